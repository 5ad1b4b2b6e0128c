"""Compare tab: one text through two models side by side -- QTG vs baseline, two tiers, CPU vs GPU,
exact vs approximate TopoFilter -- with loss, perplexity, the exact diagrams of a layer's states and
the bottleneck distance between them. Endpoint ``/compare``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import gradio as gr
import torch

from app.core import Explorer, Session, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError
from app.tabs.common import export_controls
from qtg.evaluate import score_windows, windows
from qtg.plots import diagrams_side_by_side
from qtg.tokenizer import EOS_TOKEN
from qtg.topology import bottleneck, exact_diagrams

MODES = ("approximate", "exact")  # the TopoFilter's soft-min s~, or the exact causal s (QTG only)
METRICS = ["side", "model", "device", "TopoFilter", "tokens", "loss (nats/token)", "perplexity", "bits per byte",
           "layer", "H0 bars", "H1 bars", "seconds"]


def _side(ex: Explorer, text: str, key: str, device: str, mode: str, layer_arg: Any) -> dict[str, Any]:
    """Loss and exact diagrams of one model on ``text``."""
    if mode not in MODES:
        raise AppInputError(f"mode must be one of {list(MODES)}, got {str(mode)[:50]!r}")
    if device not in ex.devices():
        raise AppInputError(f"device must be one of {ex.devices()}, got {str(device)[:50]!r}")
    loaded = ex.registry.get(key, device)
    model = loaded.exact_model() if mode == "exact" else loaded.model
    ids, tokens = ex.encode(loaded, text, ex.limits.max_text_chars, "text", min_tokens=3)
    t0 = _now(device)
    eos = loaded.tokenizer.token_to_id(EOS_TOKEN)
    seq = ([eos] if eos is not None else []) + ids[0].tolist()
    nll, count = score_windows(model, windows(seq, model.cfg.max_seq_len))
    n_states = model.cfg.n_layers + (2 if loaded.is_qtg else 1)
    layer = as_int(layer_arg, "layer", -1, n_states - 1)
    layer = n_states - 1 if layer < 0 else layer
    with torch.inference_mode():
        states = model(ids, return_internals=True).states[layer][0]
    dgms = exact_diagrams(states, maxdim=1, max_points=min(256, ex.limits.max_topology_points),
                          time_budget=ex.limits.topology_time_budget)
    seconds = _now(device) - t0
    loss = nll / count
    return {"model": loaded.source.label, "key": key, "device": loaded.device,
            "TopoFilter": mode if loaded.is_qtg else "none (baseline)", "tokens": count, "loss": loss,
            "perplexity": math.exp(loss), "bits_per_byte": nll / math.log(2) / len(text.encode("utf-8")),
            "layer": layer, "exact": dgms, "seconds": seconds}


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def compare_models(ex: Explorer, session: Session | None, text: Any, key_a: str, device_a: str, mode_a: str,
                   key_b: str, device_b: str, mode_b: str, layer: Any = -1) -> tuple:
    """Returns (metrics rows, figure, numbers, payload). ``layer`` -1 is each model's last layer."""
    session = session or ex.new_session()
    text = text if isinstance(text, str) and text.strip() else session.last_text
    if not text:
        raise AppInputError("no text: type one, or generate first (the last generation is used when empty)")
    a = _side(ex, text, key_a, device_a, mode_a, layer)
    b = _side(ex, text, key_b, device_b, mode_b, layer)
    dist = {f"H{k}": bottleneck(a["exact"].dgms[k], b["exact"].dgms[k]) for k in range(2)}
    rows = [[side, s["model"], s["device"], s["TopoFilter"], s["tokens"], round(s["loss"], 4),
             round(s["perplexity"], 3), round(s["bits_per_byte"], 4), s["layer"],
             len(s["exact"].dgms[0]), len(s["exact"].dgms[1]), round(s["seconds"], 3)]
            for side, s in (("A", a), ("B", b))]
    numbers = {"A": {k: v for k, v in a.items() if k != "exact"} | {"exact": a["exact"].to_dict()},
               "B": {k: v for k, v in b.items() if k != "exact"} | {"exact": b["exact"].to_dict()},
               "bottleneck_A_vs_B": dist, "loss_ratio_B_over_A": b["loss"] / a["loss"]}
    fig = diagrams_side_by_side(
        {f"{side}: {s['model']} ({s['device']}, {s['TopoFilter']}, layer {s['layer']})": s["exact"]
         for side, s in (("A", a), ("B", b))},
        title=f"Exact H0/H1 on the same text; bottleneck A vs B: H0 {dist['H0']:.4g}, H1 {dist['H1']:.4g}")
    headline = {"bottleneck_A_vs_B": dist, "perplexity": {"A": a["perplexity"], "B": b["perplexity"]},
                "loss_ratio_B_over_A": numbers["loss_ratio_B_over_A"]}
    return rows, fig, headline, Exportable("compare", {"diagrams": fig}, numbers)


def build(ex: Explorer, session: gr.State) -> None:
    choices = [(s.label, s.key) for s in ex.registry.sources()]
    keys = [s.key for s in ex.registry.sources()]
    default_b = next((k for k in keys if k.endswith("-baseline")), ex.default_key)
    gr.Markdown("The same text through two models: QTG vs its baseline, two tiers, CPU vs GPU, or the "
                "TopoFilter's approximation vs its exact mode (s in place of s̃). Leave the text empty to use the "
                "last generation.")
    text = gr.Textbox(label="text", lines=3, elem_id="compare-text", max_length=ex.limits.max_text_chars,
                      value="Now is the winter of our discontent made glorious summer by this sun of York.")
    with gr.Row():
        with gr.Column():
            key_a = gr.Dropdown(choices, value=ex.default_key, label="model A")
            dev_a = gr.Dropdown(ex.devices(), value=ex.device, label="device A")
            mode_a = gr.Radio(list(MODES), value="approximate", label="TopoFilter A")
        with gr.Column():
            key_b = gr.Dropdown(choices, value=default_b, label="model B")
            dev_b = gr.Dropdown(ex.devices(), value=ex.device, label="device B")
            mode_b = gr.Radio(list(MODES), value="approximate", label="TopoFilter B")
    with gr.Row():
        layer = gr.Number(value=-1, precision=0, label="layer for the diagrams (-1 = last)", minimum=-1)
        run_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
    table = gr.Dataframe(headers=METRICS, label="side by side", interactive=False, elem_id="compare-table")
    fig = gr.Plot(label="diagrams", elem_id="compare-diagrams")
    numbers = gr.JSON(label="numbers")
    payload = gr.State(None)
    export_controls(ex, payload, "compare")
    run_btn.click(user_facing(lambda *a: compare_models(ex, *a)),
                  [session, text, key_a, dev_a, mode_a, key_b, dev_b, mode_b, layer],
                  [table, fig, numbers, payload], api_name="compare", concurrency_id="heavy")
