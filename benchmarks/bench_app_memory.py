"""What one app request holds: resident memory over Load, Generate, Unload and a reload, and a Topology request's
peak memory and time, on any tier (the figures of issue 23 are for ``7b``).

    python benchmarks/bench_app_memory.py unload --tier 7b --tokens 80
    python benchmarks/bench_app_memory.py topology --tier 7b --tokens 2000 [--budget 30]

Runs the app's own handlers in this process (``app.core.Explorer`` on the CPU, as ``qtg app`` builds it) and
samples this process's resident memory every 20 ms from ``/proc/self/statm``, so a peak between two readings
is seen. ``unload``: the resident memory before the load, after it, after a Generate of ``--tokens`` (sampled,
seed 0; how many of them decode to text), after Unload (at once and ``--wait`` seconds later), and the peak of
loading the tier again. ``topology``: a
``/topology`` request on a text of ``--tokens`` tokens, its peak resident memory against what the memory check
estimated, and its wall time against its time budget. Run one 7b process at a time and check ``free -g``
first: the 7b tier takes about 8 GiB.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import os
import pstats
import tempfile
import threading
import time
from pathlib import Path

GiB = 2**30


class ResidentMemory:
    """This process's resident bytes now, and the most seen since :meth:`reset` (sampled every ``every_s``)."""

    def __init__(self, every_s: float = 0.02):
        self.every_s = every_s
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.now())

    def reset(self) -> int:
        self.peak = self.now()
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def explorer(budget: float | None = None):
    from app.config import AppConfig, Limits
    from app.core import Explorer

    limits = Limits() if budget is None else Limits(topology_time_budget=budget)
    return Explorer(AppConfig(export_dir=Path(tempfile.mkdtemp(prefix="qtg-bench-")), device="cpu", limits=limits))


def load(ex, session, key: str):
    """The Load button's handler, to its end; the session it leaves."""
    from app.core import Session
    from app.tabs import tiers

    for _, update in tiers.load_model(ex, session, key, "cpu"):
        session = update if isinstance(update, Session) else session
    return session


def bench_unload(args: argparse.Namespace) -> dict:
    from app.tabs import generate, tiers
    from qtg.data.tokenizer import decode

    rss = ResidentMemory()
    ex = explorer()
    key = f"tier:{args.tier}"
    row = {"before load": rss.reset()}
    session = load(ex, ex.new_session(), key)
    row["after load"], row["load peak"] = rss.now(), rss.peak
    rss.reset()
    *_, last = generate.generate(ex, session, "ROMEO:", args.tokens, 1.0, 0, 1, 0)  # sampled, seed 0
    row["after generate"], row["generate peak"] = rss.now(), rss.peak
    tokenizer, new = ex.current(session).tokenizer, last[5].numbers["token_ids"]
    row["new tokens that decode to text"] = f"{sum(bool(decode(tokenizer, [t])) for t in new)} of {len(new)}"
    del last
    _, session = tiers.unload_model(ex, session, key, "cpu")
    row["after unload"] = rss.now()
    time.sleep(args.wait)
    row[f"{args.wait:g} s after unload"] = rss.reset()
    session = load(ex, session, key)
    row["reload peak"], row["after reload"] = rss.peak, rss.now()
    rss.stop()
    return row


def bench_topology(args: argparse.Namespace) -> dict:
    from app.tabs import topology
    from qtg.model.views import view_memory

    rss = ResidentMemory()
    ex = explorer(args.budget)
    session = load(ex, ex.new_session(), f"tier:{args.tier}")
    loaded = ex.current(session)
    text = words_for(loaded.tokenizer, args.tokens)
    row = {"tokens": args.tokens, "after load": rss.reset()}
    profile = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    error = None
    try:
        if profile is not None:
            profile.enable()
        result = topology.topology(ex, session, text, 1, args.backend, args.max_points, 0)
        for _ in result if inspect.isgenerator(result) else ():  # a handler that streams its progress
            pass
    except Exception as e:  # a refusal or a budget that ran out is a result here
        error = f"{type(e).__name__}: {e}"
    finally:
        if profile is not None:
            profile.disable()
    row["seconds"] = time.perf_counter() - t0
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    row["peak"] = rss.peak
    row["request peak (beyond the loaded model)"] = rss.peak - row["after load"]
    row["memory check's estimate for it"] = view_memory(loaded.model.cfg, args.tokens, "fp32", 0, "topology", "cpu",
                                                        args.max_points).request
    row["error"] = error
    rss.stop()
    return row


def words_for(tokenizer, n_tokens: int) -> str:
    """English words from the bundled corpus, exactly ``n_tokens`` tokens of ``tokenizer`` (or fewer: the corpus)."""
    from qtg.data.documents import default_corpus_path, load_documents
    from qtg.data.tokenizer import decode, encode

    text = load_documents(default_corpus_path())[0].text
    return decode(tokenizer, encode(tokenizer, text)[:n_tokens])


def show(title: str, row: dict) -> None:
    print(title)
    print(f"{'measure':<44}{'value':>14}")
    print("-" * 58)
    for k, v in row.items():
        shown = f"{v / GiB:.2f} GiB" if isinstance(v, int) and v > 2**20 else (f"{v:.1f}" if isinstance(v, float)
                                                                               else str(v))
        print(f"{k:<44}{shown:>14}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["unload", "topology"])
    p.add_argument("--tier", default="7b")
    p.add_argument("--tokens", type=int, default=None, help="unload: new tokens (80); topology: text tokens (2000)")
    p.add_argument("--wait", type=float, default=5.0, help="unload: seconds to wait after Unload before reading")
    p.add_argument("--budget", type=float, default=None, help="topology: the time budget (default: the app's)")
    p.add_argument("--backend", default="gudhi + ripser (overlaid)", help="topology: the page's backend choice")
    p.add_argument("--max-points", type=int, default=256, help="topology: max points (the page's default 256)")
    p.add_argument("--profile", action="store_true", help="topology: print where the request's time went")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # as `qtg app` runs
    if args.what == "unload":
        args.tokens = args.tokens or 80
        row = bench_unload(args)
    else:
        args.tokens = args.tokens or 2000
        row = bench_topology(args)
    show(f"{args.what} on {args.tier}, cpu, torch {torch.__version__}", row)
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
