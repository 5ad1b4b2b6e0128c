"""The Patching tab: its numbers are ``qtg.experiments.patching``'s for the loaded model and its baseline on one
colour scale, each bad field is refused in one line naming it before any work, its exports hold every value
(CSV and JSON), Stop ends the work on the server, and ``/patching`` answers over HTTP as the handler does.

In-process handler tests first; ``gradio_client`` tests (marked slow) against the server of
``tests/test_app_server.py``; the Chromium test is in ``tests/test_app_browser_patching.py``.
"""

from __future__ import annotations

import csv
import json
import re
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

import gradio as gr  # noqa: E402

from app.config import Limits  # noqa: E402
from app.core import Explorer, Session  # noqa: E402
from app.errors import user_facing  # noqa: E402
from app.exports import export  # noqa: E402
from app.tabs import patching as tab  # noqa: E402
from app.tabs import patching_fields as fields  # noqa: E402
from qtg.data.tokenizer import encode, token_strings  # noqa: E402
from qtg.experiments import (  # noqa: E402
    activation_patching,
    agreement_of,
    attribution_patching,
    direct_logit_attribution,
)
from qtg.model.views import view_memory  # noqa: E402
from qtg.plots.patching import cell_digits, patching_heatmaps  # noqa: E402
from tests.app_fixtures import count_after_cancel, ex_fixture, nano_fixture  # noqa: E402, F401
from tests.test_app_server import client, server  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("one_thread")

BY_WORD = ("replacing a word", "", "son", "daughter", " son", " daughter")  # corrupt_by ... wrong
QTG, BASE = "QTG: nano", "baseline: nano-baseline"


@pytest.fixture(scope="module")
def run(ex):
    """The tab's default request on nano and nano-baseline: every update the handler yielded."""
    return list(tab.patching(ex, None, tab.CLEAN, *BY_WORD))


def _ids(loaded, text: str) -> torch.Tensor:
    return torch.tensor([encode(loaded.tokenizer, text)])


# --- the numbers ----------------------------------------------------------------------------------


def test_every_view_is_the_library_s_for_qtg_and_its_baseline(ex, nano, run):
    cut, resid, heads, topo, dla, scatter, table, numbers, payload, status, state = run[-1]
    assert list(numbers["models"]) == [QTG, BASE]
    corrupt = tab.CLEAN.replace(" son ", " daughter ")
    assert numbers["corrupted_prompt"] == corrupt
    for name, loaded in ((QTG, nano), (BASE, ex.registry.baseline_for(nano))):
        got, model = numbers["models"][name], loaded.model
        clean_ids, corrupt_ids = _ids(loaded, tab.CLEAN), _ids(loaded, corrupt)
        answer, wrong = encode(loaded.tokenizer, " son")[0], encode(loaded.tokenizer, " daughter")[0]
        assert (got["answer_id"], got["wrong_id"]) == (answer, wrong)
        real = {"resid": activation_patching(model, clean_ids, corrupt_ids, answer, wrong, "resid"),
                "heads": activation_patching(model, clean_ids, corrupt_ids, answer, wrong, "heads", positions=False)}
        if loaded.has_topofilter:
            real["topo_w"] = activation_patching(model, clean_ids, corrupt_ids, answer, wrong, "topo_w")
        assert ("topo_w" in got) == loaded.has_topofilter
        for site, ref in real.items():
            np.testing.assert_allclose(got[site]["values"], ref.values, rtol=1e-6, atol=1e-9)
            assert got[site]["axes"] == list(ref.axes) and got[site]["clean_metric"] == ref.clean_metric
        for site, positions in (("resid", True), ("heads", False)):
            est = attribution_patching(model, clean_ids, corrupt_ids, answer, wrong, site, positions)
            np.testing.assert_allclose(got[f"attribution_{site}"]["values"], est.values, rtol=1e-5, atol=1e-7)
            assert got[f"attribution_{site}"]["agreement"] == pytest.approx(
                agreement_of(est.values, real[site].values).to_dict())
        ref_dla = direct_logit_attribution(model, clean_ids, answer, wrong)
        np.testing.assert_allclose(got["dla"]["heads"], ref_dla.heads, rtol=1e-6)
        assert got["dla"]["total"] == pytest.approx(got["dla"]["logit"], abs=1e-3)  # the decomposition is exact
        row = next(r for r in table["data"] if r[0] == name)
        assert row[1:3] == [round(real["resid"].clean_metric, 4), round(real["resid"].corrupt_metric, 4)]
    assert status.startswith(f"done: {state['total']} patched units on {QTG}, {BASE}") and state["done"] == \
        state["total"]
    assert 'class="qtg-token qtg-differs"' in cut and "␣son" in cut and "␣daughter" in cut
    assert payload.tab == "patching" and set(payload.figures) == set(tab.FIGURES)


