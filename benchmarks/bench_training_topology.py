"""Topology over training: scrubbing snapshots cold and warm, and "train micro here" to its first snapshot.

    python benchmarks/bench_training_topology.py                  # as in the closing note
    python benchmarks/bench_training_topology.py --rounds 5 --out benchmarks/results/training_topology_cpu.json

Two tables, in this process:

1. **Scrubbing, per snapshot.** ``qtg.topology.training.analyse_snapshot`` of every snapshot of a run, cold
   (an empty cache: load the snapshot, one forward with internals, exact H0/H1 of the probe's cloud, the
   attention graph of every head, then the JSON written) against warm (the same call, read back from the
   cache); and the Training tab's whole redraw per slider move (``app.tabs.training.training``: every
   snapshot's analysis plus the figures), cold and warm. Rounds are interleaved and the median is reported;
   read the ratio column. Runs: the micro run that table 2 trains through the tab (the tab's settings:
   120 steps, a snapshot every 20, 64-token windows), and a nano-shaped run holding one snapshot (the
   shipped nano's weights written as a bf16 snapshot) with a 256-token probe.
2. **"Train micro here".** Seconds from the tab's ``start_micro`` to its first snapshot on disk (polled
   every 0.1 s), for the first run of a launch (which trains the 512-token BPE on the training split) and a
   second (which reuses it), and to the end of the first run. The process runs ``qtg train`` on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import qtg
from app.config import AppConfig
from app.core import Explorer
from app.tabs import training as tab
from qtg.data.tokenizer import save_tokenizer
from qtg.topology.training import CACHE_SUBDIR, analyse_snapshot
from qtg.training.snapshots import list_snapshots, snapshot_tensors, write_snapshot

PROBE_NANO = ("HAMLET. To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
              "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles, And by "
              "opposing end them? To die, to sleep; No more; and by a sleep to say we end The heart-ache and the "
              "thousand natural shocks That flesh is heir to: 'tis a consummation Devoutly to be wish'd. To die, "
              "to sleep; To sleep, perchance to dream: ay, there's the rub; For in that sleep of death what dreams "
              "may come, When we have shuffled off this mortal coil, Must give us pause: there's the respect That "
              "makes calamity of so long life. For who would bear the whips and scorns of time, The oppressor's "
              "wrong, the proud man's contumely, The pangs of despised love, the law's delay, The insolence of "
              "office, and the spurns That patient merit of the unworthy takes, When he himself might his quietus "
              "make With a bare bodkin?")


def wait(cond, timeout: float = 600.0, every: float = 0.1) -> float:
    """Seconds until ``cond()`` is true."""
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("gave up waiting")
        time.sleep(every)
    return time.perf_counter() - t0


def train_here(ex: Explorer, steps: int, every: int, to_end: bool) -> dict:
    """Start "train micro here"; seconds to the first snapshot (and to the end, or stop it there)."""
    t0 = time.perf_counter()
    key = tab.start_micro(ex, steps, every)[0]["value"]
    job = tab.runs_for(ex).jobs[key]
    first = wait(lambda: len(list_snapshots(job.out)) >= 1)
    row = {"key": key, "first_snapshot_s": first, "out": job.out}
    if to_end:
        wait(lambda: job.proc.poll() is not None, every=0.5)
        row["end_s"] = time.perf_counter() - t0
        row["exit"] = job.proc.returncode
    else:
        tab.stop_micro(ex, key)
    return row


def nano_run(folder: Path) -> Path:
    """A run folder holding the shipped nano's weights as one bf16 snapshot (step 0), with its tokenizer."""
    model = qtg.load("nano")
    save_tokenizer(model.tokenizer, folder / "tokenizer.json")
    write_snapshot(snapshot_tensors(model, "bfloat16"), model.cfg, folder, 0, "bfloat16")
    return folder


