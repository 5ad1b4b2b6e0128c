#!/usr/bin/env bash
# Prints every number of assets/checkpoints/README.md (run from the repository root).
set -euo pipefail
Q=.venv/bin/qtg
held=$(mktemp -d)
for w in alls_well_that_ends_well henry_vi_part_3 tragedy_of_titus_andronicus two_gentlemen_of_verona; do
  cp assets/corpus/$w.txt.gz "$held/"   # the held-out works of configs/nano.yaml's split
done
for m in nano nano-baseline; do
  $Q eval --checkpoint assets/checkpoints/$m --data "$held" --json --device cpu
done
.venv/bin/python benchmarks/bench_generate.py --models nano nano-baseline --new-tokens 200 --repeats 3
passage=$held/passage.txt
.venv/bin/python -c "
from qtg.data import load_documents, default_corpus_path
d = next(d for d in load_documents(default_corpus_path()) if d.name == 'two_gentlemen_of_verona')
i = d.text.find('VALENTINE.'); open('$passage', 'w').write(d.text[i:i + 690])"
$Q topo --tier nano --file "$passage" --layer all --device cpu