def test_each_heatmap_draws_both_models_on_one_scale_centred_on_zero(run):
    resid, heads, topo, dla = run[-1][1:5]
    numbers = run[-1][7]["models"]
    for fig, key in ((resid, "resid"), (heads, "heads"), (dla, "dla")):
        maps = [np.asarray(numbers[name][key]["heads" if key == "dla" else "values"]) for name in (QTG, BASE)]
        assert len(fig.data) == 2 and all(t.coloraxis == "coloraxis" for t in fig.data)
        for trace, values in zip(fig.data, maps):
            np.testing.assert_allclose(np.asarray(trace.z, dtype=float), values)
        top = max(np.abs(m).max() for m in maps)
        axis = fig.layout.coloraxis
        assert (axis.cmin, axis.cmid, axis.cmax) == (-top, 0.0, top)  # both panels read one diverging scale
        assert fig.layout.width is None  # sized to its panel
    assert len(topo.data) == 1 and topo.layout.title.text.endswith("(QTG only)")
    assert len(resid.data[0].x) == len(numbers[QTG]["tokens"])  # one column per position


def test_a_heatmap_of_zeros_keeps_a_centred_scale_and_cells_print_two_significant_digits():
    zeros = {"values": [[0.0, 0.0]], "labels": [["0"], ["0:a", "1:b"]], "axes": ["block", "position"]}
    axis = patching_heatmaps({"m": zeros}).layout.coloraxis
    assert (axis.cmin, axis.cmid, axis.cmax) == (-1.0, 0.0, 1.0)  # no empty range for plotly to divide by
    small = {"values": [0.0, -0.0071], "labels": [["0:a", "1:b"]], "axes": ["position"], "site": "topo_w"}
    fig = patching_heatmaps({"m": small})
    assert list(fig.data[0].y) == ["topo_w"] and list(fig.data[0].text[0]) == [0.0, -0.0071]
    assert list(fig.data[0].customdata[0]) == ["topo_w, position 0:a: +0.000000", "topo_w, position 1:b: -0.007100"]
    assert [cell_digits(v) for v in (1.0, 0.5, 0.0071, 12.0)] == [2, 2, 4, 2]


def test_the_scatter_sets_attribution_against_real_patching_per_site(run):
    scatter, numbers = run[-1][5], run[-1][7]["models"]
    points = [t for t in scatter.data if t.mode == "markers"]
    assert [t.name for t in points] == ["residual stream (block x position)", "heads (block x head)"] * 2
    for trace, (name, site) in zip(points, [(m, s) for m in (QTG, BASE) for s in ("resid", "heads")]):
        np.testing.assert_allclose(trace.x, np.ravel(numbers[name][site]["values"]))
        np.testing.assert_allclose(trace.y, np.ravel(numbers[name][f"attribution_{site}"]["values"]))
    r = numbers[QTG]["attribution_heads"]["agreement"]["pearson"]
    assert f"heads r {r:.2f}" in scatter.layout.annotations[0].text  # each panel names its agreement


def test_a_baseline_alone_has_one_panel_and_no_topofilter_view(ex):
    session = Session(model="shipped:nano-baseline", device="cpu")
    out = list(tab.patching(ex, session, tab.CLEAN, *BY_WORD))[-1]
    assert list(out[7]["models"]) == ["dot-product: nano-baseline"] and out[3] is None
    assert len(out[1].data) == 1 and "topo_w" not in out[8].figures


# --- refusals: one line naming the field, before any work ----------------------------------------------


def _lengths(nano, *texts):
    return [len(encode(nano.tokenizer, t)) for t in texts]


def test_prompts_of_different_lengths_are_refused_naming_both(ex, nano):
    corrupt = tab.CLEAN.replace(" son ", " sonne ")
    n, m = _lengths(nano, tab.CLEAN, corrupt)
    assert n != m
    differ = next(i for i, (a, b) in enumerate(zip(*(token_strings(nano.tokenizer, encode(nano.tokenizer, t))
                                                      for t in (tab.CLEAN, corrupt)))) if a != b)
    with pytest.raises(gr.Error) as err:
        list(user_facing(tab.patching)(ex, None, tab.CLEAN, "corrupted prompt", corrupt, "", "", " son"))
    assert err.value.message == (f"corrupted prompt: {m} tokens, the clean prompt {n}: patching pairs positions, "
                                 f"so both must cut into as many tokens (they first differ at token {differ})")


