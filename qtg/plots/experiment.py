"""Figures of experiments (plotly only; nothing here runs a model or computes a statistic).

Each function takes figures :mod:`qtg.experiments` already computed, as the
plain values their ``to_dict`` methods give, and returns a
``plotly.graph_objects.Figure``:

* :func:`next_token_bars` - the next-token distribution before and after an
  intervention, one pair of bars per token;
* :func:`forest_plot` - each condition's change against the unmodified model
  with its confidence interval over windows (these texts) and, below it, its
  interval across works with one dot per work, coloured by the verdict (the
  interval across works), and the zero line; :func:`forest_panels` stacks
  several on one x axis, and :func:`shared_range` gives separate figures one scale;
  :func:`forest_rows` reads their rows from the results' ``to_dict()``;
* :func:`lens_heatmaps` - the logit lens of one or more models, states down
  and positions across, each cell the top token and its probability (hover:
  the top five and KL(p_final || p_state)).

Token strings go through :func:`qtg.plots.topology.token_label` (newlines as ⏎, HTML escaped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qtg.experiments.bootstrap import ABOVE, ACROSS, BELOW, side_of_zero
from qtg.plots.topology import token_label

BEFORE_COLOR, AFTER_COLOR = "#1f77b4", "#ff7f0e"
# forest plot: an interval wholly above 0 (the change costs loss), wholly below (it helps), or across 0
VERDICTS = {"above": ABOVE, "below": BELOW, "across": ACROSS}
VERDICT_COLORS = {ABOVE: "#d62728", BELOW: "#2ca02c", ACROSS: "#7f7f7f"}
WORK_DOT_COLOR = "#17becf"
OFFSET = 0.16  # a row's windows interval sits this far above its place, the interval across works as far below


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


def _category(row: Mapping[str, Any]) -> str:
    """The verdict's word for a row: by its interval across works when it has one, else by its windows interval."""
    bounds = (row["works_low"], row["works_high"]) if row.get("works_low") is not None else (row["low"], row["high"])
    return VERDICTS[side_of_zero(*bounds)]


def shared_range(*groups: Sequence[Mapping[str, Any]], pad: float = 0.05) -> list[float]:
    """One x range holding 0 and every interval and per-work value of ``groups``: figures drawn with it share
    a scale (two sweeps, or two models' heads, compare by eye)."""
    values = [0.0]
    for rows in groups:
        for r in rows:
            values += [r["low"], r["high"], *(r.get("per_work") or {}).values()]
            values += [v for v in (r.get("works_low"), r.get("works_high")) if v is not None and np.isfinite(v)]
    lo, hi = min(values), max(values)
    margin = pad * (hi - lo or 1.0)
    return [lo - margin, hi + margin]


def _interval_trace(points: Sequence[tuple[float, str, float, float, float]], name: str, color: str, what: str,
                    symbol: str, size: int, thickness: float, **kw: Any) -> go.Scatter:
    """Markers with asymmetric error bars; ``points``: (y, row name, estimate, low, high) each."""
    est = np.array([p[2] for p in points], dtype=np.float64)
    return go.Scatter(
        x=est, y=[p[0] for p in points], mode="markers", name=name, marker=dict(color=color, size=size, symbol=symbol),
        error_x=dict(type="data", symmetric=False, color=color, thickness=thickness, width=6 if size > 8 else 4,
                     array=np.array([p[4] for p in points]) - est, arrayminus=est - np.array([p[3] for p in points])),
        customdata=[[p[1], p[3], p[4]] for p in points],
        hovertemplate="%{customdata[0]}, " + what + ": %{x:+.5f} [%{customdata[1]:+.5f}, %{customdata[2]:+.5f}]"
                      "<extra>" + name + "</extra>", **kw)


