"""qtg.plots.topology: each figure has the traces a reader needs, and pages are standalone."""

from __future__ import annotations

import json
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from qtg import plots, topology


@pytest.fixture(scope="module")
def sweep(micro):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (1, 48), generator=g)
    ids[0, 30:36] = ids[0, 2:8]
    tokens = [f"t{i}" for i in range(47)] + ["<b>\n"]  # one token that needs escaping
    return topology.layer_sweep(micro, ids, tokens=tokens, maxdim=1)


def names(fig: go.Figure) -> list[str]:
    return [t.name for t in fig.data]


def test_persistence_diagram_overlays_backends_with_diagonal_and_infinite_points(sweep):
    points = sweep[2].view.points
    ex = {b: topology.exact_diagrams(points, maxdim=1, backend=b) for b in ("gudhi", "ripser")}
    fig = plots.persistence_diagram(ex)
    assert isinstance(fig, go.Figure)
    assert names(fig) == ["diagonal", "gudhi H0", "gudhi H1", "ripser H0", "ripser H1"]
    h0 = fig.data[1]
    assert len(h0.x) == len(ex["gudhi"].dgms[0])
    finite_top = max(np.max(ex[b].dgms[k][np.isfinite(ex[b].dgms[k])]) for b in ex for k in (0, 1))
    assert h0.y[-1] > finite_top and "death inf" in h0.text[-1]  # the infinite bar drawn on top
    assert fig.data[1].marker.symbol != fig.data[3].marker.symbol  # the two engines are told apart


def test_barcode_draws_one_segment_per_bar(sweep):
    ex = sweep[2].exact
    fig = plots.barcode(ex)
    assert names(fig) == ["H0", "H0 (inf)", "H1"]
    segments = sum(list(t.x).count(None) for t in fig.data)
    assert segments == sum(len(d) for d in ex.dgms)
    assert fig.data[1].line.dash == "dash"


def test_exact_vs_approx_panel_has_both_diagrams_and_token_hover(sweep):
    r = sweep[1]
    fig = plots.exact_vs_approx(r.exact, r.view, r.comparison)
    assert {"exact H0", "exact H1", "TopoFilter H0 (0, s~)", "tokens", "s~ = s"} <= set(names(fig))
    tokens = next(t for t in fig.data if t.name == "tokens")
    np.testing.assert_allclose(tokens.x, r.view.exact)
    np.testing.assert_allclose(tokens.y, r.view.soft)
    assert "t5" in tokens.text[5] and "&lt;b&gt;⏎" in tokens.text[-1]
    assert f"bottleneck {r.comparison.bottleneck_h0:.4g}" in fig.layout.title.text


def test_weights_over_text_colours_each_token_by_w(sweep):
    view = sweep[1].view
    fig = plots.weights_over_text(view, per_row=10)
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=float).ravel()
    np.testing.assert_allclose(z[:view.n], view.weights)
    assert np.isnan(z[view.n:]).all() and np.asarray(heat.text).ravel()[3] == "t3"
    assert "s~" in heat.hovertemplate and "w" in heat.hovertemplate


def test_layer_summary_has_one_curve_per_quantity(sweep):
    fig = plots.layer_summary(sweep)
    assert {"bottleneck_h0", "mean_abs_error", "h1_total_persistence", "mean_weight"} <= set(names(fig))
    assert list(fig.data[0].x) == ["0: QEmbed", "1: TopoFilter", "2: block 0", "3: block 1"]


def test_training_curves_read_a_growing_metrics_file(tmp_path):
    lines = [{"step": 1, "loss": 7.0, "ce": 6.9}, {"step": 2, "loss": 6.0, "ce": 5.9},
             {"step": 2, "val_loss": 6.5, "val_ce": 6.4, "val_ppl": 600.0}]
    run = tmp_path / "run"
    run.mkdir()
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 3, "lo'  # a line still being written
    (run / "metrics.jsonl").write_text(text, encoding="utf-8")
    fig = plots.training_curves({"qtg": run, "baseline": [{"step": 1, "ce": 7.5}], "none yet": tmp_path / "absent"})
    assert names(fig) == ["qtg train ce", "qtg validation ce", "baseline train ce", "baseline validation ce",
                          "none yet train ce", "none yet validation ce"]
    assert list(fig.data[0].x) == [1, 2] and list(fig.data[0].y) == [6.9, 5.9]
    assert list(fig.data[1].x) == [2] and list(fig.data[1].y) == [6.4]
    assert list(fig.data[2].y) == [7.5] and len(fig.data[4].x) == 0
    assert list(plots.training_curves({"qtg": run / "metrics.jsonl"}, key="loss").data[0].y) == [7.0, 6.0]


def test_save_html_is_standalone(sweep, tmp_path):
    r = sweep[1]
    figs = [plots.barcode(r.exact), plots.weights_over_text(r.view)]
    one = plots.save_html(figs[0], tmp_path / "one.html")
    both = plots.save_html(figs, tmp_path / "sub" / "both.html")
    for page in (one, both):
        text = page.read_text(encoding="utf-8")
        # no tag loads anything (plotly.js itself names a CDN only as the default map-data URL of geo traces)
        assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", text)
        assert "Plotly.newPlot" in text and '<script type="text/javascript">/**\n* plotly.js' in text  # inlined
    assert both.read_text().count("Plotly.newPlot") == 2
