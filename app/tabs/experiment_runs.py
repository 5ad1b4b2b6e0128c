"""The Experiment tab's runs over the held-out works: a sweep of conditions, and the ranking of heads.

Every number is ``qtg.experiments``'s and every figure ``qtg.plots.experiment``'; this module turns form
fields into arguments and results into tables.

* ``/sweep`` - the held-out works (the test split of the bundled corpus, split as the model's
  training split it: :func:`qtg.experiments.heldout.heldout_documents`), a seeded draw of windows,
  scored under each condition (:func:`qtg.experiments.sweep`): per condition the change with its
  paired-bootstrap 95% CI over windows (these texts), its value in each work and its 95% interval
  across works, the one the verdict reads; a table and a forest plot.
* ``/heads`` - the same windows with each attention head ablated alone
  (:func:`qtg.experiments.head_importance`), heads ranked by the change in loss, for the loaded model
  and, when asked and shipped, its same-size baseline: one forest plot, one scale for both.

Each run goes in a worker thread; the handler is a generator that reports progress, and when Stop
closes it, it sets the run's cancel event, so the server stops at the next forward pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import gradio as gr

from app.core import Explorer, Session, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError, Loaded
from app.tabs.common import Number, export_controls, fit
from app.tabs.experiment_knobs import intervention_from
from app.worker import passes_in_worker
from qtg.experiments import head_importance, prepare, sweep
from qtg.experiments.bootstrap import format_ci
from qtg.experiments.heldout import heldout_documents
from qtg.model.intervention import Intervention, InterventionError
from qtg.model.memory import human_bytes
from qtg.model.views import view_memory
from qtg.plots.experiment import forest_panels, forest_plot, forest_rows

SWEEP_BATCH = 8  # windows per forward pass, as qtg experiment (fewer when the memory budget is short)
MAX_SEED = 2**32 - 1
SWEEP_HEADERS = ["condition", "bits/byte", "Δ bits/byte, these texts [95% CI]", "Δ bits/byte across works [95% CI]",
                 "verdict (across works)", "mean w", "H0 bottleneck"]
SWEEP_WIDTHS = ["16%", "10%", "19%", "19%", "18%", "8%", "10%"]
# in the numbers, not the table (the page's width): loss and Δ loss, bits/byte's own CI, tokens/s, each work's
# change (the forest plot's dots), per-head attention
HEADS_HEADERS = ["model", "rank", "head", "Δ loss, these texts [95% CI]", "Δ loss across works [95% CI]",
                 "verdict (across works)"]
DEFAULT_CONDITIONS = "topo=exact\ntopo=off\npositions=none\ngamma=1"
UNCHANGED = "= plain"  # a figure the condition cannot move (the TopoFilter precedes its knob)


# --- form fields -------------------------------------------------------------------------------------


def conditions_from(knobs: Intervention, lines: Any, loaded: Loaded, limit: int) -> list[Intervention]:
    """The knobs' intervention (unless it changes nothing) and one per non-empty line of ``lines``, each once."""
    if lines is not None and not isinstance(lines, str):
        raise AppInputError(f"conditions: expected text, one intervention per line, got {str(lines)[:50]!r}")
    out = [] if knobs.is_default else [knobs]
    for n, line in enumerate((lines or "").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            iv = Intervention.parse(line.strip())
            iv.check(loaded.model)
        except InterventionError as e:
            raise AppInputError(f"conditions line {n}: {e}") from None
        if not iv.is_default and iv.name not in {c.name for c in out}:
            out.append(iv)
    if not out:
        raise AppInputError("conditions: nothing to compare; set a knob or give a line such as topo=exact")
    if len(out) > limit:
        raise AppInputError(f"conditions: {len(out)} is above the maximum {limit} (max sweep conditions)")
    return out


def _windows_and_seed(ex: Explorer, windows: Any, seed: Any) -> tuple[int, int]:
    lim = ex.limits
    n = as_int(windows if windows not in (None, "") else lim.sweep_windows, "windows", 1, lim.max_sweep_windows)
    return n, as_int(seed if seed not in (None, "") else 0, "seed", 0, MAX_SEED)


def sweep_batch(ex: Explorer, loaded: Loaded) -> int:
    """Windows per forward pass: ``SWEEP_BATCH``, or as many full-context windows as the memory budget holds
    (``qtg.model.views.view_memory`` of one window with every block's maps, as a sampled window keeps them).

    Raises:
        AppInputError: not even one window fits, with needed against available.
    """
    cfg = loaded.model.cfg
    dtype = next(loaded.model.parameters()).dtype
    one = view_memory(cfg, cfg.max_seq_len, dtype, cfg.n_layers, "internals", loaded.device).request
    budget = ex.memory_budget(loaded.device)
    if one > budget:
        raise AppInputError(f"sweep: one window of {cfg.max_seq_len:,} tokens on {loaded.source.name} needs "
                            f"{human_bytes(one)} beyond the weights, {human_bytes(budget)} is available; free memory "
                            "or use a smaller model")
    return int(min(SWEEP_BATCH, budget // one))


def stopped(state: dict[str, Any] | None) -> str:
    """The status line after Stop, with the last progress the server reported."""
    done, total = (state or {}).get("done", 0), (state or {}).get("total", 0)
    return f"stopped after {done} of {total} window passes (Stop pressed; the server computes no more)"


def _across(d: dict[str, Any], prefix: str = "") -> str:
    return format_ci(d[prefix + "works_estimate"], d[prefix + "ci95_works"], sign=True)


def _works_words(d: dict[str, Any]) -> str:
    """How the interval across works was made, for the status line (``d``: a condition's or a head's dict)."""
    return f"95% interval across the {d['n_works']} works ({d['works_method']})"


# --- the sweep -----------------------------------------------------------------------------------------


def _figure(c: dict[str, Any], key: str, digits: int) -> Any:
    if key in c["unchanged"]:
        return UNCHANGED
    return "-" if c[key] is None else round(c[key], digits)


def sweep_table(result: dict[str, Any]) -> dict[str, Any]:
    """``SweepResult.to_dict()`` as the table's rows ("= plain" where a condition cannot move a figure)."""
    rows = []
    for i, c in enumerate(result["conditions"]):
        rows.append([c["name"], round(c["bits_per_byte"], 4), format_ci(c["delta_bits_per_byte"], c["ci95"], sign=True),
                     "-" if i == 0 else _across(c), "-" if i == 0 else c["verdict"],
                     _figure(c, "mean_topo_weight", 3), _figure(c, "bottleneck_h0_mean", 4)])
    return {"headers": SWEEP_HEADERS, "data": rows}


def run_sweep(ex: Explorer, session: Session | None, topo: Any = "approx", theta: Any = None, tau: Any = None,
              temperature: Any = None, gamma: Any = None, gamma_scale: Any = 1.0, ablate: Any = "",
              positions: Any = "model", lines: Any = DEFAULT_CONDITIONS, windows: Any = None, sample: Any = 2,
              seed: Any = 0, progress: Any = None) -> Iterator[tuple]:
    """Yields (table, forest plot, status, numbers, payload, progress state): progress while the sweep runs
    (the other outputs skipped), then the result. Closing the generator (Stop) cancels the sweep on the server.

    The knobs (``topo`` ... ``positions``) are one condition unless they change nothing; ``lines``: more
    conditions, one per line; ``windows``: windows of the held-out works drawn with ``seed`` (default
    ``Limits.sweep_windows``); ``sample``: those with attention statistics and exact H0.
    """
    session = session or ex.new_session()
    loaded = ex.current(session)
    knobs = intervention_from(loaded, topo, theta, tau, temperature, gamma, gamma_scale, ablate, positions)
    conds = conditions_from(knobs, lines, loaded, ex.limits.max_sweep_conditions)
    n, sd = _windows_and_seed(ex, windows, seed)
    s = as_int(sample if sample not in (None, "") else 2, "sampled windows", 0, min(n, ex.limits.max_sweep_sample))
    batch = sweep_batch(ex, loaded)
    docs = heldout_documents(loaded.model, "test")
    corpus = prepare(loaded.model, docs, tokenizer=loaded.tokenizer, max_windows=n, seed=sd)
    state = {"done": 0, "total": len(corpus.windows) * (len(conds) + 1)}

    def work(cancel: threading.Event, report: Callable[[int], None]) -> Any:
        return sweep(loaded.model, corpus, conds, tokenizer=loaded.tokenizer, batch_size=batch, sample=s, seed=sd,
                     cancel=cancel, on_progress=lambda done, _: report(done))

    found = yield from passes_in_worker(work, state, progress, "experiment-sweep", 2,
                                        partial(ex.counters.add, "forwards"), after=2)
    result = found.to_dict()
    result["split"] = {"name": "test", "documents": [d.name for d in docs]}
    c, changed = result["corpus"], result["conditions"][1:]
    fig = fit(forest_plot(forest_rows(changed), "Δ bits/byte against the unmodified model",
                          f"{loaded.source.name} on {c['windows']} windows of the held-out works: Δ bits/byte, 95% "
                          "CI"))
    status = (f"done: {c['windows']} windows ({c['tokens']:,} tokens, {c['bytes']:,} bytes) of the held-out works "
              f"({', '.join(result['split']['documents'])}), {len(conds) + 1} conditions; paired bootstrap 95% CI "
              f"over windows (these texts; {result['resamples']} resamples, seed {sd}) and {_works_words(changed[0])}, "
              f"which the verdict reads; attention and H0 on {s} sampled windows. {UNCHANGED}: the condition cannot "
              "change that figure (the TopoFilter precedes its knob).")
    yield sweep_table(result), fig, status, result, Exportable("sweep", {"forest": fig}, result), dict(state)


# --- the heads ----------------------------------------------------------------------------------------


def heads_table(rankings: list[dict[str, Any]]) -> dict[str, Any]:
    """``HeadRanking.to_dict()`` of each model as rows: model, rank, head, the change in loss and its verdict."""
    rows = [[r["model"], rank, h["head"], format_ci(h["delta_loss"], h["delta_loss_ci95"], sign=True),
             _across(h, "delta_loss_"), h["delta_loss_verdict"]]
            for r in rankings for rank, h in enumerate(r["heads"], start=1)]
    return {"headers": HEADS_HEADERS, "data": rows}


def run_heads(ex: Explorer, session: Session | None, with_baseline: Any = False, windows: Any = None, seed: Any = 0,
              progress: Any = None) -> Iterator[tuple]:
    """Yields (table, forest plot, status, numbers, payload, progress state), as :func:`run_sweep`: each head of
    the loaded model (and of its shipped baseline, when ``with_baseline``) ablated alone over the same windows."""
    session = session or ex.new_session()
    loaded = ex.current(session)
    n, sd = _windows_and_seed(ex, windows, seed)
    models = [loaded]
    if with_baseline:
        base = ex.registry.baseline_for(loaded)
        if base is None:
            raise AppInputError(f"baseline: no same-size baseline is shipped beside {loaded.source.name}; untick it")
        models.append(base)
    docs = heldout_documents(loaded.model, "test")
    runs = [(m, prepare(m.model, docs, tokenizer=m.tokenizer, max_windows=n, seed=sd), sweep_batch(ex, m))
            for m in models]
    totals = [len(corpus.windows) * (m.model.cfg.n_layers * m.model.cfg.n_heads + 1) for m, corpus, _ in runs]
    state = {"done": 0, "total": sum(totals)}

    def work(cancel: threading.Event, report: Callable[[int], None]) -> list[Any]:
        out = []
        for (m, corpus, batch), before in zip(runs, [sum(totals[:i]) for i in range(len(totals))]):
            out.append(head_importance(m.model, corpus, tokenizer=m.tokenizer, batch_size=batch, seed=sd,
                                       cancel=cancel, on_progress=lambda done, _, b=before: report(b + done)))
        return out

    found = yield from passes_in_worker(work, state, progress, "experiment-heads", 2,
                                        partial(ex.counters.add, "forwards"), after=2)
    rankings = [r.to_dict() for r in found]
    panels = {f"{r['model']} ({r['arch']})": forest_rows(r["heads"], "delta_loss", name="head") for r in rankings}
    corpus = runs[0][1].summary()
    fig = fit(forest_panels(panels, "Δ loss (nats/token), ablated minus unmodified",
                            f"Each head ablated alone, on {corpus['windows']} windows of the held-out works: "
                            "Δ loss, 95% CI"))
    numbers = {"split": {"name": "test", "documents": [d.name for d in docs]}, "corpus": corpus, "seed": sd,
               "rankings": rankings}
    status = (f"done: the heads of {', '.join(r['model'] for r in rankings)} on {corpus['windows']} windows of the "
              f"held-out works ({', '.join(numbers['split']['documents'])}), largest change first; paired bootstrap "
              f"95% CI over windows (these texts) and {_works_words(rankings[0]['heads'][0])}, which the verdict "
              "reads. Heads are block:head, 0-based (ablate=B:H).")
    yield heads_table(rankings), fig, status, numbers, Exportable("heads", {"forest": fig}, numbers), dict(state)


# --- the page ----------------------------------------------------------------------------------------------


def build(ex: Explorer, session: gr.State, knobs: list[Any]) -> None:
    """The sweep and the heads sections, below the one-text panels; ``knobs``: the knob components."""
    lim = ex.limits
    gr.Markdown("**Run over the held-out works.** The test split of the bundled corpus (works the model never "
                "trained on), a seeded draw of windows, each scored by the unmodified model and under the knobs' "
                "intervention and each condition below. Each change has two 95% intervals: over windows (these "
                "texts) and across works (other texts: windows of one work are not independent; a t-interval over "
                "the per-work changes when there are fewer than 6 works). The verdict reads the one across works; "
                "the forest plot draws both, with a dot per work.")
    with gr.Row():
        lines = gr.Textbox(value=DEFAULT_CONDITIONS, lines=4, label="more conditions, one a line (as `qtg "
                           "experiment --intervene`; topo_weight=gate:0.45 is the TopoFilter reduced to one "
                           "bit: w = 1 for a repeat, 0.45 otherwise)", elem_id="sweep-conditions", scale=2)
        with gr.Column(scale=1):
            windows = Number(value=lim.sweep_windows, precision=0, elem_id="sweep-windows",
                             label=f"windows (up to {lim.max_sweep_windows}; more: narrower CIs, longer)")
            sample = Number(value=2, precision=0, label="sample: windows with attention and exact H0")
            seed = Number(value=0, precision=0, label="seed (window draw and bootstrap)")
    with gr.Row():
        sweep_btn = gr.Button("Run over the held-out works", variant="primary", elem_id="sweep-btn")
        sweep_stop = gr.Button("Stop", variant="stop", elem_id="sweep-stop")
    sweep_out = section_outputs(ex, "sweep", SWEEP_HEADERS, "conditions, the unmodified model first", SWEEP_WIDTHS)

    # explicit parameters: Gradio finds gr.Progress by its place in the signature
    # parameters named as their labels say: what gradio_client shows a caller
    def go(s, topo, theta, tau, temperature, gamma, gamma_scale, ablate, positions, more_conditions, windows, sample,
           seed, progress=gr.Progress()):  # noqa: B008 - how Gradio asks for a progress bar
        yield from run_sweep(ex, s, topo, theta, tau, temperature, gamma, gamma_scale, ablate, positions,
                             more_conditions, windows, sample, seed, progress=progress)

    wire(sweep_btn, sweep_stop, user_facing(go, "sweep"), [session, *knobs, lines, windows, sample, seed],
         sweep_out, "sweep")

    gr.Markdown("**Rank heads.** Each attention head ablated alone (its slice of the attention output zero before "
                "the block's output projection) over the same windows (windows and seed above), heads ranked by the "
                "change in loss, largest first; the baseline's heads beside them on one scale.")
    with gr.Row():
        with_baseline = gr.Checkbox(value=False, elem_id="heads-baseline",
                                    label="with baseline: also the same-size baseline's heads (when one is shipped)")
        heads_btn = gr.Button("Rank heads", variant="primary", elem_id="heads-btn")
        heads_stop = gr.Button("Stop", variant="stop", elem_id="heads-stop")
    heads_out = section_outputs(ex, "heads", HEADS_HEADERS, "heads, largest change in loss first")

    def rank(s, with_baseline, windows, seed, progress=gr.Progress()):  # noqa: B008
        yield from run_heads(ex, s, with_baseline, windows, seed, progress=progress)

    wire(heads_btn, heads_stop, user_facing(rank, "heads"), [session, with_baseline, windows, seed], heads_out,
         "heads")


def section_outputs(ex: Explorer, prefix: str, headers: list[str], table_label: str,
                    widths: list[str] | None = None) -> list[Any]:
    """[table, forest plot, status, numbers, payload, progress state] of one run's section, and its export;
    ``widths``: the table's column widths (fixed widths let long cells wrap rather than widen the table)."""
    status = gr.Markdown(elem_id=f"{prefix}-status")
    table = gr.Dataframe(headers=headers, label=table_label, interactive=False, elem_id=f"{prefix}-table", wrap=True,
                         column_widths=widths)
    forest = gr.Plot(label="forest plot", elem_id=f"{prefix}-forest")
    with gr.Accordion(f"{prefix} numbers (every figure, each work's change)", open=False):
        numbers = gr.JSON(label=f"{prefix} numbers")
    payload, state = gr.State(None), gr.State(None)
    export_controls(ex, payload, prefix)
    return [table, forest, status, numbers, payload, state]


def wire(go: Any, stop: Any, handler: Any, inputs: list[Any], outputs: list[Any], api_name: str) -> None:
    """``go`` runs ``handler`` (endpoint ``/api_name``); ``stop`` cancels it, then the status says how far it got."""
    evt = go.click(handler, inputs, outputs, api_name=api_name, concurrency_id="heavy")
    # Cancelling closes the generator on the server, which cancels the run; then the status says so.
    stop.click(None, None, None, cancels=[evt], api_visibility="private").then(
        stopped, [outputs[5]], [outputs[2]], api_visibility="private", queue=False)
