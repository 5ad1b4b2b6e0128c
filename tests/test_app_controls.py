"""The "w from" toggle in-process: every TopoFilter view (Generate's colouring, Topology, Compare) shows the filter's w
or a control's (position only, one-bit gate) for the same tokens, the control calibrated on the model's validation
works (``qtg.experiments.topo_controls.calibrate``), never on the text shown. Each test reads the w a view shows and
checks it is the control's, not the filter's, so a toggle that did nothing fails it. A baseline gets a clear
message; a value the toggle does not offer is refused by name.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

import gradio as gr  # noqa: E402

import qtg  # noqa: E402
from app import controls  # noqa: E402
from app.config import AppConfig, Limits  # noqa: E402
from app.controls import FILTER, NO_FILTER  # noqa: E402
from app.core import Explorer, Session  # noqa: E402
from app.tabs import compare, generate, topology  # noqa: E402
from qtg.experiments import topo_controls  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "ROMEO:"
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."
POSITION, GATE = "position only", "one-bit gate"


@pytest.fixture(scope="module")
def ex(tmp_path_factory) -> Explorer:
    """Shipped nano by default; the controls calibrated on 4 validation windows (quick, and still not the text)."""
    return Explorer(AppConfig(export_dir=tmp_path_factory.mktemp("exports"), device="cpu",
                              limits=Limits(control_windows=4)))


@pytest.fixture(scope="module")
def calibration(ex) -> topo_controls.Calibration:
    return ex.calibrations.get(ex.current(None))


def shown_w(html: str) -> np.ndarray:
    """The w each token of Generate's text is coloured by."""
    return np.array([float(v) for v in re.findall(r'data-w="([^"]+)"', html)])


def generated(ex, control, n=8):
    return list(generate.generate(ex, None, PROMPT, n, 0, 0, 1, -1, -1, control))[-1]


def test_generate_colours_the_tokens_by_the_w_the_toggle_picks(ex, calibration):
    html, *_, payload, _ = generated(ex, FILTER)
    w, exact = np.array(payload.numbers["weights"]), payload.numbers["exact"]
    assert np.allclose(shown_w(html), w, atol=1e-6) and payload.numbers["control"] is None
    html, *_, payload, _ = generated(ex, POSITION)
    by_position = calibration.weights("position", exact)
    assert np.allclose(shown_w(html), by_position, atol=1e-6)  # the control's w of these tokens...
    assert not np.allclose(shown_w(html), w, atol=1e-3)  # ...not the filter's
    assert payload.numbers["control"]["control_weight"] == pytest.approx(list(by_position))
    assert "Position alone explains" in html and "validation works" in html and "not on this text" in html
    html = generated(ex, GATE)[0]
    assert np.allclose(shown_w(html), calibration.weights("gate", exact), atol=1e-6)
    assert set(np.round(shown_w(html), 6)) <= {1.0, round(calibration.gate, 6)}  # one bit: two values


def test_the_toggle_recolours_the_last_generation(ex, calibration):
    assert generate.recolour(ex, None, None, GATE) == (gr.skip(), gr.skip())  # before any generation
    *_, payload, _ = generated(ex, FILTER)
    html, after = generate.recolour(ex, None, payload, GATE)
    gate = calibration.weights("gate", payload.numbers["exact"])
    assert np.allclose(shown_w(html), gate, atol=1e-6) and after.numbers["control"]["control"] == "gate"
    assert after.numbers["weights"] == payload.numbers["weights"]  # the filter's w kept beside it
    back, _ = generate.recolour(ex, None, after, FILTER)
    assert np.allclose(shown_w(back), payload.numbers["weights"], atol=1e-6)
    with pytest.raises(qtg.QTGError, match="^w from: 'bogus' is not one of"):
        generate.recolour(ex, None, payload, "bogus")
    with pytest.raises(qtg.QTGError, match="^w from: 'bogus' is not one of"):
        list(generate.generate(ex, None, PROMPT, 4, 0, 0, 1, -1, -1, "bogus"))


