"""The Experiment tab: its numbers are ``qtg.experiments``'s, each bad field is refused in one line naming it,
the sweep over the held-out works is cancellable on the server, and the three endpoints answer over HTTP.

In-process handler tests first; ``gradio_client`` tests (marked slow) against the server of
``tests/test_app_server.py``; the Chromium tests are in ``tests/test_app_browser_experiment.py``.
"""

from __future__ import annotations

import copy
import re
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

import gradio as gr  # noqa: E402

import qtg  # noqa: E402
from app.core import Session  # noqa: E402
from app.errors import user_facing  # noqa: E402
from app.tabs import experiment as tab  # noqa: E402
from app.tabs import experiment_runs as runs  # noqa: E402
from app.worker import ABANDONED_S  # noqa: E402
from qtg.data.documents import default_corpus_path  # noqa: E402
from qtg.data.pipeline import split_documents  # noqa: E402
from qtg.data.tokenizer import encode, eos_id  # noqa: E402
from qtg.experiments import compare_text, head_importance, logit_lens, prepare, sweep  # noqa: E402
from qtg.experiments.corpus import read_documents  # noqa: E402
from qtg.experiments.heldout import SHIPPED_SPLIT, heldout_documents, next_token, recorded_split  # noqa: E402
from qtg.model.views import view_memory  # noqa: E402
from qtg.plots.experiment import OFFSET, VERDICT_COLORS, forest_panels, forest_plot, lens_heatmaps  # noqa: E402
from tests.app_fixtures import close_after_first_pass, count_after_cancel, ex_fixture, nano_fixture  # noqa: E402, F401
from tests.test_app_handlers import TEXT  # noqa: E402
from tests.test_app_server import client, server  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("one_thread")

KNOBS = dict(topo="approx", theta=None, tau=None, temperature=None, gamma="", gamma_scale=1.0, ablate="",
             positions="model")


def knobs(**changed) -> dict:
    return {**KNOBS, **changed}


# --- one text -----------------------------------------------------------------------------------


def test_experiment_numbers_are_the_library_s(ex, nano):
    table, fig, page, numbers, payload = tab.experiment(
        ex, None, TEXT, **knobs(topo="exact", theta=0.2, gamma="0:1,1,2,2", gamma_scale=0.5, ablate="1:0,3"))
    iv = qtg.Intervention(topo="exact", theta=0.2, gamma={0: torch.tensor([1.0, 1.0, 2.0, 2.0])}, gamma_scale=0.5,
                          ablate_heads={1: [0, 3]})
    ref = compare_text(nano.model, TEXT, iv, tokenizer=nano.tokenizer)
    assert numbers["intervention"] == iv.name
    for side in ("before", "after"):
        assert numbers[side]["loss"] == pytest.approx(getattr(ref, side).loss, rel=1e-12)
        assert numbers[side]["bits_per_byte"] == pytest.approx(ref.bits_per_byte(getattr(ref, side)), rel=1e-12)
    np.testing.assert_allclose(numbers["delta_loss"], ref.delta_loss.numpy(), rtol=1e-6)
    assert numbers["after"]["loss"] != numbers["before"]["loss"]  # the knobs reached the forward pass
    assert [row[0] for row in table["data"]] == ["loss (nats/token)", "perplexity", "bits per byte"]
    assert table["data"][0][1:3] == [round(ref.before.loss, 4), round(ref.after.loss, 4)]
    # the bars: the token after the text, before and after, as next_token gives them
    nxt = next_token(nano.model, [eos_id(nano.tokenizer)] + encode(nano.tokenizer, TEXT), iv)
    assert numbers["next_token"]["kl"] == pytest.approx(nxt.kl, rel=1e-9)
    np.testing.assert_allclose(fig.data[0].y, [p for _, p, _ in nxt.top(tab.TOP_K)], rtol=1e-6)
    np.testing.assert_allclose(fig.data[1].y, [q for _, _, q in nxt.top(tab.TOP_K)], rtol=1e-6)
    # one coloured span per predicted token, red where the loss rose
    assert page.count('class="qtg-delta"') == len(ref.delta_loss)
    worst = int(ref.delta_loss.argmax())
    assert "rgba(214, 39, 40, 0.850)" in page.split('class="qtg-delta"')[worst + 1]
    assert payload.tab == "experiment" and "next_token" in payload.figures


