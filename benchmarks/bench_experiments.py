"""Cost of a sweep per condition against `qtg eval` on the same data, side by side in one process.

    python benchmarks/bench_experiments.py                       # shipped nano, the 4 test works, 24 kB of each
    python benchmarks/bench_experiments.py --bytes-per-work 0    # the whole test works (slow on a CPU)

The data is the test split of the bundled corpus as the shipped configs split it
(val 0.1, test 0.1, seed 0), each work cut to its first ``--bytes-per-work``
bytes. ``qtg eval``'s work is :func:`qtg.training.evaluate.evaluate` (tokenising,
windows, forward passes); the sweep's is :func:`qtg.experiments.sweep` with the
unmodified model and three interventions (tokenising, windows, forward passes,
attention maps and exact H0 on the sampled windows, bootstrap CIs). Each call
is timed whole, calls are interleaved over ``--repeats`` rounds and the median
is reported:

    sweep tokens/s per condition = tokens x conditions / sweep seconds

The target is a ratio >= 0.8 to eval's tokens/s (no work beyond the forward passes
the figures need). The sweep's unmodified bits per byte must equal eval's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import qtg
from qtg.data.pipeline import Document, load_documents, split_documents
from qtg.experiments import sweep
from qtg.training.evaluate import evaluate

CONDITIONS = [qtg.Intervention(topo="exact"), qtg.Intervention(topo="off"), qtg.Intervention(gamma=1.0)]


def test_works(bytes_per_work: int) -> list[Document]:
    """The test split of the bundled corpus (whole works), each cut to its first ``bytes_per_work`` bytes (0: all)."""
    docs = split_documents(load_documents("assets/corpus"), val_fraction=0.1, test_fraction=0.1, seed=0).test
    if bytes_per_work <= 0:
        return docs
    return [Document(d.name, d.text.encode("utf-8")[:bytes_per_work].decode("utf-8", errors="ignore")) for d in docs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nano", help="a name for qtg.load (default nano)")
    p.add_argument("--bytes-per-work", type=int, default=24_000, help="bytes of each test work (0: whole works)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (median reported)")
    p.add_argument("--sample", type=int, default=8, help="the sweep's sampled windows (attention maps, exact H0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", default="benchmarks/results/experiments_cpu.json")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = qtg.load(args.model).eval()
    docs = test_works(args.bytes_per_work)
    n_conditions = 1 + len(CONDITIONS)
    times: dict[str, list[float]] = {"eval": [], "sweep": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        ev = evaluate(model, docs)
        times["eval"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sw = sweep(model, docs, CONDITIONS, sample=args.sample)
        times["sweep"].append(time.perf_counter() - t)
    eval_s, sweep_s = statistics.median(times["eval"]), statistics.median(times["sweep"])
    eval_tps = ev.tokens / eval_s
    sweep_tps = ev.tokens * n_conditions / sweep_s
    ratio = sweep_tps / eval_tps
    plain = sw.conditions[0].bits_per_byte.estimate

    print(f"{model.cfg.label} on {len(docs)} test works ({ev.bytes:,} bytes, {ev.tokens:,} tokens, "
          f"{len(sw.corpus.windows)} windows), {args.threads} thread(s), median of {args.repeats} interleaved rounds; "
          f"sweep = unmodified + {len(CONDITIONS)} interventions, {args.sample} sampled windows")
    print(f"{'case':<26} {'seconds':>8} {'tokens/s':>9} {'x eval':>7}  bits/byte")
    print(f"{'qtg eval':<26} {eval_s:>8.2f} {eval_tps:>9.0f} {1.0:>7.2f}  {ev.bits_per_byte:.6f}")
    print(f"{'sweep, per condition':<26} {sweep_s / n_conditions:>8.2f} {sweep_tps:>9.0f} {ratio:>7.2f}  {plain:.6f}")
    print(f"target: x eval >= 0.80 -> {'met' if ratio >= 0.8 else 'NOT met'}; "
          f"unmodified bits/byte equal to eval's: {abs(plain - ev.bits_per_byte) < 1e-6}")

    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": args.threads, "load_average_end": os.getloadavg()[0],
        "model": model.cfg.label, "works": [d.name for d in docs], "bytes": ev.bytes, "tokens": ev.tokens,
        "windows": len(sw.corpus.windows), "conditions": [c.name for c in sw.conditions], "sample": args.sample,
        "repeats": args.repeats, "seconds": times, "eval_tokens_per_s": eval_tps,
        "sweep_tokens_per_s_per_condition": sweep_tps, "ratio": ratio, "eval_bits_per_byte": ev.bits_per_byte,
        "sweep_plain_bits_per_byte": plain,
        "sweep": sw.to_dict(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if ratio >= 0.8 else 1


if __name__ == "__main__":
    raise SystemExit(main())
