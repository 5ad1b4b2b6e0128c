"""Attention tab: Fisher-Rao attention maps and distances per block and head, with gamma; beside them
the same text through the same-size baseline's dot-product attention. Endpoint ``/attention``.

QTG scores keys by score_ij = -gamma_h d_FR(p_i, q_j)^2 with d_FR = arccos BC(p_i, q_j) (docs/model.md,
GeoAttention); the maps come from ``model(ids, return_internals=True, map_blocks=[block])``, which
materialises the ``[B, H, N, N]`` maps of the block shown and of no other. Heads are drawn a page at a
time (``Limits.heads_per_page``), so a 24- or 64-head tier lays out like a 4-head one. Long texts can be
drawn on a log scale or per row (``qtg.model.views.scale_maps``); per-head numbers are
``qtg.metrics.attention_stats``.

Endpoint ``/attention_topology``: each shown head's map read as a weighted graph (distance
1 - max(a_ij, a_ji), Kushnareva et al. 2021), its exact H0/H1 diagram and features (graph Betti numbers at
the paper's thresholds, bar statistics), QTG and baseline side by side; every number is
``qtg.topology.attention_graph``'s.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import gradio as gr
import plotly.graph_objects as go
import torch

from app.core import Explorer, Session, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError, Loaded
from app.tabs.common import Radio, Slider, export_controls, fit
from qtg.metrics import attention_stats
from qtg.model.views import LOG_FLOOR, SCALES, scale_maps
from qtg.plots.attention import attention_heatmaps, gamma_bars
from qtg.plots.topology import attention_graph_diagrams
from qtg.topology import attention_graph
from qtg.topology.budget import Budget

COLS = 4  # heatmaps per row of a page
MAX_LABELS = 40  # axis labels drawn per axis; longer texts label every k-th token
SCALE_LABELS = {"linear": "attention weight a_ij", "log": "log10 a_ij", "row": "a_ij / max_j a_ij"}
SCALE_RANGES = {"linear": (0.0, None), "log": (math.log10(LOG_FLOOR), 0.0), "row": (0.0, 1.0)}


def n_pages(n_heads: int, per_page: int) -> int:
    return max(1, -(-n_heads // per_page))


def page_heads(n_heads: int, per_page: int, page: int) -> list[int]:
    """The heads page ``page`` (1-based) shows: ``per_page`` consecutive heads, the last page fewer."""
    return list(range((page - 1) * per_page, min(n_heads, page * per_page)))


def heatmaps(maps: Any, tokens: list[str], kind: str, heads: list[int], gamma: Any, title: str,
             scale: str = "linear") -> go.Figure:
    """``qtg.plots.attention.attention_heatmaps`` laid out for the page: at most ``COLS`` panels a row, x labels
    on the bottom row only (so no panel title sits on the labels above it), every k-th label on a long text,
    and, for attention weights, the chosen scale's colour range and names. Args: maps ``[H, N, N]``."""
    scaled = scale_maps(maps, scale) if kind == "attention" else maps
    cols = min(COLS, len(heads))
    fig = attention_heatmaps(scaled, tokens, kind, heads, gamma, title=title, cols=cols)
    rows = -(-len(heads) // cols)
    fig.update_layout(height=max(420, 340 * rows + 120), width=None, autosize=True, margin=dict(b=110))
    n = len(tokens)
    axis = list(fig.data[0].x)
    every = max(1, -(-n // MAX_LABELS))
    ticks = dict(showticklabels=True, tickmode="array", tickvals=axis[::every], ticktext=axis[::every])
    fig.update_yaxes(**ticks)
    fig.update_xaxes(**ticks, tickangle=-60)
    for r in range(1, rows):
        fig.update_xaxes(showticklabels=False, row=r)
    if kind == "attention" and scale != "linear":
        lo, hi = SCALE_RANGES[scale]
        fig.update_layout(coloraxis=dict(cmin=lo, cmax=hi, colorbar=dict(title=scale)))
        fig.for_each_trace(lambda t: t.update(hovertemplate=t.hovertemplate.replace(
            SCALE_LABELS["linear"], SCALE_LABELS[scale]), zmin=lo, zmax=hi))
    return fig


def gamma_figure(gammas: list[Any]) -> go.Figure:
    """``gamma_bars`` sized to its panel."""
    return fit(gamma_bars(gammas))


def all_gammas(loaded: Loaded) -> list[Any]:
    """Every block's gamma ``[H]`` as the forward applies it: read from a one-token pass, whose maps are
    ``[1, H, 1, 1]`` (so a sharded model gathers its parameters as it does for any forward)."""
    first = torch.zeros((1, 1), dtype=torch.long, device=loaded.device)
    with torch.inference_mode():
        return list(loaded.model(first, return_internals=True).gamma)


def _forward(ex: Explorer, loaded: Loaded, text: str, block: int, what: str,
             beside: Loaded | None = None) -> tuple[Any, list[str], str]:
    """The maps of one block (and every state) for ``text``, after the memory check; ``beside``: the model whose
    view the request will hold at the same time (the baseline), counted in that check too."""
    ids, tokens = ex.encode(loaded, text, ex.limits.max_text_chars, "text")
    cut = ""
    limit = ex.limits.max_attention_tokens
    if len(tokens) > limit:
        cut = f"Showing the first {limit} of {len(tokens)} tokens (max attention tokens)."
        ids, tokens = ids[:, :limit], tokens[:limit]
    ex.check_memory(loaded, ids.shape[1], what, map_blocks=1, beside=beside)
    with torch.inference_mode():
        out = loaded.model(ids, return_internals=True, map_blocks=[block])
    ex.counters.add("forwards")
    return out, tokens, cut


def _request(ex: Explorer, session: Session | None, text: Any, layer: Any, head: Any,
             page: Any) -> tuple[Loaded, str, int, int, int, list[int]]:
    """The session's model, the text (or the last generation) and the checked block, head and page,
    with the heads to show: the page's (head -1) or the one head."""
    session = session or ex.new_session()
    loaded = ex.current(session)
    text = ex.text_or_last(session, text)
    cfg, per_page = loaded.model.cfg, ex.limits.heads_per_page
    layer = as_int(layer, "block", 0, cfg.n_layers - 1)
    head = as_int(head, "head", -1, cfg.n_heads - 1)
    page = as_int(page, "heads page", 1, n_pages(cfg.n_heads, per_page))
    heads = page_heads(cfg.n_heads, per_page, page) if head < 0 else [head]
    return loaded, text, layer, head, page, heads


def attention(ex: Explorer, session: Session | None, text: Any, block: Any = 0, head: Any = -1, heads_page: Any = 1,
              colour_scale: Any = "linear") -> tuple:
    """Returns (attention fig, distance fig or None, gamma fig or None, baseline fig or None, numbers, note, payload).

    ``block`` is a block index (0-based); ``head`` -1 draws the heads of page ``heads_page`` (1-based,
    ``heads_per_page`` a page), else that one head; ``colour_scale`` is how attention weights are coloured
    (linear, log, row).
    """
    loaded, text, layer, head, page, heads = _request(ex, session, text, block, head, heads_page)
    if colour_scale not in SCALES:
        raise AppInputError(f"colour scale: {str(colour_scale)[:50]!r} is not one of {list(SCALES)}")
    cfg, per_page = loaded.model.cfg, ex.limits.heads_per_page
    base = ex.registry.baseline_for(loaded)
    out, tokens, cut = _forward(ex, loaded, text, layer, "attention", beside=base)
    b0 = 0  # the batch row
    qtg_model = loaded.has_topofilter
    kind = "Fisher-Rao" if qtg_model else "dot-product"
    gamma = out.gamma[layer] if qtg_model else None
    shown = f"heads {heads[0]}–{heads[-1]} of {cfg.n_heads}" if len(heads) > 1 else f"head {heads[0]}"
    figs = {"attention": heatmaps(out.attention[layer][b0], tokens, "attention", heads, gamma,
                                  f"{kind} attention, block {layer}, {shown} ({loaded.source.name})", colour_scale)}
    numbers: dict[str, Any] = {"model": loaded.source.key, "layer": layer, "heads": heads, "scale": colour_scale,
                               "tokens": tokens, "stats": attention_stats(out.attention[layer][b0]).to_dict()}
    if qtg_model:
        figs["distance"] = heatmaps(out.distances[layer][b0], tokens, "distance", heads, gamma,
                                    f"Fisher-Rao distance d_FR, block {layer}, {shown} (max pi/2)")
        gammas = all_gammas(loaded)  # out.gamma holds the shown block's only
        figs["gamma"] = gamma_figure(gammas)
        numbers["gamma"] = [g.tolist() for g in gammas]
        numbers["distance_mean"] = out.distances[layer][b0].float().mean((-1, -2)).tolist()
    notes = [cut] if cut else []
    if head < 0 and cfg.n_heads > per_page:
        notes.append(f"Heads page {page} of {n_pages(cfg.n_heads, per_page)}: {shown}.")
    if base is not None:
        bout, btokens, _ = _forward(ex, base, text, layer, "attention (baseline)")
        figs["baseline"] = heatmaps(bout.attention[layer][b0], btokens, "attention", heads, None,
                                    f"dot-product attention, block {layer}, {shown} ({base.source.name})", colour_scale)
        numbers["baseline"] = {"model": base.source.key, "tokens": btokens,
                               "stats": attention_stats(bout.attention[layer][b0]).to_dict()}
    elif qtg_model:
        notes.append("No same-size baseline is shipped beside this model, so there is no dot-product panel.")
    if qtg_model:
        g = [f"{v:.3g}" for v in out.gamma[layer].tolist()]
        notes.append(f"gamma at block {layer}: {', '.join(g)} (score = -gamma d_FR^2; d_FR in [0, "
                     f"{math.pi / 2:.4f}], so gamma bounds the score range to [-gamma pi^2/4, 0]).")
    numbers["notes"] = notes
    return (figs["attention"], figs.get("distance"), figs.get("gamma"), figs.get("baseline"), numbers,
            "  \n".join(notes), Exportable("attention", figs, numbers))


def _head_graphs(ex: Explorer, maps: Any, heads: list[int], budget: Budget) -> list[Any]:
    """``qtg.topology.attention_graph`` of each head's map (``maps`` ``[H, N, N]``), within the topology bounds
    and the request's one time ``budget``."""
    return [attention_graph(maps[h], max_points=ex.limits.max_topology_points, time_budget=budget) for h in heads]


def feature_table(graphs: dict[str, list[Any]], heads: list[int]) -> dict[str, Any]:
    """``AttentionTopology.features()`` for a ``gr.Dataframe``: a row per feature and model (a feature's models
    one under the other), a column per head, so the table is as narrow as one page of heads."""
    keys = list(next(iter(graphs.values()))[0].features())
    features = {name: [g.features() for g in gs] for name, gs in graphs.items()}
    rows = [[key, name, *[round(f[key], 4) for f in fs]] for key in keys for name, fs in features.items()]
    return {"headers": ["feature", "model", *[f"head {h}" for h in heads]], "data": rows}


def attention_topology(ex: Explorer, session: Session | None, text: Any, block: Any = 0, head: Any = -1,
                       heads_page: Any = 1) -> tuple:
    """Returns (diagram fig, feature table, numbers, note, payload): the attention graph of every shown head,
    for the loaded model and its same-size baseline (when shipped). Arguments as for :func:`attention`."""
    loaded, text, layer, head, page, heads = _request(ex, session, text, block, head, heads_page)
    cfg, per_page = loaded.model.cfg, ex.limits.heads_per_page
    base = ex.registry.baseline_for(loaded)
    out, tokens, cut = _forward(ex, loaded, text, layer, "attention topology", beside=base)
    budget = ex.topology_budget(text="the text")  # every head of both models together (the forwards not counted)
    kind = "QTG" if loaded.has_topofilter else "dot-product"
    graphs = {f"{kind} ({loaded.source.name})": _head_graphs(ex, out.attention[layer][0], heads, budget)}
    models = {loaded.source.name: loaded.source.key}
    notes = [cut] if cut else []
    if base is not None:
        bout, _, _ = _forward(ex, base, text, layer, "attention topology (baseline)")
        graphs[f"baseline ({base.source.name})"] = _head_graphs(ex, bout.attention[layer][0], heads, budget)
        models[base.source.name] = base.source.key
    elif loaded.has_topofilter:
        notes.append("No same-size baseline is shipped beside this model, so there is no dot-product column.")
    if head < 0 and cfg.n_heads > per_page:
        notes.append(f"Heads page {page} of {n_pages(cfg.n_heads, per_page)}.")
    bounded = sorted({g.diagrams.bounds.describe() for gs in graphs.values() for g in gs
                      if not g.diagrams.bounds.exact})
    notes.extend(f"Bounds applied: {b}." for b in bounded)
    fig = fit(attention_graph_diagrams(graphs, heads, f"Attention-graph H0/H1, block {layer} "
                                                      f"(distance 1 − max(a_ij, a_ji); {len(tokens)} tokens)"))
    numbers: dict[str, Any] = {"models": models, "layer": layer, "heads": heads, "tokens": tokens, "notes": notes,
                               "graphs": {name: [g.to_dict() for g in gs] for name, gs in graphs.items()}}
    return (fig, feature_table(graphs, heads), numbers, "  \n".join(notes),
            Exportable("attention", {"attention_topology": fig}, numbers))


def control_ranges(ex: Explorer, loaded: Loaded) -> tuple:
    """Updates of this tab's controls for ``loaded``: blocks, heads and pages of heads (hidden when one page
    holds every head; a slider needs two values, the handler refuses any page beyond the last)."""
    cfg = loaded.model.cfg
    pages = n_pages(cfg.n_heads, ex.limits.heads_per_page)
    return (gr.update(maximum=max(1, cfg.n_layers - 1), value=0), gr.update(maximum=max(0, cfg.n_heads - 1), value=-1),
            gr.update(maximum=max(2, pages), value=1, visible=pages > 1))


def build(ex: Explorer, session: gr.State, loaded: Loaded) -> dict[str, Any]:
    """The tab's components and events; ``loaded`` is the model the page starts on (its ranges)."""
    cfg = loaded.model.cfg
    pages = n_pages(cfg.n_heads, ex.limits.heads_per_page)
    gr.Markdown("Fisher–Rao attention: queries and keys are softmax-normalised per head and scored by "
                "−γ·arccos(BC)². Rows are queries, columns keys; the blank triangle is the causal mask. "
                f"Heads are drawn {ex.limits.heads_per_page} at a time: pick the page, or one head.")
    with gr.Row():
        text = gr.Textbox(label="text (empty: the last generation)", lines=3, scale=3, elem_id="attention-text",
                          value="To be, or not to be, that is the question.", max_length=ex.limits.max_text_chars)
        with gr.Column(scale=2):
            layer = Slider(0, max(1, cfg.n_layers - 1), value=0, step=1, label="block", elem_id="attention-block")
            head = Slider(-1, max(0, cfg.n_heads - 1), value=-1, step=1, label="head (-1 = the page's heads)",
                          elem_id="attention-head")
            page = Slider(1, max(2, pages), value=1, step=1, label="heads page", elem_id="attention-page",
                          visible=pages > 1)
            scale = Radio(list(SCALES), value="linear", label="colour scale (log or per row for long texts)")
            run_btn = gr.Button("Show", variant="primary", elem_id="attention-btn")
    note = gr.Markdown()
    attn = gr.Plot(label="attention", elem_id="attention-map")
    dist = gr.Plot(label="Fisher-Rao distance", elem_id="attention-distance")
    base = gr.Plot(label="baseline dot-product attention", elem_id="attention-baseline")
    gamma = gr.Plot(label="gamma", elem_id="attention-gamma")
    numbers = gr.JSON(label="per-head numbers")
    payload = gr.State(None)
    export_controls(ex, payload, "attention")
    run_btn.click(user_facing(functools.partial(attention, ex), "attention"), [session, text, layer, head, page, scale],
                  [attn, dist, gamma, base, numbers, note, payload], api_name="attention", concurrency_id="heavy")
    gr.Markdown("**Attention topology.** Each head's map as a weighted graph, distance 1 − max(a_ij, a_ji): "
                "its exact H0/H1 persistence diagram, the Betti numbers of the graph kept at attention ≥ t, and "
                "bar statistics (Kushnareva et al. 2021), QTG and the same-size baseline side by side.")
    topo_btn = gr.Button("Attention topology", elem_id="attention-topology-btn")
    topo_note = gr.Markdown(elem_id="attention-topology-note")
    topo_fig = gr.Plot(label="attention-graph diagrams", elem_id="attention-topology")
    topo_table = gr.Dataframe(label="attention-graph features per head", elem_id="attention-topology-features",
                              interactive=False, wrap=True)
    topo_numbers = gr.JSON(label="attention-graph numbers")
    topo_btn.click(user_facing(functools.partial(attention_topology, ex), "attention topology"),
                   [session, text, layer, head, page], [topo_fig, topo_table, topo_numbers, topo_note, payload],
                   api_name="attention_topology", concurrency_id="heavy")
    return {"ranges": [layer, head, page]}
