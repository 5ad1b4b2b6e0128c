"""Generation speed: QTG vs its same-size baseline, with and without the cache.

    python benchmarks/bench_generate.py                      # the shipped nano and nano-baseline
    python benchmarks/bench_generate.py --models micro --new-tokens 100

Greedy decoding, batch 1, a fixed prompt; cases are interleaved (each runs
once per round, ``--repeats`` rounds) and the median is reported, so read the
ratios. Each case's tokens are checked to be identical with and without the
cache (greedy decoding must not depend on it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import qtg
from qtg.generate import generate

PROMPT_IDS = [0, 17, 42, 99, 7, 300, 12, 5]


def time_generation(model, ids: torch.Tensor, new_tokens: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = generate(model, ids, new_tokens, temperature=0, use_cache=use_cache)
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["nano", "nano-baseline"],
                   help="names for qtg.load: shipped models, tiers or checkpoint directories")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    models = {name: qtg.load(name).eval() for name in args.models}
    ids = torch.tensor([PROMPT_IDS])
    cases = [(name, cache) for name in models for cache in (True, False)]
    times: dict = {c: [] for c in cases}
    outputs: dict = {}
    for _ in range(args.repeats):
        for name, cache in cases:
            dt, out = time_generation(models[name], ids, args.new_tokens, cache)
            times[(name, cache)].append(dt)
            outputs[(name, cache)] = out
    print(f"greedy generation, batch 1, {len(PROMPT_IDS)}-token prompt, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    print(f"{'model':<16} {'cache':<6} {'tok/s':>8} {'x no-cache':>11} {'x ' + args.models[0]:>12}  same tokens")
    first = statistics.median(times[(args.models[0], True)])
    for name, cache in cases:
        med = statistics.median(times[(name, cache)])
        speedup = statistics.median(times[(name, False)]) / med
        same = torch.equal(outputs[(name, True)], outputs[(name, False)])
        print(f"{name:<16} {'yes' if cache else 'no':<6} {args.new_tokens / med:>8.0f} {speedup:>11.2f} "
              f"{first / med:>12.2f}  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