@pytest.mark.parametrize("args, message", [
    (("", *BY_WORD), "clean prompt: empty; type some text"),
    ((tab.CLEAN, "a dice", "", "", "", " son"),
     "corrupt by: 'a dice' is not one of ['corrupted prompt', 'replacing a word']"),
    ((tab.CLEAN, "corrupted prompt", "", "", "", " son"), "corrupted prompt: empty; type some text"),
    ((tab.CLEAN, "corrupted prompt", tab.CLEAN, "", "", " son"),
     "corrupted prompt: the same 21 tokens as the clean prompt; nothing to patch"),
    ((tab.CLEAN, "replacing a word", "", "so", "daughter", " son"),
     "word to replace: 'so' is not a word of the clean prompt"),
    ((tab.CLEAN, "replacing a word", "", "son", "", " son"),
     "replacement: empty; type a word of the clean prompt and the word to put in its place"),
    ((tab.CLEAN, *BY_WORD[:4], ""),
     "answer: empty; type the token the clean prompt should be followed by, e.g. ' son'"),
    ((tab.CLEAN, *BY_WORD[:4], " Juliet"), "answer: ' Juliet' is 2 tokens for nano (' J' | 'uliet'); give one token"),
    ((tab.CLEAN, *BY_WORD[:4], " son", " Juliet"),
     "wrong token: ' Juliet' is 2 tokens for nano (' J' | 'uliet'); give one token"),
    ((tab.CLEAN, *BY_WORD[:4], " son", " son"),
     "wrong token: ' son' is the answer's token; leave it empty for logit[answer] alone"),
])
def test_each_bad_field_is_refused_in_one_line_before_any_work(ex, args, message):
    before = ex.counters.forwards
    with pytest.raises(gr.Error) as err:
        list(user_facing(tab.patching)(ex, None, *args))
    assert err.value.message == message
    assert ex.counters.forwards == before


def test_replacing_a_word_replaces_every_whole_word_and_nothing_inside_another():
    text = "my son, his sonnet and her son"
    assert fields.corrupted_text(text, "replacing a word", "", "son", "heir") == "my heir, his sonnet and her heir"
    assert fields.corrupted_text(text, "corrupted prompt", "as given", "son", "heir") == "as given"


def _budget(ex, nbytes: int) -> Explorer:
    small = Explorer(replace(ex.cfg, limits=replace(Limits(), memory_budget=nbytes)))
    small.registry = ex.registry  # the same loaded weights
    return small


def test_a_request_over_the_memory_budget_is_refused_before_it_runs_and_batches_what_fits(ex, nano):
    small = _budget(ex, 1024)
    with pytest.raises(gr.Error) as err:
        list(user_facing(tab.patching)(small, None, tab.CLEAN, *BY_WORD))
    assert re.fullmatch(r"patching: 21 tokens on nano need .* beyond the weights, 1\.0 KiB is available; no text "
                        r"fits: free memory or use a smaller model", err.value.message), err.value.message
    assert small.counters.forwards == 0
    one = view_memory(nano.model.cfg, 21, torch.float32, 0).request
    assert fields.patching_rows(_budget(ex, 3 * one), nano, 21) == 3  # patched rows per pass: what the budget holds
    assert fields.patching_rows(ex, nano, 21) == fields.PASS_ROWS


# --- exports and Stop --------------------------------------------------------------------------------------


