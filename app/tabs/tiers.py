"""Tiers tab: every tier counted on the meta device beside the seed's claims; load a model.

Endpoints: ``/tiers`` (the table for a device) and ``/load`` (switch this session's model).
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import plotly.graph_objects as go

import qtg
from app.core import Explorer, Session
from app.errors import user_facing
from app.exports import Exportable
from app.tabs.common import export_controls
from qtg.memory import human_bytes, human_count, tier_summary

COLUMNS = ["tier", "d", "layers", "heads", "context", "params (counted)", "seed's claim", "counted / claimed",
           "inference (device dtype)", "training (device dtype)", "fits inference", "fits training"]

def summaries(device: str) -> list[dict]:
    """``tier_summary`` of every tier on ``device``, with the memory available now. The parameter counts
    (5.5q's meta build takes seconds) are cached by ``qtg.count_params`` itself."""
    return [tier_summary(t, device) for t in qtg.TIERS]


def _row(s: dict) -> list[Any]:
    dt = s["device_dtype"]
    claim = s["claimed_params"]
    return [s["tier"], s["d_model"], s["n_layers"], s["n_heads"], s["max_seq_len"], human_count(s["params"]),
            human_count(claim) if claim else "-", f"{s['params'] / claim:.3g}x" if claim else "-",
            human_bytes(s["memory_bytes"][f"inference_{dt}"]), human_bytes(s["memory_bytes"][f"train_{dt}"]),
            "yes" if s["fits_inference"] else "no", "yes" if s["fits_train"] else "no"]


def params_figure(rows: list[dict]) -> go.Figure:
    claimed = [r for r in rows if r["claimed_params"]]
    fig = go.Figure([
        go.Bar(x=[r["tier"] for r in rows], y=[r["params"] for r in rows], name="counted (meta device)"),
        go.Bar(x=[r["tier"] for r in claimed], y=[r["claimed_params"] for r in claimed], name="seed's claim"),
    ])
    fig.update_layout(title="Parameters: counted vs claimed", yaxis_type="log", barmode="group",
                      template="plotly_white", height=380, yaxis_title="parameters")
    return fig


def tiers_table(ex: Explorer, device: str) -> tuple[list[list[Any]], Any, str, Exportable]:
    """The tier table for ``device``, the counted-vs-claimed figure, a note, and the export payload."""
    if device not in ex.devices():
        raise gr.Error(f"device must be one of {ex.devices()}, got {device!r}")
    rows = summaries(device)
    have = rows[0]["available_bytes"]
    note = (f"Parameters are counted by building each tier on PyTorch's meta device (nothing allocated). "
            f"Memory: batch 1, full context, in {rows[0]['device_dtype']} on {device}; "
            f"{human_bytes(have)} available there now. 'seed's claim' is the seed documents' figure, unmeasured.")
    fig = params_figure(rows)
    return [_row(r) for r in rows], fig, note, Exportable("tiers", {"params": fig}, {"tiers": rows})


def load_model(ex: Explorer, session: Session | None, key: str, device: str) -> tuple[str, Session]:
    """Switch this session to ``key`` on ``device``. A refusal (does not fit, bad checkpoint) leaves the
    session's model as it was."""
    session = session or ex.new_session()
    if device not in ex.devices():
        raise gr.Error(f"device must be one of {ex.devices()}, got {device!r}")
    loaded = ex.registry.get(key, device)  # raises before the session changes
    return loaded.describe(), Session(model=loaded.source.key, device=loaded.device, last_text=session.last_text)


def status(ex: Explorer, session: Session | None) -> str:
    return ex.current(session).describe()


def build(ex: Explorer, session: gr.State) -> dict[str, Any]:
    """The tab's components and events; returns what other tabs hook onto (the load event)."""
    gr.Markdown("Every tier of the seed, counted, with memory estimates and whether it fits here. "
                "Load a shipped model, a checkpoint directory given on the command line, or any tier that "
                "fits (random weights, labelled so).")
    with gr.Row():
        choices = [(s.label, s.key) for s in ex.registry.sources()]
        source = gr.Dropdown(choices, value=ex.default_key, label="model", scale=3)
        device = gr.Dropdown(ex.devices(), value=ex.device, label="device", scale=1)
        load_btn = gr.Button("Load", variant="primary", scale=1)
    loaded_md = gr.Markdown(elem_id="loaded-model")
    table_btn = gr.Button("Show tier table", elem_id="tiers-btn")
    table = gr.Dataframe(headers=COLUMNS, label="tiers", interactive=False, wrap=True)
    fig = gr.Plot(label="parameters")
    note = gr.Markdown()
    payload = gr.State(None)
    export_controls(ex, payload, "tiers")
    table_btn.click(user_facing(lambda d: tiers_table(ex, d)), [device], [table, fig, note, payload],
                    api_name="tiers", concurrency_id="light")
    load_evt = load_btn.click(user_facing(lambda s, k, d: load_model(ex, s, k, d)), [session, source, device],
                              [loaded_md, session], api_name="load", concurrency_id="load", concurrency_limit=1)
    return {"load_event": load_evt, "status": loaded_md, "payload": payload, "device": device}
