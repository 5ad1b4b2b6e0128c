"""Figures of activation patching, attribution patching and direct logit attribution (plotly only).

Each function takes what :mod:`qtg.experiments.patching` already computed, as the
plain values of its ``to_dict`` methods, one panel per model, and returns a
``plotly.graph_objects.Figure``; nothing here runs a model or computes an effect:

* :func:`patching_heatmaps` - ``PatchingResult.to_dict()`` of one site for each model
  (block x position, block x head, or one row by position), side by side;
* :func:`logit_attribution_heatmaps` - ``LogitAttribution.to_dict()``'s per-head terms, block x head;
* :func:`attribution_scatter` - attribution patching's estimates against real patching's values,
  one point per unit, with the line y = x and the agreement of each site.

The heatmaps share one diverging colour scale centred on 0 (:func:`symmetric_limit`), so two models'
panels compare by eye: the same colour is the same number in both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qtg.plots.topology import token_label

DIVERGING = "RdBu"  # red below 0, white at 0, blue above
MAX_CELL_TEXT = 400  # cells per panel that print their number; beyond, the hover alone gives it
SITE_MARKERS = {"resid": ("circle", "#1f77b4"), "heads": ("diamond", "#d62728"), "topo_w": ("square", "#2ca02c"),
                "mlp": ("triangle-up", "#9467bd")}
SITE_NAMES = {"resid": "residual stream (block x position)", "heads": "heads (block x head)",
              "topo_w": "TopoFilter w (position)", "mlp": "MLP (block)"}


def symmetric_limit(*arrays: Any) -> float:
    """The largest |value| of all ``arrays`` (1 when all are 0 or empty): the colour range is [-limit, limit]."""
    top = max((float(np.nanmax(np.abs(a))) for a in map(np.asarray, arrays) if a.size and np.isfinite(a).any()),
              default=0.0)
    return top or 1.0


def _grid(panel: Mapping[str, Any]) -> tuple[np.ndarray, list[str], list[str], str, str]:
    """z ``[rows, cols]``, row and column labels and axis names of one ``to_dict()`` (1-D: one row)."""
    values = np.asarray(panel["values"], dtype=np.float64)
    labels, axes = [list(map(str, lab)) for lab in panel["labels"]], list(panel["axes"])
    if values.ndim == 1:
        return values[None], [panel.get("site", "")], labels[0], "", axes[0]
    if values.ndim != 2:
        raise ValueError(f"a heatmap panel needs 1-D or 2-D values, got shape {values.shape} (axes {axes})")
    return values, labels[0], labels[1], axes[0], axes[1]


def cell_digits(limit: float) -> int:
    """Decimals that print the largest |value| ``limit`` with two significant digits (at least 2)."""
    return max(2, 1 - math.floor(math.log10(limit))) if limit > 0 else 2


def _heatmaps(panels: Mapping[str, Mapping[str, Any]], title: str, colorbar: str, digits: int | None) -> go.Figure:
    if not panels:
        raise ValueError("a patching figure needs at least one panel")
    grids = [_grid(p) for p in panels.values()]
    limit = symmetric_limit(*(g[0] for g in grids))
    digits = cell_digits(limit) if digits is None else digits
    fig = make_subplots(rows=1, cols=len(grids), subplot_titles=list(panels), horizontal_spacing=0.1)
    for col, (z, rows, cols, row_axis, col_axis) in enumerate(grids, start=1):
        shown = [token_label(c) for c in cols]
        hover = [[f"{row_axis} {r}, {col_axis} {c}: {v:+.{digits + 2}f}".lstrip() for c, v in zip(shown, line)]
                 for r, line in zip(rows, z)]
        text = dict(text=np.round(z, digits), texttemplate="%{text}", textfont=dict(size=9)) \
            if z.size <= MAX_CELL_TEXT else {}
        fig.add_trace(go.Heatmap(z=z, x=shown, y=rows, customdata=hover, coloraxis="coloraxis",
                                 hovertemplate="%{customdata}<extra></extra>", **text), row=1, col=col)
        # category axes: block "0", "1" would otherwise be read as numbers, and equal tokens merged
        fig.update_xaxes(type="category", title_text=col_axis, tickangle=-60 if len(cols) > 8 else 0,
                         showticklabels=len(cols) <= 96, row=1, col=col)
        fig.update_yaxes(type="category", title_text=row_axis, autorange="reversed", row=1, col=col)
    n_rows = max(len(g[1]) for g in grids)
    fig.update_layout(title=title, template="plotly_white", height=230 + 34 * n_rows,
                      coloraxis=dict(colorscale=DIVERGING, cmid=0.0, cmin=-limit, cmax=limit,
                                     colorbar=dict(title=colorbar)))
    return fig


def patching_heatmaps(panels: Mapping[str, Mapping[str, Any]], title: str = "Activation patching",
                      colorbar: str = "normalised LD", digits: int | None = None) -> go.Figure:
    """One heatmap per model, side by side, on one diverging scale centred on 0.

    Args:
        panels: panel title -> ``PatchingResult.to_dict()`` with 1-D (one row, by position) or 2-D values
            (first axis down, e.g. block x position or block x head).
        colorbar: what the colour means (patching: 1 = the clean run's logit difference, 0 = the corrupted one's).
        digits: decimals printed in each cell (panels of at most ``MAX_CELL_TEXT`` cells); None:
            :func:`cell_digits` of the largest |value|.
    """
    return _heatmaps(panels, title, colorbar, digits)


def logit_attribution_heatmaps(panels: Mapping[str, Mapping[str, Any]], title: str = "Direct logit attribution",
                               digits: int | None = None) -> go.Figure:
    """Each head's direct term of the logit difference, block x head, one panel per model, one scale.

    Args:
        panels: panel title -> ``LogitAttribution.to_dict()`` (its ``"heads"``, ``[blocks, heads]``, is drawn).
    """
    grids = {}
    for name, d in panels.items():
        heads = np.asarray(d["heads"], dtype=np.float64)
        grids[name] = {"values": heads, "axes": ["block", "head"],
                       "labels": [[str(b) for b in range(heads.shape[0])], [str(h) for h in range(heads.shape[1])]]}
    return _heatmaps(grids, title, "logit units", digits)


def _unit_names(d: Mapping[str, Any]) -> list[str]:
    """``"block 1, position 3:the"`` for each unit of a ``to_dict()``, in C order of its values."""
    shape, axes, labels = np.asarray(d["values"]).shape, d["axes"], d["labels"]
    return [", ".join(f"{axes[k]} {token_label(str(labels[k][i]))}" for k, i in enumerate(idx))
            for idx in np.ndindex(*shape)]


def attribution_scatter(panels: Mapping[str, Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]],
                        title: str = "Attribution patching against real patching") -> go.Figure:
    """Per model, one point per unit: real (activation) patching across, attribution patching's estimate up.

    Args:
        panels: panel title -> ``(real, estimate)`` pairs, one per site: ``PatchingResult.to_dict()`` of
            :func:`~qtg.experiments.activation_patching` and of :func:`~qtg.experiments.attribution_patching`
            on the same units; the estimate's ``"agreement"`` (Pearson r, top-k overlap), when set, is named
            in the panel's title.
    """
    if not panels:
        raise ValueError("attribution_scatter needs at least one panel")
    titles = []
    for name, pairs in panels.items():
        notes = [f"{est['site']} r {a['pearson']:.2f}, top-{a['k']} {a['top_k_overlap']:.0%}"
                 for _, est in pairs if (a := est.get("agreement"))]
        titles.append(name + (f"<br><sup>{'; '.join(notes)}</sup>" if notes else ""))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=titles, horizontal_spacing=0.1)
    every = [np.ravel(d["values"]) for pairs in panels.values() for pair in pairs for d in pair]
    limit = symmetric_limit(*every) * 1.08
    seen = set()
    for col, pairs in enumerate(panels.values(), start=1):
        for real, est in pairs:
            site = est["site"]
            symbol, color = SITE_MARKERS.get(site, ("circle-open", "#7f7f7f"))
            fig.add_trace(go.Scatter(
                x=np.ravel(real["values"]), y=np.ravel(est["values"]), mode="markers",
                name=SITE_NAMES.get(site, site), legendgroup=site, showlegend=site not in seen,
                marker=dict(symbol=symbol, color=color, size=8, opacity=0.75), customdata=_unit_names(real),
                hovertemplate="%{customdata}<br>real %{x:+.4f}<br>attribution %{y:+.4f}<extra>" + site + "</extra>"),
                row=1, col=col)
            seen.add(site)
        fig.add_trace(go.Scatter(x=[-limit, limit], y=[-limit, limit], mode="lines", name="y = x",
                                 line=dict(color="gray", dash="dash", width=1), hoverinfo="skip",
                                 showlegend=col == 1, legendgroup="diagonal"), row=1, col=col)
        fig.update_xaxes(title_text="real patching (normalised LD)", range=[-limit, limit], row=1, col=col)
        fig.update_yaxes(title_text="attribution estimate" if col == 1 else None, range=[-limit, limit],
                         row=1, col=col)
    fig.update_layout(title=title, template="plotly_white", height=470, margin=dict(t=110),
                      legend=dict(orientation="h", yanchor="bottom", y=-0.32, xanchor="right", x=1.0))
    return fig
