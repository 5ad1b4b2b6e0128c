"""Attention tab: Fisher-Rao attention maps and distances per layer and head, with gamma; beside them
the same text through the same-size baseline's dot-product attention. Endpoint ``/attention``.

QTG scores keys by score_ij = -gamma_h d_FR(p_i, q_j)^2 with d_FR = arccos BC(p_i, q_j) (spec,
GeoAttention); the maps come from ``model(ids, return_internals=True)``: ``out.attention`` and
``out.distances`` per block, ``[B, H, N, N]``.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr
import torch

from app.core import Explorer, Session, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError, Loaded
from app.tabs.common import export_controls
from qtg.attention_plots import attention_heatmaps, gamma_bars


def head_stats(maps: torch.Tensor) -> dict[str, list[float]]:
    """Per head, over queries: mean row entropy (nats; log i is uniform over i keys) and mean attended
    distance sum_j a_ij (i - j) in tokens. Args: maps ``[H, N, N]``."""
    maps = maps.float()
    n = maps.shape[-1]
    ent = -(maps * torch.log(maps.clamp_min(1e-30))).sum(-1).mean(-1)  # [H]
    lag = (torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1)).clamp_min(0).float()  # [N, N]
    dist = (maps * lag).sum(-1).mean(-1)  # [H]
    return {"mean_row_entropy": ent.tolist(), "mean_attended_distance": dist.tolist()}


def _maps(loaded: Loaded, ex: Explorer, text: str, layer_arg: Any) -> tuple[Any, list[str], int, str]:
    ids, tokens = ex.encode(loaded, text, ex.limits.max_text_chars, "text")
    cut = ""
    if len(tokens) > ex.limits.max_attention_tokens:
        cut = (f"Showing the first {ex.limits.max_attention_tokens} of {len(tokens)} tokens "
               f"(max attention tokens).")
        ids, tokens = ids[:, :ex.limits.max_attention_tokens], tokens[:ex.limits.max_attention_tokens]
    layer = as_int(layer_arg, "layer", 0, loaded.model.cfg.n_layers - 1)
    with torch.inference_mode():
        out = loaded.model(ids, return_internals=True)
    return out, tokens, layer, cut


def attention(ex: Explorer, session: Session | None, text: Any, layer: Any = 0, head: Any = -1) -> tuple:
    """Returns (attention fig, distance fig or None, gamma fig or None, baseline fig or None, numbers, note, payload).

    ``layer`` is a block index; ``head`` -1 draws every head.
    """
    session = session or ex.new_session()
    text = text if isinstance(text, str) and text.strip() else session.last_text
    if not text:
        raise AppInputError("no text: type one, or generate first (the last generation is used when empty)")
    loaded = ex.current(session)
    out, tokens, layer, cut = _maps(loaded, ex, text, layer)
    n_heads = loaded.model.cfg.n_heads
    head = as_int(head, "head", -1, n_heads - 1)
    heads = None if head < 0 else [head]
    b0 = 0  # the batch row
    kind = "Fisher-Rao" if loaded.is_qtg else "dot-product"
    gamma = out.gamma[layer] if loaded.is_qtg else None
    figs = {"attention": attention_heatmaps(out.attention[layer][b0], tokens, "attention", heads, gamma,
                                            title=f"{kind} attention, block {layer} ({loaded.source.name})")}
    numbers: dict[str, Any] = {"model": loaded.source.key, "layer": layer, "tokens": tokens,
                               "stats": head_stats(out.attention[layer][b0])}
    if loaded.is_qtg:
        figs["distance"] = attention_heatmaps(out.distances[layer][b0], tokens, "distance", heads, gamma,
                                              title=f"Fisher-Rao distance d_FR, block {layer} (max pi/2)")
        figs["gamma"] = gamma_bars(out.gamma)
        numbers["gamma"] = [g.tolist() for g in out.gamma]
        numbers["distance_mean"] = out.distances[layer][b0].float().mean((-1, -2)).tolist()
    notes = [cut] if cut else []
    base = ex.registry.baseline_for(loaded)
    if base is not None:
        bout, btokens, _, _ = _maps(base, ex, text, layer)
        figs["baseline"] = attention_heatmaps(bout.attention[layer][b0], btokens, "attention", heads,
                                              title=f"dot-product attention, block {layer} ({base.source.name})")
        numbers["baseline"] = {"model": base.source.key, "tokens": btokens,
                               "stats": head_stats(bout.attention[layer][b0])}
    elif loaded.is_qtg:
        notes.append("No same-size baseline is shipped beside this model, so there is no dot-product panel.")
    if loaded.is_qtg:
        g = [f"{v:.3g}" for v in out.gamma[layer].tolist()]
        notes.append(f"gamma at block {layer}: {', '.join(g)} (score = -gamma d_FR^2; d_FR in [0, "
                     f"{math.pi / 2:.4f}], so gamma bounds the score range to [-gamma pi^2/4, 0]).")
    numbers["notes"] = notes
    return (figs["attention"], figs.get("distance"), figs.get("gamma"), figs.get("baseline"), numbers,
            "  \n".join(notes), Exportable("attention", figs, numbers))


def build(ex: Explorer, session: gr.State, n_layers: int, n_heads: int) -> dict[str, Any]:
    gr.Markdown("Fisher–Rao attention: queries and keys are softmax-normalised per head and scored by "
                "−γ·arccos(BC)². Rows are queries, columns keys; the blank triangle is the causal mask.")
    with gr.Row():
        text = gr.Textbox(label="text (empty: the last generation)", lines=3, scale=3, elem_id="attention-text",
                          value="To be, or not to be, that is the question.", max_length=ex.limits.max_text_chars)
        with gr.Column(scale=1):
            layer = gr.Slider(0, max(0, n_layers - 1), value=0, step=1, label="block")
            head = gr.Slider(-1, max(0, n_heads - 1), value=-1, step=1, label="head (-1 = all)")
            run_btn = gr.Button("Show", variant="primary", elem_id="attention-btn")
    note = gr.Markdown()
    attn = gr.Plot(label="attention", elem_id="attention-map")
    dist = gr.Plot(label="Fisher-Rao distance")
    with gr.Row():
        base = gr.Plot(label="baseline dot-product attention")
        gamma = gr.Plot(label="gamma")
    numbers = gr.JSON(label="per-head numbers")
    payload = gr.State(None)
    export_controls(ex, payload, "attention")
    run_btn.click(user_facing(lambda *a: attention(ex, *a)), [session, text, layer, head],
                  [attn, dist, gamma, base, numbers, note, payload], api_name="attention", concurrency_id="heavy")
    return {"layer": layer, "head": head}
