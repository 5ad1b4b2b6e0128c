"""The app's handlers called in-process: the numbers they show are the library's, bad input is refused
with a message naming the limit, and one request never changes another's model."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

import gradio as gr  # noqa: E402

import qtg  # noqa: E402
from app.config import AppConfig, Limits  # noqa: E402
from app.core import Explorer, Session  # noqa: E402
from app.errors import user_facing  # noqa: E402
from app.exports import export  # noqa: E402
from app.tabs import attention, compare, generate, tiers, topology  # noqa: E402
from qtg.generate import generate as generate_ids  # noqa: E402
from qtg.tokenizer import EOS_TOKEN, decode, encode  # noqa: E402
from qtg.topology import approx_view, exact_diagrams  # noqa: E402
from qtg.topology import compare as topo_compare  # noqa: E402

PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def ex(tmp_path_factory) -> Explorer:
    return Explorer(AppConfig(export_dir=tmp_path_factory.mktemp("exports"), device="cpu"))


@pytest.fixture(scope="module")
def nano(ex):
    return ex.current(None)


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
    outs, (html, text, fig, stats, session, payload) = _last(generate.generate(ex, None, PROMPT, 40, 0, 0, 1, -1))
    assert text == library_greedy(nano.model, nano.tokenizer, PROMPT, 40)
    assert session.last_text == PROMPT + text
    assert "done: 40 new tokens" in stats and "first token" in stats
    assert fig is not None and len(fig.data) > 0  # the live exact diagram


def test_generate_streams_several_updates(ex, monkeypatch):
    monkeypatch.setattr(generate, "YIELD_EVERY_S", 0.0)
    outs = list(generate.generate(ex, None, PROMPT, 12, 0, 0, 1, -1))
    assert len(outs) == 13  # one per token, then the final one
    texts = [o[1] for o in outs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # the text only grows


def test_token_colours_are_the_model_own_scores(ex, nano):
    """The incremental scorer (one token at a time against the past) equals the full forward pass."""
    outs, last = _last(generate.generate(ex, None, PROMPT, 30, 0.9, 0, 1, 7))
    numbers = last[5].numbers
    ids = torch.tensor([encode(nano.tokenizer, PROMPT) + numbers["token_ids"]])
    with torch.inference_mode():
        out = nano.model(ids, return_internals=True)
    np.testing.assert_allclose(numbers["soft"], out.topo_scores[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(numbers["exact"], out.topo_exact_scores[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(numbers["weights"], out.topo_weights[0].numpy(), atol=1e-5)
    assert 'title="s~ = ' in last[0] and last[0].count('class="qtg-tok"') == ids.shape[1]


def test_generate_seeded_sampling_repeats(ex):
    a = _last(generate.generate(ex, None, PROMPT, 20, 1.0, 50, 0.9, 123))[1][1]
    b = _last(generate.generate(ex, None, PROMPT, 20, 1.0, 50, 0.9, 123))[1][1]
    assert a == b


@pytest.mark.parametrize("args, message", [
    (("", 10, 0.8, 0, 1, -1), "prompt is empty"),
    (("x" * 4001, 10, 0.8, 0, 1, -1), "limit is 4,000"),
    ((PROMPT, 10_000, 0.8, 0, 1, -1), "max new tokens must be between 1 and 512"),
    ((PROMPT, 0, 0.8, 0, 1, -1), "max new tokens must be between 1"),
    ((PROMPT, 10, -1, 0, 1, -1), "temperature must be between 0"),
    ((PROMPT, 10, float("nan"), 0, 1, -1), "temperature"),
    ((PROMPT, 10, 0.8, -3, 1, -1), "top-k must be between 0"),
    ((PROMPT, 10, 0.8, 0, 0, -1), "top-p must be between"),
    ((PROMPT, 10, 0.8, 0, 1, "abc"), "seed must be a number"),
    ((PROMPT, 2.5, 0.8, 0, 1, -1), "whole number"),
    ((PROMPT, 10, 0.8, 0, 1, float("inf")), "seed must be a whole number"),
    (("word " * 300, 10, 0.8, 0, 1, -1), "reads at most 256"),
    (("word " * 200, 100, 0.8, 0, 1, -1), "max_seq_len of 256"),
])
def test_generate_bad_input_is_one_clear_line(ex, args, message):
    with pytest.raises(gr.Error, match=message):
        list(user_facing(generate.generate)(ex, None, *args))


def test_internal_errors_are_reported_not_raised_raw():
    def broken():
        raise KeyError("boom")
    with pytest.raises(gr.Error, match="internal error: KeyError"):
        user_facing(broken)()


# --- topology ----------------------------------------------------------------------------


TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."


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


def test_topology_states_the_bounds_it_applied(ex):
    text = " ".join(f"w{i}" for i in range(40))
    *_, bounds, payload = topology.topology(ex, None, text, 3, "ripser", 20, 0.5)
    assert "20 of" in bounds and "farthest-point sampling" in bounds
    assert "max_edge = 0.5" in bounds
    assert payload.numbers["exact"]["ripser"]["bounds"]["points_kept"] == 20


def test_topology_uses_the_last_generation(ex):
    *_, session, _ = _last(generate.generate(ex, None, PROMPT, 10, 0, 0, 1, -1))[1]
    payload = topology.topology(ex, session, "", 1, "ripser", 64, 0)[5]
    assert "".join(payload.numbers["tokens"]) == session.last_text
    with pytest.raises(qtg.QTGError, match="generate first"):
        topology.topology(ex, None, "  ", 1, "ripser", 64, 0)


@pytest.mark.parametrize("args, message", [
    ((TEXT, 99, "ripser", 64, 0), "layer must be between 0 and 5"),
    ((TEXT, 1, "ripser", 5000, 0), "max points must be between 3 and 1024"),
    ((TEXT, 1, "nope", 64, 0), "backend must be one of"),
    (("hi", 1, "ripser", 64, 0), "at least 3 are needed"),
    (("x" * 30_000, 1, "ripser", 64, 0), "limit is 20,000"),
])
def test_topology_bad_input(ex, args, message):
    with pytest.raises(qtg.QTGError, match=message):
        topology.topology(ex, None, *args)


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
    assert "gamma at block 2" in note


def test_attention_one_head_and_cut(ex):
    small = Explorer(replace(ex.cfg, limits=replace(Limits(), max_attention_tokens=8)))
    fig, *_, numbers, note, _ = attention.attention(small, None, TEXT, 0, 3)
    assert len(fig.data) == 1 and "head 3" in fig.layout.annotations[0].text
    assert len(numbers["tokens"]) == 8 and "first 8 of" in note
    with pytest.raises(qtg.QTGError, match="head must be between -1 and 3"):
        attention.attention(ex, None, TEXT, 0, 4)


# --- compare -----------------------------------------------------------------------------


def test_compare_exact_mode_without_touching_the_shared_model(ex, nano):
    rows, fig, headline, payload = compare.compare_models(
        ex, None, TEXT, "shipped:nano", "cpu", "approximate", "shipped:nano", "cpu", "exact", -1)
    ids = torch.tensor([encode(nano.tokenizer, TEXT)])
    ref = qtg.topology.exact_mode_loss(nano.model, torch.cat([torch.tensor([[0]]), ids], 1))
    a, b = payload.numbers["A"], payload.numbers["B"]
    assert a["loss"] == pytest.approx(ref.ce_approx, rel=1e-5)
    assert b["loss"] == pytest.approx(ref.ce_exact, rel=1e-5)
    assert nano.model.topo.exact_mode is False  # the shared model never switched
    assert headline["bottleneck_A_vs_B"]["H0"] >= 0 and len(rows) == 2


def test_compare_qtg_against_baseline(ex):
    rows, fig, headline, payload = compare.compare_models(
        ex, None, TEXT, "shipped:nano", "cpu", "approximate", "shipped:nano-baseline", "cpu", "approximate", 0)
    assert rows[1][3] == "none (baseline)"
    assert payload.numbers["A"]["perplexity"] != payload.numbers["B"]["perplexity"]
    with pytest.raises(qtg.QTGError, match="mode must be one of"):
        compare.compare_models(ex, None, TEXT, "shipped:nano", "cpu", "fast", "shipped:nano", "cpu", "exact", 0)
    with pytest.raises(qtg.QTGError, match="exact TopoFilter mode needs a QTG model"):
        compare.compare_models(ex, None, TEXT, "shipped:nano", "cpu", "exact", "shipped:nano-baseline", "cpu",
                               "exact", 0)


# --- tiers, loading, sharing -------------------------------------------------------------


def test_tiers_table_is_the_library_count(ex):
    rows, fig, note, payload = tiers.tiers_table(ex, "cpu")
    assert [r[0] for r in rows] == list(qtg.TIERS)
    assert [s["params"] for s in payload.numbers["tiers"]] == [qtg.count_params(t) for t in qtg.TIERS]
    assert rows[-1][-2] == "no"  # 5.5q never fits


def test_load_refusal_keeps_the_session(ex):
    before = Session("shipped:nano", "cpu", "kept")
    with pytest.raises(qtg.TierTooLargeError, match="need .* available; nothing was allocated"):
        tiers.load_model(ex, before, "tier:5.5q", "cpu")
    assert before.model == "shipped:nano" and before.last_text == "kept"


@pytest.mark.parametrize("key", ["dir:/etc", "/etc/passwd", "shipped:../../etc", "tier:nope", None])
def test_only_offered_sources_load(ex, key):
    with pytest.raises(qtg.QTGError, match="unknown model"):
        ex.registry.get(key, "cpu")


def test_random_tier_is_labelled_and_weights_are_shared(ex):
    message, session = tiers.load_model(ex, None, "tier:micro", "cpu")
    assert "RANDOM weights" in message and session.model == "tier:micro"
    loads = ex.registry.loads
    assert ex.current(session) is ex.current(Session("tier:micro", "cpu"))  # a second session: no second load
    assert ex.registry.loads == loads
    micro = ex.current(session)
    assert micro.model.tokenizer is None and micro.tokenizer.get_vocab_size() == 512  # trained to fit micro
    assert "512-token BPE" in message
    text = _last(generate.generate(ex, session, PROMPT, 5, 0, 0, 1, -1))[1][1]
    assert text == library_greedy(micro.model, micro.tokenizer, PROMPT, 5)


# --- export ------------------------------------------------------------------------------


def test_export_writes_standalone_html_json_and_png(ex):
    payload = topology.topology(ex, None, TEXT, 1, "ripser", 64, 0)[5]
    paths, message = export(payload, ex.cfg.export_dir)
    names = {p.rsplit("/", 1)[1] for p in paths}
    assert {"figures.html", "numbers.json"} <= names
    page = open(next(p for p in paths if p.endswith(".html")), encoding="utf-8").read()
    assert "Plotly.newPlot" in page and '<script src="http' not in page  # opens offline
    numbers = json.load(open(next(p for p in paths if p.endswith(".json")), encoding="utf-8"))
    assert numbers["comparison"]["bottleneck_h0"] == pytest.approx(payload.numbers["comparison"]["bottleneck_h0"])
    pngs = [p for p in paths if p.endswith(".png")]
    if shutil.which("chromium") or os.environ.get("CI", "").lower() == "true":  # kaleido renders with it
        assert len(pngs) == len(payload.figures), message
        assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in pngs)
    else:
        assert not pngs and "PNG export failed" in message and "camera" in message
    with pytest.raises(qtg.QTGError, match="nothing to export"):
        export(None, ex.cfg.export_dir)


# --- launch and layering -----------------------------------------------------------------


def test_qtg_app_help_and_bad_flags():
    from tests.test_cli import run_qtg

    r = run_qtg("app", "--help")
    assert r.returncode == 0 and "127.0.0.1" in r.stdout and "--checkpoint-dir" in r.stdout
    r = run_qtg("app", "--checkpoint-dir", "/nonexistent/ckpt")
    assert r.returncode == 2 and "not a checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_the_library_never_imports_the_app():
    import subprocess
    import sys

    code = ("import sys, qtg, qtg.topology, qtg.plots, qtg.attention_plots, qtg.cli, qtg.train, qtg.evaluate\n"
            "bad = sorted(m for m in sys.modules if m == 'app' or m.startswith(('app.', 'gradio')))\n"
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
    assert text == library_greedy(loaded.model, loaded.tokenizer, "First Citizen:", 5)
    with pytest.raises(qtg.QTGError, match="unknown model"):  # a sibling folder was not given
        ex.registry.get(f"dir:{tiny_checkpoint.parent}", "cpu")
