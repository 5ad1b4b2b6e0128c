#!/usr/bin/env bash
# Prints every number of assets/checkpoints/README.md (run from the repository root).
set -euo pipefail
Q=.venv/bin/qtg
held=$(mktemp -d)
# The test works of configs/nano.yaml's split: never trained on, never used to choose a checkpoint.
for w in $(.venv/bin/python -c "
from qtg.data import default_corpus_path, load_documents, split_documents
from qtg.train_config import load_config
d = load_config('configs/nano.yaml').data
works = split_documents(load_documents(default_corpus_path()), val_fraction=d.val_fraction,
                        test_fraction=d.test_fraction, seed=d.split_seed)
print(' '.join(w.name for w in works.test))"); do
  cp assets/corpus/$w.txt.gz "$held/"
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