def test_next_token_is_the_model_s_last_distribution(nano):
    ids = torch.tensor([encode(nano.tokenizer, TEXT)])
    nxt = next_token(nano.model, ids, qtg.Intervention(positions="none"))
    with torch.inference_mode():
        plain = torch.log_softmax(nano.model(ids).logits[0, -1].float(), -1)
        off = torch.log_softmax(nano.model(ids, intervene=qtg.Intervention(positions="none")).logits[0, -1].float(), -1)
    torch.testing.assert_close(nxt.before, plain)
    torch.testing.assert_close(nxt.after, off)
    assert nxt.kl > 0 and 0 < nxt.total_variation <= 1


def test_an_empty_text_uses_the_last_generation(ex, nano):
    session = Session(model=ex.default_key, device="cpu", last_text=TEXT)
    numbers = tab.experiment(ex, session, "", **knobs(topo="off"))[3]
    assert numbers["ids"] == [eos_id(nano.tokenizer)] + encode(nano.tokenizer, TEXT)


REFUSALS = [
    (dict(text="x" * 20_001), "^text: 20,001 characters is above the maximum 20,000$"),
    (dict(text="word " * 300), r"^text: [\d,]+ tokens \(1,500 characters\) is above the 255 tokens nano reads"),
    (dict(topo="exactly"), r"^TopoFilter mode: 'exactly' is not one of \['approx', 'exact', 'off'\]$"),
    (dict(theta="high"), "^theta: expected a number, got 'high'$"),
    (dict(tau=0), "^tau: 0 is below the minimum 1e-09$"),
    (dict(temperature=float("nan")), "^T: expected a finite number, got nan$"),
    (dict(gamma="-1"), "^gamma: -1 is below the minimum 0$"),
    (dict(gamma="0:1,x"), "^gamma: expected a number or block:g,g"),
    (dict(gamma="0:1,1"), r"^gamma\[0\] must be 4 finite values in \[0, 1e\+30\] \(one per head\), got shape \(2,\)$"),
    (dict(gamma_scale=-0.5), "^gamma scale: -0.5 is below the minimum 0$"),
    (dict(ablate="0;1"), "^ablated heads: expected block:head,head;block:head"),
    (dict(ablate="0:7"), r"^ablate_heads\[0\]: head\(s\) \[7\] out of range 0..3$"),
    (dict(ablate="9:0"), r"^ablate_heads: block 9 out of range 0..3$"),
    (dict(positions="rotary"), r"^positions: 'rotary' is not one of \['model', 'none'\]$"),
]


@pytest.mark.parametrize("changed, message", REFUSALS)
def test_experiment_refuses_each_bad_field_in_one_line(ex, changed, message):
    text = changed.pop("text", TEXT)
    with pytest.raises(gr.Error) as err:
        user_facing(tab.experiment)(ex, None, text, **knobs(**changed))
    assert re.search(message, err.value.message), err.value.message
    assert "\n" not in err.value.message


def test_default_knobs_on_one_text_say_no_intervention_is_set(ex):
    before = ex.counters.forwards
    with pytest.raises(gr.Error) as err:
        user_facing(tab.experiment)(ex, None, TEXT, **KNOBS)
    assert err.value.message == tab.NO_INTERVENTION and err.value.message.startswith("knobs: no intervention is set")
    assert ex.counters.forwards == before


def test_a_baseline_takes_only_ablated_heads(ex):
    session = Session(model="shipped:nano-baseline", device="cpu")
    with pytest.raises(gr.Error, match=r"has no TopoFilter and no GeoAttention: it takes only ablate_heads, not topo"):
        user_facing(tab.experiment)(ex, session, TEXT, **knobs(topo="exact"))
    numbers = tab.experiment(ex, session, TEXT, **knobs(ablate="0:1"))[3]
    assert numbers["intervention"] == "ablate=0:1" and numbers["after"]["loss"] != numbers["before"]["loss"]


# --- the logit lens -------------------------------------------------------------------------------


