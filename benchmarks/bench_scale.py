"""One training step and one generation on the largest tier that fits this device, QTG beside its baseline.

    python benchmarks/bench_scale.py                    # GPU: bf16; the largest tier that fits, per mode
    python benchmarks/bench_scale.py --tier micro       # any tier (on CPU this is the smoke run)

For each architecture (QTG, then the same-size dot-product baseline, ``qtg.baseline_of``):

* training: AdamW on float32 master weights under bf16 autocast (CUDA), batch 1 at ``--seq-len``;
  tokens/s over ``--steps`` timed steps after ``--warmup``, peak memory, and MFU = achieved / peak FLOP/s.
  FLOPs per token = 6 P + 12 L d T (weights forward and backward, plus the N x N attention scores and
  their use, for a causal sequence of T tokens; the Fisher-Rao form's elementwise arccos is not counted,
  so QTG's MFU is the fraction of peak doing the same useful work as the baseline's).
* generation: bf16 weights, greedy, with the decoding cache; tokens/s and memory-bandwidth utilisation
  MBU = (weight bytes + mean cache bytes read per step) x tokens/s / peak bandwidth.

The largest tier is picked per mode from ``qtg.memory_estimate`` against the free device memory, so
training and generation may use different tiers. Peaks are looked up from the device name (H100 SXM,
H200) or given with ``--peak-tflops`` / ``--peak-gbps``; on CPU MFU and MBU are left blank. The QTG /
baseline ratios are the figures to read: both run in one process, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import qtg
from qtg.generate import generate
from qtg.model.memory import available_memory, human_bytes, memory_estimate

# dense bf16 tensor-core FLOP/s and HBM bytes/s, from the vendors' datasheets (SXM parts)
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}
SEED_TIERS = ("base", "7b", "30b", "100b")


@dataclass
class Result:
    arch: str
    tier: str
    params: int
    tokens_per_s: float
    peak_bytes: int | None
    utilisation: float | None  # MFU (training) or MBU (generation)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peaks(device: torch.device, tflops: float | None, gbps: float | None) -> tuple[float | None, float | None]:
    flops, bw = None, None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (f, b) in PEAKS.items():
            if key in name:
                flops, bw = f, b
    return (tflops * 1e12 if tflops else flops), (gbps * 1e9 if gbps else bw)


def largest_fitting(device: torch.device, mode: str) -> str:
    """The largest seed tier whose bf16 ``mode`` estimate fits the free GPU memory now (else nano; nano on CPU)."""
    if device.type != "cuda":
        return "nano"
    have = available_memory(device)
    fits = [t for t in SEED_TIERS if memory_estimate(t, "bf16", mode).total < 0.9 * have]
    return fits[-1] if fits else "nano"


def train_flops_per_token(cfg, params: int, seq_len: int) -> float:
    return 6 * params + 12 * cfg.n_layers * cfg.d_model * seq_len


def bench_train(cfg, device, seq_len: int, steps: int, warmup: int, peak_flops: float | None) -> Result:
    model = qtg.build(cfg, device=device, seed=0).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, targets=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tps = seq_len / step
    mfu = tps * train_flops_per_token(cfg, params, seq_len) / peak_flops if peak_flops else None
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, opt
    return Result(cfg.arch, cfg.name, params, tps, peak, mfu)


def bench_generate(cfg, device, prompt_len: int, new_tokens: int, peak_bw: float | None) -> Result:
    dtype = "bf16" if device.type == "cuda" else "fp32"
    model = qtg.build(cfg, device=device, dtype=dtype, seed=0).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    generate(model, ids, 4, temperature=0)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    generate(model, ids, new_tokens, temperature=0)
    sync(device)
    tps = new_tokens / (time.perf_counter() - t0)
    bytes_per_param = 2 if dtype == "bf16" else 4
    mean_len = prompt_len + new_tokens / 2
    cache = memory_estimate(cfg, dtype, "inference", seq_len=int(mean_len)).kv_cache
    mbu = (params * bytes_per_param + cache) * tps / peak_bw if peak_bw else None
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model
    return Result(cfg.arch, cfg.name, params, tps, peak, mbu)


def row(kind: str, r: Result) -> str:
    util = "-" if r.utilisation is None else f"{100 * r.utilisation:.1f}%"
    mem = "-" if r.peak_bytes is None else human_bytes(r.peak_bytes)
    count = qtg.model.memory.human_count(r.params)
    return f"{kind:9s} {r.tier:15s} {r.arch:9s} {count:>9s} {r.tokens_per_s:>12,.1f} " \
           f"{util:>8s} {mem:>10s}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tier", help="one tier for both modes (default: the largest that fits, per mode)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seq-len", type=int, default=None, help="training sequence (default: the tier's context)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    p.add_argument("--peak-gbps", type=float, default=None, help="override the device's memory bandwidth")
    args = p.parse_args(argv)
    device = qtg.model.builder.resolve_device(args.device)
    peak_flops, peak_bw = peaks(device, args.peak_tflops, args.peak_gbps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}; peaks: "
          f"{'-' if peak_flops is None else f'{peak_flops / 1e12:.0f} TFLOP/s'}, "
          f"{'-' if peak_bw is None else f'{peak_bw / 1e9:.0f} GB/s'}")
    print(f"{'mode':9s} {'tier':15s} {'arch':9s} {'params':>9s} {'tokens/s':>12s} {'MFU/MBU':>8s} {'peak mem':>10s}")
    ratios = []
    for kind in ("train", "generate"):
        tier = args.tier or largest_fitting(device, "train" if kind == "train" else "inference")
        results = []
        for cfg in (qtg.get_tier(tier), qtg.baseline_of(qtg.get_tier(tier))):
            if kind == "train":
                seq = min(args.seq_len or cfg.max_seq_len, cfg.max_seq_len)
                r = bench_train(cfg, device, seq, args.steps, args.warmup, peak_flops)
            else:
                r = bench_generate(cfg, device, args.prompt_len, args.new_tokens, peak_bw)
            results.append(r)
            print(row(kind, r), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ratios.append((kind, results[1].tokens_per_s / results[0].tokens_per_s))
    for kind, ratio in ratios:
        print(f"{kind}: baseline tokens/s / QTG tokens/s = {ratio:.2f} (the cost of Fisher-Rao attention)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
