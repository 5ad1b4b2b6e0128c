"""GeoAttention kernels side by side: time and peak memory, with ratios.

    python benchmarks/bench_attention.py                 # CPU: N = 256, 1024, 4096
    python benchmarks/bench_attention.py --n 256 1024 --repeats 5 --json out.json

Implementations, all causal, B=1, H=4, d_h=64 by default:

* ``reference`` - qtg's matmul form (sqrt-simplex, BC = <sqrt p, sqrt q>, float32);
* ``flex``      - qtg's flex_attention path (forward only on CPU in torch 2.13);
* ``sdpa``      - torch's plain dot-product causal attention, the speed baseline;
* ``seed``      - the seed sketch's form, an ``[B, H, N, N, d_h]`` tensor (only
  where its estimated memory fits under ``--seed-limit-gb``).

Runs are interleaved (every case once per round, ``--repeats`` rounds) and the
median is reported, so machine noise hits all cases alike; read the ratio
columns, not the absolute milliseconds. Peak memory is the process's extra
resident memory (CPU: VmHWM after resetting it through /proc/self/clear_refs)
or ``torch.cuda.max_memory_allocated`` (GPU), above what was resident before.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from qtg.model.fisher_rao import attention_flex, attention_reference, sqrt_simplex


@dataclass
class Result:
    impl: str
    n: int
    mode: str  # "fwd" or "fwd+bwd"
    ms: float | None
    peak_mb: float | None
    first_call_s: float | None = None
    note: str = ""


# --- the implementations, each a function of raw (q, k, v) ---------------------------


def seed_form_distances(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The seed sketch's N x N x d_h form of d_FR, kept here only as a baseline to time.

    Materialises ``[B, H, N, N, d_h]``; the model never uses it.
    """
    bc = torch.sqrt(p.unsqueeze(-2) * q.unsqueeze(-3)).sum(-1)  # [B, H, N, N]
    return torch.acos(bc.clamp(-1.0, 1.0))


def run_reference(q, k, v, gamma):
    return attention_reference(sqrt_simplex(q), sqrt_simplex(k), v, gamma)


def run_flex(q, k, v, gamma):
    return attention_flex(sqrt_simplex(q), sqrt_simplex(k), v, gamma)


def run_sdpa(q, k, v, gamma):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def run_seed(q, k, v, gamma):
    """The seed's formulation: elementwise sqrt(p q) summed over an N x N x d_h tensor."""
    p, qq = F.softmax(q.float(), -1), F.softmax(k.float(), -1)
    dist = seed_form_distances(p, qq)  # [B, H, N, N] via [B, H, N, N, d_h]
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    scores = (-gamma.view(1, -1, 1, 1) * dist**2).masked_fill(mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(v.dtype)


IMPLS = {"reference": run_reference, "flex": run_flex, "sdpa": run_sdpa, "seed": run_seed}


# --- measurement -----------------------------------------------------------------------


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_once(fn, inputs, backward: bool, device) -> tuple[float, float | None]:
    """(seconds, extra peak MB) of one call."""
    q, k, v, gamma = inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _proc_kb("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS high-water mark
        except OSError:
            base = None
    _sync(device)
    t0 = time.perf_counter()
    out = fn(q, k, v, gamma)
    if backward:
        out.float().square().mean().backward()
    _sync(device)
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = None if base is None else (_proc_kb("VmHWM") * 1024 - base) / 2**20
    for t in (q, k, v):
        t.grad = None
    return dt, peak


def make_inputs(n: int, heads: int, head_dim: int, device, dtype, backward: bool):
    g = torch.Generator(device="cpu").manual_seed(n)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, torch.ones(heads, device=device)


def seed_form_gb(n: int, heads: int, head_dim: int) -> float:
    return 3 * heads * n * n * head_dim * 4 / 2**30  # p*q, its sqrt and the grad-saved copy


def bench(args) -> list[Result]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = ["fwd", "fwd+bwd"]
    results: list[Result] = []
    for n in args.n:
        for mode in modes:
            backward = mode == "fwd+bwd"
            cases = {}
            for name in args.impls:
                if name == "flex" and backward and device.type != "cuda":
                    results.append(Result(name, n, mode, None, None, note="no CPU backward in torch 2.13"))
                    continue
                if name == "seed" and seed_form_gb(n, args.heads, args.head_dim) > args.seed_limit_gb:
                    results.append(Result(name, n, mode, None, None,
                                          note=f"needs ~{seed_form_gb(n, args.heads, args.head_dim):.0f} GB"))
                    continue
                cases[name] = make_inputs(n, args.heads, args.head_dim, device, dtype, backward)
            first = {}
            for name, inputs in cases.items():  # warm-up; for flex this is the compile
                t0 = time.perf_counter()
                IMPLS[name](*inputs)
                _sync(device)
                first[name] = time.perf_counter() - t0
            times = {name: [] for name in cases}
            peaks = {name: [] for name in cases}
            for _ in range(args.repeats):
                for name, inputs in cases.items():
                    dt, peak = measure_once(IMPLS[name], inputs, backward, device)
                    times[name].append(dt)
                    if peak is not None:
                        peaks[name].append(peak)
            for name in cases:
                results.append(Result(name, n, mode, 1e3 * statistics.median(times[name]),
                                      max(peaks[name]) if peaks[name] else None, first_call_s=first[name]))
            print(f"  measured N={n} {mode}", file=sys.stderr)
    return results


def print_table(results: list[Result], device: str) -> None:
    by_key = {(r.impl, r.n, r.mode): r for r in results}
    header = (f"{'N':>5}  {'mode':<8} {'impl':<10} {'ms':>9} {'x sdpa':>8} {'x ref':>7} {'peak MB':>9} "
              f"{'first call s':>12}  note")
    print(f"GeoAttention kernels on {device} (median, interleaved runs)")
    print(header)
    print("-" * len(header))
    for r in results:
        sdpa, ref = by_key.get(("sdpa", r.n, r.mode)), by_key.get(("reference", r.n, r.mode))

        def ratio(base, r=r):
            return f"{r.ms / base.ms:.2f}" if r.ms and base and base.ms else "-"

        ms = f"{r.ms:.1f}" if r.ms is not None else "-"
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"
        first = f"{r.first_call_s:.2f}" if r.first_call_s is not None else "-"
        print(f"{r.n:>5}  {r.mode:<8} {r.impl:<10} {ms:>9} {ratio(sdpa):>8} {ratio(ref):>7} {peak:>9} "
              f"{first:>12}  {r.note}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[256, 1024, 4096], help="sequence lengths")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed-limit-gb", type=float, default=4.0, help="skip the seed's form above this estimate")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    results = bench(args)
    print_table(results, f"{args.device} ({torch.get_num_threads()} threads, torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