def test_topology_draws_the_filters_w_beside_the_controls(ex, calibration):
    payload = topology.topology(ex, None, TEXT, 1, "ripser", 64, 0)[5]
    own = payload.numbers["topo_filter"]
    fig, note = topology.weights_view(ex, None, payload, GATE)
    traces = {t.name: np.array(t.y) for t in fig.data}
    assert np.allclose(traces["the filter's w (s̃)"], own["weights"])
    assert np.allclose(traces["one-bit gate control's w"], calibration.weights("gate", own["exact"]))
    assert np.allclose(traces["position alone"], calibration.weights("position", own["exact"]))
    comparison = topo_controls.against_control(calibration, "gate", own["weights"], own["exact"])
    assert f"correlation {comparison.correlation:.2f}" in note
    assert f"mean |w − w_control| = {comparison.mean_abs_difference:.3f}" in note
    fig, note = topology.weights_view(ex, None, payload, FILTER)
    assert [t.name for t in fig.data] == ["position alone", "the filter's w (s̃)"] and "w shown: the filter's" in note
    assert topology.weights_view(ex, None, None, GATE)[0] is None  # nothing computed yet: words, no error


def test_compare_runs_the_model_with_the_controls_w(ex, calibration):
    rows, _, _, payload = compare.compare_models(ex, None, TEXT, "shipped:nano", "cpu", "approximate",
                                                 "shipped:nano", "cpu", POSITION, -1)
    table = {r[0]: r[1:] for r in rows}
    a, b = payload.numbers["A"], payload.numbers["B"]
    control = b["w"]["control"]
    expected = calibration.weights("position", np.ones(len(control["weight"])))  # by position alone: s plays no part
    assert control["control_weight"] == pytest.approx(list(expected))
    # the w the model applied on side B is the control's, so its mean is the control's, not the filter's
    assert b["w"]["mean_w"] == pytest.approx(float(np.mean(control["control_weight"][1:])), abs=1e-5)
    assert a["w"]["mean_w"] == pytest.approx(float(np.mean(control["weight"][1:])), abs=1e-5)
    assert a["loss"] != b["loss"] and table["TopoFilter"] == ["approximate", POSITION]
    r, mad = table["w vs the filter's: r, mean |Δw|"][1].split(", ")
    assert float(r) == pytest.approx(control["correlation"], abs=0.005)
    assert float(mad) == pytest.approx(control["mean_abs_difference"], abs=0.0005)
    assert table["w variance position explains"][1] == f"{100 * control['position_share']:.0f} %"
    assert "Position alone explains" in b["w"]["note"] and "validation works" in b["w"]["note"]


def test_a_baseline_gets_a_message_not_an_error(ex):
    session = Session("shipped:nano-baseline", "cpu")
    html = list(generate.generate(ex, session, PROMPT, 3, 0, 0, 1, -1, -1, GATE))[-1][0]
    assert NO_FILTER in html and not np.isfinite(shown_w(html)).any()
    payload = topology.topology(ex, session, TEXT, 1, "ripser", 64, 0)[5]
    assert topology.weights_view(ex, session, payload, POSITION) == (None, NO_FILTER)
    rows, *_ = compare.compare_models(ex, None, TEXT, "shipped:nano-baseline", "cpu", GATE,
                                      "shipped:nano", "cpu", "approximate", -1)
    assert {r[0]: r[1:] for r in rows}["w vs the filter's: r, mean |Δw|"][0] == "— (no TopoFilter)"


def test_each_model_is_calibrated_once_whatever_the_threads(ex, monkeypatch):
    calls = []

    def slow(model, **kw):
        calls.append(model)
        threading.Event().wait(0.2)  # long enough for every thread to ask meanwhile
        return "calibrated"

    monkeypatch.setattr(topo_controls, "calibrate", slow)
    cache = controls.Calibrations(windows=2)
    loaded = ex.current(None)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(loaded))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["calibrated"] * 6 and len(calls) == 1
    cache.drop(loaded.source.key, loaded.device)
    cache.get(loaded)
    assert len(calls) == 2  # dropped with its model: measured again
