"""Tiers tab: every tier counted on the meta device beside the seed's claims; load and unload models.

Endpoints: ``/tiers`` (the table for a device), ``/load`` (switch this session's model, streaming the
load's progress) and ``/unload`` (drop a model's weights from the shared cache).

"Fits" means the views work, not only that the weights load: the weights plus one view of a full
context (every state and one block's attention maps, ``qtg.model.views.view_memory``) against the memory
the device has free now.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import gradio as gr
import plotly.graph_objects as go

import qtg
from app.core import Explorer, Session
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError, allocated_bytes
from app.tabs.common import Dropdown, export_controls, fit
from app.worker import in_worker
from qtg.model.memory import human_bytes, human_count, tier_summary
from qtg.model.views import view_memory

COLUMNS = ["tier", "d", "layers", "heads", "context", "params", "seed's claim", "counted / claimed", "weights",
           "weights + a view", "training", "views fit", "training fits"]
POLL_S = 0.25  # how often a load reports its progress


def summaries(device: str) -> list[dict]:
    """``tier_summary`` of every tier on ``device``, with the memory available now and what one view of a full
    context needs. The parameter counts (5.5q's meta build takes seconds) are cached by ``qtg.count_params``."""
    rows = []
    for t in qtg.TIERS:
        s = tier_summary(t, device)
        view = view_memory(t, None, s["device_dtype"], map_blocks=1, device=device)
        rows.append({**s, "view_memory": view.to_dict(), "fits_views": view.total <= s["available_bytes"]})
    return rows


def _row(s: dict) -> list[Any]:
    dt = s["device_dtype"]
    claim = s["claimed_params"]
    return [s["tier"], s["d_model"], s["n_layers"], s["n_heads"], s["max_seq_len"], human_count(s["params"]),
            human_count(claim) if claim else "-", f"{s['params'] / claim:.3g}x" if claim else "-",
            human_bytes(s["view_memory"]["weights"]), human_bytes(s["view_memory"]["total"]),
            human_bytes(s["memory_bytes"][f"train_{dt}"]), "yes" if s["fits_views"] else "no",
            "yes" if s["fits_train"] else "no"]


def params_figure(rows: list[dict]) -> go.Figure:
    claimed = [r for r in rows if r["claimed_params"]]
    fig = go.Figure([
        go.Bar(x=[r["tier"] for r in rows], y=[r["params"] for r in rows], name="counted (meta device)"),
        go.Bar(x=[r["tier"] for r in claimed], y=[r["claimed_params"] for r in claimed], name="seed's claim"),
    ])
    fig.update_layout(title="Parameters: counted vs claimed", yaxis_type="log", barmode="group",
                      template="plotly_white", height=380, yaxis_title="parameters")
    return fit(fig)


def _check_device(ex: Explorer, device: Any) -> str:
    if device not in ex.devices():
        raise AppInputError(f"device: {str(device)[:50]!r} is not one of {ex.devices()}")
    return device


def tiers_table(ex: Explorer, device: str) -> tuple[list[list[Any]], Any, str, Exportable]:
    """The tier table for ``device``, the counted-vs-claimed figure, a note, and the export payload."""
    device = _check_device(ex, device)
    rows = summaries(device)
    have = rows[0]["available_bytes"]
    note = (f"Parameters are counted by building each tier on PyTorch's meta device (nothing allocated). "
            f"Memory in {rows[0]['device_dtype']} on {device}, {human_bytes(have)} available there now. "
            "'weights + a view': the weights and one inspection of a full context (every layer's states and "
            "one block's attention maps); 'views fit' compares that with what is available. Training: batch 1, "
            "full context. 'seed's claim' is the seed documents' figure, unmeasured.")
    fig = params_figure(rows)
    return [_row(r) for r in rows], fig, note, Exportable("tiers", {"params": fig}, {"tiers": rows})


def load_model(ex: Explorer, session: Session | None, model: Any, device: Any,
               progress: Any = None) -> Iterator[tuple[str, Any]]:
    """Switch this session to ``model`` (a source key) on ``device``, yielding (message, session update) while it
    loads.

    The message states what the weights will take and how much is free; while they load, the bytes the
    process has gained so far (resident memory, or CUDA memory) against that figure drive ``progress``.
    A refusal (does not fit, bad checkpoint) leaves the session's model as it was.
    """
    session = session or ex.new_session()
    device = _check_device(ex, device)
    src = ex.registry.source(model)  # an unknown key is refused here
    if not ex.registry.is_loaded(src.key, device):
        need, have = ex.registry.weights_needed(src.key, device)
        head = (f"Loading **{src.label}** on {device}: its weights take {human_bytes(need)}, "
                f"{human_bytes(have)} is free there.")
        start = allocated_bytes(device)

        def tick() -> tuple:
            done = max(0, allocated_bytes(device) - start)
            if progress is not None and need:
                progress(min(0.99, done / need), desc=f"{human_bytes(done)} of {human_bytes(need)}")
            return f"{head} {human_bytes(done)} so far.", gr.skip()

        # a load cannot be cancelled: closed, the handler leaves it to finish in its thread; its error is
        # re-raised here, where the handler words it
        yield from in_worker(lambda _: ex.registry.get(src.key, device), tick, f"load-{src.key}", POLL_S,
                             grace_s=0.0, abandoned_s=None)
    loaded = ex.registry.get(src.key, device)
    yield loaded.describe(), Session(model=loaded.source.key, device=loaded.device, last_text=session.last_text)


def unload_model(ex: Explorer, session: Session | None, model: Any, device: Any) -> tuple[str, Session]:
    """Drop ``model``'s weights (a source key) on ``device`` from the shared cache. A session on that model goes
    back to the default one; the default model stays loaded (every new session starts on it)."""
    session = session or ex.new_session()
    device = _check_device(ex, device)
    src = ex.registry.source(model)
    if src.key == ex.default_key:
        raise AppInputError(f"model: {src.label} is the default model and stays loaded (new sessions start on it)")
    if not ex.registry.unload(src.key, device):
        raise AppInputError(f"model: {src.label} is not loaded on {device}")
    if session.model == src.key:
        session = Session(model=ex.default_key, device=ex.device, last_text=session.last_text)
    return (f"Unloaded {src.label} on {device}. This session's model: {ex.current(session).describe()}",
            session)


def status(ex: Explorer, session: Session | None) -> str:
    return ex.current(session).describe()


def build(ex: Explorer, session: gr.State) -> dict[str, Any]:
    """The tab's components and events; returns what other tabs hook onto (load and unload, the table)."""
    gr.Markdown("Every tier of the seed, counted, with memory estimates and whether its views fit here. "
                "Load a shipped model, a checkpoint directory given on the command line, or any tier that "
                "fits (random weights, labelled so); unload one to free its memory.")
    with gr.Row():
        choices = [(s.label, s.key) for s in ex.registry.sources()]
        source = Dropdown(choices, value=ex.default_key, label="model", scale=3, elem_id="tiers-model")
        device = Dropdown(ex.devices(), value=ex.device, label="device", scale=1)
        load_btn = gr.Button("Load", variant="primary", scale=1, elem_id="load-btn")
        unload_btn = gr.Button("Unload", scale=1, elem_id="unload-btn")
    loaded_md = gr.Markdown(elem_id="loaded-model")
    table_btn = gr.Button("Refresh the tier table (memory available now)", elem_id="tiers-btn")
    table = gr.Dataframe(headers=COLUMNS, label="tiers", interactive=False, wrap=True, elem_id="tiers-table")
    fig = gr.Plot(label="parameters")
    note = gr.Markdown()
    payload = gr.State(None)
    export_controls(ex, payload, "tiers")
    table_event = dict(fn=user_facing(functools.partial(tiers_table, ex), "tiers"), inputs=[device],
                       outputs=[table, fig, note, payload])
    table_btn.click(**table_event, api_name="tiers", concurrency_id="light")

    def load(session, model, device, progress=gr.Progress()):  # noqa: B008 - Gradio finds the progress bar by it
        yield from load_model(ex, session, model, device, progress)

    load_evt = load_btn.click(user_facing(load, "load"), [session, source, device], [loaded_md, session],
                              api_name="load", concurrency_id="load", concurrency_limit=1)
    unload_evt = unload_btn.click(user_facing(functools.partial(unload_model, ex), "unload"),
                                  [session, source, device], [loaded_md, session], api_name="unload",
                                  concurrency_id="load", concurrency_limit=1)
    return {"load_event": load_evt, "unload_event": unload_evt, "status": loaded_md, "payload": payload,
            "device": device, "table_event": table_event}