def test_lens_is_the_library_s_for_qtg_and_its_baseline(ex, nano):
    long = TEXT + " " + TEXT  # more tokens than the lens draws
    fig, numbers, note, payload = tab.lens(ex, None, long)
    n = ex.limits.max_lens_tokens
    assert list(numbers["lens"]) == ["QTG: nano", "baseline: nano-baseline"]
    assert note.startswith(f"Showing the first {n} of ")
    ids = torch.tensor([encode(nano.tokenizer, long)[:n]])
    ref = logit_lens(nano.model, ids)
    mine = numbers["lens"]["QTG: nano"]
    assert mine == ref.to_dict(nano.tokenizer, k=tab.LENS_TOP)
    assert [s["name"] for s in mine["states"]] == nano.model.state_names  # blocks from 0, as in every tab
    assert mine["states"][-1]["name"] == f"block {nano.model.cfg.n_layers - 1}"
    with torch.inference_mode():  # the last state is the model's own prediction
        top = nano.model(ids).logits[0].argmax(-1).tolist()
    assert [row[0] for row in mine["states"][-1]["top_ids"]] == top
    base = ex.registry.baseline_for(nano)
    assert [s["name"] for s in numbers["lens"]["baseline: nano-baseline"]["states"]] == base.model.state_names
    assert len(fig.data) == 2 and fig.data[0].z.shape == (len(mine["states"]), n)  # one heatmap per model


def test_lens_heatmap_cells_show_the_top_token_and_hover_the_top_five():
    lens = {"input_ids": [5, 6], "input_tokens": ["a", "\n"],
            "states": [{"name": "s0", "top_ids": [[1, 2], [3, 4]], "top_tokens": [["x", "y"], ["z", "w"]],
                        "top_probs": [[0.6, 0.3], [0.9, 0.05]], "kl_to_final": [0.5, 0.0]}]}
    fig = lens_heatmaps({"m": lens})
    assert fig.data[0].text.tolist() == [["x<br>0.60", "z<br>0.90"]]
    assert list(fig.data[0].x) == ["0:a", "1:⏎"]
    assert "y: 0.300" in fig.data[0].customdata[0][0] and "KL to final 0.500" in fig.data[0].customdata[0][0]


def test_forest_plot_colours_each_row_by_its_interval_across_works_and_draws_both_and_the_works():
    rows = [{"name": "hurts", "estimate": 0.2, "low": 0.1, "high": 0.3, "works_low": 0.05, "works_high": 0.4,
             "works_estimate": 0.21, "per_work": {"a": 0.1, "b": 0.3}},
            {"name": "helps", "estimate": -0.2, "low": -0.3, "high": -0.1},  # no works interval: by its windows
            # narrow over windows, but across works the interval holds 0: no difference detected
            {"name": "noise", "estimate": 0.05, "low": 0.04, "high": 0.06, "works_low": -0.1, "works_high": 0.2,
             "works_estimate": 0.05, "per_work": {"a": -0.08, "b": 0.18}}]
    fig = forest_plot(rows)
    windows = {tr.name: [c[0] for c in tr.customdata] for tr in fig.data if tr.marker.symbol == "diamond"}
    assert windows == {"worse": ["hurts"], "better": ["helps"], "no difference detected": ["noise"]}
    worse = next(tr for tr in fig.data if tr.name == "worse")
    assert worse.marker.color == VERDICT_COLORS["worse"] and list(worse.error_x.array) == pytest.approx([0.1])
    assert list(worse.y) == [2 + OFFSET]  # top row, the windows interval above its place
    across = {tr.name: tr for tr in fig.data if tr.marker.symbol == "circle-open"}
    assert set(across) == {"worse, across works", "no difference detected, across works"}
    hurts = across["worse, across works"]
    assert list(hurts.x) == [0.21] and list(hurts.error_x.array) == pytest.approx([0.19])
    assert list(hurts.error_x.arrayminus) == pytest.approx([0.16]) and list(hurts.y) == [2 - OFFSET]
    dots = next(tr for tr in fig.data if tr.name == "each work")
    assert list(dots.x) == [0.1, 0.3, -0.08, 0.18] and list(dots.y) == [2 - OFFSET] * 2 + [-OFFSET] * 2
    assert [list(c) for c in dots.customdata] == [["hurts", "a"], ["hurts", "b"], ["noise", "a"], ["noise", "b"]]
    assert list(fig.layout.yaxis.ticktext) == ["noise", "helps", "hurts"]  # drawn top to bottom


def test_forest_panels_share_one_scale():
    small = [{"name": "0:0", "estimate": 0.01, "low": 0.0, "high": 0.02, "per_work": {"a": 0.03}}]
    large = [{"name": "0:0", "estimate": 0.5, "low": 0.4, "high": 0.6, "works_low": -0.2, "works_high": 1.2,
              "works_estimate": 0.5}]
    fig = forest_panels({"qtg": small, "baseline": large})
    low, high = fig.layout.xaxis.range
    assert list(fig.layout.xaxis2.range) == [low, high]
    assert low < -0.2 and high > 1.2  # every interval of both panels in view


# --- the sweep over the held-out works ---------------------------------------------------------------


