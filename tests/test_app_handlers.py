"""The app's handlers called in-process: the numbers they show are the library's, bad input is refused
with one line naming the field, one request never changes another's model, every request knows its
memory before it runs, exports stay private and bounded, and every view lays out for every tier."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

import gradio as gr  # noqa: E402

import qtg  # noqa: E402
from app import exports  # noqa: E402
from app.config import AppConfig, Limits  # noqa: E402
from app.core import Explorer, Session, as_int  # noqa: E402
from app.errors import user_facing  # noqa: E402
from app.exports import Exportable, export, private_dir, prune  # noqa: E402
from app.models import exploration_tier  # noqa: E402
from app.server import control_ranges  # noqa: E402
from app.tabs import attention, compare, generate, tiers, topology  # noqa: E402
from qtg.data.tokenizer import EOS_TOKEN, decode, encode  # noqa: E402
from qtg.generate import generate as generate_ids  # noqa: E402
from qtg.metrics import attention_stats  # noqa: E402
from qtg.model.views import view_memory  # noqa: E402
from qtg.plots.topology import attention_graph_diagrams  # noqa: E402
from qtg.topology import approx_view, attention_graph, exact_diagrams, prompt_distance  # noqa: E402
from qtg.topology import compare as topo_compare  # noqa: E402
from tests.app_fixtures import ex_fixture, nano_fixture  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("one_thread")  # micro/nano gain nothing from a second thread

PROMPT = "ROMEO:"
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."
HAS_CHROMIUM = bool(shutil.which("chromium")) or os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def micro_session(ex) -> Session:
    """This module's explorer with the micro tier (random weights) loaded in a session."""
    return generate_last(tiers.load_model(ex, None, "tier:micro", "cpu"))[1]


def generate_last(stream):
    return list(stream)[-1]


def _last(stream):
    outs = list(stream)
    return outs, outs[-1]


def library_greedy(model, tokenizer, prompt: str, n: int) -> str:
    """The library's greedy continuation, stopping at EOS as the app does."""
    ids = torch.tensor([encode(tokenizer, prompt)])
    eos = tokenizer.token_to_id(EOS_TOKEN)
    out = generate_ids(model, ids, n, temperature=0, eos_id=eos)
    return decode(tokenizer, out[0, ids.shape[1]:].tolist())


# --- generate ----------------------------------------------------------------------------


def test_generate_greedy_equals_library(ex, nano):
    outs, (html, text, fig, stats, session, payload, strip) = _last(generate.generate(ex, None, PROMPT, 40, 0, 0, 1,
                                                                                        -1))
    assert text == PROMPT + library_greedy(nano.model, nano.tokenizer, PROMPT, 40)  # the box starts at the prompt
    assert session.last_text == text
    assert "done: 40 new tokens" in stats and "first token" in stats
    assert fig is not None and len(fig.data) > 0  # the live exact diagram
    assert fig.layout.width is None  # sized to its panel, not 760 px
    assert strip is not None and len(strip.data) == nano.model.cfg.n_heads and strip.layout.width is None