def test_the_export_holds_every_value_as_csv_and_json(ex, run):
    numbers, payload = run[-1][7], run[-1][8]
    paths, message = export(payload, ex.export_dir, png=False)
    assert message.startswith("Wrote") and "patching.csv" in message
    with open(next(p for p in paths if p.endswith(".csv")), encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == tab.CSV_HEADERS
    models = numbers["models"]
    views = [(name, view) for name, r in models.items() for view in r if view in
             ("resid", "heads", "topo_w", "attribution_resid", "attribution_heads")]
    sizes = sum(np.size(models[n][v]["values"]) for n, v in views) + sum(np.size(r["dla"]["heads"])
                                                                        for r in models.values())
    assert len(rows) - 1 == sizes  # one row per value of every view
    son = [r for r in rows if r[:3] == [QTG, "resid", "0"] and r[5] == " son"]
    assert [float(son[0][6])] == pytest.approx([models[QTG]["resid"]["values"][0][5]])
    written = json.load(open(next(p for p in paths if p.endswith("numbers.json")), encoding="utf-8"))
    np.testing.assert_allclose(written["models"][BASE]["heads"]["values"], models[BASE]["heads"]["values"])


def _longest(nano, limit: int) -> str:
    """The default prompt repeated while it stays within ``limit`` tokens."""
    text = tab.CLEAN
    while len(encode(nano.tokenizer, text + " " + tab.CLEAN)) <= limit:
        text += " " + tab.CLEAN
    return text


def test_a_prompt_past_the_patching_limit_is_refused(ex, nano):
    limit = ex.limits.max_patching_tokens
    text = _longest(nano, limit) + " " + tab.CLEAN
    n = len(encode(nano.tokenizer, text))
    with pytest.raises(gr.Error) as err:
        list(user_facing(tab.patching)(ex, None, text, *BY_WORD))
    assert err.value.message == (f"clean prompt: {n} tokens is above the maximum {limit} (max patching tokens: "
                                 "every block and position is one patched pass); shorten it")


def test_closing_the_handler_stops_the_work_on_the_server(ex, nano):
    """What Stop does: Gradio closes the handler's generator; the worker stops at its next batch."""
    gen = tab.patching(ex, None, _longest(nano, ex.limits.max_patching_tokens), *BY_WORD)
    update = next(gen)
    assert update[-2].startswith("running: 0 of ") and "qtg-token" in update[0]
    start = ex.counters.forwards
    while ex.counters.forwards == start:
        update = next(gen)
    at_close = ex.counters.forwards
    gen.close()
    assert not [t for t in threading.enumerate() if t.name == "patching"]
    stopped_at = ex.counters.forwards
    time.sleep(0.5)
    assert ex.counters.forwards == stopped_at, "patching kept running after it was closed"
    # the worker runs ahead of the progress updates, but after close it finishes at most the pass under way,
    # well before the end (36 passes: nano 16 + 1 + 4, its baseline 16 + 1)
    assert stopped_at - at_close <= 1 and stopped_at - start < 36
    assert update[-2].startswith("running: ") and tab.stopped(update[-1]) == (
        f"stopped after {update[-1]['done']} of {update[-1]['total']} patched units (Stop pressed; the server "
        "computes no more)")


# --- over HTTP (gradio_client) ------------------------------------------------------------------------


@pytest.mark.slow
def test_the_endpoint_answers_as_the_handler_and_exports(server, run):  # noqa: F811
    ex, url = server
    c = client(url)
    assert {"/patching", "/export_patching"} <= set(c.view_api(print_info=False, return_format="dict")
                                                    ["named_endpoints"])
    cut, *figs, table, numbers, status = c.predict(tab.CLEAN, *BY_WORD, api_name="/patching")
    ref = run[-1][7]["models"]
    for name in (QTG, BASE):
        np.testing.assert_allclose(numbers["models"][name]["resid"]["values"], ref[name]["resid"]["values"],
                                   rtol=1e-6, atol=1e-9)
    assert len(figs) == 5 and status.startswith("done: ") and [r[0] for r in table["data"]] == [QTG, BASE]
    files, message = c.predict(api_name="/export_patching")
    assert {f.rsplit("/", 1)[1] for f in files} >= {"numbers.json", "patching.csv", "figures.html"}
    with pytest.raises(Exception) as err:
        c.predict(tab.CLEAN, "corrupted prompt", tab.CLEAN + " more", "", "", " son", "", api_name="/patching")
    assert str(err.value).startswith("corrupted prompt: 22 tokens, the clean prompt 21: ")


@pytest.mark.slow
def test_stop_cancels_patching_on_the_server(server, nano):  # noqa: F811
    ex, url = server
    before = ex.counters.forwards
    job = client(url).submit(_longest(nano, ex.limits.max_patching_tokens), *BY_WORD, api_name="/patching")
    at_stop = count_after_cancel(job, lambda: ex.counters.forwards != before, lambda: ex.counters.forwards,
                                 "patching")
    assert 0 < at_stop - before <= 6  # batched passes: 36 had it run to the end
    assert not [t for t in threading.enumerate() if t.name == "patching"]