def test_heldout_works_are_the_split_the_model_trained_with(nano):
    assert recorded_split(nano.model) == SHIPPED_SPLIT  # nano's state.json records the shipped configs' split
    docs = heldout_documents(nano.model)
    ref = split_documents(read_documents(default_corpus_path()), **SHIPPED_SPLIT).test
    assert [d.name for d in docs] == [d.name for d in ref] and docs


def test_sweep_numbers_are_the_library_s(ex, nano):
    tab_headers = runs.SWEEP_HEADERS
    outs = list(runs.run_sweep(ex, None, **knobs(topo="exact"), lines="gamma=1\ntopo=exact", windows=4, sample=1,
                              seed=3))
    table, fig, status, numbers, payload, state = outs[-1]
    corpus = prepare(nano.model, heldout_documents(nano.model), max_windows=4, seed=3)
    ref = sweep(nano.model, corpus, [qtg.Intervention(topo="exact"), qtg.Intervention(gamma=1.0)], sample=1,
                seed=3).to_dict()
    assert [c["name"] for c in numbers["conditions"]] == ["plain", "topo=exact", "gamma=1.0"]  # each once
    for mine, theirs in zip(numbers["conditions"], ref["conditions"]):
        for key in ("loss", "bits_per_byte", "delta_bits_per_byte", "ci95", "delta_loss_ci95", "mean_topo_weight"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-9), key
    for mine, theirs in zip(numbers["conditions"][1:], ref["conditions"][1:]):  # per work and across works
        assert mine["n_works"] == theirs["n_works"] == len({d for d in corpus.document})
        assert mine["ci95_works"] == pytest.approx(theirs["ci95_works"], rel=1e-9)
        assert mine["per_work"] == pytest.approx(theirs["per_work"], rel=1e-9)
    assert [r[0] for r in table["data"]] == ["plain", "topo=exact", "gamma=1.0"]
    gamma = table["data"][2]
    assert gamma[tab_headers.index("verdict (across works)")] == numbers["conditions"][2]["verdict"]
    # gamma is an attention knob: the TopoFilter before the blocks cannot move mean w or the H0 bottleneck
    assert gamma[-2:] == [runs.UNCHANGED, runs.UNCHANGED] and table["data"][1][-2] != runs.UNCHANGED
    assert sorted(x for tr in fig.data if tr.marker.symbol == "diamond" for x in tr.x) == sorted(
        c["delta_bits_per_byte"] for c in ref["conditions"][1:])
    dots = next(tr for tr in fig.data if tr.name == "each work")
    assert sorted(dots.x) == pytest.approx(sorted(v for c in ref["conditions"][1:] for v in c["per_work"].values()))
    assert status.startswith("done: 4 windows") and state["done"] == state["total"] == 12
    assert numbers["split"]["documents"] == [d.name for d in heldout_documents(nano.model)]


@pytest.mark.parametrize("changed, message", [
    (dict(windows=0), "^windows: 0 is below the minimum 1$"),
    (dict(windows=10**6), "^windows: 1000000 is above the maximum 2000$"),
    (dict(windows=4, sample=5), "^sampled windows: 5 is above the maximum 4$"),
    (dict(seed=-1), "^seed: -1 is below the minimum 0$"),
    (dict(lines="topo=exact\ntopo=fast"), r"^conditions line 2: topo must be one of"),
    (dict(lines="gamma=1\nablate=0:9"), r"^conditions line 2: ablate_heads\[0\]: head\(s\) \[9\] out of range"),
    (dict(lines=""), "^conditions: nothing to compare"),
    (dict(lines="\n".join(f"theta={i / 10}" for i in range(9))), "^conditions: 9 is above the maximum 8"),
])
def test_sweep_refuses_each_bad_field_before_any_work(ex, changed, message):
    before = ex.counters.forwards
    args = {"lines": "topo=exact", "windows": 4, "sample": 0, "seed": 0, **changed}
    with pytest.raises(gr.Error) as err:
        list(user_facing(runs.run_sweep)(ex, None, **KNOBS, **args))
    assert re.search(message, err.value.message), err.value.message
    assert ex.counters.forwards == before