def test_generate_streams_several_updates(ex, monkeypatch):
    monkeypatch.setattr(generate, "YIELD_EVERY_S", 0.0)
    outs = list(generate.generate(ex, None, PROMPT, 12, 0, 0, 1, -1))
    assert len(outs) == 13  # one per token, then the final one
    texts = [o[1] for o in outs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # the text only grows


@pytest.mark.parametrize("decoder", ["engine", "uncached"])
def test_token_colours_are_the_model_own_scores(ex, nano, monkeypatch, decoder):
    """The colours' s~, s, w are the forward pass's own (``model(ids, return_internals=True)``), whether the
    shared engine scores them or, for a model sharded across ranks (no engine), the tab's :class:`Scorer`:
    the prompt's bit for bit (the same float32 distances by token ids), each new token's (one step against
    the past) to float32 rounding."""
    if decoder == "uncached":  # what a model sharded across ranks decodes through
        monkeypatch.setattr(ex, "engine", lambda loaded: None)
    outs, last = _last(generate.generate(ex, None, TEXT, 30, 0.9, 0, 1, 7))
    numbers = last[5].numbers
    prompt = encode(nano.tokenizer, TEXT)
    ids = torch.tensor([prompt + numbers["token_ids"]])
    with torch.inference_mode():
        out = nano.model(ids, return_internals=True)
    n = len(prompt)
    for key, ref in (("soft", out.topo_scores), ("exact", out.topo_exact_scores), ("weights", out.topo_weights)):
        shown, ref = np.array(numbers[key], dtype=np.float32), ref[0].numpy()
        np.testing.assert_array_equal(shown[:n], ref[:n], err_msg=key)  # no ids (float64): off by ulps
        np.testing.assert_allclose(shown, ref, rtol=0, atol=2e-6, err_msg=key)
    assert 'title="s~ = ' in last[0] and last[0].count('class="qtg-tok"') == ids.shape[1]


def test_generate_seeded_sampling_repeats_up_to_the_largest_seed(ex):
    """The advertised maximum seed, 2^63 - 1, is taken exactly (it used to pass through a float and be refused)."""
    a = _last(generate.generate(ex, None, PROMPT, 20, 1.0, 50, 0.9, 2**63 - 1))[1][1]
    b = _last(generate.generate(ex, None, PROMPT, 20, 1.0, 50, 0.9, str(2**63 - 1)))[1][1]
    assert a == b
    with pytest.raises(qtg.QTGError, match=r"^seed: 9223372036854775808 is above the maximum 9223372036854775807$"):
        list(generate.generate(ex, None, PROMPT, 5, 1.0, 0, 1, 2**63))


@pytest.mark.parametrize("temperature", [1e-38, 1e-300, 5e-324])
def test_tiny_temperatures_are_greedy_not_a_crash(ex, nano, temperature):
    _, text, _, stats, _, _, _ = _last(generate.generate(ex, None, PROMPT, 8, temperature, 0, 1, -1))[1]
    assert text == PROMPT + library_greedy(nano.model, nano.tokenizer, PROMPT, 8)
    assert "(greedy)" in stats


@pytest.mark.parametrize("args, message", [
    (("", 10, 0.8, 0, 1, -1), "^prompt: empty"),
    (("x" * 4001, 10, 0.8, 0, 1, -1), "^prompt: 4,001 characters is above the maximum 4,000$"),
    ((PROMPT, 0, 0.8, 0, 1, -1), "^max new tokens: 0 is below the minimum 1$"),
    ((PROMPT, 10, -1, 0, 1, -1), "^temperature: -1 is below the minimum 0$"),
    ((PROMPT, 10, float("nan"), 0, 1, -1), "^temperature: expected a finite number"),
    ((PROMPT, 10, 0.8, -3, 1, -1), "^top-k: -3 is below the minimum 0$"),
    ((PROMPT, 10, 0.8, 0, 0, -1), "^top-p: 0 is below the minimum"),
    ((PROMPT, 10, 0.8, 0, 1, "abc"), "^seed: expected a whole number, got 'abc'$"),
    ((PROMPT, 2.5, 0.8, 0, 1, -1), "^max new tokens: expected a whole number, got 2.5$"),
    ((PROMPT, 10, 0.8, 0, 1, float("inf")), "^seed: expected a whole number, got inf$"),
    (("word " * 300, 10, 0.8, 0, 1, -1), r"^prompt: [\d,]+ tokens \(1,500 characters\) is above the 256 "
                                         r"tokens nano reads at once \(its context\); here that is the first "
                                         r"[\d,]+ characters"),
    ((PROMPT, 10, 0.8, 0, 1, -1, 4), "^strip block: 4 is above the maximum 3$"),
    ((PROMPT, 10, 0.8, 0, 1, -1, -2), "^strip block: -2 is below the minimum -1$"),
])
def test_generate_bad_input_is_one_line_naming_the_field(ex, args, message):
    with pytest.raises(gr.Error) as err:
        list(user_facing(generate.generate)(ex, None, *args))
    assert re.search(message, err.value.message), err.value.message
    assert "\n" not in err.value.message and "Value " not in err.value.message


def test_max_new_tokens_is_bounded_by_the_room_the_prompt_leaves(ex, nano):
    """The context less the prompt's tokens: the handler's bound, the slider's maximum as the prompt changes, and
    the maximum after a model loads; a prompt that fills the context is refused as the prompt."""
    context = nano.model.cfg.max_seq_len
    for prompt in (PROMPT, "ROMEO: " * 40):
        room = context - len(encode(nano.tokenizer, prompt))
        with pytest.raises(qtg.QTGError, match=f"^max new tokens: {room + 1} is above the maximum {room}$"):
            list(generate.generate(ex, None, prompt, room + 1, 0, 0, 1, -1))
        kept = gr.update(maximum=room) if room >= 80 else gr.update(maximum=room, value=room)
        assert generate.room_for(ex, None, prompt, 80) == kept
        assert generate.room_for(ex, None, prompt, 10_000)["value"] == room  # a value beyond the room: the room
        assert control_ranges(ex, None, prompt)[1]["maximum"] == room
    assert generate.room_for(ex, None, "", 80) == gr.update(maximum=context - 1)  # nothing typed: one token
    full = " ".join(f"w{i}" for i in range(400))
    fills = decode(nano.tokenizer, encode(nano.tokenizer, full)[:context])
    assert len(encode(nano.tokenizer, fills)) == context
    with pytest.raises(qtg.QTGError, match=f"^prompt: {context} tokens fill the {context}-token context of nano"):
        list(generate.generate(ex, None, fills, 1, 0, 0, 1, -1))


def test_internal_errors_are_reported_not_raised_raw():
    def broken():
        raise KeyError("boom")
    with pytest.raises(gr.Error, match="internal error: KeyError"):
        user_facing(broken)()


def test_refusals_are_one_log_line_without_traceback(ex, caplog):
    with caplog.at_level("INFO", logger="app"), pytest.raises(gr.Error):
        list(user_facing(generate.generate, "generate")(ex, None, "", 10, 0.8, 0, 1, -1))
    lines = [r for r in caplog.records if r.name.startswith("app")]
    assert [r.getMessage() for r in lines] == ["refused generate: prompt: empty; type some text"]
    assert all(r.exc_info is None for r in lines)


@pytest.mark.parametrize("block", [-1, 0])
def test_the_strip_is_the_prompt_distance_of_the_final_map(ex, nano, block):
    """The strip, kept token by token from the engine's attention rows, equals for every head and after every
    generated token t ``qtg.topology.prompt_distance`` of the final text's full attention map (one plain
    forward pass) cut to t + 1 tokens; its figure draws one line of those numbers per head."""
    outs, last = _last(generate.generate(ex, None, PROMPT, 24, 0.9, 0, 1, 3, block))
    strip, numbers = last[6], last[5].numbers
    got = numbers["prompt_distance"]
    n_layers = nano.model.cfg.n_layers
    assert got["block"] == block % n_layers
    ids = torch.tensor([encode(nano.tokenizer, PROMPT) + numbers["token_ids"]])
    with torch.inference_mode():
        A = nano.model(ids, return_internals=True, map_blocks=[got["block"]]).attention[got["block"]][0]  # [H, N, N]
    p = got["prompt_len"]
    assert p == len(encode(nano.tokenizer, PROMPT)) and len(got["heads"]) == A.shape[0]
    for h, values in enumerate(got["heads"]):
        assert len(values) == len(numbers["token_ids"]) == 24
        want = [prompt_distance(A[h, :p + t + 1, :p + t + 1], p) for t in range(24)]
        np.testing.assert_allclose(values, want, atol=1e-5)
        np.testing.assert_allclose(strip.data[h].y, values)
    assert max(max(v) for v in got["heads"]) > 0.1
    assert f"block {block % n_layers}" in strip.layout.title.text


def test_after_stop_the_status_says_stopped_with_the_count(ex):
    """Stop during a run: the count of the last update sent. Stop after it, or once the server has finished it
    (its "done" update on its way), or with no run: the status is left as it is."""
    updates = [out[5] for out in generate.generate(ex, None, PROMPT, 7, 0, 0, 1, -1)]
    midway, final = updates[-2], updates[-1]
    n = len(midway.numbers["token_ids"])
    assert 0 < n < 7 and not midway.numbers["done"] and final.numbers["done"]
    assert generate.stopped(midway, "generating: 1 new tokens").startswith(f"stopped after {n} new tokens")
    assert generate.stopped(None, "generating: 0 new tokens").startswith("stopped after 0 new tokens")
    assert generate.stopped(final, "generating: 6 new tokens") == gr.skip()
    for status in ("done: 7 new tokens · first token 9 ms", "stopped after 7 new tokens", "", None):  # no run under way
        assert generate.stopped(midway, status) == gr.skip()


# --- topology ----------------------------------------------------------------------------


def test_topology_equals_library_and_engines_agree(ex, nano):
    diagram, bars, approx_fig, headline, bounds, payload = topology.topology(
        ex, None, TEXT, 1, "gudhi + ripser (overlaid)", 256, 0)
    agree = headline["gudhi_vs_ripser_bottleneck"]
    assert agree["H0"] < 1e-6 and agree["H1"] < 1e-6
    ids = torch.tensor([encode(nano.tokenizer, TEXT)])
    with torch.inference_mode():
        out = nano.model(ids, return_internals=True)
    ref = topo_compare(exact_diagrams(out.states[0][0], maxdim=1, backend="ripser"),
                       approx_view(out, layer=1, model=nano.model))
    assert headline["comparison"]["bottleneck_h0"] == pytest.approx(ref.bottleneck_h0, rel=1e-9)
    assert headline["comparison"]["mean_abs_error"] == pytest.approx(ref.mean_abs_error, rel=1e-9)
    assert "exact for the whole cloud" in bounds
    assert {"diagram", "barcode", "exact_vs_approx"} == set(payload.figures)
    assert {"gudhi H0", "gudhi H1", "ripser H0", "ripser H1"} <= {tr.name for tr in diagram.data}  # overlaid
    assert all(f.layout.width is None for f in payload.figures.values())  # every figure fits its panel


def test_topology_states_the_bounds_it_applied(ex):
    text = " ".join(f"w{i}" for i in range(40))
    *_, bounds, payload = topology.topology(ex, None, text, 3, "ripser", 20, 0.5)
    assert "20 of" in bounds and "farthest-point sampling" in bounds
    assert "max_edge = 0.5" in bounds
    assert payload.numbers["exact"]["ripser"]["bounds"]["points_kept"] == 20
    assert payload.numbers["layer_name"] == "block 1"  # blocks from 0: layer 3 is block 1's output


def test_the_text_or_the_last_generation(ex):
    """One rule for every tab: an empty text means the session's last generation."""
    *_, session, _, _ = _last(generate.generate(ex, None, PROMPT, 10, 0, 0, 1, -1))[1]
    payload = topology.topology(ex, session, "", 1, "ripser", 64, 0)[5]
    assert "".join(payload.numbers["tokens"]) == session.last_text
    assert attention.attention(ex, session, " ", 0, -1)[4]["tokens"] == payload.numbers["tokens"]
    with pytest.raises(qtg.QTGError, match="^text: empty, and nothing was generated yet"):
        topology.topology(ex, None, "  ", 1, "ripser", 64, 0)


@pytest.mark.parametrize("args, message", [
    ((TEXT, 99, "ripser", 64, 0), "^layer: 99 is above the maximum 5$"),
    ((TEXT, 1, "ripser", 5000, 0), "^max points: 5000 is above the maximum 1024$"),
    ((TEXT, 1, "nope", 64, 0), "^backend: 'nope' is not one of"),
    (("hi", 1, "ripser", 64, 0), "^text: 1 token\\(s\\) is below the minimum 3$"),
    (("x" * 30_000, 1, "ripser", 64, 0), "^text: 30,000 characters is above the maximum 20,000$"),
])
def test_topology_bad_input(ex, args, message):
    with pytest.raises(qtg.QTGError, match=message):
        topology.topology(ex, None, *args)


def test_a_text_beyond_the_context_is_refused_with_the_real_limit(ex, nano):
    """The limit in tokens and in characters of this very text (not only the 20,000-character cap)."""
    text = "Now is the winter of our discontent made glorious summer by this sun of York. " * 40
    ids = encode(nano.tokenizer, text)
    fits = len(decode(nano.tokenizer, ids[:256]))
    for run in (lambda: topology.topology(ex, None, text, 1, "ripser", 64, 0),
                lambda: attention.attention(ex, None, text, 0, -1),
                lambda: compare.compare_models(ex, None, text, "shipped:nano", "cpu", "approximate",
                                               "shipped:nano", "cpu", "approximate", -1)):
        with pytest.raises(qtg.QTGError, match=f"^text: {len(ids):,} tokens \\({len(text):,} characters\\) is above "
                                               f"the 256 tokens nano reads at once .* first {fits:,} characters"):
            run()


# --- memory: known before a request runs --------------------------------------------------


def test_a_view_that_does_not_fit_the_memory_budget_is_refused_before_it_runs(ex, micro_session):
    """micro's maps at its full context (128 tokens) exceed a budget set just below what that view needs:
    refused with needed vs available and the longest text that fits, and the model never runs."""
    micro = ex.current(micro_session)
    need = view_memory("micro", 128, "fp32", map_blocks=1).request
    small = Explorer(replace(ex.cfg, limits=replace(Limits(), memory_budget=need - 1)))
    small.registry = ex.registry  # the same loaded weights
    session = Session(micro_session.model, "cpu")
    words = " ".join(["the"] * 400)
    ids = encode(micro.tokenizer, words)[:128]
    full = decode(micro.tokenizer, ids)
    assert len(encode(micro.tokenizer, full)) == 128
    with pytest.raises(qtg.QTGError, match=r"^attention: 128 tokens on micro need .* beyond the weights, "
                                           r".* is available; at most \d+ tokens fit: shorten the text$") as err:
        attention.attention(small, session, full, 0, -1)
    assert small.counters.forwards == 0  # refused before the forward pass
    fits = int(str(err.value).split("at most ")[1].split(" ")[0])
    assert 0 < fits < 128
    short = decode(micro.tokenizer, ids[:fits])
    assert attention.attention(small, session, short, 0, -1)[4]["tokens"]  # a text that fits runs
    assert small.counters.forwards == 1


def test_views_materialise_only_the_maps_of_the_block_they_show(ex, nano, monkeypatch):
    calls = []
    forward = nano.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("map_blocks", "all"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(nano.model, "forward", spy)
    out = attention.attention(ex, None, TEXT, 2, -1)
    topology.topology(ex, None, TEXT, 3, "ripser", 64, 0)
    assert calls[0] == [2]  # the attention view: block 2's maps only
    assert calls[-1] == ()  # topology: states only, no maps
    assert out[4]["gamma"][2] == pytest.approx(nano.model.blocks[2].attn.gamma().tolist())  # every block's gamma


def test_generation_memory_is_checked_too(ex):
    small = Explorer(replace(ex.cfg, limits=replace(Limits(), memory_budget=1024)))
    small.registry = ex.registry
    with pytest.raises(qtg.QTGError, match=r"^generate: \d+ tokens on nano need .* beyond the weights"):
        list(generate.generate(small, None, PROMPT, 10, 0, 0, 1, -1))
    assert small.counters.tokens_generated == 0


# --- attention ---------------------------------------------------------------------------


def test_attention_maps_and_baseline(ex, nano):
    attn_fig, dist_fig, gamma_fig, base_fig, numbers, note, payload = attention.attention(ex, None, TEXT, 2, -1)
    ids = torch.tensor([encode(nano.tokenizer, TEXT)])
    with torch.inference_mode():
        out = nano.model(ids, return_internals=True)
    z = np.asarray(attn_fig.data[0].z, dtype=float)  # head 0, NaN above the diagonal
    np.testing.assert_allclose(np.nan_to_num(z), torch.tril(out.attention[2][0, 0]).numpy(), atol=1e-6)
    assert np.allclose(np.nansum(z, axis=1), 1.0, atol=1e-5)  # rows of a causal softmax
    assert np.nanmax(np.asarray(dist_fig.data[0].z, dtype=float)) <= math.pi / 2 + 1e-6
    assert len(attn_fig.data) == nano.model.cfg.n_heads
    assert base_fig is not None and numbers["baseline"]["model"] == "shipped:nano-baseline"
    assert numbers["gamma"][2] == pytest.approx(out.gamma[2].tolist())
    assert numbers["stats"] == attention_stats(out.attention[2][0]).to_dict()  # the library's statistics
    assert "gamma at block 2" in note
    # the seed's gamma = 1 is a legend entry, not a label drawn over the bars
    assert not [a for a in gamma_fig.layout.annotations if "gamma = 1" in (a.text or "")]
    assert any((t.name or "").startswith("gamma = 1") for t in gamma_fig.data)


def test_attention_one_head_and_cut(ex):
    small = Explorer(replace(ex.cfg, limits=replace(Limits(), max_attention_tokens=8)))
    fig, *_, numbers, note, _ = attention.attention(small, None, TEXT, 0, 3)
    assert len(fig.data) == 1 and "head 3" in fig.layout.annotations[0].text
    assert len(numbers["tokens"]) == 8 and "first 8 of" in note
    with pytest.raises(qtg.QTGError, match="^head: 4 is above the maximum 3$"):
        attention.attention(ex, None, TEXT, 0, 4)
    with pytest.raises(qtg.QTGError, match="^heads page: 2 is above the maximum 1$"):
        attention.attention(ex, None, TEXT, 0, -1, 2)


@pytest.mark.parametrize("tier", list(qtg.TIERS))
def test_attention_lays_out_any_number_of_heads(tier):
    """Every tier's head count (4 to 10,000) is drawn a page at a time; the pages cover every head once.
    Plotly refused one figure of 24 heads in two columns ("Vertical spacing cannot be greater than ...")."""
    n_heads, per_page = qtg.get_tier(tier).n_heads, Limits().heads_per_page
    pages = attention.n_pages(n_heads, per_page)
    shown = [h for p in range(1, pages + 1) for h in attention.page_heads(n_heads, per_page, p)]
    assert shown == list(range(n_heads))
    maps = torch.full((n_heads, 3, 3), 1 / 3)
    for page in {1, pages}:
        heads = attention.page_heads(n_heads, per_page, page)
        fig = attention.heatmaps(maps, ["a", "b", "c"], "attention", heads, None, "t")
        assert len(fig.data) == len(heads) <= per_page
        rows = -(-len(heads) // attention.COLS)
        # tick labels on the bottom row only: no subplot title sits on the labels of the row above
        labelled = [ax for name, ax in fig.layout.to_plotly_json().items()
                    if name.startswith("xaxis") and ax.get("showticklabels") is not False]
        assert len(labelled) == min(len(heads), attention.COLS) or rows == 1


def test_long_maps_keep_labels_and_offer_log_and_row_scales(ex, nano):
    text = " ".join(f"w{i}" for i in range(40))
    fig, *_, numbers, _, _ = attention.attention(ex, None, text, 1, 0, 1, "log")
    n = len(numbers["tokens"])
    assert 48 < n <= Limits().max_attention_tokens
    ticks = fig.layout.xaxis.tickvals
    assert fig.layout.xaxis.showticklabels and 10 <= len(ticks) <= attention.MAX_LABELS
    ids = torch.tensor([encode(nano.tokenizer, text)])
    with torch.inference_mode():
        a = nano.model(ids, return_internals=True).attention[1][0, 0]
    z = np.asarray(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(np.tril(z), np.tril(torch.log10(a.clamp(min=1e-6)).numpy()), atol=1e-5)
    assert fig.layout.coloraxis.cmin == -6 and "log10 a_ij" in fig.data[0].hovertemplate
    row = np.asarray(attention.attention(ex, None, text, 1, 0, 1, "row")[0].data[0].z, dtype=float)
    assert np.allclose(np.nanmax(row, axis=1), 1.0)  # each query's strongest key is 1
    with pytest.raises(qtg.QTGError, match="^colour scale: 'cubic' is not one of"):
        attention.attention(ex, None, text, 1, 0, 1, "cubic")



def test_attention_topology_is_the_librarys_attention_graph(ex, nano):
    """Every number of ``/attention_topology`` equals ``qtg.topology.attention_graph`` on the same map, for QTG
    and the same-size baseline; the figure's points are those diagrams; the table rows are their features."""
    fig, table, numbers, note, payload = attention.attention_topology(ex, None, TEXT, 2, -1)
    base = ex.registry.baseline_for(nano)
    ids = torch.tensor([encode(nano.tokenizer, TEXT)])
    heads = list(range(nano.model.cfg.n_heads))
    assert numbers["heads"] == heads and numbers["models"]["nano-baseline"] == "shipped:nano-baseline"
    expected = {}
    for name, loaded in (("QTG (nano)", nano), ("baseline (nano-baseline)", base)):
        with torch.inference_mode():
            maps = loaded.model(ids, return_internals=True).attention[2][0]
        expected[name] = [attention_graph(maps[h]) for h in heads]
        for h in heads:
            want = expected[name][h].to_dict()
            got = numbers["graphs"][name][h]
            assert got["betti0"] == want["betti0"] and got["betti1"] == want["betti1"]
            assert got["features"] == pytest.approx(want["features"], abs=1e-9)
            assert got["diagrams"]["dgms"] == want["diagrams"]["dgms"]
    keys = list(expected["QTG (nano)"][0].features())  # a row per feature and model, a column per head
    assert table["headers"] == ["feature", "model", *[f"head {h}" for h in heads]]
    assert [r[:2] for r in table["data"]] == [[k, n] for k in keys for n in expected]
    for row in table["data"]:
        assert row[2:] == pytest.approx([g.features()[row[0]] for g in expected[row[1]]], abs=1e-4)
    # panel (head 1, baseline): its H1 points are the library's H1 diagram
    h1 = [t for t in fig.data if t.name == "H1"][2 * 1 + 1]
    want_h1 = expected["baseline (nano-baseline)"][1].diagrams.dgms[1]
    np.testing.assert_allclose(np.c_[h1.x, h1.y], want_h1, atol=1e-12)
    assert "baseline (nano-baseline), head 1" in [a.text for a in fig.layout.annotations]
    assert payload.figures["attention_topology"] is fig


def test_attention_topology_refuses_bad_input_and_checks_memory(ex, micro_session):
    with pytest.raises(qtg.QTGError, match="^head: 4 is above the maximum 3$"):
        attention.attention_topology(ex, None, TEXT, 0, 4)
    with pytest.raises(qtg.QTGError, match="^block: expected a whole number, got 'x'$"):
        attention.attention_topology(ex, None, TEXT, "x", -1)
    need = view_memory("micro", 128, "fp32", map_blocks=1).request
    small = Explorer(replace(ex.cfg, limits=replace(Limits(), memory_budget=need - 1)))
    small.registry = ex.registry
    micro = ex.current(micro_session)
    full = decode(micro.tokenizer, encode(micro.tokenizer, " ".join(["the"] * 400))[:128])
    with pytest.raises(qtg.QTGError, match=r"^attention topology: 128 tokens on micro need .* beyond the weights"):
        attention.attention_topology(small, Session(micro_session.model, "cpu"), full, 0, -1)
    assert small.counters.forwards == 0  # refused before the forward pass


def test_attention_graph_diagrams_lays_out_heads_by_models():
    ring = np.eye(4, k=-1) + np.eye(4, k=3)  # a 4-cycle of full attention: one H1 bar
    graphs = {"a": [attention_graph(ring)] * 3, "b": [attention_graph(np.tril(np.ones((4, 4))) / 4)] * 3}
    fig = attention_graph_diagrams(graphs, [0, 1, 2])
    assert [a.text for a in fig.layout.annotations][:2] == ["a, head 0", "b, head 0"]
    assert [t.name for t in fig.data if t.showlegend is not False] == ["H0", "H1"]  # named once each
    assert len([t for t in fig.data if t.name == "H1" and t.showlegend is False and len(t.x)]) == 3  # the rings
    with pytest.raises(ValueError, match="one diagram per head"):
        attention_graph_diagrams({"a": graphs["a"][:2]}, [0, 1, 2])

# --- compare -----------------------------------------------------------------------------


def test_compare_exact_mode_is_an_argument_not_a_copy(ex, nano, monkeypatch):
    modules = len(list(nano.model.modules()))
    rows, fig, headline, payload = compare.compare_models(
        ex, None, TEXT, "shipped:nano", "cpu", "approximate", "shipped:nano", "cpu", "exact", -1)
    ids = torch.tensor([encode(nano.tokenizer, TEXT)])
    ref = qtg.topology.exact_mode_loss(nano.model, torch.cat([torch.tensor([[0]]), ids], 1))
    a, b = payload.numbers["A"], payload.numbers["B"]
    assert a["loss"] == pytest.approx(ref.ce_approx, rel=1e-5)
    assert b["loss"] == pytest.approx(ref.ce_exact, rel=1e-5)
    n_bytes = len(TEXT.encode("utf-8"))
    assert a["bits_per_byte"] == pytest.approx(qtg.metrics.bits_per_byte(ref.ce_approx * a["tokens"], n_bytes))
    assert len(list(nano.model.modules())) == modules and not hasattr(nano, "exact_model")  # no twin module
    table = {r[0]: r[1:] for r in rows}  # metrics down, A and B across: the table never runs off the page
    assert table["TopoFilter"] == ["approximate", "exact"] and len(rows[0]) == 3
    assert headline["bottleneck_A_vs_B"]["H0"] >= 0 and "same space" in headline["spaces"]


def test_compare_qtg_against_baseline(ex):
    rows, fig, headline, payload = compare.compare_models(
        ex, None, TEXT, "shipped:nano", "cpu", "approximate", "shipped:nano-baseline", "cpu", "approximate", 0)
    table = {r[0]: r[1:] for r in rows}
    assert table["TopoFilter"][1] == "none (baseline)"
    assert payload.numbers["A"]["perplexity"] != payload.numbers["B"]["perplexity"]
    with pytest.raises(qtg.QTGError, match="^TopoFilter A: 'fast' is not one of"):
        compare.compare_models(ex, None, TEXT, "shipped:nano", "cpu", "fast", "shipped:nano", "cpu", "exact", 0)
    with pytest.raises(qtg.QTGError, match="^TopoFilter B: exact mode needs a model with a TopoFilter"):
        compare.compare_models(ex, None, TEXT, "shipped:nano", "cpu", "exact", "shipped:nano-baseline", "cpu",
                               "exact", 0)


def test_compare_across_state_widths_says_the_spaces_differ(ex, micro_session):
    rows, fig, headline, _ = compare.compare_models(
        ex, None, TEXT, "shipped:nano", "cpu", "approximate", "tier:micro", "cpu", "approximate", -1)
    assert {r[0]: r[1:] for r in rows}["state width"] == [192, 128]
    assert "different spaces (192-D and 128-D)" in headline["spaces"] and "192-D vs 128-D" in fig.layout.title.text


# --- tiers, loading, sharing, ranges -----------------------------------------------------


def test_tiers_table_is_the_library_count_and_fits_means_the_views_fit(ex):
    rows, fig, note, payload = tiers.tiers_table(ex, "cpu")
    assert [r[0] for r in rows] == list(qtg.TIERS)
    summary = payload.numbers["tiers"]
    assert [s["params"] for s in summary] == [qtg.count_params(t) for t in qtg.TIERS]
    for s, row in zip(summary, rows):
        view = view_memory(s["tier"], None, "fp32", map_blocks=1)
        assert s["view_memory"]["total"] == view.total > view.weights
        assert row[tiers.COLUMNS.index("views fit")] == ("yes" if view.total <= s["available_bytes"] else "no")
    assert rows[-1][tiers.COLUMNS.index("views fit")] == "no"  # 5.5q never fits


def test_load_refusal_keeps_the_session(ex):
    before = Session("shipped:nano", "cpu", "kept")
    with pytest.raises(qtg.TierTooLargeError, match="need .* available; nothing was allocated"):
        list(tiers.load_model(ex, before, "tier:5.5q", "cpu"))
    assert before.model == "shipped:nano" and before.last_text == "kept"


def test_loading_shows_the_memory_it_takes_and_real_progress(ex, monkeypatch):
    monkeypatch.setattr(tiers, "POLL_S", 0.01)
    seen = []
    outs = list(tiers.load_model(ex, None, "tier:base", "cpu", progress=lambda f, desc: seen.append((f, desc))))
    need = qtg.memory_estimate(exploration_tier("base")[0], "fp32", "inference").weights  # its tokenizer's vocabulary
    assert outs[0][0].startswith(f"Loading **base tier (random weights)** on cpu: its weights take "
                                 f"{qtg.model.memory.human_bytes(need)}")
    assert seen and all(0 <= f < 1 for f, _ in seen) and seen[-1][0] > 0  # the bytes the load has allocated
    assert "RANDOM weights" in outs[-1][0] and outs[-1][1].model == "tier:base"
    message, session = tiers.unload_model(ex, outs[-1][1], "tier:base", "cpu")
    assert ("tier:base", "cpu") not in ex.registry.loaded() and session.model == ex.default_key
    assert message.startswith("Unloaded base tier")
    with pytest.raises(qtg.QTGError, match="is the default model and stays loaded"):
        tiers.unload_model(ex, None, "shipped:nano", "cpu")


@pytest.mark.parametrize("key", ["dir:/etc", "/etc/passwd", "shipped:../../etc", "tier:nope", None])
def test_only_offered_sources_load(ex, key):
    with pytest.raises(qtg.QTGError, match="^model: unknown"):
        ex.registry.get(key, "cpu")


def test_random_tier_is_labelled_and_weights_are_shared(ex, micro_session):
    loads = ex.registry.loads
    message, session = generate_last(tiers.load_model(ex, None, "tier:micro", "cpu"))
    assert "RANDOM weights" in message and session.model == "tier:micro"
    assert ex.current(session) is ex.current(Session("tier:micro", "cpu"))  # a second session: no second load
    assert ex.registry.loads == loads
    micro = ex.current(session)
    assert micro.model.tokenizer is None and micro.tokenizer.get_vocab_size() == 512  # trained to fit micro
    assert "512-token BPE" in message
    text = _last(generate.generate(ex, session, PROMPT, 5, 0, 0, 1, -1))[1][1]
    assert text == PROMPT + library_greedy(micro.model, micro.tokenizer, PROMPT, 5)


def test_every_control_range_follows_the_loaded_model(ex, micro_session):
    """nano (context 256, 6 states, 4 blocks) and micro (context 128, 4 states, 2 blocks) set different ranges."""
    ranges = {name: control_ranges(ex, s)[1:] for name, s in (("nano", None), ("micro", micro_session))}
    maxima = {name: [u["maximum"] for u in r] for name, r in ranges.items()}
    assert maxima["nano"] == [255, 3, 5, 3, 3, 2]  # max new tokens, strip block, layer, block, head, heads page
    assert maxima["micro"] == [127, 1, 3, 1, 3, 2]
    assert ranges["micro"][-1]["visible"] is False
    room = 128 - len(encode(ex.current(micro_session).tokenizer, PROMPT))  # micro's context less the prompt
    with pytest.raises(qtg.QTGError, match=f"^max new tokens: 200 is above the maximum {room}$"):
        list(generate.generate(ex, micro_session, PROMPT, 200, 0, 0, 1, -1))


# --- export ------------------------------------------------------------------------------


def test_export_writes_standalone_html_json_and_png_at_the_figures_size(ex):
    payload = topology.topology(ex, None, TEXT, 1, "ripser", 64, 0)[5]
    paths, message = export(payload, ex.export_dir)
    names = {p.rsplit("/", 1)[1] for p in paths}
    assert {"figures.html", "numbers.json"} <= names
    assert str(ex.export_dir) not in message and "/" not in message  # no server path on the page
    page = open(next(p for p in paths if p.endswith(".html")), encoding="utf-8").read()
    assert "Plotly.newPlot" in page and '<script src="http' not in page  # opens offline
    numbers = json.load(open(next(p for p in paths if p.endswith(".json")), encoding="utf-8"))
    assert numbers["comparison"]["bottleneck_h0"] == pytest.approx(payload.numbers["comparison"]["bottleneck_h0"])
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in paths)  # readable by the owner only
    pngs = [p for p in paths if p.endswith(".png")]
    if HAS_CHROMIUM:  # kaleido renders with it
        assert len(pngs) == len(payload.figures), message
        for p in pngs:
            head = open(p, "rb").read(24)
            assert head[:8] == exports.PNG_MAGIC
            width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
            fig = payload.figures[Path(p).stem]
            assert (width, height) == (fig.layout.width or exports.PNG_SIZE[0], fig.layout.height or 600)
    else:
        assert not pngs and "PNG export failed" in message and "camera" in message
    with pytest.raises(qtg.QTGError, match="nothing to export"):
        export(None, ex.export_dir)


def test_control_characters_in_a_text_export_and_only_written_pngs_are_listed(ex, monkeypatch):
    text = "To be\x00 or not\x01 to be\x7f, that is the question."
    payload = attention.attention(ex, None, text, 0, -1)[6]
    paths, message = export(payload, ex.export_dir)
    if HAS_CHROMIUM:  # a NUL in a token label made Chromium skip that figure
        assert sum(p.endswith(".png") for p in paths) == len(payload.figures), message
    assert "\x00" not in open(next(p for p in paths if p.endswith(".html")), encoding="utf-8").read()

    def half(figures, targets):  # a renderer that silently skips figures
        for t in targets[::2]:
            t.write_bytes(exports.PNG_MAGIC)
        return None

    monkeypatch.setattr(exports, "write_pngs", half)
    paths, message = export(payload, ex.export_dir)
    assert [p for p in paths if p.endswith(".png")] == [p for p in paths if p.endswith(".png") and os.path.exists(p)]
    assert sum(p.endswith(".png") for p in paths) == 2 and "2 of 4 figures were not drawn" in message


def test_export_folder_is_private_fresh_and_never_a_planted_link(tmp_path):
    a, b = private_dir(tmp_path), private_dir(tmp_path)
    assert a != b and a.parent == b.parent == tmp_path
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o700 and not a.is_symlink()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(qtg.QTGError, match="is a symbolic link"):
        private_dir(tmp_path / "link")
    ex1 = Explorer(AppConfig(export_dir=tmp_path / "named", device="cpu"))
    assert ex1.export_dir.parent == tmp_path / "named" and ex1.export_dir.name.startswith("qtg-explorer-")


def test_export_folder_keeps_a_size_and_an_age_oldest_first(tmp_path):
    now = time.time()
    for i in range(6):  # six exports of 1 MB, a minute apart
        d = tmp_path / f"x-{i}"
        d.mkdir()
        (d / "figures.html").write_bytes(b"x" * 2**20)
        os.utime(d / "figures.html", (now - 60 * (6 - i), now - 60 * (6 - i)))
    assert prune(tmp_path, 3 * 2**20 + 10, 3600.0, keep=tmp_path / "x-5") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-3", "x-4", "x-5"]  # the oldest went, folders too
    assert prune(tmp_path, 10 * 2**20, 150.0) == 1  # x-3 is 180 s old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-4", "x-5"]


def test_every_export_prunes_the_folder(tmp_path):
    folder = private_dir(tmp_path)
    payload = Exportable("tiers", {}, {"n": list(range(1000))})
    for _ in range(3):
        paths, _ = export(payload, folder, png=False, max_bytes=1)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files == [Path(paths[0])]  # only the newest export is left


# --- fields, launch and layering ---------------------------------------------------------


def test_integer_fields_never_pass_through_a_float():
    assert as_int(2**63 - 1, "seed", -1, 2**63 - 1) == 2**63 - 1
    assert as_int("9223372036854775807", "seed", -1, 2**63 - 1) == 2**63 - 1
    assert as_int(12.0, "n", 0, 20) == 12
    for bad in (True, "1e3", None, 2.5):
        with pytest.raises(qtg.QTGError, match="^n: expected a whole number, got "):
            as_int(bad, "n", 0, 10_000)


def test_qtg_app_help_and_bad_flags():
    from tests.conftest import run_qtg

    r = run_qtg("app", "--help")
    assert r.returncode == 0 and "127.0.0.1" in r.stdout and "--checkpoint-dir" in r.stdout
    r = run_qtg("app", "--checkpoint-dir", "/nonexistent/ckpt")
    assert r.returncode == 2 and "not a checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_the_library_never_imports_the_app():
    import subprocess
    import sys

    code = ("import sys, qtg, qtg.topology, qtg.plots, qtg.cli, qtg.training.train, qtg.training.evaluate, "
            "qtg.model.views\nbad = sorted(m for m in sys.modules if m == 'app' or m.startswith(('app.', 'gradio')))\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_a_checkpoint_dir_given_at_launch_loads(tiny_checkpoint, tmp_path):
    ex = Explorer(AppConfig(export_dir=tmp_path, device="cpu", checkpoint_dirs=(tiny_checkpoint,),
                            model=tiny_checkpoint.name))
    assert ex.default_key == f"dir:{tiny_checkpoint.resolve()}"
    loaded = ex.current(None)
    assert loaded.source.kind == "dir" and not loaded.random_weights
    text = _last(generate.generate(ex, None, "First Citizen:", 5, 0, 0, 1, -1))[1][1]
    assert text == "First Citizen:" + library_greedy(loaded.model, loaded.tokenizer, "First Citizen:", 5)
    with pytest.raises(qtg.QTGError, match="unknown"):  # a sibling folder was not given
        ex.registry.get(f"dir:{tiny_checkpoint.parent}", "cpu")
