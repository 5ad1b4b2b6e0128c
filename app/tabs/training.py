"""Training tab: a run's topology over training, snapshot by snapshot. Endpoint ``/training``.

A run is one that kept snapshots (``qtg train --snapshot-every K``, :mod:`qtg.snapshots`): shipped under
``assets/checkpoints/<name>/snapshots/``, given with ``--checkpoint-dir``, or started here ("train micro here":
``qtg train`` for the micro tier on the bundled corpus in a background process, in a folder private to this
launch, with a progress bar and Stop; its snapshots appear as they are written). Runs are named by source
keys (``shipped:``, ``dir:``, ``here:``), never by a path typed in a request.

Every number is :func:`qtg.topology.training.analyse_snapshot`'s (cached on disk per snapshot and probe, so
the slider scrubs back at once); the figures are :mod:`qtg.training_plots`'s. Export writes the curves and
an animated figure, one frame per snapshot, as standalone HTML.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from app.core import Explorer, as_int
from app.errors import user_facing
from app.exports import Exportable, private_dir
from app.models import AppInputError
from app.tabs.common import Dropdown, Slider, export_controls, fit
from qtg.checkpoint import SHIPPED_DIR
from qtg.snapshots import list_snapshots
from qtg.topology.training import analyse_snapshot
from qtg.training_plots import animated, over_training, snapshot_views

SHIPPED, DIR, HERE = "shipped", "dir", "here"
PROBE = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows."
MAX_PROBE_TOKENS = 128
MICRO = {"steps": 120, "every": 20, "seq_len": 64}  # "train micro here": small enough for a laptop CPU
MAX_STEPS = 2000
POLL_S = 1.0
# The child runs `qtg train` after asking Linux to end it with its parent (PR_SET_PDEATHSIG): a server killed
# without running its exit handlers (SIGTERM, SIGKILL) leaves no training process behind.
CHILD = ("import ctypes, runpy, signal, sys\n"
         "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\nexcept (OSError, AttributeError):\n    pass\n"
         "sys.argv = ['qtg', *sys.argv[1:]]\nrunpy.run_module('qtg', run_name='__main__', alter_sys=True)\n")


@dataclass
class Job:
    """One "train micro here" run: its folder, process and what it was asked for."""

    key: str
    out: Path
    steps: int
    every: int
    proc: subprocess.Popen
    started: float = field(default_factory=time.perf_counter)
    first_snapshot_s: float | None = None  # seconds from start to the first snapshot on disk
    stopped: bool = False

    def step(self) -> int:
        """The last training step in metrics.jsonl (0 before the first)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return 0
        last = 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                last = max(last, int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line being written
        return last

    def state(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "running"
        if self.stopped:
            return "stopped"
        return "finished" if code == 0 else f"failed (exit {code})"

    def log_tail(self) -> str:
        log = self.out / "train.log"
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
        return lines[-1][:300] if lines else ""


class TrainingRuns:
    """The runs this tab offers, and the background jobs it started (one at a time)."""

    def __init__(self, ex: Explorer):
        self.ex = ex
        self._lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self._folder: Path | None = None
        atexit.register(self.close)

    def folder(self) -> Path:
        """This launch's private folder for runs started here (removed at exit)."""
        if self._folder is None:
            self._folder = private_dir(self.ex.cfg.export_dir)
        return self._folder

    def sources(self) -> list[tuple[str, str]]:
        """(label, key) of every run with snapshots, plus the runs started here."""
        out = []
        if SHIPPED_DIR.is_dir():
            out += [(f"{p.name} (shipped)", f"{SHIPPED}:{p.name}") for p in sorted(SHIPPED_DIR.iterdir())
                    if list_snapshots(p)]
        out += [(f"{p.name} (checkpoint dir)", f"{DIR}:{p}") for p in self.ex.registry.checkpoint_dirs
                if list_snapshots(p)]
        out += [(f"micro run {k.split(':')[1]} (started here)", k) for k in self.jobs]
        return out

    def run_dir(self, key: Any) -> Path:
        """The folder a key names; anything not offered is refused."""
        kind, _, name = str(key).partition(":")
        if kind == HERE and key in self.jobs:
            return self.jobs[key].out
        if kind == SHIPPED and f"{SHIPPED}:{name}" in {k for _, k in self.sources()}:
            return SHIPPED_DIR / name
        if kind == DIR and any(str(p) == name for p in self.ex.registry.checkpoint_dirs):
            return Path(name)
        offered = ", ".join(k for _, k in self.sources()) or "none yet: press 'Train micro here'"
        raise AppInputError(f"run: unknown {str(key)[:200]!r}; choose one of {offered}")

    def start(self, steps: int, every: int, seq_len: int) -> Job:
        """``qtg train`` for micro on the bundled corpus, in a background process; one job at a time."""
        with self._lock:
            if any(j.proc.poll() is None for j in self.jobs.values()):
                raise AppInputError("train micro here: a run is already training; stop it first")
            key = f"{HERE}:{len(self.jobs) + 1}"
            out = self.folder() / f"micro-{len(self.jobs) + 1}"
            cmd = [sys.executable, "-c", CHILD, "train", "--tier", "micro", "--out", str(out), "--steps", str(steps),
                   "--seq-len", str(seq_len), "--snapshot-every", str(every), "--device", "cpu", "--no-progress"]
            done = [j.out / "tokenizer.json" for j in self.jobs.values() if (j.out / "tokenizer.json").is_file()]
            if done:  # the same BPE every run would train again (seconds): reuse the first one's
                cmd += ["--tokenizer", str(done[0])]
            out.mkdir(parents=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}  # leave the other core to the app
            with open(out / "train.log", "w") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(out))
            job = self.jobs[key] = Job(key, out, steps, every, proc)
            return job

    def job(self, key: Any) -> Job:
        if key not in self.jobs:
            raise AppInputError(f"run: {str(key)[:200]!r} was not started here")
        return self.jobs[key]

    def stop(self, key: Any) -> Job:
        job = self.job(key)
        if job.proc.poll() is None:
            job.stopped = True
            job.proc.terminate()
            try:
                job.proc.wait(10)
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()
        return job

    def close(self) -> None:
        """Stop every job and remove this launch's run folder."""
        for key in list(self.jobs):
            self.stop(key)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


_RUNS: dict[int, TrainingRuns] = {}


def runs_for(ex: Explorer) -> TrainingRuns:
    """The one :class:`TrainingRuns` of this Explorer."""
    if id(ex) not in _RUNS:
        _RUNS[id(ex)] = TrainingRuns(ex)
    return _RUNS[id(ex)]


# --- handlers ------------------------------------------------------------------------------------


def start_micro(ex: Explorer, steps: Any = MICRO["steps"], every: Any = MICRO["every"]) -> tuple:
    """Start "train micro here". Returns (run dropdown update whose value is the run's key, status line, timer)."""
    steps = as_int(steps, "steps", 1, MAX_STEPS)
    every = as_int(every, "snapshot every", 1, steps)
    runs = runs_for(ex)
    job = runs.start(steps, every, MICRO["seq_len"])
    msg = f"Training micro for {steps} steps (snapshot every {every}) in a background process."
    return gr.update(choices=runs.sources(), value=job.key), msg, gr.Timer(active=True)


def progress(ex: Explorer, key: Any) -> tuple:
    """Where a run started here stands. Returns (progress HTML, snapshot slider update, snapshot count, status,
    numbers, timer): the slider's range follows the snapshots on disk, its value stays where the user left it;
    the timer stops polling once the job has ended. A run not started here answers its snapshot count only."""
    runs = runs_for(ex)
    if key not in runs.jobs:
        try:
            n = len(list_snapshots(runs.run_dir(key)))
        except AppInputError:
            n = 0
        return "", gr.update(maximum=max(1, n - 1)), n, "", {"snapshots": n}, gr.Timer(active=False)
    job = runs.jobs[key]
    snaps = list_snapshots(job.out)
    if snaps and job.first_snapshot_s is None:
        job.first_snapshot_s = time.perf_counter() - job.started
    step, state = job.step(), job.state()
    tail = f" — {job.log_tail()}" if state.startswith("failed") else ""
    status = f"{state}: step {step} of {job.steps}, {len(snaps)} snapshot(s){tail}"
    bar = f"<progress id='training-bar' value='{step}' max='{job.steps}' style='width:100%'></progress>"
    numbers = {"state": state, "step": step, "steps": job.steps, "snapshots": len(snaps),
               "first_snapshot_s": job.first_snapshot_s}
    return (bar, gr.update(maximum=max(1, len(snaps) - 1)), len(snaps), status, numbers,
            gr.Timer(active=state == "running"))


def stop_micro(ex: Explorer, key: Any) -> str:
    """Stop a run started here; its snapshots stay. Returns a status line."""
    job = runs_for(ex).stop(key)
    return f"{job.state()} at step {job.step()}, {len(list_snapshots(job.out))} snapshot(s) kept."


def training(ex: Explorer, key: Any, probe: Any = PROBE, index: Any = -1) -> tuple:
    """Every view of a run at one snapshot. ``index``: position in the run's snapshots (-1: the latest).

    Returns (curves over training, the snapshot's views, numbers, note, export payload).
    """
    run = runs_for(ex).run_dir(key)
    if not isinstance(probe, str) or not probe.strip():
        raise AppInputError("probe: give a non-empty text")
    if len(probe) > ex.limits.max_text_chars:
        raise AppInputError(f"probe: {len(probe)} characters, over the limit of {ex.limits.max_text_chars}")
    snaps = list_snapshots(run)
    if not snaps:
        raise AppInputError("run: no snapshot written yet; wait for the first one")
    index = as_int(index, "snapshot", -1, len(snaps) - 1)
    index = len(snaps) - 1 if index < 0 else index
    analyses = [analyse_snapshot(s, probe, max_tokens=MAX_PROBE_TOKENS,
                                 time_budget=ex.limits.topology_time_budget) for s in snaps]
    a = analyses[index]
    curves = fit(over_training(analyses, current=a.step, title=f"The probe over training ({len(snaps)} snapshots)"))
    views = fit(snapshot_views(analyses, index))
    numbers = {"run": str(key), "steps": [x.step for x in analyses], "index": index, "snapshot": a.to_dict(),
               "cached": sum(x.from_cache for x in analyses)}
    note = (f"Snapshot {index + 1} of {len(snaps)} (step {a.step}), {a.n_tokens} probe tokens; "
            f"{numbers['cached']} of {len(snaps)} analyses read from the cache."
            + ("" if a.has_topology else " A dot-product baseline run: no TopoFilter, so no topology panels."))
    figs = {"over_training": curves, "animated": lambda: animated(analyses)}  # the animation: made on export
    return curves, views, numbers, note, Exportable("training", figs, numbers)


# --- layout --------------------------------------------------------------------------------------


def build(ex: Explorer) -> dict[str, Any]:
    """The tab's components and events."""
    runs = runs_for(ex)
    gr.Markdown("Topology over training: pick a run that kept snapshots (`qtg train --snapshot-every K`), or "
                "train the micro tier here. Each snapshot's probe loss, γ per head, attention entropy, the "
                "distribution of the TopoFilter's w and the exact-vs-approximate H0 of the probe are computed "
                "once and cached, so the slider scrubs back at once.")
    sources = runs.sources()
    with gr.Row():
        run = Dropdown(choices=sources, value=sources[0][1] if sources else None, label="run",
                       elem_id="training-run", allow_custom_value=True, scale=2)
        with gr.Column(scale=2):
            with gr.Row():
                steps = Slider(10, MAX_STEPS, value=MICRO["steps"], step=10, label="micro: steps",
                               elem_id="training-steps")
                every = Slider(1, 200, value=MICRO["every"], step=1, label="snapshot every",
                               elem_id="training-every")
            with gr.Row():
                start_btn = gr.Button("Train micro here", variant="primary", elem_id="training-start")
                stop_btn = gr.Button("Stop", elem_id="training-stop")
    bar = gr.HTML(elem_id="training-progress")
    status = gr.Markdown(elem_id="training-status")
    probe = gr.Textbox(label="probe text", value=PROBE, lines=2, max_length=ex.limits.max_text_chars,
                       elem_id="training-probe")
    with gr.Row():
        index = Slider(-1, 1, value=-1, step=1, label="snapshot (-1 = latest)", elem_id="training-snapshot", scale=3)
        show_btn = gr.Button("Show", elem_id="training-show", scale=1)
    count = gr.Number(visible=False, value=0, elem_id="training-count")
    note = gr.Markdown(elem_id="training-note")
    curves = gr.Plot(label="over training", elem_id="training-curves")
    views = gr.Plot(label="at the snapshot", elem_id="training-views")
    numbers = gr.JSON(label="numbers at the snapshot")
    job_numbers = gr.JSON(visible=False)
    payload = gr.State(None)
    export_controls(ex, payload, "training")
    show = user_facing(lambda *a: training(ex, *a), "training")
    outputs = [curves, views, numbers, note, payload]
    show_btn.click(show, [run, probe, index], outputs, api_name="training", concurrency_id="heavy")
    index.release(show, [run, probe, index], outputs, api_visibility="private", concurrency_id="heavy")
    timer = gr.Timer(POLL_S, active=False)  # polls while a run started here is training
    start_btn.click(user_facing(lambda *a: start_micro(ex, *a), "training_start"), [steps, every],
                    [run, status, timer], api_name="training_start", concurrency_id="light")
    stop_btn.click(user_facing(lambda k: stop_micro(ex, k), "training_stop"), [run], [status],
                   api_name="training_stop", concurrency_id="light")
    poll = user_facing(lambda k: progress(ex, k), "training_progress")
    timer.tick(poll, [run], [bar, index, count, status, job_numbers, timer], api_name="training_progress",
               concurrency_id="light", show_progress="hidden")
    run.change(poll, [run], [bar, index, count, status, job_numbers, timer], api_visibility="private",
               concurrency_id="light", show_progress="hidden")
    count.change(show, [run, probe, index], outputs, api_visibility="private", concurrency_id="heavy",
                 show_progress="hidden")
    return {"run": run}
