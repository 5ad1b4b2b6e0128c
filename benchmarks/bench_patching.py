"""Cost of the circuit methods (qtg.experiments.patching) against the passes they are made of, side by side.

    python benchmarks/bench_patching.py                 # shipped nano and nano-baseline, 1 thread
    python benchmarks/bench_patching.py --models nano --repeats 5

Three ratios, each timed interleaved over ``--repeats`` rounds in one process (median reported):

* attribution patching of every head at every position of a 256-token pair,
  against one forward + backward of that pair (target <= 3x);
* real (activation) patching of every head at every position of a 64-token
  pair, batched, against attribution patching of the same pair (target <= 10x);
* peak memory of ``run_with_cache`` with one name asked, against a plain
  forward (target within 10 %): each measured in a fresh process as the rise
  of its peak RSS over the RSS just before the call (batch 32 x 256 tokens, no
  gradients), median of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import qtg
from qtg.experiments import activation_patching, attribution_patching

MEMORY_CHILD = """
import resource, sys, torch, qtg
torch.set_num_threads(1)
model = qtg.load(sys.argv[1]).eval()
ids = torch.randint(0, model.cfg.vocab_size, (32, 256), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(ids[:1, :8])  # allocator and kernels warm, on a size that cannot set the peak
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024  # RSS now, KiB
    if sys.argv[2] == "plain":
        model(ids)
    elif sys.argv[2] == "one":
        model.run_with_cache(ids, ["blocks.1.attn.out"])
    else:
        model.run_with_cache(ids)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def pair(model, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    clean = torch.randint(0, model.cfg.vocab_size, (1, n), generator=g)
    corrupt = clean.clone()
    corrupt[0, n // 3] = (corrupt[0, n // 3] + 1) % model.cfg.vocab_size
    return clean, corrupt


def forward_backward(model, ids: torch.Tensor) -> None:
    with torch.enable_grad():
        logits = model(ids).logits
        torch.autograd.grad(logits[0, -1, 5] - logits[0, -1, 7], [p for p in model.parameters()][:1])


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timings(model, repeats: int) -> dict[str, float]:
    """Median seconds of each case over ``repeats`` interleaved rounds."""
    long_pair, short_pair = pair(model, 256), pair(model, 64)
    cases = {"fb256": lambda: forward_backward(model, long_pair[0]),
             "attr256": lambda: attribution_patching(model, *long_pair, 5, 7, site="heads"),
             "attr64": lambda: attribution_patching(model, *short_pair, 5, 7, site="heads"),
             "real64": lambda: activation_patching(model, *short_pair, 5, 7, site="heads")}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            times[key].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def peak_rss_kib(model: str, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, model, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["nano", "nano-baseline"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        med = timings(qtg.load(name).eval(), args.repeats)
        memory = {mode: statistics.median(peak_rss_kib(name, mode) for _ in range(args.repeats))
                  for mode in ("plain", "one", "all")}
        rows.append((name, med, memory))
    print(f"threads {args.threads}, median of {args.repeats} interleaved rounds; "
          "peak = rise of ru_maxrss in a fresh process")
    print(f"{'model':<15}{'fwd+bwd 256':>12}{'attr 256':>10}{'ratio':>7}{'attr 64':>9}{'real 64':>9}{'ratio':>7}"
          f"{'peak plain':>12}{'one name':>10}{'ratio':>7}{'all names':>11}")
    for name, med, mem in rows:
        print(f"{name:<15}{med['fb256'] * 1e3:>10.1f}ms{med['attr256'] * 1e3:>8.1f}ms"
              f"{med['attr256'] / med['fb256']:>6.2f}x{med['attr64'] * 1e3:>7.1f}ms{med['real64'] * 1e3:>7.1f}ms"
              f"{med['real64'] / med['attr64']:>6.2f}x{mem['plain'] / 1024:>9.1f}MiB{mem['one'] / 1024:>7.1f}MiB"
              f"{mem['one'] / mem['plain']:>6.2f}x{mem['all'] / 1024:>8.1f}MiB")
    print("targets: attribution <= 3x a forward+backward; real patching <= 10x attribution; one name <= 1.10x plain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