def scrub(run: Path, probe: str, max_tokens: int, rounds: int) -> dict:
    """Median ms per snapshot of analyse_snapshot, cold (empty cache) and warm (cache hit)."""
    cold, warm = [], []
    snaps = list_snapshots(run)
    for _ in range(rounds):
        cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))
        for s in snaps:  # interleaved: each snapshot cold then warm
            t0 = time.perf_counter()
            a = analyse_snapshot(s, probe, max_tokens=max_tokens, cache_dir=cache)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = analyse_snapshot(s, probe, max_tokens=max_tokens, cache_dir=cache)
            warm.append(time.perf_counter() - t0)
            assert not a.from_cache and b.from_cache and a.to_dict() == b.to_dict()
        shutil.rmtree(cache)
    return {"snapshots": len(snaps), "tokens": a.n_tokens, "cold_ms": 1e3 * statistics.median(cold),
            "warm_ms": 1e3 * statistics.median(warm)}


def scrub_tab(ex: Explorer, key: str, run: Path, rounds: int) -> dict:
    """Median ms of the tab's redraw for one slider position, cold (the run's cache removed) and warm."""
    cold, warm = [], []
    n = len(list_snapshots(run))
    for r in range(rounds):
        shutil.rmtree(run / "snapshots" / CACHE_SUBDIR, ignore_errors=True)
        t0 = time.perf_counter()
        tab.training(ex, key, tab.PROBE, r % n)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = tab.training(ex, key, tab.PROBE, (r + 1) % n)
        warm.append(time.perf_counter() - t0)
        assert out[2]["cached"] == n
    return {"snapshots": n, "cold_ms": 1e3 * statistics.median(cold), "warm_ms": 1e3 * statistics.median(warm)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="also write the numbers as JSON here")
    args = p.parse_args(argv)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; training processes on one thread")
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        ex = Explorer(AppConfig(device="cpu", export_dir=Path(tmp) / "exports"))
        try:
            first = train_here(ex, tab.MICRO["steps"], tab.MICRO["every"], to_end=True)
            second = train_here(ex, tab.MICRO["steps"], tab.MICRO["every"], to_end=False)
            assert first["exit"] == 0, "the micro run failed"
            micro = scrub(first["out"], tab.PROBE, tab.MAX_PROBE_TOKENS, args.rounds)
            nano = scrub(nano_run(Path(tmp) / "nano"), PROBE_NANO, 257, args.rounds)
            redraw = scrub_tab(ex, first["key"], first["out"], args.rounds)
        finally:
            tab.runs_for(ex).close()
    print("\n| scrubbing | snapshots | probe tokens | cold ms | warm ms | cold / warm |")
    print("|---|---|---|---|---|---|")
    for name, r in (("analyse_snapshot, micro run", micro), ("analyse_snapshot, nano weights", nano)):
        print(f"| {name} | {r['snapshots']} | {r['tokens']} | {r['cold_ms']:.1f} | {r['warm_ms']:.2f} | "
              f"{r['cold_ms'] / r['warm_ms']:.0f}x |")
    print(f"| Training tab redraw (all {redraw['snapshots']} analyses + figures), micro run | {redraw['snapshots']} | "
          f"{micro['tokens']} | {redraw['cold_ms']:.0f} | {redraw['warm_ms']:.0f} | "
          f"{redraw['cold_ms'] / redraw['warm_ms']:.1f}x |")
    print("\n| train micro here (120 steps, snapshot every 20, seq_len 64) | seconds |")
    print("|---|---|")
    print(f"| first run of a launch (trains the BPE): to the first snapshot | {first['first_snapshot_s']:.1f} |")
    print(f"| second run (reuses the BPE): to the first snapshot | {second['first_snapshot_s']:.1f} |")
    print(f"| first run: to the end (7 snapshots) | {first['end_s']:.1f} |")
    print("\nAll times on this machine, in this run; cold / warm is the ratio to read.")
    if args.out:
        result = {"micro": micro, "nano": nano, "tab_redraw": redraw,
                  "first_snapshot_s": {"first_run": first["first_snapshot_s"],
                                       "second_run": second["first_snapshot_s"]},
                  "first_run_end_s": first["end_s"], "rounds": args.rounds}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