def test_sweep_batches_what_the_memory_budget_holds_and_refuses_below_one_window(ex, nano):
    cfg = nano.model.cfg
    one = view_memory(cfg, cfg.max_seq_len, torch.float32, cfg.n_layers, "internals", "cpu").request
    tight = copy.copy(ex)
    tight.limits = replace(ex.limits, memory_budget=3 * one + 1)
    assert runs.sweep_batch(tight, nano) == 3 and runs.sweep_batch(ex, nano) == runs.SWEEP_BATCH
    tight.limits = replace(ex.limits, memory_budget=one - 1)
    with pytest.raises(gr.Error) as err:
        list(user_facing(runs.run_sweep)(tight, None, **KNOBS, lines="topo=exact", windows=4, sample=0, seed=0))
    assert re.search(r"^sweep: one window of 256 tokens on nano needs [\d.]+ MiB beyond the weights, [\d.]+ MiB "
                     "is available", err.value.message), err.value.message


def test_heads_ranking_is_the_library_s_with_the_baseline_on_one_scale(ex, nano):
    table, fig, status, numbers, payload, state = list(runs.run_heads(ex, None, True, 4, 2))[-1]
    corpus = prepare(nano.model, heldout_documents(nano.model), max_windows=4, seed=2)
    ref = head_importance(nano.model, corpus, seed=2).to_dict()
    mine = numbers["rankings"][0]
    assert [h["head"] for h in mine["heads"]] == [h["head"] for h in ref["heads"]]  # the same order
    for a, b in zip(mine["heads"], ref["heads"]):
        for key in ("delta_loss", "delta_loss_ci95", "delta_loss_ci95_works", "delta_loss_per_work"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert [r["model"] for r in numbers["rankings"]] == ["nano", "nano-baseline"]
    n_heads = nano.model.cfg.n_layers * nano.model.cfg.n_heads
    assert len(table["data"]) == 2 * n_heads and table["data"][0][:3] == ["nano", 1, ref["heads"][0]["head"]]
    assert table["data"][0][-1] == ref["heads"][0]["delta_loss_verdict"]
    # both models' heads in one figure, one x axis: the panels' rows are on one scale
    assert {tr.xaxis for tr in fig.data} == {"x", "x2"}
    assert fig.layout.xaxis.range == fig.layout.xaxis2.range
    assert fig.layout.xaxis.range[1] >= max(h["delta_loss_ci95"][1] for r in numbers["rankings"] for h in r["heads"])
    assert status.startswith("done: the heads of nano, nano-baseline on 4 windows")
    assert state["done"] == state["total"] == 2 * 4 * (n_heads + 1)
    assert payload.tab == "heads" and "forest" in payload.figures


def test_heads_refuse_a_missing_baseline_and_bad_windows_before_any_work(ex):
    before = ex.counters.forwards
    session = Session(model="shipped:nano-baseline", device="cpu")
    for args, message in [((session, True, 4, 0), "baseline: no same-size baseline is shipped beside nano-baseline; "
                                                   "untick it"),
                          ((None, False, 0, 0), "windows: 0 is below the minimum 1")]:
        with pytest.raises(gr.Error) as err:
            list(user_facing(runs.run_heads)(ex, *args))
        assert err.value.message == message
    assert ex.counters.forwards == before


def test_closing_the_sweep_cancels_it_on_the_server(ex):
    """What Stop does: Gradio closes the handler's generator; the sweep's worker stops at its next batch."""
    seen = []
    gen = runs.run_sweep(ex, None, **KNOBS, lines="topo=exact\ntopo=off\ngamma=1", windows=400, sample=0, seed=0,
                        progress=lambda p, **kw: seen.append(p))
    start = ex.counters.forwards
    for update in gen:  # progress updates until a forward pass has run
        assert len(update) == 6 and update[0] is not None and update[2].startswith("running: ")
        if ex.counters.forwards > start:
            break
    t0 = time.perf_counter()
    gen.close()
    assert time.perf_counter() - t0 < 10
    assert not [t for t in threading.enumerate() if t.name == "experiment-sweep"]
    stopped_at = ex.counters.forwards
    time.sleep(0.5)
    assert ex.counters.forwards == stopped_at, "the sweep kept running after it was closed"
    total = 400 * 4
    assert seen and seen[-1][1] == total  # the progress bar counts window passes
    assert stopped_at - start < 10  # forward passes (of 8 windows) after the first: 200 had it run to the end
    assert runs.stopped({"done": 40, "total": total}) == f"stopped after 40 of {total} window passes (Stop pressed; " \
                                                        "the server computes no more)"


def test_closing_the_heads_ranking_cancels_it_on_the_server(ex):
    ran = close_after_first_pass(ex, runs.run_heads(ex, None, False, 400, 0), "experiment-heads")
    assert ran < 10  # 850 passes had it run to the end


def test_a_sweep_nobody_reads_any_more_stops_on_the_server(ex):
    """Gradio's cancel stops iterating the handler but closes it only when it is collected: a run whose
    progress is not read for ABANDONED_S stops at its next pass, though its generator is still alive."""
    gen = runs.run_sweep(ex, None, *HTTP_KNOBS, "topo=off", 400, 0, 0)
    start = ex.counters.forwards
    for _ in gen:
        if ex.counters.forwards > start:
            break  # dropped, not closed: `gen` stays referenced
    deadline = time.time() + ABANDONED_S + 30
    while [t for t in threading.enumerate() if t.name == "experiment-sweep"] and time.time() < deadline:
        time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == "experiment-sweep"], "the dropped sweep kept going"
    assert ex.counters.forwards - start < 400  # 800 window passes had it run to the end
    gen.close()


