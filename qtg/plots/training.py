"""Figures of a run over training (plotly only): what :mod:`qtg.topology.training` computed, drawn.

Every function takes :class:`~qtg.topology.training.SnapshotAnalysis` results (a list, by step) and
returns a ``plotly.graph_objects.Figure``; nothing here computes. :func:`animated` makes one figure
whose frames are the snapshots (a slider and a play button), for a standalone HTML export
(:func:`qtg.plots.topology.save_html`). Axes keep one range across snapshots, so moving between them shows
change, not rescaling. Baseline runs have no topology fields: their figures show the attention panels only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qtg.plots.topology import APPROX_COLOR, DIM_COLORS

HEAD_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def _steps(analyses: Sequence[Any]) -> list[int]:
    return [a.step for a in analyses]


def _heads(analyses: Sequence[Any]) -> list[tuple[int, int]]:
    """(block, head) pairs, in order."""
    return [(b, h) for b, row in enumerate(analyses[0].entropy) for h in range(len(row))]


def _has_topology(analyses: Sequence[Any]) -> bool:
    return bool(analyses) and analyses[0].has_topology


def over_training(analyses: Sequence[Any], current: int | None = None,
                  title: str = "The probe over training") -> go.Figure:
    """Curves against the step: probe loss; exact-vs-approximate H0 distances; attention entropy and gamma
    per head (``b<block>h<head>``). ``current``: the step marked by a vertical line."""
    topo = _has_topology(analyses)
    names = ["probe cross-entropy (nats/token)", "H0: exact vs TopoFilter (bottleneck, W1)",
             "attention entropy per head (nats)", "gamma per head" if topo else "attention-graph H0 total per head"]
    fig = make_subplots(rows=2, cols=2, subplot_titles=names, horizontal_spacing=0.1, vertical_spacing=0.16)
    x = _steps(analyses)
    fig.add_trace(go.Scatter(x=x, y=[a.ce for a in analyses], name="probe CE", mode="lines+markers",
                             line=dict(color="black")), row=1, col=1)
    if topo:
        fig.add_trace(go.Scatter(x=x, y=[a.bottleneck_h0 for a in analyses], name="H0 bottleneck",
                                 mode="lines+markers", line=dict(color=APPROX_COLOR)), row=1, col=2)
        fig.add_trace(go.Scatter(x=x, y=[a.wasserstein1_per_token for a in analyses], name="H0 W1 / token",
                                 mode="lines+markers", line=dict(color=DIM_COLORS[0], dash="dot")), row=1, col=2)
    for i, (b, h) in enumerate(_heads(analyses)):
        color = HEAD_COLORS[i % len(HEAD_COLORS)]
        dash = ("solid", "dash", "dot", "dashdot")[b % 4]
        label = f"b{b}h{h}"
        fig.add_trace(go.Scatter(x=x, y=[a.entropy[b][h] for a in analyses], name=label,
                                 mode="lines", line=dict(color=color, dash=dash), legendgroup=label), row=2, col=1)
        y = [a.gamma[b][h] for a in analyses] if topo else [a.attention_features[b][h]["h0_total"] for a in analyses]
        fig.add_trace(go.Scatter(x=x, y=y, name=f"{label} {'gamma' if topo else 'graph H0'}", mode="lines",
                                 line=dict(color=color, dash=dash), legendgroup=label, showlegend=False), row=2, col=2)
    if current is not None:  # one shape per panel, set at once (add_vline per subplot is slow)
        axes = ["", "2", "3", "4"]
        line = dict(color="gray", dash="dash", width=1)
        fig.update_layout(shapes=[dict(type="line", x0=current, x1=current, xref=f"x{k}", y0=0, y1=1,
                                       yref=f"y{k} domain", line=line) for k in axes])
    fig.update_xaxes(title_text="step", row=2)
    fig.update_layout(title=title, template="plotly_white", height=640, legend=dict(font=dict(size=10)))
    return fig


def _inf_level(analyses: Sequence[Any]) -> float:
    """One height for infinite deaths across every snapshot: 5% above the largest finite death."""
    finite = [v for a in analyses for d in (a.exact_h0, a.exact_h1, a.approx_h0) if d is not None
              for v in d[np.isfinite(d)].ravel()]
    top = max(finite, default=1.0)
    return top * 1.05 if top > 0 else 1.0


def _dgm_xy(dgm: np.ndarray | None, inf_level: float) -> tuple[list[float], list[float]]:
    if dgm is None or len(dgm) == 0:
        return [], []
    return dgm[:, 0].tolist(), np.where(np.isinf(dgm[:, 1]), inf_level, dgm[:, 1]).tolist()


def _snapshot_traces(a: Any, inf_level: float, topo: bool) -> list[go.BaseTraceType]:
    """The per-snapshot traces in a fixed order (frames replace them one for one)."""
    heads = [f"b{b}h{h}" for b, row in enumerate(a.entropy) for h in range(len(row))]
    traces = []
    if topo:
        for name, dgm, color, symbol in (("exact H0", a.exact_h0, DIM_COLORS[0], "circle-open"),
                                         ("exact H1", a.exact_h1, DIM_COLORS[1], "triangle-up-open"),
                                         ("TopoFilter H0 (0, s~)", a.approx_h0, APPROX_COLOR, "x-thin-open")):
            x, y = _dgm_xy(dgm, inf_level)
            marker = dict(color=color, symbol=symbol, size=8, line=dict(width=1.5, color=color))
            traces.append(go.Scatter(x=x, y=y, mode="markers", name=name, marker=marker))
        edges = np.linspace(0.0, 1.0, len(a.w_hist) + 1)
        traces.append(go.Bar(x=((edges[:-1] + edges[1:]) / 2).tolist(), y=a.w_hist, width=1.0 / len(a.w_hist),
                             name="tokens by w", marker=dict(color=APPROX_COLOR)))
    traces.append(go.Bar(x=heads, y=[e for row in a.entropy for e in row], name="attention entropy",
                         marker=dict(color="#1f77b4")))
    traces.append(go.Bar(x=heads, y=[f["h0_total"] for row in a.attention_features for f in row],
                         name="attention-graph H0 total", marker=dict(color="#2ca02c")))
    return traces


def _panels(topo: bool) -> tuple[int, int, list[str], list[tuple[int, int]]]:
    if topo:
        return 2, 2, ["probe's QEmbed cloud: exact H0/H1 and the TopoFilter's H0", "TopoFilter weights w",
                      "attention entropy per head (nats)", "attention-graph H0 total per head"], \
            [(1, 1), (1, 1), (1, 1), (1, 2), (2, 1), (2, 2)]
    return 1, 2, ["attention entropy per head (nats)", "attention-graph H0 total per head"], [(1, 1), (1, 2)]


def snapshot_views(analyses: Sequence[Any], index: int, title: str | None = None) -> go.Figure:
    """One snapshot (``analyses[index]``): the probe's exact diagram beside the TopoFilter's, the histogram
    of w, and per head the attention entropy and attention-graph H0 total; axes fixed over the run."""
    fig, _ = _snapshot_figure(analyses, index, title)
    return fig


def _snapshot_figure(analyses: Sequence[Any], index: int, title: str | None) -> tuple[go.Figure, bool]:
    topo = _has_topology(analyses)
    rows, cols, names, where = _panels(topo)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.1, vertical_spacing=0.18)
    inf_level = _inf_level(analyses) if topo else 1.0
    a = analyses[index]
    for trace, (r, c) in zip(_snapshot_traces(a, inf_level, topo), where):
        fig.add_trace(trace, row=r, col=c)
    ent = max((e for x in analyses for row in x.entropy for e in row), default=1.0)
    h0 = max((f["h0_total"] for x in analyses for row in x.attention_features for f in row), default=1.0)
    last = (rows, 1) if topo else (1, 1)
    fig.update_yaxes(range=[0, ent * 1.1], row=last[0], col=last[1])
    fig.update_yaxes(range=[0, h0 * 1.1], row=last[0], col=last[1] + 1)
    if topo:
        fig.add_trace(go.Scatter(x=[0, inf_level], y=[0, inf_level], mode="lines", line=dict(color="gray", width=1),
                                 hoverinfo="skip", showlegend=False), row=1, col=1)
        fig.update_xaxes(range=[-0.02 * inf_level, inf_level * 1.04], title_text="birth", row=1, col=1)
        fig.update_yaxes(range=[-0.02 * inf_level, inf_level * 1.04], title_text="death (top: inf)", row=1, col=1)
        fig.update_xaxes(range=[0, 1], title_text="w", row=1, col=2)
        fig.update_yaxes(range=[0, max(max(x.w_hist) for x in analyses) * 1.1], title_text="tokens", row=1, col=2)
    extra = f", H0 bottleneck {a.bottleneck_h0:.4f}" if topo else ""
    fig.update_layout(title=title or f"Snapshot at step {a.step} ({a.arch}): probe CE {a.ce:.3f}{extra}",
                      template="plotly_white", height=700 if topo else 420, legend=dict(font=dict(size=10)))
    return fig, topo


def animated(analyses: Sequence[Any], title: str = "Topology over training") -> go.Figure:
    """:func:`snapshot_views` with one frame per snapshot, a step slider and a play button."""
    fig, topo = _snapshot_figure(analyses, 0, title)
    inf_level = _inf_level(analyses) if topo else 1.0
    n = len(_snapshot_traces(analyses[0], inf_level, topo))
    frames = [go.Frame(name=str(a.step), data=_snapshot_traces(a, inf_level, topo), traces=list(range(n)),
                       layout=go.Layout(title_text=f"{title}: step {a.step}, probe CE {a.ce:.3f}"
                                        + (f", H0 bottleneck {a.bottleneck_h0:.4f}" if topo else "")))
              for a in analyses]
    fig.frames = frames
    play = dict(frame=dict(duration=600, redraw=True), fromcurrent=True, transition=dict(duration=0))
    fig.update_layout(
        updatemenus=[dict(type="buttons", showactive=False, x=0.0, y=-0.08, xanchor="left", yanchor="top",
                          buttons=[dict(label="Play", method="animate", args=[None, play]),
                                   dict(label="Pause", method="animate",
                                        args=[[None], dict(frame=dict(duration=0), mode="immediate")])])],
        sliders=[dict(active=0, x=0.12, y=-0.05, len=0.88, currentvalue=dict(prefix="step "),
                      steps=[dict(label=str(a.step), method="animate",
                                  args=[[str(a.step)], dict(frame=dict(duration=0, redraw=True), mode="immediate")])
                             for a in analyses])],
        margin=dict(b=120))
    return fig
