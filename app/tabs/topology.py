"""Topology tab: exact persistence (gudhi and ripser, overlaid) of one layer's token states beside the
TopoFilter's approximation, with ``qtg.topology.compare``'s numbers. Endpoint ``/topology``.

One time budget ("time budget (s)", the app's limit by default) bounds all of a request's topology work once
the model's forward pass is done: every engine and H0 included, the two overlaid engines together, and the
comparison with the TopoFilter (``qtg.topology.budget.Budget``). The work runs in a thread of its own
(:func:`app.worker.in_worker`): Stop ends it on the server, a Rips engine's process included.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
import torch

from app.controls import compare_weights
from app.core import Explorer, Session, as_float, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError, Loaded
from app.tabs.common import Dropdown, Number, Slider, export_controls, fit, w_from_toggle
from app.worker import in_worker
from qtg.experiments.topo_controls import CONTROLS
from qtg.plots.topology import barcode, exact_vs_approx, persistence_diagram, weights_beside_control
from qtg.topology import approx_view, bottleneck, compare, exact_diagrams
from qtg.topology.budget import Budget

BACKENDS = {
    "gudhi + ripser (overlaid)": ("gudhi", "ripser"),
    "auto (spanning tree H0, giotto-ph H1)": ("auto",),
    "gudhi": ("gudhi",),
    "ripser": ("ripser",),
    "giotto-ph": ("giotto-ph",),
}


def _engines(backend: str) -> tuple[str, ...]:
    for label, engines in BACKENDS.items():
        if backend in (label, "+".join(engines)):
            return engines
    raise AppInputError(f"backend: {str(backend)[:50]!r} is not one of {list(BACKENDS)} "
                        f"(or {['+'.join(e) for e in BACKENDS.values()]})")


def _agreement(results: dict[str, Any]) -> dict[str, float] | None:
    """Bottleneck distance between the two engines' diagrams, per dimension (0 when they agree)."""
    if len(results) < 2:
        return None
    a, b = results.values()
    return {f"H{k}": bottleneck(a.dgms[k], b.dgms[k]) for k in range(len(a.dgms))}


# The controls a refusal names when the time budget runs out (Budget.knobs): this tab's labels.
KNOBS = {"time_budget": "'time budget (s)'", "max_points": "'max points'", "max_edge": "'max edge'",
         "text": "the text"}
MIN_TIME_BUDGET = 1e-3  # seconds


def topology(ex: Explorer, session: Session | None, text: Any, layer: Any = 1, backend: str = "auto",
             max_points: Any = 256, max_edge: Any = 0, time_budget: Any = None,
             cancel: threading.Event | None = None, started: Callable[[Budget], None] | None = None) -> tuple:
    """Exact diagrams of ``states[layer]`` and, on a QTG model, the TopoFilter's view of the same cloud.

    Returns (diagram fig, barcode fig, exact-vs-approx fig or None, numbers dict, bounds markdown, payload).
    ``text`` empty means the session's last generation; ``max_edge`` 0 means the exact enclosing radius.
    ``time_budget`` (seconds; empty: the app's limit) bounds all the topology work after the forward pass;
    ``cancel`` (Stop) ends it at its next check. ``started`` is handed the request's budget when that work begins.
    """
    session = session or ex.new_session()
    loaded = ex.current(session)
    text = ex.text_or_last(session, text)
    model = loaded.model
    names = loaded.model.state_names
    layer = as_int(layer, "layer", 0, len(names) - 1)
    points = as_int(max_points, "max points", 3, ex.limits.max_topology_points)
    edge = as_float(max_edge if max_edge not in (None, "") else 0, "max edge", 0.0, 1e6)
    seconds = as_float(ex.limits.topology_time_budget if time_budget in (None, "") else time_budget,
                       "time budget (s)", MIN_TIME_BUDGET, ex.limits.max_topology_time_budget)
    engines = _engines(backend)
    ids, tokens = ex.encode(loaded, text, ex.limits.max_text_chars, "text", min_tokens=3)
    # the states, the logits held meanwhile, the cloud's copies and the TopoFilter's N x N view
    ex.check_memory(loaded, ids.shape[1], "topology", kind="topology", max_points=points)

    with torch.inference_mode():
        out = model(ids, return_internals=True, map_blocks=())
    ex.counters.add("forwards")
    budget = ex.topology_budget(seconds, cancel, **KNOBS)  # the topology work begins: the budget's clock starts
    if started is not None:
        started(budget)
    # layer 1 of a QTG model is the TopoFilter's view of the QEmbed cloud (layer 0)
    cloud = out.states[0 if (loaded.has_topofilter and layer == 1) else layer][0]
    bounded = dict(maxdim=1, max_points=points, max_edge=edge or None, time_budget=budget, metric_input="points")
    results = {e: exact_diagrams(cloud, backend=e, **bounded) for e in engines}
    main = results["ripser"] if "ripser" in results else next(iter(results.values()))
    name = names[layer]

    diagram = fit(persistence_diagram(results, title=f"Exact H0/H1 at layer {layer} ({name}), {len(tokens)} tokens"),
                  height=560)
    bars = fit(barcode(main, title=f"Barcode ({main.backend})"))
    numbers: dict[str, Any] = {"model": loaded.source.key, "device": loaded.device, "layer": layer,
                               "layer_name": name, "tokens": tokens,
                               "exact": {e: r.to_dict() for e, r in results.items()},
                               "engine_agreement_bottleneck": _agreement(results)}
    figures = {"diagram": diagram, "barcode": bars}
    approx_fig = None
    if loaded.has_topofilter:
        budget.check("the TopoFilter's view")
        view = approx_view(out, layer=layer, model=model, tokens=tokens)
        cmp = compare(main, view)
        budget.check("the comparison with the TopoFilter")
        approx_fig = fit(exact_vs_approx(main, view, cmp))
        figures["exact_vs_approx"] = approx_fig
        numbers.update(comparison=cmp.to_dict(), approx=view.to_dict())
        # the model's own TopoFilter (on the QEmbed states, whatever the layer): what the "w from" toggle reads
        numbers["topo_filter"] = {"exact": out.topo_exact_scores[0].tolist(), "weights": out.topo_weights[0].tolist()}
    bounds = _bounds_text(main, results, loaded.has_topofilter)
    numbers["bounds"] = bounds
    return diagram, bars, approx_fig, _headline(numbers), bounds, Exportable("topology", figures, numbers)