# --- over HTTP (gradio_client) ------------------------------------------------------------------------

HTTP_KNOBS = ["exact", "", "", "", "", 1.0, "", "model"]


@pytest.mark.slow
def test_endpoints_answer_and_equal_the_handlers(server):  # noqa: F811
    ex, url = server
    c = client(url)
    names = set(c.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/experiment", "/lens", "/sweep", "/heads", "/export_experiment", "/export_lens", "/export_sweep",
            "/export_heads"} <= names
    table, _, page, numbers = c.predict(TEXT, *HTTP_KNOBS, api_name="/experiment")
    ref = tab.experiment(ex, None, TEXT, *HTTP_KNOBS)[3]
    assert numbers["after"]["loss"] == pytest.approx(ref["after"]["loss"], rel=1e-12)
    assert numbers["delta_loss"] == pytest.approx(ref["delta_loss"], rel=1e-9)
    assert 'class="qtg-delta"' in page and table["data"][0][0] == "loss (nats/token)"
    files, message = c.predict(api_name="/export_experiment")
    assert message.startswith("Wrote") and any(f.endswith("numbers.json") for f in files)
    _, lens_numbers, _ = c.predict(TEXT, api_name="/lens")
    assert list(lens_numbers["lens"]) == ["QTG: nano", "baseline: nano-baseline"]
    table, _, status, sweep_numbers = c.predict(*HTTP_KNOBS, "topo=off", 4, 0, 0, api_name="/sweep")
    assert [r[0] for r in table["data"]] == ["plain", "topo=exact", "topo=off"] and status.startswith("done: 4")
    table, _, status, heads = c.predict(False, 4, 0, api_name="/heads")
    ref = list(runs.run_heads(ex, None, False, 4, 0))[-1][3]
    assert [h["head"] for h in heads["rankings"][0]["heads"]] == [h["head"] for h in ref["rankings"][0]["heads"]]
    assert table["data"][0][:3] == ["nano", 1, ref["rankings"][0]["heads"][0]["head"]] and status.startswith("done:")
    files, message = c.predict(api_name="/export_heads")
    assert message.startswith("Wrote") and any(f.endswith("numbers.json") for f in files)
    with pytest.raises(Exception) as err:
        c.predict(*HTTP_KNOBS, "", 0, 0, 0, api_name="/sweep")
    assert str(err.value) == "windows: 0 is below the minimum 1"
    with pytest.raises(Exception) as err:
        c.predict(TEXT, "exact", "high", "", "", "", 1.0, "", "model", api_name="/experiment")
    assert str(err.value) == "theta: expected a number, got 'high'"
    with pytest.raises(Exception) as err:  # the knobs as the page starts: nothing to compare
        c.predict(TEXT, "approx", "", "", "", "", 1.0, "", "model", api_name="/experiment")
    assert str(err.value) == tab.NO_INTERVENTION


@pytest.mark.slow
def test_stop_cancels_the_sweep_on_the_server(server):  # noqa: F811
    ex, url = server
    c = client(url)
    before = ex.counters.forwards
    job = c.submit(*HTTP_KNOBS, "topo=off\ngamma=1", 400, 0, 0, api_name="/sweep")
    # settle: a dropped run stops within ABANDONED_S of its last read, after the pass under way
    at_stop = count_after_cancel(job, lambda: ex.counters.forwards != before, lambda: ex.counters.forwards,
                                 "the sweep", settle_s=ABANDONED_S + 3.0)
    assert 0 < at_stop - before < 50  # forward passes of 8 windows: 150 had it run to the end
    assert not [t for t in threading.enumerate() if t.name == "experiment-sweep"]
