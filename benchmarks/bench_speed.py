"""QTG's own speed on CPU, side by side with its same-size baseline, in one process.

    python benchmarks/bench_speed.py --threads 1                   # ~1.5 minutes on a quiet 2-core machine
    python benchmarks/bench_speed.py --threads 1 --malloc default  # glibc's own malloc settings, for comparison
    python benchmarks/bench_speed.py --threads 1 --ablate          # each QTG optimisation off, one at a time
    python benchmarks/bench_speed.py --quick                       # fewer rounds
    python benchmarks/bench_speed.py --threads 1 --decode-only --profile  # decoding alone, with its profile

Cases (random weights; ``--tier`` nano by default, its baseline is ``qtg.baseline_of``):

* **training step**: B = 16, N = 256, forward + backward + gradient clipping +
  AdamW (``qtg.training.optim.build_optimizer``), one step per round after warm-up steps;
* **decoding step**: cached greedy decoding, batch 1, after an 8-token prompt:
  ``--new-tokens`` (256) steps, QTG's and the baseline's, each eager and compiled
  (``qtg.model.decode.CompiledDecoder``: ``torch.compile`` of the step over a static
  cache; ``--no-compile`` leaves it out), taking turns by blocks of 16 steps; with the aten ops
  per token (``torch.profiler``, nested ops included) and, with ``--profile``, the
  top ops by self CPU time;
* **generation**: ``qtg.generate.generate`` of 256 greedy tokens with the cache
  and without it (every step re-runs the sequence): cached x uncached.
  The context is widened to fit the prompt and the new tokens (positions are
  ALiBi/RoPE, computed on the fly, so nothing else changes).

Every case runs once per round and rounds are interleaved, so load from other
processes hits all cases alike; read the ratios. "median" is the median over
rounds (steps); "best" the 10th percentile (the minimum below 10 rounds), the
run least disturbed by other processes. ``minflt`` is the minor page faults per
step (``resource.getrusage``): memory returned to the system and faulted in
again. ``--malloc keep`` (the default) first calls
``qtg.training.malloc.keep_freed_memory()``, as training should; glibc's settings cannot
be restored in-process, so ``--malloc default`` is a separate run. On a machine
shared with other jobs, use ``--threads 1``: with 2 threads on 2 busy cores
every op waits for its preempted twin (20x slower here).

``--ablate`` times QTG alone with each optimisation switched off in turn (the
previous implementation, kept here, patched in for the call), and all of them
off at once, against all on.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

import qtg
import qtg.model.model as qtg_model
from qtg.generate import generate
from qtg.model import fisher_rao, topo_filter, topo_kernels
from qtg.model.decode import CompiledDecoder, compile_unavailable
from qtg.training.malloc import keep_freed_memory
from qtg.training.optim import build_optimizer

PROMPT_IDS = [0, 17, 42, 99, 7, 300, 12, 5]


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(fn: Callable[[], object]) -> tuple[float, int]:
    """Seconds and minor page faults of one call."""
    f0, t0 = minflt(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, minflt() - f0


def train_step_fn(model, batch: int, n: int, seed: int = 0) -> Callable[[], None]:
    """One training step (forward, backward, clip, AdamW) of ``model`` on a fixed random batch."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(model.cfg.vocab_size, (batch, n + 1), generator=gen)
    x, y = data[:, :-1], data[:, 1:]
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))

    def step() -> None:
        loss = model(x, targets=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def decode_fn(model, new_tokens: int, use_cache: bool) -> Callable[[], torch.Tensor]:
    ids = torch.tensor([PROMPT_IDS])
    return lambda: generate(model, ids, new_tokens, temperature=0, use_cache=use_cache)


class Stepper:
    """Greedy decoding of one prompt, one token per call: the model eager over a cache written in place,
    or a :class:`CompiledDecoder`'s step over a static cache (one decoder per model: it compiles once)."""

    def __init__(self, model, dec: CompiledDecoder | None):
        ids = torch.tensor([PROMPT_IDS])
        with torch.inference_mode():
            if dec is not None:
                self.cache, logits = dec.prefill(ids)
                self.forward = dec.step
            else:
                self.cache = qtg.QTGCache(checked_ids=True)
                logits = model(ids, cache=self.cache).logits[:, -1]
                self.forward = lambda nxt, cache: model(nxt, cache=cache).logits[:, -1]
        self.nxt = logits.argmax(-1, keepdim=True)

    def __call__(self) -> None:
        self.nxt = self.forward(self.nxt, self.cache).argmax(-1, keepdim=True)


def decode_steps(make: dict[str, Callable[[], Stepper]], new_tokens: int, block: int = 16
                 ) -> dict[str, list[float]]:
    """Seconds of every greedy decoding step of each case, the cases taking turns by blocks of steps.

    Each case is prefilled with the prompt, then runs ``block`` steps before the next case runs its
    ``block``, round after round: a burst of load from elsewhere hits all alike, and each case's steps
    run back to back as a decoding loop's do (its weights and cache warm in the CPU's caches).
    """
    steppers = {name: fn() for name, fn in make.items()}
    times: dict[str, list[float]] = {k: [] for k in make}
    with torch.inference_mode():
        for start in range(0, new_tokens, block):
            for name, step in steppers.items():
                for _ in range(min(block, new_tokens - start)):
                    t0 = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
    return times


def ops_per_token(make: Callable[[], Stepper], steps: int = 20, table: bool = False) -> float:
    """aten ops per decoding step (torch.profiler, ops called inside other ops counted too); ``table``: also
    print the top ops by self CPU time."""
    step = make()
    with torch.inference_mode():
        for _ in range(3):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
    events = prof.key_averages()
    if table:
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    return sum(e.count for e in events if e.key.startswith("aten::")) / steps


def decoding(args, q, b) -> None:
    """Eager and compiled greedy decoding of QTG and its baseline, side by side."""
    models = {"qtg": q, "baseline": b}
    reason = None if args.no_compile else compile_unavailable()
    modes = ["eager"] + ([] if args.no_compile or reason else ["compiled"])
    decoders = {name: CompiledDecoder(model) for name, model in models.items()} if "compiled" in modes else {}
    make = {f"{name} {mode}": functools.partial(Stepper, model, decoders[name] if mode == "compiled" else None)
            for mode in modes for name, model in models.items()}
    t0 = time.perf_counter()
    decode_steps(make, 16)  # warm-up (and compilation: the inductor cache keeps it for the next run)
    warm = time.perf_counter() - t0
    n = args.new_tokens
    step = decode_steps(make, n)
    ops = {k: ops_per_token(fn, table=args.profile) for k, fn in make.items()}
    print(f"\ncached greedy decoding step, batch 1, context {len(PROMPT_IDS)}..{len(PROMPT_IDS) + n}, "
          f"{n} steps, the cases taking turns by 16 (best: 10th percentile); warm-up {warm:.0f} s")
    if reason:
        print(f"compiled: not run, torch.compile cannot run here: {reason}")
    print(f"{'case':<18} {'ms median':>10} {'ms best':>8} {'tok/s':>7} {'(best)':>7} {'aten ops/token':>15} "
          f"{'x baseline eager':>17} {'x own eager':>12}")
    for name, t in step.items():
        arch, mode = name.split()
        m, lo = statistics.median(t), low(t)
        base, own = statistics.median(step["baseline eager"]), statistics.median(step[f"{arch} eager"])
        print(f"{name:<18} {1e3 * m:>10.3f} {1e3 * lo:>8.3f} {1 / m:>7.0f} {1 / lo:>7.0f} {ops[name]:>15.0f} "
              f"{base / m:>17.2f} {own / m:>12.2f}")


def run_rounds(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
               ) -> dict[str, tuple[list[float], int]]:
    """Seconds of every round and the median minor faults of each case, cases interleaved within each round."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    faults: dict[str, list[int]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            dt, nf = measure(fn)
            times[name].append(dt)
            faults[name].append(nf)
    return {k: (times[k], int(statistics.median(faults[k]))) for k in cases}


def low(times: list[float]) -> float:
    """The 10th percentile (the minimum for fewer than 10 runs): the run least disturbed by other processes."""
    return sorted(times)[len(times) // 10]


def build_pair(tier: str, max_len: int):
    cfg = qtg.get_tier(tier).replace(max_seq_len=max_len)
    return qtg.build(cfg, seed=0), qtg.build(qtg.baseline_of(cfg), seed=0)


def side_by_side(args) -> None:
    max_len = max(args.n, len(PROMPT_IDS) + args.new_tokens + 16)  # the warm-up's steps fit too
    q, b = build_pair(args.tier, max_len)
    if args.decode_only:
        decoding(args, q.eval(), b.eval())
        return
    train = {"qtg": train_step_fn(q.train(), args.batch, args.n),
             "baseline": train_step_fn(b.train(), args.batch, args.n)}
    res = run_rounds(train, args.train_rounds, warmup=2)
    print(f"training step, {args.tier}, B={args.batch}, N={args.n}, fwd+bwd+clip+AdamW, "
          f"{torch.get_num_threads()} threads, malloc {args.malloc}, {args.train_rounds} interleaved rounds")
    print(f"{'model':<10} {'ms median':>10} {'ms best':>8} {'tok/s':>7} {'minflt':>7} "
          f"{'x baseline tok/s (median)':>26} {'(best)':>7}")
    bm, bl = statistics.median(res["baseline"][0]), low(res["baseline"][0])
    for name in train:
        t, f = res[name]
        m, lo = statistics.median(t), low(t)
        print(f"{name:<10} {1e3 * m:>10.1f} {1e3 * lo:>8.1f} {args.batch * args.n / m:>7.0f} {f:>7d} "
              f"{bm / m:>26.2f} {bl / lo:>7.2f}")

    q.eval(), b.eval()
    n = args.new_tokens
    decoding(args, q, b)

    dec = {"qtg cached": decode_fn(q, n, True), "baseline cached": decode_fn(b, n, True)}
    res = run_rounds(dec, args.decode_rounds)
    unc = {"qtg uncached": decode_fn(q, n, False), "baseline uncached": decode_fn(b, n, False)}
    res.update(run_rounds(unc, args.uncached_rounds, warmup=0))
    med = {k: statistics.median(v[0]) for k, v in res.items()}
    print(f"\ngeneration (qtg.generate.generate, greedy), batch 1, {len(PROMPT_IDS)}-token prompt, {n} new tokens, "
          f"median of {args.decode_rounds} (cached) / {args.uncached_rounds} (uncached) interleaved rounds")
    print(f"{'case':<18} {'ms/token':>9} {'tok/s':>7} {'x baseline tok/s':>17} {'cached x uncached':>18}")
    for name in ("qtg cached", "baseline cached", "qtg uncached", "baseline uncached"):
        arch, mode = name.split()
        speedup = f"{med[f'{arch} uncached'] / med[name]:>18.2f}" if mode == "cached" else ""
        print(f"{name:<18} {1e3 * med[name] / n:>9.2f} {n / med[name]:>7.0f} "
              f"{med[f'baseline {mode}'] / med[name]:>17.2f} {speedup}")


# --- ablation: the previous implementations, kept here to be patched in ----------------------------


class PreviousFrSq(torch.autograd.Function):
    """fr_sq as it was: saves x and arccos(x), backward through the where-branches (six temporaries)."""

    @staticmethod
    def forward(ctx, bc):
        x = bc.clamp(max=1.0)
        a = torch.acos(x)
        ctx.save_for_backward(x, a)
        return a * a

    @staticmethod
    def backward(ctx, grad):
        x, a = ctx.saved_tensors
        u = 1.0 - x
        near = u < 1e-3
        series = -(2.0 + u * (2.0 / 3.0 + u * (4.0 / 15.0)))
        exact = -2.0 * a * torch.rsqrt((u * (1.0 + x)).clamp(min=1e-30))
        return grad * torch.where(near, series, exact)


def previous_fr_sq(bc):
    return PreviousFrSq.apply(bc)


def previous_scores(sp, sk, gamma, slopes, q_offset, bias=None):
    """_scores as it was: slopes, positions and mask built per call, the autograd Function also without grad."""
    if slopes is None and bias is not None and bias.shape[0] > 1:  # the model now hands over a cached ALiBi bias
        slopes = fisher_rao._alibi_slopes(bias.shape[0], sp.device)  # the model used to build them per call
    nq, nk = sp.shape[-2], sk.shape[-2]
    dtype = fisher_rao.compute_dtype(sp)
    with torch.autocast(device_type=sp.device.type, enabled=False):
        bc = sp.to(dtype) @ sk.to(dtype).transpose(-1, -2)
    scores = -gamma.to(dtype).view(1, -1, 1, 1) * fisher_rao.fr_sq(bc)
    i = torch.arange(q_offset, q_offset + nq, device=sp.device).view(-1, 1)
    j = torch.arange(nk, device=sp.device).view(1, -1)
    if slopes is not None:
        scores = scores - slopes.to(dtype).view(1, -1, 1, 1) * (i - j).clamp(min=0).to(dtype)
    return scores.masked_fill(j > i, float("-inf")), bc


def scores_with_function(sp, sk, gamma, slopes, q_offset, bias=None):
    """Today's _scores with the autograd Function on every call (no separate no-grad path)."""
    dtype = fisher_rao.compute_dtype(sp)
    bc = sp.to(dtype) @ sk.to(dtype).transpose(-1, -2)
    if bias is None:
        bias = fisher_rao.build_bias(slopes, q_offset, sp.shape[-2], sk.shape[-2], sp.device, dtype)
    return (fisher_rao.fr_sq(bc) * -gamma.to(dtype).view(1, -1, 1, 1)).add_(bias), bc


def composed_attention(sp, sk, v, gamma, bias, q_offset=0):
    """Training attention as it was: _scores (fr_sq's Function, -gamma, + bias), softmax and A V, op by op."""
    scores, _ = fisher_rao._scores(sp, sk, gamma, None, q_offset, bias)
    return torch.softmax(scores, dim=-1) @ v


def composed_soft_min(x, ids, temperature):
    """TopoFilter's training soft-min as it was: its composition, through autograd (TopoFilter.forward's other path)."""
    delta = topo_kernels.pairwise_distances(x, x, ids, ids)
    i = torch.arange(x.shape[1]).view(-1, 1)
    j = torch.arange(x.shape[1]).view(1, -1)
    keep = (j < i) | ((i == 0) & (j == 0))
    soft = -temperature * torch.logsumexp((delta / -temperature).masked_fill_(~keep, float("-inf")), dim=-1)
    return torch.where(i.view(1, -1) == 0, torch.zeros_like(soft), soft)


def float64_distances(x, y, x_ids, y_ids):
    """The TopoFilter distances as they were: float64, without the ids."""
    return topo_kernels.pairwise_distances(x, y)


@contextlib.contextmanager
def patched(*replacements: tuple[object, str, object]):
    """Set attributes for the duration of a block, then restore them."""
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in replacements]
    for obj, name, value in replacements:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


