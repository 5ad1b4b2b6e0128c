"""Figures of attention maps (plotly only; nothing here runs a model).

Each function takes maps already computed by a forward pass with
``return_internals=True`` (``out.attention[layer][b]``, ``out.distances[layer][b]``,
both ``[H, N, N]``) and returns a ``plotly.graph_objects.Figure`` with the
tokens on both axes: rows are queries i, columns keys j. Causal maps are
masked above the diagonal (shown blank, not as zero), so an empty cell means
"not allowed", never "no weight".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qtg.plots.topology import token_label

KINDS = {
    # colour scale, value range, what the colour means
    "attention": ("Blues", (0.0, None), "attention weight a_ij"),
    "distance": ("Magma", (0.0, math.pi / 2), "d_FR(i, j) = arccos BC"),
}


def _as_heads(maps: Any) -> np.ndarray:
    arr = maps.detach().float().cpu().numpy() if hasattr(maps, "detach") else np.asarray(maps, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"maps must be [H, N, N] or [N, N], got shape {arr.shape}")
    return arr


def _causal(arr: np.ndarray) -> np.ndarray:
    """NaN above the diagonal: those pairs are never scored."""
    n = arr.shape[-1]
    out = arr.astype(np.float64).copy()
    out[..., np.triu_indices(n, k=1)[0], np.triu_indices(n, k=1)[1]] = np.nan
    return out


def attention_heatmaps(maps: Any, tokens: Sequence[str] | None = None, kind: str = "attention",
                       heads: Sequence[int] | None = None, gamma: Any = None, title: str | None = None,
                       cols: int = 2) -> go.Figure:
    """One heatmap per head, queries down, keys across.

    Args:
        maps: ``[H, N, N]`` (or ``[N, N]``) attention weights or Fisher-Rao distances.
        tokens: N token strings for the axes and hover (default ``#i``).
        kind: ``"attention"`` (weights, rows sum to 1) or ``"distance"`` (d_FR in [0, pi/2]).
        heads: which heads to draw (default all).
        gamma: ``[H]`` contrast per head, shown in each panel's title (score = -gamma d_FR^2).
        title: figure title.
        cols: panels per row.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    arr = _causal(_as_heads(maps))
    n_heads, n = arr.shape[0], arr.shape[-1]
    heads = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"head(s) {bad} out of range: the maps have heads 0..{n_heads - 1}")
    labels = [token_label(t) for t in tokens] if tokens is not None else [f"#{i}" for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} token strings for maps of {n} tokens")
    # unique axis labels: plotly merges equal category names, and texts repeat tokens
    axis = [f"{i}:{t}" for i, t in enumerate(labels)]
    g = None if gamma is None else np.asarray(gamma.detach().float().cpu() if hasattr(gamma, "detach") else gamma)
    names = [f"head {h}" + (f", gamma {float(g[h]):.3g}" if g is not None else "") for h in heads]
    cols = max(1, min(cols, len(heads)))
    rows = -(-len(heads) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.08,
                        vertical_spacing=0.12 if rows > 1 else 0.0)
    scale, (zmin, zmax), meaning = KINDS[kind]
    for p, h in enumerate(heads):
        fig.add_trace(go.Heatmap(
            z=arr[h], x=axis, y=axis, colorscale=scale, zmin=zmin, zmax=zmax if zmax is not None else None,
            coloraxis="coloraxis", hovertemplate="query %{y}<br>key %{x}<br>" + meaning + " %{z:.4f}<extra>"
                                                 + names[p] + "</extra>"),
            row=p // cols + 1, col=p % cols + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=n <= 48)
    fig.update_xaxes(showticklabels=n <= 48, tickangle=-60)
    fig.update_layout(title=title or meaning, template="plotly_white", height=max(380, 360 * rows),
                      coloraxis=dict(colorscale=scale, cmin=zmin, cmax=zmax, colorbar=dict(title=kind)))
    return fig


def gamma_bars(gammas: Sequence[Any], title: str = "Fisher-Rao contrast gamma per layer and head") -> go.Figure:
    """gamma_h for every layer (one group of bars per layer); gamma = 1 is the seed's fixed contrast."""
    fig = go.Figure()
    for layer, g in enumerate(gammas):
        vals = np.asarray(g.detach().float().cpu() if hasattr(g, "detach") else g, dtype=np.float64).ravel()
        fig.add_trace(go.Bar(x=[f"head {h}" for h in range(len(vals))], y=vals, name=f"block {layer}",
                             hovertemplate="%{x}: gamma %{y:.4g}<extra>block " + str(layer) + "</extra>"))
    fig.add_hline(y=1.0, line=dict(color="gray", dash="dash", width=1))
    # named in the legend: a label on the line itself lands on the bars
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="gamma = 1 (the seed's fixed value)",
                             line=dict(color="gray", dash="dash", width=1)))
    fig.update_layout(title=title, template="plotly_white", barmode="group", height=360, yaxis_title="gamma")
    return fig


def prompt_distance_strip(values: Any, block: int, title: str | None = None, height: int = 240) -> go.Figure:
    """One small line per head: TOHA's prompt distance after each generated token.

    Args:
        values: ``[H, T]``: head h's :func:`qtg.topology.prompt_distance` of the attention map of
            block ``block`` cut after the t-th generated token (``qtg.topology.PromptForest.total``,
            kept as the tokens arrive); T may be 0 (nothing generated yet).
        block: the block the maps come from (0-based), for the title.
        title: replaces the default title.
        height: in pixels (a strip: short).

    Returns:
        A figure with one ``Scatter`` line per head, x the generated token's index (0 = the first).
    """
    vals = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    if vals.ndim != 2:
        raise ValueError(f"values must be [H, T] (heads x generated tokens), got shape {vals.shape}")
    fig = go.Figure()
    x = np.arange(vals.shape[1])
    for h, row in enumerate(vals):
        fig.add_trace(go.Scatter(x=x, y=row, mode="lines", name=f"head {h}", line=dict(width=1.5),
                                 hovertemplate=f"head {h}" + ", token %{x}: %{y:.4g}<extra></extra>"))
    fig.update_layout(
        title=dict(text=title or f"Prompt distance per head, block {block} (spanning forest from the continuation "
                                 "to the prompt)", font=dict(size=13)),
        template="plotly_white", height=height, margin=dict(l=50, r=10, t=40, b=40),
        xaxis_title="generated token", yaxis_title="prompt distance", yaxis=dict(rangemode="tozero"),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0, font=dict(size=10)))
    return fig
