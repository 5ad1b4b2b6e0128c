"""The training runs the app offers and the ones it started ("train micro here"), owned by an Explorer.

A run is named by a source key, never by a path typed in a request: ``shipped:<name>`` (snapshots under
``assets/checkpoints/<name>/snapshots/``), ``dir:<path>`` (a ``--checkpoint-dir`` folder) or ``here:<n>`` (the
n-th run started here: ``qtg train`` for micro in a background process, in a folder private to this launch).
Each :class:`~app.core.Explorer` owns one :class:`TrainingRuns` (``ex.training_runs``), which lives and ends
with it; the Training tab drives it.
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

from app.exports import private_dir
from app.models import AppInputError
from qtg.model.checkpoint import SHIPPED_DIR
from qtg.training.snapshots import list_snapshots

SHIPPED, DIR, HERE = "shipped", "dir", "here"
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

    def __init__(self, export_dir: Path | None, checkpoint_dirs: tuple[Path, ...]):
        """``export_dir``: where this launch's private folder of runs is made; ``checkpoint_dirs``: the
        ``--checkpoint-dir`` folders (offered when they hold snapshots)."""
        self.export_dir = export_dir
        self.checkpoint_dirs = checkpoint_dirs
        self._lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self._folder: Path | None = None
        atexit.register(self.close)

    def folder(self) -> Path:
        """This launch's private folder for runs started here (removed at exit)."""
        if self._folder is None:
            self._folder = private_dir(self.export_dir)
        return self._folder

    def sources(self) -> list[tuple[str, str]]:
        """(label, key) of every run with snapshots, plus the runs started here."""
        out = []
        if SHIPPED_DIR.is_dir():
            out += [(f"{p.name} (shipped)", f"{SHIPPED}:{p.name}") for p in sorted(SHIPPED_DIR.iterdir())
                    if list_snapshots(p)]
        out += [(f"{p.name} (checkpoint dir)", f"{DIR}:{p}") for p in self.checkpoint_dirs
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
        if kind == DIR and any(str(p) == name for p in self.checkpoint_dirs):
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