def run_topology(ex: Explorer, session: Session | None, text: Any, layer: Any = 1, backend: str = "auto",
                 max_points: Any = 256, max_edge: Any = 0, time_budget: Any = None) -> Iterator[tuple]:
    """The Compute button: :func:`topology` in a thread of its own, the bounds panel saying where it stands
    (the forward pass, then the topology work against its budget) until the result comes. Closing this
    generator (Stop) cancels the work on the server."""
    t0 = time.perf_counter()
    held: dict[str, Budget] = {}

    def work(cancel: threading.Event) -> tuple:
        return topology(ex, session, text, layer, backend, max_points, max_edge, time_budget, cancel,
                        started=lambda budget: held.setdefault("budget", budget))

    def tick() -> tuple:
        b = held.get("budget")
        status = (f"computing: the topology work, {b.elapsed():.1f} s of its {b.seconds:g} s time budget" if b else
                  f"computing: the model's forward pass, {time.perf_counter() - t0:.1f} s (outside the time budget)")
        return (*[gr.skip()] * 4, status, gr.skip())

    result = yield from in_worker(work, tick, "topology")
    yield result


def weights_view(ex: Explorer, session: Session | None, payload: Exportable | None, w_from: Any) -> tuple:
    """The "w from" toggle, after Compute and whenever it changes: (figure, words) of the last text's w from the
    model's TopoFilter beside the chosen control's for the same tokens; the words alone on a baseline."""
    if payload is None or payload.tab != "topology":
        return None, "Compute first: the toggle shows the computed text's w."
    n = payload.numbers
    loaded = ex.registry.get(n["model"], n.get("device") or (session or ex.new_session()).device)
    if "topo_filter" not in n:
        return None, compare_weights(ex.calibrations, loaded, w_from, [], [])[1]
    comparison, note = compare_weights(ex.calibrations, loaded, w_from, n["topo_filter"]["weights"],
                                       n["topo_filter"]["exact"])
    label = None if comparison.control is None else f"{CONTROLS[comparison.control]} control's"
    fig = fit(weights_beside_control(comparison.to_dict(), n["tokens"], label,
                                     title="w of each token: the TopoFilter's, beside the control's and position's"))
    return fig, note


def stopped() -> str:
    return "stopped (Stop pressed): the server computes no more for this request"


def _headline(numbers: dict[str, Any]) -> dict[str, Any]:
    """The numbers the page shows (the export holds everything)."""
    keep = ("bottleneck_h0", "wasserstein1_h0", "mean_abs_error", "max_abs_error", "spearman_filter_vs_elder",
            "spearman_filter_vs_causal", "softmin_bound_holds", "filter_agreement_elder", "h1_bars",
            "h1_total_persistence", "negative_soft", "exact_is_bounded")
    out = {"layer": f"{numbers['layer']} ({numbers['layer_name']})", "tokens": len(numbers["tokens"])}
    out["bars"] = {e: r["bars"] for e, r in numbers["exact"].items()}
    out["seconds"] = {e: round(r["seconds"], 4) for e, r in numbers["exact"].items()}
    if numbers["engine_agreement_bottleneck"] is not None:
        out["gudhi_vs_ripser_bottleneck"] = numbers["engine_agreement_bottleneck"]
    if "comparison" in numbers:
        out["comparison"] = {k: numbers["comparison"][k] for k in keep}
    return out


