"""Figures of experiments (plotly only; nothing here runs a model or computes a statistic).

Each function takes figures :mod:`qtg.experiments` already computed, as the
plain values their ``to_dict`` methods give, and returns a
``plotly.graph_objects.Figure``:

* :func:`next_token_bars` - the next-token distribution before and after an
  intervention, one pair of bars per token;
* :func:`forest_plot` - each condition's change against the unmodified model
  with its confidence interval, and the zero line;
* :func:`lens_heatmaps` - the logit lens of one or more models, states down
  and positions across, each cell the top token and its probability (hover:
  the top five and KL(p_final || p_state)).

Token strings go through :func:`qtg.plots.token_label` (newlines as ⏎, HTML escaped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qtg.plots import token_label

BEFORE_COLOR, AFTER_COLOR = "#1f77b4", "#ff7f0e"
# forest plot: an interval wholly above 0 (the change costs loss), wholly below (it helps), or across 0
VERDICT_COLORS = {"worse": "#d62728", "better": "#2ca02c", "within noise": "#7f7f7f"}


def next_token_bars(rows: Sequence[tuple[str, float, float]], names: tuple[str, str] = ("before", "after"),
                    title: str = "Next-token distribution") -> go.Figure:
    """Grouped bars: each token's probability before and after.

    Args:
        rows: ``(token string, p before, p after)`` per token, in the order drawn.
        names: the two conditions' names for the legend.
    """
    labels = [token_label(t).replace(" ", "␣") for t, _, _ in rows]  # a space token would print as nothing
    x = list(range(len(rows)))  # positions, not labels: two tokens may print alike
    fig = go.Figure()
    for side, (name, color) in enumerate(zip(names, (BEFORE_COLOR, AFTER_COLOR))):
        probs = [r[1 + side] for r in rows]
        fig.add_trace(go.Bar(x=x, y=probs, name=name, marker_color=color, customdata=labels,
                             hovertemplate="%{customdata}: p = %{y:.4f}<extra>" + name + "</extra>"))
    fig.update_layout(title=title, template="plotly_white", barmode="group", height=380, yaxis_title="probability",
                      xaxis=dict(tickmode="array", tickvals=x, ticktext=labels, tickangle=-45),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    return fig


def _verdict(low: float, high: float) -> str:
    return "worse" if low > 0 else "better" if high < 0 else "within noise"


def forest_plot(rows: Sequence[Mapping[str, Any]], unit: str = "delta bits/byte",
                title: str = "Change against the unmodified model, 95% CI") -> go.Figure:
    """One row per condition: the estimate and its interval, coloured by which side of 0 the interval lies.

    Args:
        rows: ``{"name", "estimate", "low", "high"}`` per condition, drawn top to bottom.
        unit: the x axis title.
    """
    fig = go.Figure()
    names = [str(r["name"]) for r in rows]
    for verdict, color in VERDICT_COLORS.items():
        mine = [r for r in rows if _verdict(r["low"], r["high"]) == verdict]
        est = np.array([r["estimate"] for r in mine], dtype=np.float64)
        fig.add_trace(go.Scatter(
            x=est, y=[str(r["name"]) for r in mine], mode="markers", name=f"{verdict}",
            marker=dict(color=color, size=10, symbol="diamond"),
            error_x=dict(type="data", symmetric=False, color=color, thickness=2, width=6,
                         array=np.array([r["high"] for r in mine]) - est,
                         arrayminus=est - np.array([r["low"] for r in mine])),
            customdata=[[r["low"], r["high"]] for r in mine],
            hovertemplate="%{y}: %{x:+.5f} [%{customdata[0]:+.5f}, %{customdata[1]:+.5f}]<extra>" + verdict
                          + "</extra>", showlegend=True))
    fig.add_vline(x=0.0, line=dict(color="gray", dash="dash", width=1))
    fig.update_layout(title=title, template="plotly_white", xaxis_title=unit, height=160 + 40 * max(1, len(rows)),
                      yaxis=dict(categoryorder="array", categoryarray=names[::-1], automargin=True),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    return fig


def _lens_cells(lens: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """z (top-1 probability), cell text, hover text ``[S, N]``; state names; position labels."""
    states = lens["states"]
    inputs = lens.get("input_tokens") or [f"#{i}" for i in lens["input_ids"]]
    n = len(inputs)
    z = np.array([[p[0] for p in s["top_probs"]] for s in states], dtype=np.float64)  # [S, N]
    text = np.empty((len(states), n), dtype=object)
    hover = np.empty((len(states), n), dtype=object)
    for si, s in enumerate(states):
        tokens = s.get("top_tokens") or [[f"#{i}" for i in row] for row in s["top_ids"]]
        for i in range(n):
            top = [(token_label(t), p) for t, p in zip(tokens[i], s["top_probs"][i])]
            text[si, i] = f"{top[0][0]}<br>{top[0][1]:.2f}"
            hover[si, i] = (f"{s['name']}, after #{i} {token_label(inputs[i])}<br>"
                            + "<br>".join(f"{t}: {p:.3f}" for t, p in top)
                            + f"<br>KL to final {s['kl_to_final'][i]:.3f} nats")
    return z, text, hover, [s["name"] for s in states], [f"{i}:{token_label(t)}" for i, t in enumerate(inputs)]


def lens_heatmaps(panels: Mapping[str, Mapping[str, Any]], title: str = "Logit lens") -> go.Figure:
    """One heatmap per model, stacked: states down (the model's order, output last), positions across.

    Args:
        panels: panel title -> ``qtg.experiments.Lens.to_dict(tokenizer, k)`` (k >= 1; the hover shows them all).
    """
    if not panels:
        raise ValueError("lens_heatmaps needs at least one panel")
    cells = [_lens_cells(p) for p in panels.values()]
    heights = [len(c[3]) for c in cells]
    fig = make_subplots(rows=len(panels), cols=1, subplot_titles=list(panels), row_heights=heights,
                        vertical_spacing=min(0.25, 90 / (60 * sum(heights) + 120)))
    for r, (z, text, hover, states, positions) in enumerate(cells, start=1):
        fig.add_trace(go.Heatmap(z=z, x=positions, y=states, text=text, customdata=hover, texttemplate="%{text}",
                                 textfont=dict(size=9), coloraxis="coloraxis",
                                 hovertemplate="%{customdata}<extra></extra>"), row=r, col=1)
        fig.update_yaxes(autorange="reversed", row=r, col=1)
        fig.update_xaxes(tickangle=-60, showticklabels=len(positions) <= 64, row=r, col=1)
    fig.update_layout(title=title, template="plotly_white", height=140 + 60 * sum(heights) + 90 * len(panels),
                      coloraxis=dict(colorscale="Viridis", cmin=0.0, cmax=1.0, colorbar=dict(title="top-1 p")))
    return fig
