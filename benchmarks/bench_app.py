"""The app as a user meets it: start-up, first-token latency, tokens/s, and each tab's main action.

    python benchmarks/bench_app.py [--repeats 3] [--threads 2] [--json benchmarks/results/app_cpu.json]

Starts ``python -m app`` in a subprocess (timed from the command to the first page served), times the
phases of a start-up in another fresh process (imports, model and page, server), then drives the app
through ``gradio_client`` as a remote user would. Generation is set beside the library's own
``qtg.generate.generate`` in this process with the same thread count, so the app's overhead reads as
a ratio. Medians over ``--repeats``; this machine is noisy, so read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "ROMEO:"
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds"
PATCHING = ("The good king and his son rode out to the town at night, and the king and his",  # 21 tokens
            "replacing a word", "", "son", "daughter", " son", " daughter")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(threads: int) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--device", "cpu",
                             "--threads", str(threads), "--export-dir",
                             tempfile.mkdtemp(prefix="qtg-bench-")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise SystemExit("the app did not start") from None
            time.sleep(0.05)


PHASES = """
import os, socket, sys, time
t0 = time.perf_counter()
def lap(name): print(f"{name}\t{time.perf_counter() - t0:.3f}", flush=True)
import torch; lap("import torch")
torch.set_num_threads(int(sys.argv[1]))
import qtg; lap("import qtg")
import gradio; lap("import gradio")
import app.server as server; lap("import the app's modules")
from app.config import AppConfig
demo, ex = server.build_app(AppConfig(device="cpu")); lap("load nano and build the page")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
demo.launch(server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False); lap("start the server")
demo.close()
"""


def startup_phases(threads: int) -> dict[str, float]:
    """Seconds from the start of a fresh process to the end of each start-up phase (cumulative)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", PHASES, str(threads)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return {name: float(t) for name, t in (line.split("\t") for line in out.splitlines() if "\t" in line)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def app_generate(client, n: int) -> tuple[float, float, float]:
    """(seconds to the first streamed token, tokens/s after it) as the client sees them, and the
    tokens/s the server itself reports (its stats line), which leaves out the client's share of the CPU."""
    t0 = time.perf_counter()
    job = client.submit(PROMPT, n, 0, 0, 1, -1, api_name="/generate")
    first = None
    for _ in job:
        first = first or time.perf_counter()
    end = time.perf_counter()
    server = float(re.search(r"([\d.]+) tokens/s after it", job.outputs()[-1][3]).group(1))
    return first - t0, (n - 1) / (end - first), server


def library_generate(model, n: int) -> tuple[float, float]:
    import torch

    from qtg.data.tokenizer import encode
    from qtg.generate import generate

    ids = torch.tensor([encode(model.tokenizer, PROMPT)])
    first = timed(lambda: generate(model, ids, 1, temperature=0))
    total = timed(lambda: generate(model, ids, n, temperature=0))
    return first, (n - 1) / max(total - first, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="torch threads in the app and in this process (default: the app's, all cores but one)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from gradio_client import Client

    import qtg

    torch.set_num_threads(args.threads)
    rows: dict[str, list[float]] = {}
    starts = []
    for _ in range(args.repeats):
        proc, url, seconds = start_app(args.threads)
        starts.append(seconds)
        if len(starts) < args.repeats:
            proc.terminate()
            proc.wait(30)
    phases: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, t in startup_phases(args.threads).items():
            phases.setdefault(name, []).append(t)
    model = qtg.load("nano")
    client = Client(url, verbose=False)
    actions = {
        "topology (gudhi + ripser, 256 pts)": lambda: client.predict(TEXT * 2, 1, "gudhi + ripser (overlaid)", 256, 0,
                                                                     api_name="/topology"),
        "attention (4 heads + baseline)": lambda: client.predict(TEXT, 0, -1, 1, "linear", api_name="/attention"),
        "compare (nano vs nano-baseline)": lambda: client.predict(TEXT, "shipped:nano", "cpu", "approximate",
                                                                  "shipped:nano-baseline", "cpu", "approximate", -1,
                                                                  api_name="/compare"),
        "patching (nano + baseline, 21-token pair)": lambda: client.predict(*PATCHING, api_name="/patching"),
        "tiers table": lambda: client.predict("cpu", api_name="/tiers"),
        "load micro (random)": lambda: (client.predict("tier:micro", "cpu", api_name="/load"),
                                        client.predict("shipped:nano", "cpu", api_name="/load")),
        "export topology (HTML+PNG+JSON)": lambda: client.predict(api_name="/export_topology"),
    }
    try:
        app_generate(client, 8), library_generate(model, 8)  # warm-up: first calls pay one-off costs
        for _ in range(args.repeats):  # interleaved: app, library, then each tab
            ft, rate, server = app_generate(client, args.tokens)
            rows.setdefault("app first token s", []).append(ft)
            rows.setdefault("app tokens/s", []).append(rate)
            rows.setdefault("app tokens/s (server's own count)", []).append(server)
            ft, rate = library_generate(model, args.tokens)
            rows.setdefault("library first token s", []).append(ft)
            rows.setdefault("library tokens/s", []).append(rate)
            for name, fn in actions.items():
                rows.setdefault(f"{name} s", []).append(timed(fn))
    finally:
        proc.terminate()
        proc.wait(30)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"QTG Explorer app on nano, cpu, {args.threads} threads, torch {torch.__version__} "
          f"(median of {args.repeats})")
    print(f"{'measure':48s} {'value':>10s}")
    print("-" * 60)
    print(f"{'start-up to first page s':48s} {statistics.median(starts):10.2f}")
    for name, ts in phases.items():
        print(f"{'  by the end of ' + name + ' s':48s} {statistics.median(ts):10.2f}")
    for k, v in med.items():
        print(f"{k:48s} {v:10.3f}")
    print(f"{'app / library tokens/s':48s} {med['app tokens/s'] / med['library tokens/s']:10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"startup_s": starts, "startup_phases_s": phases, "threads": args.threads,
                                         "tokens": args.tokens, "runs": rows, "median": med}, indent=2))


if __name__ == "__main__":
    main()
