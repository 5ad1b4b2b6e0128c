"""The model card's ablation table: the shipped nano models on the test works, each with its CI.

    python benchmarks/ablation_table.py                       # every shipped nano model, every test window
    python benchmarks/ablation_table.py --models nano nano-notopo --max-windows 200

Every model is scored on the same windows of the test works of
``configs/nano.yaml``'s split (never trained on, never used to choose a
checkpoint) by :func:`qtg.experiments.compare_models`: its bits per byte with a
bootstrap 95% interval over windows, and its difference from nano with a
paired one (the models share nano's tokenizer and context, so a window is one
pair) and with the interval across the works, which the verdict reads
(windows of one work are not independent; ``qtg compare`` prints the same).
Training speed is not here: the runs shared the machine with other work, so
``benchmarks/bench_train_throughput.py`` measures it side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import qtg
from qtg.data.pipeline import default_corpus_path, load_documents, split_documents
from qtg.experiments import compare_models
from qtg.training.train_config import load_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["nano", "nano-seed", "nano-notopo", "nano-baseline", "nano-baseline-alibi"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS, help="shipped model names (the first is the reference)")
    ap.add_argument("--max-windows", type=int, default=None, help="score this many windows (default: all)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = load_config(ROOT / "configs" / "nano.yaml").data
    test = split_documents(load_documents(default_corpus_path()), val_fraction=d.val_fraction,
                           test_fraction=d.test_fraction, seed=d.split_seed).test
    models = {name: qtg.load(name) for name in args.models}  # a name without shipped weights is refused
    random = [name for name, m in models.items() if m.random_weights]
    if random:
        raise SystemExit(f"no shipped weights for {', '.join(random)}: train and export them first (model card)")
    scores = compare_models(models, test, max_windows=args.max_windows, resamples=args.resamples, progress=True)
    print(f"test works: {', '.join(w.name for w in test)}; {args.resamples} bootstrap resamples")
    works = scores[-1].works.interval if len(scores) > 1 else None
    if works is not None:
        print(f"minus {args.models[0]}: paired over windows (these texts), and across the {works.n} works "
              f"({works.method})")
    print(f"{'model':<22}{'params':>11}{'loss':>8}{'bits/byte [95% CI]':>28}{'minus ' + args.models[0]:>32}"
          f"{'across works':>22}  verdict")
    for s in scores:
        b, dlt = s.bits_per_byte, s.delta_bits_per_byte
        params = sum(p.numel() for p in models[s.name].parameters())
        gap = "" if dlt is None else f"{dlt.estimate:+.4f} [{dlt.low:+.4f}, {dlt.high:+.4f}]"
        across = "" if s.works is None else f"[{s.works.interval.low:+.4f}, {s.works.interval.high:+.4f}]"
        print(f"{s.name:<22}{params:>11,}{s.loss:>8.4f}{b.estimate:>10.4f} [{b.low:.4f}, {b.high:.4f}]{gap:>32}"
              f"{across:>22}  {'' if s.works is None else s.works.verdict()}")
    if args.json:
        args.json.write_text(json.dumps([s.to_dict() for s in scores], indent=1))


if __name__ == "__main__":
    main()