def _bounds_text(main: Any, results: dict[str, Any], has_topofilter: bool) -> str:
    b = main.bounds
    lines = [f"**Bounds applied**: {b.describe()}.",
             "The diagrams are exact for the whole cloud." if b.exact else
             "The diagrams are exact for the points kept and the edges allowed, as stated above."]
    if not has_topofilter:
        lines.append("This is a dot-product baseline: it has no TopoFilter, so there is no approximation to compare.")
    return "  \n".join(lines)


def layer_label(loaded: Loaded) -> str:
    """The layer slider's label: its indices and the states they name, the inputs and first block in full
    (blocks are numbered from 0: layer 2 of a QTG model is the output of block 0)."""
    names = loaded.model.state_names
    first = len(names) - loaded.model.cfg.n_layers + 1  # the inputs, then block 0
    shown = [f"{i} {name}" for i, name in enumerate(names)]
    return f"layer ({', '.join(shown if first >= len(names) - 1 else [*shown[:first], '…', shown[-1]])})"


def control_ranges(ex: Explorer, loaded: Loaded) -> tuple:
    """Updates of this tab's controls for ``loaded`` (its states: QEmbed, TopoFilter, blocks...)."""
    n = len(loaded.model.state_names)
    return (gr.update(maximum=n - 1, value=min(1, n - 1), label=layer_label(loaded)),)


def build(ex: Explorer, session: gr.State, loaded: Loaded) -> dict[str, Any]:
    """The tab's components and events; ``loaded`` is the model the page starts on (its ranges)."""
    lim = ex.limits
    gr.Markdown("Exact Vietoris–Rips persistence of the token states at one layer, beside the TopoFilter's "
                "approximation of H0 on the same tokens. Leave the text empty to use the last generation. "
                "The text must fit the model's context (a longer one is refused with the limit in tokens and "
                "characters).")
    with gr.Row():
        text = gr.Textbox(label="text (empty: the last generation)", lines=4, scale=3, elem_id="topology-text",
                          max_length=lim.max_text_chars)
        with gr.Column(scale=2):
            layer = Slider(0, len(loaded.model.state_names) - 1, value=1, step=1, label=layer_label(loaded),
                           elem_id="topology-layer")
            backend = Dropdown(list(BACKENDS), value=next(iter(BACKENDS)), label="backend")
            max_points = Slider(3, lim.max_topology_points, value=256, step=1, label="max points")
            max_edge = Number(value=0, label="max edge (0 = enclosing radius, exact)", minimum=0)
            budget = Number(value=lim.topology_time_budget, minimum=MIN_TIME_BUDGET,
                            maximum=lim.max_topology_time_budget, elem_id="topology-budget",
                            label="time budget (s): all the topology work, both engines and H0 included")
            with gr.Row():
                run_btn = gr.Button("Compute", variant="primary", elem_id="topology-btn")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="topology-stop")
    bounds = gr.Markdown(elem_id="topology-bounds")
    with gr.Row():
        diagram = gr.Plot(label="diagram", elem_id="topology-diagram")
        bars = gr.Plot(label="barcode", elem_id="topology-barcode")
    approx = gr.Plot(label="exact vs approximate", elem_id="topology-approx")
    with gr.Row():
        with gr.Column(scale=1):
            w_from = w_from_toggle("topology-w-from")
            w_note = gr.Markdown(elem_id="topology-w-note")
        w_plot = gr.Plot(label="w beside a control", elem_id="topology-w", scale=2)
    numbers = gr.JSON(label="comparison numbers")
    payload = gr.State(None)
    export_controls(ex, payload, "topology")
    evt = run_btn.click(user_facing(functools.partial(run_topology, ex), "topology"),
                        [session, text, layer, backend, max_points, max_edge, budget],
                        [diagram, bars, approx, numbers, bounds, payload], api_name="topology",
                        concurrency_id="heavy")
    show_w = user_facing(functools.partial(weights_view, ex), "topology_w_from")
    evt.then(show_w, [session, payload, w_from], [w_plot, w_note], api_visibility="private")
    w_from.change(show_w, [session, payload, w_from], [w_plot, w_note], api_name="topology_w_from",
                  concurrency_id="heavy")
    # Cancelling closes the handler's generator, which cancels the work (a Rips engine's process is killed)
    stop_btn.click(None, None, None, cancels=[evt], api_visibility="private").then(
        stopped, None, [bounds], api_visibility="private", queue=False)
    return {"ranges": [layer]}
