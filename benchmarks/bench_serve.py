"""Many streaming clients at once: continuous batching against one request at a time.

    python benchmarks/bench_serve.py                     # nano, 1 4 12 30 clients, 64 tokens each
    python benchmarks/bench_serve.py --clients 1 12 --rounds 3 --out benchmarks/results/serve_cpu.json

Starts two ``qtg serve`` processes on the same model: the engine batching every running request
(``--max-batch 64``) and the same engine taking one request at a time (``--max-batch 1``: the
baseline, what the app did before: requests queue and decode alone). Then, for each client count and
round, interleaved, that many clients start together (a barrier), each streaming one 64-token
completion (plain HTTP, server-sent events; sampled, seeded per client) from one server, then from
the other. Per case: wall time (first request sent to last [DONE]), its ratio to one client's wall
on the same server, p50/p95 time to first token (request sent to first token chunk), tokens
received per second, errors. Medians over rounds.

The goal (issue 18): twelve concurrent streams within 2.5x the wall of one, p95 TTFT <= 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PROMPTS = ("ROMEO:", "First Citizen:", "HAMLET:\nTo be", "KING LEAR:", "JULIET:\nO", "MACBETH:")


def start_server(model: str, port: int, max_batch: int, threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qtg", "serve", "--model", model, "--port", str(port), "--max-batch", str(max_batch)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server on port {port} did not answer within 180 s")


def one_client(url: str, i: int, tokens: int, barrier: threading.Barrier, out: list) -> None:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0.8, "seed": i,
            "stream": True}
    http = httpx.Client(timeout=300)  # made before the start: a client's set-up (TLS context) is not the server's
    barrier.wait()
    t0 = time.perf_counter()
    first, n, error = None, 0, None
    try:
        with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}"
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason") is None:
                    n += 1
                    first = first or time.perf_counter()
    except httpx.HTTPError as e:
        error = type(e).__name__
    out[i] = (t0, first, time.perf_counter(), n, error)
    http.close()


def run_case(url: str, clients: int, tokens: int) -> dict:
    barrier = threading.Barrier(clients)
    out: list = [None] * clients
    threads = [threading.Thread(target=one_client, args=(url, i, tokens, barrier, out)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(o[0] for o in out)
    ttft = sorted((o[1] - o[0]) if o[1] else float("inf") for o in out)
    wall = max(o[2] for o in out) - start
    return {"wall": wall, "ttft_p50": _pct(ttft, 50), "ttft_p95": _pct(ttft, 95),
            "tokens": sum(o[3] for o in out), "errors": sum(1 for o in out if o[4] or o[3] == 0)}


def _pct(sorted_values: list[float], q: float) -> float:
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nano")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 12, 30])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--port", type=int, default=8791, help="batched server's port; the baseline's is the next")
    p.add_argument("--threads", type=int, default=None, help="torch threads per server (default: the server's)")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)

    servers = {"batched": (args.port, 64), "one at a time": (args.port + 1, 1)}
    procs = [start_server(args.model, port, mb, args.threads) for port, mb in servers.values()]
    try:
        for port, _ in servers.values():  # warm-up: the first request of a process pays one-off costs
            run_case(f"http://127.0.0.1:{port}", 2, 8)
        results: dict = {(s, c): [] for s in servers for c in args.clients}
        for _ in range(args.rounds):
            for c in args.clients:
                for name, (port, _) in servers.items():
                    results[(name, c)].append(run_case(f"http://127.0.0.1:{port}", c, args.tokens))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)

    rows = []
    print(f"{args.model}, {args.tokens}-token streams (sampled, seeded), median of {args.rounds} interleaved rounds, "
          f"{os.cpu_count()} CPUs (load average at the end: {os.getloadavg()[0]:.1f})")
    print(f"{'server':<14} {'clients':>7} {'wall s':>7} {'x 1 client':>10} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'tok/s':>7} {'errors':>6}")
    for name in servers:
        one = statistics.median(r["wall"] for r in results[(name, args.clients[0])])
        for c in args.clients:
            rs = results[(name, c)]
            row = {"server": name, "clients": c, **{k: statistics.median(r[k] for r in rs) for k in rs[0]},
                   "errors": sum(r["errors"] for r in rs)}
            row["ratio"] = row["wall"] / one
            rows.append(row)
            print(f"{name:<14} {c:>7} {row['wall']:>7.2f} {row['ratio']:>10.2f} {row['ttft_p50']:>9.3f} "
                  f"{row['ttft_p95']:>9.3f} {row['tokens'] / row['wall']:>7.0f} {row['errors']:>6}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "tokens": args.tokens, "rounds": args.rounds,
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
