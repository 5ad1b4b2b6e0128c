"""``qtg eval``: loss, perplexity and bits per byte on a text, file or directory."""

from __future__ import annotations

import argparse
import json

from qtg.cli.common import add_model_args, load_model
from qtg.model.intervention import Intervention
from qtg.training.evaluate import evaluate

HELP = """Score a model on text: mean loss per token (nats), perplexity, and bits per
byte = total negative log-likelihood in bits / raw UTF-8 bytes of the text. Bits
per byte compares models with different tokenizers. Each document is scored as
[EOS] + its tokens in non-overlapping windows of the model's context, so every
byte is paid for. --intervene scores the model with one forward-pass edit (the
weights are untouched), e.g. the exact TopoFilter (topo=exact), no TopoFilter
(topo=off), gamma = 1 in every head (gamma=1), no ALiBi (positions=none) or
heads ablated (ablate=0:1,2 for block 0's heads 1 and 2)."""

EXAMPLES = """examples:
  qtg eval --data assets/corpus/hamlet.txt.gz                       the shipped nano (the default)
  qtg eval --model nano-baseline --data assets/corpus/hamlet.txt.gz   any shipped model, by name
  qtg eval --checkpoint runs/nano --data my_texts/ --json            your own weights
  qtg eval --data assets/corpus/hamlet.txt.gz --intervene topo=exact"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte on text", description=HELP,
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="PATH", help="a .txt/.txt.gz/.jsonl file or a directory of them")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--intervene", metavar="SPEC", default=None,
                   help="score under an intervention: topo=exact|off, theta=, tau=, temperature=, gamma=, "
                        "gamma_scale=, positions=none, ablate=BLOCK:HEADS, topo_weight=gate:C (see qtg.Intervention)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    intervene = Intervention.parse(args.intervene) if args.intervene else None  # before loading anything
    model = load_model(args)
    result = evaluate(model, args.data, batch_size=args.batch_size, progress=not args.json, intervene=intervene)
    condition = intervene.name if intervene else "plain"
    if args.json:
        print(json.dumps({"model": model.cfg.label, "intervention": condition, **result.to_dict()}))
    else:
        print(f"{model.cfg.label} ({condition}): loss {result.loss:.4f} nats/token, "
              f"perplexity {result.perplexity:.2f}, {result.bits_per_byte:.4f} bits/byte "
              f"({result.tokens:,} tokens, {result.bytes:,} bytes, {result.documents} documents)")
    return 0
