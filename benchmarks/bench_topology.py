"""Exact persistence cost: gudhi vs ripser.py vs the default (auto) backend.

    python benchmarks/bench_topology.py                          # N = 128 ... 8192, random + nano states
    python benchmarks/bench_topology.py --sizes 128 256 --budget 30
    python benchmarks/bench_topology.py --model runs/nano --layers 0 5 --out results.json

Each case (cloud, dimensions, N, backend) runs in a fresh process with the
engines already imported (as in a long-lived app), so its peak memory is its
own. The table reports the wall time of ``exact_diagrams`` (distances,
duplicate removal, engines; in-process, no time-budget child) and the peak
resident memory above the resident memory after loading the points (Linux:
VmHWM, reset before the case). A case that exceeds ``--budget`` seconds is
killed and larger N of the same kind are skipped. "interactive" means the
default backend took under 2 s.

Clouds: random unit vectors in the nano state width (192), and real model
states of the held-out works (the split of configs/nano.yaml: val_fraction
0.1, seed 0) at ``--layers``: 0 is QEmbed, the TopoFilter's cloud, where
repeated tokens are duplicates; -1 is the final block. One context holds
``max_seq_len`` tokens; larger N join the states of consecutive windows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BACKENDS = ("gudhi", "ripser", "auto")
INTERACTIVE_S = 2.0


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak() -> float:
    """Reset the peak-RSS counter where Linux allows it (so imports do not count); the current RSS in MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mb() -> float:
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(path: str, n: int, backend: str, maxdim: int) -> None:
    """One case, in this process, engines imported beforehand (as in a long-lived app); prints a JSON line."""
    import gudhi  # noqa: F401
    import ripser  # noqa: F401

    from qtg.topology import exact_diagrams

    x = np.load(path)[:n]
    base = reset_peak()
    res = exact_diagrams(x, maxdim=maxdim, backend=backend, max_points=n, time_budget=None)
    print(json.dumps({"seconds": res.seconds, "peak_mb": peak_mb() - base, "bars": [len(d) for d in res.dgms],
                      "distinct": res.bounds.points_distinct, "engines": res.backend}))


def run_case(path: str, n: int, backend: str, maxdim: int, budget: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, str(n), backend, str(maxdim)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=budget + 30, env=env)  # + import time
    except subprocess.TimeoutExpired:
        return {"timeout": True}
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"timeout": True} if out["seconds"] > budget else out


def random_cloud(n: int, width: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, width))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def model_clouds(name: str, layers: list[int], n: int) -> tuple[dict[str, np.ndarray], int]:
    """States of consecutive windows of a held-out play, per layer: {label: [n, 2d]}."""
    import torch

    import qtg
    from qtg.data import default_corpus_path, load_documents, split_documents
    from qtg.tokenizer import encode

    model = qtg.load(name).eval()
    _, held_out = split_documents(load_documents(default_corpus_path()), val_fraction=0.1, seed=0)
    text = "\n".join(d.text for d in held_out)
    ctx = model.cfg.max_seq_len
    ids = encode(model.tokenizer, text)[: -(-n // ctx) * ctx]
    with torch.no_grad():
        out = model(torch.tensor(ids).view(-1, ctx), return_internals=True)
    layers = [k if k >= 0 else len(out.states) + k for k in layers]
    return ({f"{model.cfg.name} L{k}": out.states[k].reshape(-1, out.states[k].shape[-1]).double().numpy()[:n]
             for k in layers}, model.cfg.width)


def fmt(case: dict | None) -> str:
    if case is None:
        return "skipped"
    if case.get("timeout"):
        return "> budget"
    if "error" in case:
        return "error"
    return f"{case['seconds']:.3f}"


def print_table(rows: list[dict], budget: float) -> None:
    print(f"\n| cloud | dims | N | distinct | gudhi s | ripser s | auto s | gudhi/auto | ripser/auto | "
          f"peak MB g/r/a | interactive (auto < {INTERACTIVE_S:g} s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        c = row["cases"]
        auto = c.get("auto") or {}
        ok = {b: c.get(b) and "seconds" in c[b] for b in BACKENDS}
        ratio = {b: f"{c[b]['seconds'] / auto['seconds']:.1f}x" if ok[b] and ok["auto"] else "—" for b in BACKENDS}
        mem = "/".join(f"{c[b]['peak_mb']:.0f}" if ok[b] else "—" for b in BACKENDS)
        distinct = next((c[b]["distinct"] for b in BACKENDS if ok[b]), "—")
        inter = ("yes" if auto["seconds"] < INTERACTIVE_S else "no") if ok["auto"] else "no"
        print(f"| {row['cloud']} | H0{'+H1' if row['maxdim'] else ''} | {row['n']} | {distinct} | "
              f"{fmt(c.get('gudhi'))} | {fmt(c.get('ripser'))} | {fmt(c.get('auto'))} | {ratio['gudhi']} | "
              f"{ratio['ripser']} | {mem} | {inter} |")
    print(f"\n'> budget': killed after {budget:g} s; larger N of that kind skipped.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--budget", type=float, default=60.0, help="seconds per case (default 60)")
    p.add_argument("--model", default="nano", help="qtg.load name for real states, or 'none' (default nano)")
    p.add_argument("--layers", type=int, nargs="+", default=[0, -1], help="state indices (default 0 and last)")
    p.add_argument("--maxdims", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="benchmarks/results/topology_cpu.json")
    p.add_argument("--worker", nargs=4, metavar=("NPY", "N", "BACKEND", "MAXDIM"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2], int(args.worker[3]))
        return 0

    n_max = max(args.sizes)
    clouds, width = ({}, 192) if args.model == "none" else model_clouds(args.model, args.layers, n_max)
    clouds = {f"random unit {width}-D": random_cloud(n_max, width), **clouds}
    print(f"exact_diagrams on {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at start), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, budget {args.budget:g} s per case")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, x in clouds.items():
            path = str(Path(tmp) / f"{len(rows)}.npy")
            np.save(path, x)
            for maxdim in args.maxdims:
                stopped: set[str] = set()
                for n in sorted(s for s in args.sizes if s <= len(x)):
                    cases = {}
                    for b in BACKENDS:
                        cases[b] = None if b in stopped else run_case(path, n, b, maxdim, args.budget)
                        if cases[b] is not None and "seconds" not in cases[b]:
                            stopped.add(b)
                    rows.append({"cloud": label, "maxdim": maxdim, "n": n, "cases": cases})
                    print(f"  {label} H0{'+H1' if maxdim else ''} N={n}: "
                          + ", ".join(f"{b} {fmt(c)}" for b, c in cases.items()), flush=True)
    print_table(rows, args.budget)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"budget_s": args.budget, "cpu_count": os.cpu_count(),
                                          "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
