"""``qtg experiment``: a model under interventions over a corpus, each against the unmodified model, with CIs."""

from __future__ import annotations

import argparse
import json

from qtg.cli.common import add_data_args, add_model_args, check_tokenizer, load_model, read_data
from qtg.cli.table import format_table
from qtg.experiments import ExperimentError, Interval, head_importance, prepare, side_by_side, sweep
from qtg.experiments.bootstrap import DEFAULT_RESAMPLES, format_ci
from qtg.experiments.sweep import DEFAULT_SAMPLE
from qtg.model.intervention import Intervention
from qtg.model.loading import load

HELP = """Ask a model a causal question over a corpus and get an answer with an error bar.

Every window of the data (cut as `qtg eval` cuts it: each document as [EOS] + its
tokens, in non-overlapping windows of the model's context) is scored by the
unmodified model and under each --intervene, a per-call edit of the forward pass
(the weights are untouched). For each condition it prints the loss (nats/token),
bits per byte, and the change against the unmodified model on the same windows
with two 95% confidence intervals (seeded: the same command gives the same
numbers): a paired bootstrap over windows, for these texts, and an interval
across works (windows of one work are not independent), for other texts: a
cluster bootstrap by work, or with fewer than 6 works a t-interval over the
per-work changes (the table's header says which). The verdict reads the
interval across works: better, worse, or no difference detected (± its
half-width); the change in each work is printed below the table.

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
    add_data_args(p)
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
    docs = read_data(args)
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


def _ci(iv: Interval, digits: int = 4, sign: bool = False) -> str:
    return format_ci(iv.estimate, [iv.low, iv.high], digits, sign)


def _opt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _figure(d: dict, key: str, digits: int) -> str:
    """A TopoFilter figure, or "= plain" where the condition cannot move it (the filter precedes its knob)."""
    return "= plain" if key in d["unchanged"] else _opt(d[key], digits)


def works_note(method: str | None, n_works: int) -> str:
    """The header's words for the interval across works."""
    works = f"the {n_works} works" if n_works != 1 else "the one work"
    return f"across {works} ({method})" if method else f"across {works}"


def per_work_table(names: list[str], per_work: list[dict[str, float] | None], what: str) -> str:
    """One row per condition (or model), one column per work: each work's change."""
    works = list(dict.fromkeys(w for pw in per_work if pw for w in pw))
    rows = [[name, *(f"{pw[w]:+.4f}" if pw and w in pw else "-" for w in works)] for name, pw in zip(names, per_work)]
    return f"{what} in each work:\n\n" + format_table(["", *works], rows, right=set(range(1, len(works) + 1)))


def _report(result) -> str:
    c = result.corpus.summary()
    changed = [cond.to_dict() for cond in result.conditions[1:]]
    method = changed[0]["works_method"] if changed else None
    n_works = changed[0]["n_works"] if changed else len(c["documents"])
    head = (f"{result.model} ({result.arch}) on {len(c['documents'])} documents: {c['windows']:,} windows, "
            f"{c['tokens']:,} tokens, {c['bytes']:,} bytes. 95% CIs: paired bootstrap over windows (these texts) "
            f"and {works_note(method, n_works)}; {result.resamples} resamples, seed {result.seed}. Verdicts read "
            f"the interval across works. Attention and H0 on {len(result.sample)} sampled windows (--json); "
            "'= plain': the condition cannot change that figure (the TopoFilter precedes its knob).")
    rows = []
    for cond in result.conditions:
        d = cond.to_dict()
        works = cond.delta_bits_per_byte_works
        first = cond is result.conditions[0]
        rows.append([cond.name, f"{cond.loss:.4f}", _ci(cond.bits_per_byte), _ci(cond.delta_bits_per_byte, sign=True),
                     "-" if first else format_ci(works.interval.estimate, d["ci95_works"], sign=True),
                     "-" if first else works.verdict(), _ci(cond.delta_loss, sign=True),
                     _figure(d, "mean_topo_weight", 3), _figure(d, "bottleneck_h0_mean", 4)])
    table = format_table(["condition", "loss", "bits/byte [95% CI]", "Δ bits/byte, these texts [95% CI]",
                          "Δ bits/byte across works [95% CI]", "verdict", "Δ loss, these texts [95% CI]",
                          "mean w", "H0 bottleneck"], rows, right={1})
    works = per_work_table([d["name"] for d in changed], [d["per_work"] for d in changed], "Δ bits/byte")
    return head + "\n\n" + table + ("\n\n" + works if changed else "")


def _heads_report(rankings) -> str:
    headers = ["rank"]
    for r in rankings:
        headers += [f"{r.model} head", "Δ loss, these texts [95% CI]", "across works [95% CI]"]
    rows = []
    for rank, effects in enumerate(side_by_side(rankings), start=1):
        row = [str(rank)]
        for e in effects:
            row += ["", "", ""] if e is None else [
                e.label, _ci(e.delta_loss, sign=True),
                format_ci(e.delta_loss_works.interval.estimate, e.delta_loss_works.to_dict()["ci95_works"], sign=True)]
        rows.append(row)
    works = rankings[0].heads[0].delta_loss_works.interval if rankings and rankings[0].heads else None
    note = ("Heads as block:head, 0-based (ablate=B:H); Δ loss in nats/token, ablated minus unmodified; "
            + (f"{works_note(works.method, works.n)}." if works else ""))
    return note + "\n\n" + format_table(headers, rows, right={0})