def _add_forest(fig: go.Figure, rows: Sequence[Mapping[str, Any]], subplot: dict[str, int], legend: bool) -> None:
    """Each row at y = its place from the top: the windows interval (thick, diamond) above, the interval across
    works (thin, circle) below it with one dot per work."""
    n = len(rows)
    for name, color in VERDICT_COLORS.items():
        mine = [(n - 1 - i, r) for i, r in enumerate(rows) if _category(r) == name]
        if not mine:
            continue
        windows = [(y + OFFSET, r["name"], r["estimate"], r["low"], r["high"]) for y, r in mine]
        fig.add_trace(_interval_trace(windows, name, color, "these texts", "diamond", 10, 3, legendgroup=name,
                                      showlegend=legend), **subplot)
        works = [(y - OFFSET, r["name"], r.get("works_estimate", r["estimate"]), r["works_low"], r["works_high"])
                 for y, r in mine if r.get("works_low") is not None and np.isfinite(r["works_low"])]
        if works:
            fig.add_trace(_interval_trace(works, f"{name}, across works", color, "across works", "circle-open", 7, 1.2,
                                          legendgroup=name, showlegend=False), **subplot)
    dots = [(n - 1 - i - OFFSET, r["name"], work, v) for i, r in enumerate(rows)
            for work, v in (r.get("per_work") or {}).items()]
    if dots:
        fig.add_trace(go.Scatter(
            x=[d[3] for d in dots], y=[d[0] for d in dots], mode="markers", name="each work", showlegend=legend,
            legendgroup="each work", marker=dict(color=WORK_DOT_COLOR, size=6, opacity=0.8),
            customdata=[[d[1], d[2]] for d in dots],
            hovertemplate="%{customdata[0]}, %{customdata[1]}: %{x:+.5f}<extra>one work</extra>"), **subplot)
    fig.add_vline(x=0.0, line=dict(color="gray", dash="dash", width=1), **subplot)
    fig.update_yaxes(tickmode="array", tickvals=list(range(n)), ticktext=[str(r["name"]) for r in rows][::-1],
                     range=[-0.6, n - 0.4], automargin=True, zeroline=False, **subplot)


# the keys of a change measured in bits/byte or in loss, in the to_dict of qtg.experiments' results
MEASURES = {"delta_bits_per_byte": "", "delta_loss": "delta_loss_"}


def forest_rows(items: Sequence[Mapping[str, Any]], measure: str = "delta_bits_per_byte",
                name: str = "name") -> list[dict[str, Any]]:
    """:func:`forest_plot` rows from the ``to_dict()`` of ``qtg.experiments`` results (conditions, head effects,
    model scores): ``measure`` (``delta_bits_per_byte`` or ``delta_loss``), its windows interval, its interval
    across works and its value per work; ``name``: the key that labels a row."""
    prefix = MEASURES[measure]
    rows = []
    for d in items:
        works = d.get(prefix + "ci95_works")
        low, high = d["ci95" if measure == "delta_bits_per_byte" else "delta_loss_ci95"]
        rows.append({"name": d[name], "estimate": d[measure], "low": low, "high": high,
                     "works_low": works[0] if works else None, "works_high": works[1] if works else None,
                     "works_estimate": d.get(prefix + "works_estimate"), "per_work": d.get(prefix + "per_work")})
    return rows


FOREST_NOTE = "thick: these texts (windows); thin, with a dot per work: across works"


def forest_plot(rows: Sequence[Mapping[str, Any]], unit: str = "delta bits/byte",
                title: str = "Change against the unmodified model, 95% CI",
                x_range: Sequence[float] | None = None) -> go.Figure:
    """One row per condition: the estimate and its interval over windows and, below it, the interval across
    works and each work's estimate, coloured by the verdict (the interval across works when given).

    Args:
        rows: ``{"name", "estimate", "low", "high"}`` per condition, drawn top to bottom, with optional
            ``"works_low"``, ``"works_high"``, ``"works_estimate"`` (None: no interval across works) and
            ``"per_work"`` ({work: estimate}).
        unit: the x axis title.
        x_range: the x axis range (:func:`shared_range` to share a scale with another figure); None: automatic.
    """
    fig = go.Figure()
    _add_forest(fig, rows, {}, legend=True)
    fig.update_layout(title=title, template="plotly_white", xaxis_title=f"{unit} ({FOREST_NOTE})",
                      height=180 + 48 * max(1, len(rows)),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    if x_range is not None:
        fig.update_xaxes(range=list(x_range))
    return fig


def forest_panels(panels: Mapping[str, Sequence[Mapping[str, Any]]], unit: str = "delta loss",
                  title: str = "Change against the unmodified model, 95% CI", row_px: int = 34) -> go.Figure:
    """Several forest plots stacked (e.g. two models' heads), one x axis for all: one scale to compare by eye.

    Args:
        panels: panel title -> rows as :func:`forest_plot` takes them.
        row_px: height of one row, pixels.
    """
    if not panels:
        raise ValueError("forest_panels needs at least one panel")
    heights = [max(1, len(rows)) for rows in panels.values()]
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=list(panels),
                        row_heights=heights, vertical_spacing=min(0.3, 60 / (row_px * sum(heights) + 120)))
    for i, rows in enumerate(panels.values(), start=1):
        _add_forest(fig, rows, {"row": i, "col": 1}, legend=i == 1)
    fig.update_xaxes(range=shared_range(*panels.values()))
    fig.update_xaxes(title_text=f"{unit} ({FOREST_NOTE})", row=len(panels), col=1)
    fig.update_layout(title=title, template="plotly_white", height=160 + row_px * sum(heights) + 60 * len(panels),
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
