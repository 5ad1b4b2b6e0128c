"""``qtg compare``: models side by side on the same windows, each with its seeds, against the first."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qtg.cli.common import add_data_args, check_tokenizer, read_data
from qtg.cli.experiment import per_work_table, works_note
from qtg.cli.table import format_table
from qtg.errors import ConfigError
from qtg.experiments import compare_models
from qtg.experiments.bootstrap import DEFAULT_RESAMPLES, format_ci
from qtg.model.loading import load, seed_groups, shipped_models

HELP = """Score several models on the same windows of a corpus, the first as the reference.

Each --model is one model; a comma-separated list is that model's seeds (runs of
one recipe with different seeds), scored by the mean over its seeds of each
window's loss. Each item is a shipped model name or a checkpoint directory. All
must share a tokenizer and a context, so that a window under one model and
under another form a pair.

For each model it prints bits per byte (bootstrap 95% CI over windows) and its
difference from the reference with two 95% intervals: a paired bootstrap over
windows (these texts), and one across works, for other texts (windows of one
work are not independent): a cluster bootstrap by work, or with fewer than 6
works a t-interval over the per-work differences; where a model has several
seeds, the interval also resamples the seeds (a run is better or worse on every
work). The verdict reads the interval across works: better, worse, or no
difference detected (± its half-width). The difference in each work is printed
below the table; --json holds every figure."""

EXAMPLES = """examples:
  qtg compare --model nano --model nano-baseline --model nano-notopo --data assets/corpus --split test
      the shipped models on the four test works, nano the reference
  qtg compare --model nano,nano-s1,nano-s2 --model nano-notopo,nano-notopo-s1,nano-notopo-s2 \\
      --data assets/corpus --split test --json
      two recipes of three seeds each; the interval resamples seeds and works
  qtg compare --model nano --model nano-notopo --model nano-gate --seeds --data assets/corpus --split test
      each shipped recipe with every seed shipped beside it (nano, nano-s1, nano-s2, ...)
  qtg compare --model runs/a --model runs/b --data my_texts/ --max-windows 200
      your own checkpoints on your own texts, 200 windows drawn with --seed"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="models side by side (seeds too), intervals over windows and across works",
                       description=HELP, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="NAME[,SEED...]", action="append", required=True, dest="models",
                   help="one model (repeat for more; the first is the reference); a comma-separated list is that "
                        "model's seeds. Each: a shipped model or a checkpoint directory")
    p.add_argument("--seeds", action="store_true",
                   help="each --model that names one shipped recipe also brings its shipped seeds (<name>-s1, ...)")
    add_data_args(p)
    p.add_argument("--max-windows", type=int, metavar="N", help="score N windows drawn with --seed (default all)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0, help="fixes the window draw and the bootstraps (default 0)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                   help=f"bootstrap resamples (default {DEFAULT_RESAMPLES})")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 (default auto)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, ... (default: each checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def parse_models(specs: list[str], with_seeds: bool = False) -> dict[str, list[str]]:
    """``["nano,nano-s1", "x"]`` -> ``{"nano": ["nano", "nano-s1"], "x": ["x"]}`` (a model is named by its first
    seed); each item checked to be a shipped model or a directory before anything loads. ``with_seeds``: a spec
    that is one shipped recipe becomes that recipe and its shipped seeds (:func:`seed_groups`)."""
    shipped = shipped_models()
    groups = seed_groups(shipped)
    out: dict[str, list[str]] = {}
    for spec in specs:
        items = [item.strip() for item in spec.split(",")]
        if not all(items):
            raise ConfigError(f"--model {spec!r}: an empty name in the list (names are separated by single commas)")
        if with_seeds and len(items) == 1 and items[0] in groups:
            items = groups[items[0]]
        for item in items:
            if item not in shipped and not Path(item).is_dir():
                raise ConfigError(f"--model {item!r} is neither a shipped model (shipped: {', '.join(shipped)}) "
                                  "nor a checkpoint directory")
        if len(set(items)) != len(items):
            raise ConfigError(f"--model {spec!r}: a seed is named twice")
        name = items[0]
        if name in out:
            raise ConfigError(f"--model {name!r} is given twice")
        out[name] = items
    return out


def run(args: argparse.Namespace) -> int:
    specs = parse_models(args.models, args.seeds)
    if args.max_windows is not None and args.max_windows < 1:
        raise ConfigError(f"--max-windows must be >= 1, got {args.max_windows}")
    docs = read_data(args)
    models = {}
    for name, items in specs.items():
        seeds = {}
        for item in items:
            seeds[item] = load(item, device=args.device, dtype=args.dtype).eval()
            check_tokenizer(seeds[item])
        models[name] = seeds
    scores = compare_models(models, docs, max_windows=args.max_windows, seed=args.seed, batch_size=args.batch_size,
                            resamples=args.resamples, progress=not args.json)
    if args.json:
        print(json.dumps({"models": [s.to_dict() for s in scores], "resamples": args.resamples, "seed": args.seed}))
    else:
        print(report(scores, args.resamples, args.seed))
    return 0


def report(scores: list, resamples: int, seed: int) -> str:
    """The table (one row per model), then each work's difference."""
    ref, rest = scores[0], scores[1:]
    methods = list(dict.fromkeys(s.works.interval.method for s in rest))  # seeded models have their own
    seeds = ", ".join(f"{s.name} {len(s.seeds)}" for s in scores)
    across = works_note("; ".join(methods) or None, ref.n_works)
    head = (f"Reference {ref.name}; {ref.n_works} works; seeds: {seeds}. 95% CIs: bits/byte and the paired "
            f"difference over windows (these texts); the difference {across}; {resamples} resamples, seed {seed}. "
            "Verdicts read the interval across works.")
    rows = []
    for s in scores:
        d = s.to_dict()
        bpb = format_ci(s.bits_per_byte.estimate, d["bits_per_byte_ci95"])
        if s.works is None:
            rows.append([s.name, str(len(s.seeds)), f"{s.loss:.4f}", bpb, "-", "-", "reference"])
        else:
            rows.append([s.name, str(len(s.seeds)), f"{s.loss:.4f}", bpb,
                         format_ci(d["delta_bits_per_byte"], d["ci95"], sign=True),
                         format_ci(s.works.interval.estimate, d["ci95_works"], sign=True), d["verdict"]])
    table = format_table(["model", "seeds", "loss", "bits/byte [95% CI]", f"minus {ref.name}, these texts [95% CI]",
                          "across works [95% CI]", "verdict"], rows, right={1, 2})
    if not rest:
        return head + "\n\n" + table
    per_work = per_work_table([s.name for s in rest], [s.works.per_work for s in rest], f"minus {ref.name}")
    return head + "\n\n" + table + "\n\n" + per_work
