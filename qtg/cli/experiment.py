"""``qtg experiment``: a model under interventions over a corpus, each against the unmodified model, with CIs."""

from __future__ import annotations

import argparse
import json

from qtg.checkpoint import load
from qtg.cli.common import add_model_args, check_tokenizer, load_model
from qtg.cli.table import format_table
from qtg.data import split_documents
from qtg.experiments import ExperimentError, Interval, head_importance, prepare, side_by_side, sweep
from qtg.experiments.bootstrap import DEFAULT_RESAMPLES
from qtg.experiments.corpus import read_documents
from qtg.experiments.heldout import SHIPPED_SPLIT
from qtg.experiments.sweep import DEFAULT_SAMPLE
from qtg.intervention import Intervention

# configs/nano.yaml and configs/nano-baseline.yaml: validation and test tenths of the bytes, split seed 0

HELP = """Ask a model a causal question over a corpus and get an answer with an error bar.

Every window of the data (cut as `qtg eval` cuts it: each document as [EOS] + its
tokens, in non-overlapping windows of the model's context) is scored by the
unmodified model and under each --intervene, a per-call edit of the forward pass
(the weights are untouched). For each condition it prints the loss (nats/token),
bits per byte, and the change against the unmodified model on the same windows
with a paired bootstrap 95% confidence interval over windows (seeded: the same
command gives the same numbers). An interval that excludes 0 means the change
is larger than the window-to-window noise of this corpus.

On a seeded sample of windows (--sample) it also measures each block's per-head
attention entropy and mean attended distance, and the bottleneck distance
between the TopoFilter's soft-min H0 diagram and the exact H0 diagram of the
same token cloud (QTG models); --json holds them all.

--heads ablates every attention head alone and ranks heads by the loss they
cost; --baseline NAME ranks a second model's heads beside them.

Interventions (keys of qtg.Intervention): topo=exact|off (the exact H0 death
or no TopoFilter), theta=, tau=, temperature= (the TopoFilter's knobs), gamma=
(every head's gamma), gamma_scale=, positions=none (no ALiBi), ablate=B:H,H
(0-based block:heads), topo_weight=gate:C (a control: w = 1 for a repeated
token, C for a first occurrence). Several keys in one condition:
topo=exact,gamma=1. A baseline model takes only ablate=."""

EXAMPLES = """examples:
  qtg experiment --model nano --data assets/corpus --split test \
      --intervene topo=exact --intervene topo=off --intervene gamma=1
      the TopoFilter exact or off, and gamma = 1, each against nano as trained, on the held-out works
  qtg experiment --model nano --data assets/corpus --split test --intervene positions=none --max-windows 200 --json
      a quick look (200 windows drawn with --seed); one JSON object on stdout
  qtg experiment --model nano --data assets/corpus --split test --heads --baseline nano-baseline --max-windows 100
      which heads matter, QTG and its baseline side by side
  qtg experiment --checkpoint runs/nano --data my_texts/ --intervene "theta=0.2,tau=0.5"
      your own weights and texts, two TopoFilter knobs changed together"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="interventions over a corpus, with bootstrap confidence intervals",
                       description=HELP, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="PATH", help="a .txt/.txt.gz/.jsonl file or a directory of them")
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="only these works of --data, split as the shipped configs split it (whole works by bytes: "
                        "val 0.1, test 0.1, seed 0)")
    p.add_argument("--intervene", metavar="SPEC", action="append", default=[],
                   help="one condition (repeat for more), e.g. topo=exact, gamma=1, ablate=0:1")
    p.add_argument("--heads", action="store_true", help="also ablate each head alone and rank heads by delta loss")
    p.add_argument("--baseline", metavar="NAME",
                   help="with --heads: a second model (shipped name or checkpoint) whose heads are ranked beside")
    p.add_argument("--max-windows", type=int, metavar="N", help="score N windows drawn with --seed (default all)")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
                   help=f"windows with attention statistics and exact H0 (default {DEFAULT_SAMPLE})")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0, help="fixes the window draws and the bootstrap (default 0)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                   help=f"bootstrap resamples (default {DEFAULT_RESAMPLES})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    interventions = [Intervention.parse(spec) for spec in args.intervene]  # before loading anything
    if args.baseline and not args.heads:
        raise ExperimentError("--baseline ranks a second model's heads: give --heads too")
    if not interventions and not args.heads:
        raise ExperimentError("nothing to compare: give at least one --intervene SPEC, or --heads")
    model = load_model(args)
    for iv in interventions:  # refuse a baseline's topo= before the data is read
        iv.check(model)
    kw = {"batch_size": args.batch_size, "seed": args.seed, "resamples": args.resamples, "progress": not args.json}
    docs = _documents(args)
    corpus = prepare(model, docs, max_windows=args.max_windows, seed=args.seed)
    result = sweep(model, corpus, interventions, sample=args.sample, **kw)
    rankings = []
    if args.heads:
        rankings.append(head_importance(model, corpus, **kw))
        if args.baseline:
            other = load(args.baseline, device=args.device, dtype=args.dtype).eval()
            check_tokenizer(other)
            rankings.append(head_importance(other, prepare(other, docs, max_windows=args.max_windows,
                                                           seed=args.seed), **kw))
    if args.json:
        print(json.dumps({**result.to_dict(), "heads": [r.to_dict() for r in rankings] or None}))
    else:
        print(_report(result))
        if rankings:
            print()
            print(_heads_report(rankings))
    return 0


def _documents(args: argparse.Namespace) -> list:
    """--data, or its --split part (as the shipped configs split it)."""
    docs = read_documents(args.data)
    if args.split:
        docs = getattr(split_documents(docs, **SHIPPED_SPLIT), args.split)
        if not docs:
            raise ExperimentError(f"--split {args.split}: that split of {args.data} holds no work")
    return docs


def _ci(iv: Interval, digits: int = 4, sign: bool = False) -> str:
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(iv.estimate)} [{f.format(iv.low)}, {f.format(iv.high)}]"


def _opt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _report(result) -> str:
    c = result.corpus.summary()
    head = (f"{result.model} ({result.arch}) on {len(c['documents'])} documents: {c['windows']:,} windows, "
            f"{c['tokens']:,} tokens, {c['bytes']:,} bytes. Paired bootstrap 95% CI over windows "
            f"({result.resamples} resamples, seed {result.seed}); attention and H0 on {len(result.sample)} "
            "sampled windows (--json).")
    rows = []
    for cond in result.conditions:
        d = cond.to_dict()
        rows.append([cond.name, f"{cond.loss:.4f}", _ci(cond.bits_per_byte), _ci(cond.delta_bits_per_byte, sign=True),
                     _ci(cond.delta_loss, sign=True), _opt(d["mean_topo_weight"]), _opt(d["bottleneck_h0_mean"], 4)])
    table = format_table(["condition", "loss", "bits/byte [95% CI]", "delta bits/byte [95% CI]",
                          "delta loss [95% CI]", "mean w", "H0 bottleneck"], rows, right={1})
    return head + "\n\n" + table


def _heads_report(rankings) -> str:
    headers = ["rank"]
    for r in rankings:
        headers += [f"{r.model} head", "delta loss [95% CI]"]
    rows = []
    for rank, effects in enumerate(side_by_side(rankings), start=1):
        row = [str(rank)]
        for e in effects:
            row += ["", ""] if e is None else [e.label, _ci(e.delta_loss, sign=True)]
        rows.append(row)
    note = "Heads as block:head, 0-based (ablate=B:H); delta loss in nats/token, ablated minus unmodified."
    return note + "\n\n" + format_table(headers, rows, right={0})