VARIANTS: dict[str, tuple[tuple[object, str, object], ...]] = {
    "all on": (),
    "fr_sq: previous backward": ((fisher_rao, "fr_sq", previous_fr_sq), (qtg_model, "fr_sq", previous_fr_sq)),
    "scores: previous (bias per call)": ((fisher_rao, "_scores", previous_scores),),
    "scores: Function without grad too": ((fisher_rao, "_scores", scores_with_function),),
    "TopoFilter: float64 distances": ((topo_kernels, "_distances_by_ids", float64_distances),),
    "attention: composed, no fused Function": ((fisher_rao, "fused_attention", composed_attention),),
    "fused attention: one block of rows": ((fisher_rao, "FUSED_BLOCK_ROWS", 1 << 30),),
    "TopoFilter: composed soft-min": ((topo_filter, "soft_min_distance", composed_soft_min),),
}
# every previous implementation at once (previous_scores includes the Function without grad; the composed
# attention has no blocks of rows)
VARIANTS["all of them off"] = tuple(r for v in list(VARIANTS.values())[1:] for r in v
                                    if r[2] is not scores_with_function and r[1] != "FUSED_BLOCK_ROWS")


def ablate(args) -> None:
    """QTG with each optimisation off in turn, interleaved with all on."""
    q, _ = build_pair(args.tier, max(args.n, len(PROMPT_IDS) + args.new_tokens))
    q.train()
    step = train_step_fn(q, args.batch, args.n)

    def under(variant: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            with patched(*VARIANTS[variant]):
                return fn()
        return run

    res = run_rounds({v: under(v, step) for v in VARIANTS}, args.train_rounds)
    q.eval()
    models = {v: q for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ids = torch.tensor([PROMPT_IDS])
    with torch.inference_mode():
        caches = {}
        for v in VARIANTS:
            with patched(*VARIANTS[v]):
                caches[v] = qtg.QTGCache()
                models[v](ids, cache=caches[v])
        nxt = {v: ids[:, -1:] for v in VARIANTS}
        for _ in range(args.new_tokens):
            for v in VARIANTS:
                with patched(*VARIANTS[v]):
                    t0 = time.perf_counter()
                    nxt[v] = q(nxt[v], cache=caches[v]).logits[:, -1].argmax(-1, keepdim=True)
                    times[v].append(time.perf_counter() - t0)
    print(f"QTG ({args.tier}) with one optimisation off at a time; training step B={args.batch}, N={args.n}, "
          f"{args.train_rounds} interleaved rounds;\ncached decoding step over {args.new_tokens} alternating steps; "
          f"{torch.get_num_threads()} threads, malloc {args.malloc}")
    print(f"{'variant':<40} {'train ms':>9} {'(best)':>8} {'x all on':>9} "
          f"{'decode ms':>10} {'(best)':>7} {'x all on':>9}")
    t_on, d_on = res["all on"][0], times["all on"]
    for v in VARIANTS:
        t, d = res[v][0], times[v]
        print(f"{v:<40} {1e3 * statistics.median(t):>9.1f} {1e3 * low(t):>8.1f} "
              f"{statistics.median(t) / statistics.median(t_on):>9.2f} {1e3 * statistics.median(d):>10.3f} "
              f"{1e3 * low(d):>7.3f} {statistics.median(d) / statistics.median(d_on):>9.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tier", default="nano")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--train-rounds", type=int, default=11)
    p.add_argument("--decode-rounds", type=int, default=7)
    p.add_argument("--uncached-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="fewer rounds: 5 train, 3 decode, 1 uncached")
    p.add_argument("--ablate", action="store_true", help="QTG alone, each optimisation off in turn")
    p.add_argument("--decode-only", action="store_true", help="only the decoding steps (eager and compiled)")
    p.add_argument("--no-compile", action="store_true", help="decoding steps eager only (no torch.compile)")
    p.add_argument("--profile", action="store_true", help="print each decoding case's top ops by self CPU time")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: qtg.training.malloc.keep_freed_memory() first, as training does; "
                        "default: glibc's settings")
    args = p.parse_args(argv)
    if args.malloc == "keep" and not keep_freed_memory():
        print("note: glibc mallopt unavailable here; malloc settings unchanged")
    if args.quick:
        args.train_rounds, args.decode_rounds, args.uncached_rounds = 5, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.ablate:
        ablate(args)
    else:
        side_by_side(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
