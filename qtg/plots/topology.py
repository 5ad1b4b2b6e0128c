"""Figures for the exact-versus-approximate topology view (plotly only).

Every function takes results already computed by :mod:`qtg.topology` and
returns a ``plotly.graph_objects.Figure``; nothing here computes topology.
:func:`save_html` writes standalone HTML with plotly.js inlined: the page
loads nothing from the network.

Conventions: diagrams are (birth, death) in ripser.py's convention. Infinite
deaths are drawn on a dashed line marked "inf" just above the largest finite
value, with "death: inf" in the hover text. Token strings are shown with
newlines as ⏎ and HTML-escaped.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qtg.atomic import atomic_text

DIM_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")  # H0, H1, H2, H3
SOURCE_SYMBOLS = ("circle-open", "x-thin-open", "diamond-open", "square-open")
APPROX_COLOR = "#ff7f0e"


def token_label(token: str) -> str:
    """A token as a person can read it in a figure."""
    return html.escape(token.replace("\n", "⏎").replace("\t", "⇥")) or "∅"


def _as_dgms(source: Any) -> list[np.ndarray]:
    dgms = getattr(source, "dgms", source)
    return [np.asarray(d, dtype=np.float64).reshape(-1, 2) for d in dgms]


def _sources(diagrams: Any) -> dict[str, list[np.ndarray]]:
    """{name: dgms} from an ExactDiagrams, a list of arrays, or a mapping of either."""
    if isinstance(diagrams, Mapping):
        return {str(k): _as_dgms(v) for k, v in diagrams.items()}
    name = getattr(diagrams, "backend", "exact")
    return {name: _as_dgms(diagrams)}


def _inf_level(all_dgms: Sequence[Sequence[np.ndarray]]) -> float:
    """Where infinite deaths are drawn: 5% above the largest finite value."""
    finite = [v for dgms in all_dgms for d in dgms for v in d[np.isfinite(d)].ravel()]
    top = max(finite, default=1.0)
    return top * 1.05 if top > 0 else 1.0


def _diagram_traces(dgm: np.ndarray, inf_level: float, name: str, color: str, symbol: str) -> go.Scatter:
    inf = np.isinf(dgm[:, 1])
    y = np.where(inf, inf_level, dgm[:, 1])
    hover = [f"birth {b:.4g}<br>death {'inf' if i else f'{d:.4g}'}<br>persistence {'inf' if i else f'{d - b:.4g}'}"
             for (b, d), i in zip(dgm, inf)]
    return go.Scatter(x=dgm[:, 0], y=y, mode="markers", name=name, text=hover, hoverinfo="text+name",
                      marker=dict(color=color, symbol=symbol, size=8, line=dict(width=1.5, color=color)))


def _frame(fig: go.Figure, inf_level: float, row: int | None = None, col: int | None = None) -> None:
    """Diagonal and the dashed line of infinite deaths."""
    where = {} if row is None else dict(row=row, col=col)
    fig.add_trace(go.Scatter(x=[0, inf_level], y=[0, inf_level], mode="lines", name="diagonal",
                             line=dict(color="gray", width=1), hoverinfo="skip", showlegend=False), **where)
    fig.add_hline(y=inf_level, line=dict(color="gray", dash="dash", width=1), annotation_text="inf",
                  annotation_position="top left", **where)


def persistence_diagram(diagrams: Any, title: str = "Persistence diagram") -> go.Figure:
    """Points of every dimension; several sources (e.g. ``{"gudhi": ex_g, "ripser": ex_r}``) overlaid.

    Args:
        diagrams: an ExactDiagrams, a list of ``[n, 2]`` arrays, or a mapping name -> either.
        title: figure title.
    """
    sources = _sources(diagrams)
    level = _inf_level(list(sources.values()))
    fig = go.Figure()
    _frame(fig, level)
    for s, (name, dgms) in enumerate(sources.items()):
        for k, dgm in enumerate(dgms):
            fig.add_trace(_diagram_traces(dgm, level, f"{name} H{k}", DIM_COLORS[k % len(DIM_COLORS)],
                                          SOURCE_SYMBOLS[s % len(SOURCE_SYMBOLS)]))
    pad = 0.03 * level
    fig.update_layout(title=title, xaxis_title="birth (edge length)", yaxis_title="death (edge length)",
                      template="plotly_white", height=700,  # width: the container's
                      xaxis=dict(range=[-pad, level + pad]), yaxis=dict(range=[-pad, level + 2 * pad]))
    return fig


def diagrams_side_by_side(panels: Mapping[str, Any], title: str = "Persistence diagrams") -> go.Figure:
    """One diagram panel per entry (e.g. two models' states), on a shared "inf" level so they compare.

    Args:
        panels: panel title -> an ExactDiagrams or a list of ``[n, 2]`` arrays.
    """
    named = {name: _as_dgms(d) for name, d in panels.items()}
    fig = make_subplots(rows=1, cols=len(named), subplot_titles=list(named))
    level = _inf_level(list(named.values()))
    for col, dgms in enumerate(named.values(), start=1):
        _frame(fig, level, row=1, col=col)
        for k, dgm in enumerate(dgms):
            fig.add_trace(_diagram_traces(dgm, level, f"H{k}", DIM_COLORS[k % len(DIM_COLORS)], "circle-open"),
                          row=1, col=col)
            fig.data[-1].showlegend = col == 1
        fig.update_xaxes(title_text="birth", row=1, col=col)
    fig.update_yaxes(title_text="death", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=480)
    return fig


def barcode(diagrams: Any, title: str = "Barcode") -> go.Figure:
    """One horizontal bar per class, grouped by dimension, longest first; infinite bars dashed to "inf"."""
    dgms = _as_dgms(diagrams)
    level = _inf_level([dgms])
    fig, y = go.Figure(), 0
    for k, dgm in enumerate(dgms):
        order = np.argsort(-(np.minimum(dgm[:, 1], level) - dgm[:, 0]), kind="stable")
        for infinite in (False, True):
            xs, ys = [], []
            for b, d in dgm[order][np.isinf(dgm[order][:, 1]) == infinite]:
                xs += [b, level if infinite else d, None]
                ys += [y, y, None]
                y += 1
            if xs:
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"H{k}" + (" (inf)" if infinite else ""),
                                         line=dict(color=DIM_COLORS[k % len(DIM_COLORS)], width=2,
                                                   dash="dash" if infinite else "solid")))
        y += 2  # a gap between dimensions
    fig.add_vline(x=level, line=dict(color="gray", dash="dot", width=1), annotation_text="inf")
    fig.update_layout(title=title, xaxis_title="edge length", template="plotly_white",
                      height=int(min(1600, max(400, 150 + 2.5 * y))),
                      yaxis=dict(showticklabels=False, autorange="reversed"))
    return fig


def _token_labels(view: Any) -> list[str]:
    tokens = view.tokens or [f"#{i}" for i in range(view.n)]
    return [token_label(t) for t in tokens]


def exact_vs_approx(exact: Any, view: Any, comparison: Any = None,
                    title: str = "Exact H0 against the TopoFilter") -> go.Figure:
    """Left: exact diagrams with the implied approximate H0 {(0, s~_i)}. Right: per token s~ against s.

    Args:
        exact: ExactDiagrams of ``view.points``. view: an ApproxView. comparison: its Comparison (for the title).
    """
    labels = _token_labels(view)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.1,
                        subplot_titles=("diagrams", "per token: soft-min s~ against exact causal s"))
    dgms, implied = _as_dgms(exact), view.diagram
    level = _inf_level([dgms, [implied]])
    _frame(fig, level, row=1, col=1)
    for k, dgm in enumerate(dgms):
        fig.add_trace(_diagram_traces(dgm, level, f"exact H{k}", DIM_COLORS[k % len(DIM_COLORS)], "circle-open"),
                      row=1, col=1)
    approx = _diagram_traces(implied, level, "TopoFilter H0 (0, s~)", APPROX_COLOR, "x-thin-open")
    approx.text = [f"{labels[(i + 1) % view.n]}<br>{t}" for i, t in enumerate(approx.text)]  # row i is token i+1
    fig.add_trace(approx, row=1, col=1)

    top = float(max(view.exact.max(), view.soft.max(), 1e-9))
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="s~ = s", line=dict(color="gray", width=1),
                             hoverinfo="skip"), row=1, col=2)
    hover = [f"#{i} {labels[i]}<br>s~ {a:.4g}<br>s {b:.4g}<br>w {c:.3f}"
             for i, (a, b, c) in enumerate(zip(view.soft, view.exact, view.weights))]
    fig.add_trace(go.Scatter(x=view.exact, y=view.soft, mode="markers", name="tokens", text=hover,
                             hoverinfo="text", marker=dict(color=view.weights, colorscale="Viridis", cmin=0, cmax=1,
                                                           colorbar=dict(title="w", x=1.02), size=7)), row=1, col=2)
    fig.add_hline(y=view.theta, line=dict(color=APPROX_COLOR, dash="dot", width=1),
                  annotation_text=f"theta {view.theta:g}", row=1, col=2)
    if comparison is not None:
        rho = comparison.spearman_filter_vs_elder
        title += (f": bottleneck {comparison.bottleneck_h0:.4g}, W1 {comparison.wasserstein1_h0:.4g}, "
                  f"mean |s~ - s| {comparison.mean_abs_error:.4g}, Spearman {'n/a' if rho is None else f'{rho:.3f}'}")
    fig.update_xaxes(title_text="birth", row=1, col=1)
    fig.update_yaxes(title_text="death", row=1, col=1)
    fig.update_xaxes(title_text="exact causal s = min_{j<i} delta_ij", row=1, col=2)
    fig.update_yaxes(title_text="soft-min s~", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", height=620,
                      legend=dict(orientation="h", yanchor="top", y=-0.15, xanchor="left", x=0))
    return fig


def weights_over_text(view: Any, per_row: int = 16, title: str = "TopoFilter weights over the text") -> go.Figure:
    """The tokens in reading order, each cell coloured by w; hover shows s~, s and w."""
    labels = _token_labels(view)
    rows = -(-view.n // per_row)
    z = np.full((rows, per_row), np.nan)
    text = np.full((rows, per_row), "", dtype=object)
    custom = np.full((rows, per_row, 4), np.nan)
    for i in range(view.n):
        r, c = divmod(i, per_row)
        z[r, c], text[r, c] = view.weights[i], labels[i]
        custom[r, c] = (i, view.soft[i], view.exact[i], view.weights[i])
    fig = go.Figure(go.Heatmap(
        z=z, text=text, customdata=custom, texttemplate="%{text}", zmin=0.0, zmax=1.0, colorscale="Viridis",
        colorbar=dict(title="w"), xgap=2, ygap=2, name="w",
        hovertemplate="#%{customdata[0]} %{text}<br>s~ %{customdata[1]:.4g}<br>s %{customdata[2]:.4g}"
                      "<br>w %{customdata[3]:.3f}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", height=80 + 28 * rows,
                      xaxis=dict(visible=False), yaxis=dict(visible=False, autorange="reversed"))
    return fig


def weights_beside_control(comparison: Mapping[str, Any], tokens: Sequence[str] | None = None,
                           control_label: str | None = None,
                           title: str = "The TopoFilter's w beside a control, token by token") -> go.Figure:
    """w by position: the filter's, the control's for the same tokens (when one is set), and what position
    alone predicts (the position-only control's w, dotted).

    Args:
        comparison: ``ControlComparison.to_dict()`` (:mod:`qtg.experiments.topo_controls`).
        tokens: the token strings, for the hover. control_label: the control's name in words.
    """
    w = comparison["weight"]
    x = list(range(len(w)))
    labels = [token_label(t) for t in tokens] if tokens is not None else [""] * len(w)
    hover = "#%{x} %{text}<br>w %{y:.3f}<extra>%{fullData.name}</extra>"
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=comparison["position_weight"], mode="lines", name="position alone",
                             line=dict(color="#7f7f7f", dash="dot"), text=labels, hovertemplate=hover))
    fig.add_trace(go.Scatter(x=x, y=w, mode="markers", name="the filter's w (s̃)", marker=dict(color="#e6550d"),
                             text=labels, hovertemplate=hover))
    if comparison.get("control_weight") is not None:
        fig.add_trace(go.Scatter(x=x, y=comparison["control_weight"], mode="markers",
                                 name=f"{control_label or comparison['control']} w",
                                 marker=dict(color="#3182bd", symbol="diamond-open", size=9), text=labels,
                                 hovertemplate=hover))
    fig.update_layout(title=title, template="plotly_white", height=360, xaxis_title="position (token index)",
                      yaxis=dict(title="w", range=[-0.02, 1.05]), legend=dict(orientation="h", y=-0.25))
    return fig


_SUMMARY_PANELS = (
    ("approximation error", ("bottleneck_h0", "mean_abs_error")),
    ("rank and filter agreement", ("spearman_filter_vs_elder", "filter_agreement_elder")),
    ("exact topology", ("h0_total_persistence", "h1_total_persistence")),
    ("the filter", ("mean_weight",)),
)


def layer_summary(layers: Sequence[Any], title: str = "Topology through the depth") -> go.Figure:
    """Per-layer curves: approximation error, agreement, exact total persistence, mean weight.

    Args:
        layers: LayerComparison objects, or their ``summary()`` dicts.
    """
    rows = [x.summary() if hasattr(x, "summary") else dict(x) for x in layers]
    names = [f"{r['layer']}: {r['name']}" for r in rows]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[p[0] for p in _SUMMARY_PANELS], vertical_spacing=0.15)
    for p, (_, keys) in enumerate(_SUMMARY_PANELS):
        for key in keys:
            fig.add_trace(go.Scatter(x=names, y=[r.get(key) for r in rows], mode="lines+markers", name=key),
                          row=p // 2 + 1, col=p % 2 + 1)
    fig.update_yaxes(type="log", row=2, col=1)  # H0 totals grow with depth and dwarf H1 on a linear axis
    fig.update_layout(title=title, template="plotly_white", height=650)
    return fig


def _metric_records(source: Any) -> list[dict]:
    """Records from a run directory, a metrics.jsonl file, or already-read records.

    A line still being written by a running training (no newline yet, or not
    JSON) is skipped, so a live view can read the file while it grows.
    """
    if not isinstance(source, (str, os.PathLike)):
        return [dict(r) for r in source]
    path = Path(source)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").split("\n")[:-1]:  # the last piece has no newline yet
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def training_curves(runs: Mapping[str, Any], key: str = "ce", title: str = "Training") -> go.Figure:
    """Training ``key`` per step (lines) and its validation value (``val_<key>``, markers), one colour per run.

    Args:
        runs: name -> a run directory, its ``metrics.jsonl``, or the records already read
            (the lines ``qtg.training.train.train`` writes). ``key="ce"`` compares QTG with the
            baseline on cross-entropy alone; ``"loss"`` is each model's own objective.
        title: figure title.
    """
    fig = go.Figure()
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
    for r, (name, source) in enumerate(runs.items()):
        records = _metric_records(source)
        color = palette[r % len(palette)]
        steps = [x for x in records if x.get(key) is not None and "val_loss" not in x]
        val = [x for x in records if x.get(f"val_{key}") is not None]
        fig.add_trace(go.Scatter(x=[x["step"] for x in steps], y=[x[key] for x in steps], mode="lines",
                                 name=f"{name} train {key}", line=dict(color=color, width=1.5)))
        fig.add_trace(go.Scatter(x=[x["step"] for x in val], y=[x[f"val_{key}"] for x in val], mode="lines+markers",
                                 name=f"{name} validation {key}", line=dict(color=color, dash="dash"),
                                 marker=dict(size=8, symbol="diamond")))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title=f"{key} (nats per token)" if key in ("ce", "loss")
                      else key, template="plotly_white", height=450)
    return fig


def save_html(figures: go.Figure | Sequence[go.Figure], path: str | os.PathLike, title: str = "QTG topology") -> Path:
    """Write one standalone HTML page (plotly.js inlined, nothing fetched from the network).

    Args:
        figures: one figure or several, stacked in order.
        path: the file to write; its folder is created.

    Returns:
        The path written.
    """
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = [figures] if isinstance(figures, go.Figure) else list(figures)
    body = "\n".join(pio.to_html(f, full_html=False, include_plotlyjs=False, include_mathjax=False) for f in figures)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head>\n<body>\n{body}\n</body></html>\n")
    return atomic_text(path, page)


def attention_graph_diagrams(columns: Mapping[str, Sequence[Any]], heads: Sequence[int],
                             title: str = "Attention-graph persistence diagrams") -> go.Figure:
    """H0/H1 diagrams of attention graphs (``qtg.topology.attention_graph``): one row per head, one column
    per model, on a shared "inf" level so that the columns compare.

    A point is a class born at distance b and dying at d, distances being d_ij = 1 - max(a_ij, a_ji): an
    H0 bar dying at d is two groups of tokens joined once attention 1 - d links them.

    Args:
        columns: column title (e.g. the model) -> one diagram per head, each an ``AttentionTopology``,
            an ``ExactDiagrams`` or a list of ``[n, 2]`` arrays.
        heads: the head index of each row (the entries of every column, in order).
        title: figure title.
    """
    named = {name: [_as_dgms(getattr(g, "diagrams", g)) for g in graphs] for name, graphs in columns.items()}
    bad = [name for name, dgms in named.items() if len(dgms) != len(heads)]
    if bad or not named:
        raise ValueError(f"every column needs one diagram per head ({len(heads)}); columns {bad or 'none'} differ")
    cols, rows = len(named), len(heads)
    titles = [f"{name}, head {h}" for h in heads for name in named]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.1,
                        vertical_spacing=min(0.3 / rows, 0.08) if rows > 1 else 0.0)
    level = _inf_level([d for dgms in named.values() for d in dgms])
    for r in range(1, rows + 1):  # panels in reading order, as the titles
        for c, dgms in enumerate(named.values(), start=1):
            dgm = dgms[r - 1]
            _frame(fig, level, row=r, col=c)
            for k, points in enumerate(dgm):
                fig.add_trace(_diagram_traces(points, level, f"H{k}", DIM_COLORS[k % len(DIM_COLORS)],
                                              "circle-open"), row=r, col=c)
                fig.data[-1].update(showlegend=False, legendgroup=f"H{k}")
    for k in range(max(len(d) for dgms in named.values() for d in dgms)):
        # named once in the legend, whether or not the first panel holds a point of that dimension
        color = DIM_COLORS[k % len(DIM_COLORS)]
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"H{k}", legendgroup=f"H{k}",
                                 marker=dict(color=color, symbol="circle-open", size=8, line=dict(color=color))))
    pad = 0.03 * level
    fig.update_xaxes(range=[-pad, level + pad])
    fig.update_yaxes(range=[-pad, level + 2 * pad])
    fig.update_xaxes(title_text="birth (1 - attention)", row=rows)
    fig.update_yaxes(title_text="death", col=1)
    fig.update_layout(title=title, template="plotly_white", height=max(380, 260 * rows + 120),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0 + 40 / (260 * rows + 120),
                                  xanchor="right", x=1.0))
    return fig
