"""Training tab: a run's topology over training, snapshot by snapshot. Endpoint ``/training``.

A run is one that kept snapshots (``qtg train --snapshot-every K``, :mod:`qtg.training.snapshots`): shipped under
``assets/checkpoints/<name>/snapshots/``, given with ``--checkpoint-dir``, or started here ("train micro here":
``qtg train`` for the micro tier on the bundled corpus in a background process, in a folder private to this
launch, with a progress bar and Stop; its snapshots appear as they are written). Runs are named by source
keys (``shipped:``, ``dir:``, ``here:``), never by a path typed in a request.

Every number is :func:`qtg.topology.training.analyse_snapshot`'s (cached on disk per snapshot and probe, so
the slider scrubs back at once); the figures are :mod:`qtg.plots.training`'s. Export writes the curves and
an animated figure, one frame per snapshot, as standalone HTML.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import gradio as gr

from app.core import Explorer, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError
from app.runs import TrainingRuns
from app.tabs.common import Dropdown, Slider, export_controls, fit
from qtg.plots.training import animated, over_training, snapshot_views
from qtg.topology.training import analyse_snapshot
from qtg.training.snapshots import list_snapshots

PROBE = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows."
MAX_PROBE_TOKENS = 128
MICRO = {"steps": 120, "every": 20, "seq_len": 64}  # "train micro here": small enough for a laptop CPU
MAX_STEPS = 2000
POLL_S = 1.0


def runs_for(ex: Explorer) -> TrainingRuns:
    """The Explorer's :class:`~app.runs.TrainingRuns` (it owns them: they live and end with it)."""
    return ex.training_runs


# --- handlers ------------------------------------------------------------------------------------


def start_micro(ex: Explorer, steps: Any = MICRO["steps"], snapshot_every: Any = MICRO["every"]) -> tuple:
    """Start "train micro here". Returns (run dropdown update whose value is the run's key, status line, timer)."""
    steps = as_int(steps, "steps", 1, MAX_STEPS)
    every = as_int(snapshot_every, "snapshot every", 1, steps)
    runs = runs_for(ex)
    job = runs.start(steps, every, MICRO["seq_len"])
    msg = f"Training micro for {steps} steps (snapshot every {every}) in a background process."
    return gr.update(choices=runs.sources(), value=job.key), msg, gr.Timer(active=True)


def progress(ex: Explorer, run: Any) -> tuple:
    """Where a run started here stands. Returns (progress HTML, snapshot slider update, snapshot count, status,
    numbers, timer): the slider's range follows the snapshots on disk, its value stays where the user left it;
    the timer stops polling once the job has ended. A run not started here answers its snapshot count only."""
    runs = runs_for(ex)
    if run not in runs.jobs:
        try:
            n = len(list_snapshots(runs.run_dir(run)))
        except AppInputError:
            n = 0
        return "", gr.update(maximum=max(1, n - 1)), n, "", {"snapshots": n}, gr.Timer(active=False)
    job = runs.jobs[run]
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


def stop_micro(ex: Explorer, run: Any) -> str:
    """Stop a run started here; its snapshots stay. Returns a status line."""
    job = runs_for(ex).stop(run)
    return f"{job.state()} at step {job.step()}, {len(list_snapshots(job.out))} snapshot(s) kept."


def training(ex: Explorer, run: Any, probe_text: Any = PROBE, snapshot: Any = -1) -> tuple:
    """Every view of a run at one snapshot. ``snapshot``: position in the run's snapshots (-1: the latest).

    Returns (curves over training, the snapshot's views, numbers, note, export payload).
    """
    folder = runs_for(ex).run_dir(run)
    if not isinstance(probe_text, str) or not probe_text.strip():
        raise AppInputError("probe text: give a non-empty text")
    if len(probe_text) > ex.limits.max_text_chars:
        raise AppInputError(f"probe text: {len(probe_text)} characters, over the limit of {ex.limits.max_text_chars}")
    snaps = list_snapshots(folder)
    if not snaps:
        raise AppInputError("run: no snapshot written yet; wait for the first one")
    index = as_int(snapshot, "snapshot", -1, len(snaps) - 1)
    index = len(snaps) - 1 if index < 0 else index
    budget = ex.topology_budget(text="the probe text")  # every snapshot's diagrams together
    analyses = [analyse_snapshot(s, probe_text, max_tokens=MAX_PROBE_TOKENS, time_budget=budget) for s in snaps]
    a = analyses[index]
    curves = fit(over_training(analyses, current=a.step, title=f"The probe over training ({len(snaps)} snapshots)"))
    views = fit(snapshot_views(analyses, index))
    numbers = {"run": str(run), "steps": [x.step for x in analyses], "index": index, "snapshot": a.to_dict(),
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
                steps = Slider(10, MAX_STEPS, value=MICRO["steps"], step=10, label="steps (of a micro run)",
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
    show = user_facing(functools.partial(training, ex), "training")
    outputs = [curves, views, numbers, note, payload]
    show_btn.click(show, [run, probe, index], outputs, api_name="training", concurrency_id="heavy")
    index.release(show, [run, probe, index], outputs, api_visibility="private", concurrency_id="heavy")
    timer = gr.Timer(POLL_S, active=False)  # polls while a run started here is training
    start_btn.click(user_facing(functools.partial(start_micro, ex), "training_start"), [steps, every],
                    [run, status, timer], api_name="training_start", concurrency_id="light")
    stop_btn.click(user_facing(functools.partial(stop_micro, ex), "training_stop"), [run], [status],
                   api_name="training_stop", concurrency_id="light")
    poll = user_facing(functools.partial(progress, ex), "training_progress")
    timer.tick(poll, [run], [bar, index, count, status, job_numbers, timer], api_name="training_progress",
               concurrency_id="light", show_progress="hidden")
    run.change(poll, [run], [bar, index, count, status, job_numbers, timer], api_visibility="private",
               concurrency_id="light", show_progress="hidden")
    count.change(show, [run, probe, index], outputs, api_visibility="private", concurrency_id="heavy",
                 show_progress="hidden")
    return {"run": run}
