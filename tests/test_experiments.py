"""qtg.experiments (lens, one text with/without, sweeps, bootstrap, head importance) and `qtg experiment`.

Models are micro with a 32-token context (windows are cheap) and the small BPE of ``tiny_checkpoint``.
"""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qtg
from qtg import experiments as ex
from qtg import topology
from qtg.cli import main
from qtg.data.pipeline import Document
from qtg.data.tokenizer import decode, encode, token_strings
from qtg.model.checkpoint import save_checkpoint
from qtg.training.evaluate import evaluate
from tests.conftest import SAMPLE_TEXT, run_qtg

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 32
EXACT, OFF, GAMMA3 = qtg.Intervention(topo="exact"), qtg.Intervention(topo="off"), qtg.Intervention(gamma=3.0)


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return qtg.load(tiny_checkpoint).tokenizer


@pytest.fixture(scope="module")
def small(tok):
    """micro, 32-token context, carrying the tiny BPE."""
    model = qtg.build(qtg.get_tier("micro").replace(max_seq_len=CONTEXT), seed=0).eval()
    model.tokenizer = tok
    return model


@pytest.fixture(scope="module")
def small_baseline(tok):
    model = qtg.build(qtg.get_tier("micro").replace(max_seq_len=CONTEXT, arch="baseline"), seed=0).eval()
    model.tokenizer = tok
    return model


@pytest.fixture(scope="module")
def docs():
    """Three works: ASCII over several windows, multi-byte characters, and an empty one."""
    return [Document("speech", SAMPLE_TEXT[:400]), Document("accents", "Résolu — ünïcødé 🎭 « speak ». " * 4),
            Document("empty", "")]


# --- the bootstrap ---------------------------------------------------------------------------


def test_constant_paired_difference_gives_a_zero_width_interval_at_that_value():
    before = np.random.default_rng(0).normal(3.0, 5.0, size=500)
    ci = ex.paired_bootstrap(before + 0.25, before)
    assert ci.estimate == pytest.approx(0.25, abs=1e-12)
    assert ci.low == pytest.approx(0.25, abs=1e-12) and ci.high == pytest.approx(0.25, abs=1e-12)


def test_bootstrap_of_a_large_normal_sample_has_the_textbook_interval():
    mu, sigma, n = 0.3, 2.0, 10_000
    x = np.random.default_rng(1).normal(mu, sigma, size=n)
    ci = ex.bootstrap_ratio(x)
    assert ci.low < mu < ci.high
    assert ci.width == pytest.approx(2 * 1.96 * sigma / math.sqrt(n), rel=0.08)
    assert ci.estimate == pytest.approx(x.mean())


def test_bootstrap_is_seeded_and_weights_make_a_ratio_of_sums():
    num, den = np.array([1.0, 4.0, 2.0, 8.0]), np.array([1.0, 2.0, 1.0, 4.0])
    a, b = ex.bootstrap_ratio(num, den, seed=3), ex.bootstrap_ratio(num, den, seed=3)
    assert a == b and a.estimate == pytest.approx(15 / 8)
    assert ex.bootstrap_ratio(num, den, seed=4) != a
    with pytest.raises(ValueError, match="non-finite"):
        ex.bootstrap_ratio([1.0, float("nan")])
    with pytest.raises(ValueError, match="differ in shape"):
        ex.paired_bootstrap([1.0, 2.0], [1.0])


# --- the logit lens --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["micro", "baseline"])
def test_lens_last_state_is_the_models_log_probabilities(which, micro, small_baseline, ids):
    model = micro if which == "micro" else small_baseline
    ids = ids[:, :CONTEXT] if which == "baseline" else ids
    lens = ex.logit_lens(model, ids)
    assert lens.state_names == model.state_names
    assert len(lens.log_probs) == model.cfg.n_layers + (2 if model.has_topofilter else 1)
    with torch.no_grad():
        expected = F.log_softmax(model(ids).logits.float(), dim=-1)
    assert all(lp.shape == expected.shape for lp in lens.log_probs)
    torch.testing.assert_close(lens.log_probs[-1], expected, atol=1e-5, rtol=0)
    kl = lens.kl_to_final()  # [S, B, N]
    assert kl.shape == (len(lens.state_names), *ids.shape)
    assert float(kl[-1].abs().max()) < 1e-5 and float(kl.min()) > -1e-5 and float(kl[0].mean()) > 1e-4


def test_lens_follows_the_intervention_and_reports_top_tokens(micro, ids):
    lens = ex.logit_lens(micro, ids, intervene=OFF)
    with torch.no_grad():
        expected = F.log_softmax(micro(ids, intervene=OFF).logits.float(), dim=-1)
    torch.testing.assert_close(lens.log_probs[-1], expected, atol=1e-5, rtol=0)
    probs, top_ids = lens.top(3)
    assert probs.shape == (len(lens.state_names), *ids.shape, 3)
    assert bool((probs[..., :-1] >= probs[..., 1:]).all())
    assert torch.equal(top_ids[..., 0], torch.stack(lens.log_probs).argmax(-1))
    d = lens.to_dict(k=3)
    assert [s["name"] for s in d["states"]] == micro.state_names and len(d["states"][0]["top_ids"]) == ids.shape[1]


def test_lens_as_json_names_the_tokens(small, tok):
    ids = [0] + encode(tok, "All: Speak, speak.")
    d = ex.logit_lens(small, torch.tensor(ids)).to_dict(tok, k=2)
    assert d["input_tokens"] == token_strings(tok, ids)
    top = d["states"][-1]
    assert top["top_tokens"][3] == token_strings(tok, top["top_ids"][3]) and len(top["top_probs"][3]) == 2
    assert json.loads(json.dumps(d)) == d


def test_head_table_is_the_models_declared_unembedding(micro, small_baseline):
    assert ex.head_table(micro) is micro.embed.table.weight
    assert ex.head_table(small_baseline) is small_baseline.embed.weight


# --- one text, with and without ----------------------------------------------------------------


def test_one_text_with_and_without_an_intervention(small, tok):
    text = "All: Speak, speak."
    same = ex.compare_text(small, text, qtg.Intervention())
    assert float(same.kl.abs().max()) == 0 and float(same.delta_loss.abs().max()) == 0
    c = ex.compare_text(small, text, OFF)
    ids = [0] + encode(tok, text)
    assert c.ids == ids and c.kl.shape == (len(ids) - 1,) and c.delta_loss.shape == (len(ids) - 1,)
    with torch.no_grad():
        after = F.cross_entropy(small(torch.tensor([ids[:-1]]), intervene=OFF).logits[0], torch.tensor(ids[1:]),
                                reduction="none")
    torch.testing.assert_close(c.after.nll, after)
    torch.testing.assert_close(c.delta_loss, after - c.before.nll)
    assert float(c.kl[1:].min()) > 0 and float(c.total_variation.max()) <= 1.0
    assert c.bits_per_byte(c.before) == pytest.approx(evaluate(small, [Document("t", text)]).bits_per_byte, rel=1e-5)
    d = c.to_dict(tok, k=2)
    assert d["tokens"][0] == "<|endoftext|>" and len(d["top"]["after"]) == 2
    with pytest.raises(ex.ExperimentError, match="context"):
        ex.compare_text(small, "speak " * 200, OFF)


# --- windows and their bytes ---------------------------------------------------------------------


def test_token_bytes_add_up_to_the_text_bytes(tok):
    text = "Résolu — ünïcødé 🎭 « speak », 日本語\n\t  end"
    lengths = ex.token_byte_lengths(tok)
    assert int(lengths[encode(tok, text)].sum()) == len(text.encode("utf-8"))


def test_each_window_pays_for_the_bytes_it_predicts(tok, docs):
    corpus = ex.cut_corpus(docs, tok, CONTEXT)
    speech = [w for w, d in zip(corpus.windows, corpus.document) if d == 0]
    assert len(speech) > 2 and corpus.n_bytes.sum() == corpus.total_bytes == sum(d.n_bytes for d in docs)
    for window, n in zip(speech, corpus.n_bytes[corpus.document == 0]):
        assert n == len(decode(tok, window[1:]).encode("utf-8"))  # ASCII: no character split across windows


# --- sweeps ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(small, docs):
    return ex.sweep(small, docs, [EXACT, OFF, GAMMA3], sample=2, resamples=300)


def test_sweep_unmodified_bits_per_byte_equal_qtg_eval(small, docs, swept):
    plain = swept.conditions[0]
    result = evaluate(small, docs)
    assert plain.name == "plain" and plain.bits_per_byte.estimate == pytest.approx(result.bits_per_byte, rel=1e-6)
    assert plain.tokens == result.tokens and plain.loss == pytest.approx(result.loss, rel=1e-6)
    assert plain.delta_bits_per_byte.estimate == 0 and plain.delta_bits_per_byte.width == 0
    assert plain.bits_per_byte.low < plain.bits_per_byte.estimate < plain.bits_per_byte.high


def test_sweep_deltas_match_eval_under_each_intervention(small, docs, swept):
    base = evaluate(small, docs).bits_per_byte
    for cond, iv in zip(swept.conditions[1:], [EXACT, OFF, GAMMA3]):
        assert cond.name == iv.name
        assert cond.delta_bits_per_byte.estimate == pytest.approx(evaluate(small, docs, intervene=iv).bits_per_byte
                                                                  - base, abs=1e-6)
        assert cond.delta_bits_per_byte.low <= cond.delta_bits_per_byte.estimate <= cond.delta_bits_per_byte.high
    off = swept.conditions[2]
    assert off.mean_topo_weight == pytest.approx(1.0) and swept.conditions[0].mean_topo_weight < 1.0


def test_sweep_reports_each_work_and_the_interval_across_works(small, docs, swept):
    """Each work's change is qtg eval's on that work alone; the pooled change is their byte-weighted mean;
    two works with text take the t-interval over works (the empty one has no window)."""
    work_bytes = {d.name: d.n_bytes for d in docs if d.text}
    for cond, iv in zip(swept.conditions[1:], [EXACT, OFF, GAMMA3]):
        works = cond.delta_bits_per_byte_works
        assert list(works.per_work) == ["speech", "accents"] and works.n_works == 2
        for doc in docs[:2]:
            alone = evaluate(small, [doc], intervene=iv).bits_per_byte - evaluate(small, [doc]).bits_per_byte
            assert works.per_work[doc.name] == pytest.approx(alone, abs=1e-6)
        pooled = sum(works.per_work[w] * b for w, b in work_bytes.items()) / sum(work_bytes.values())
        assert pooled == pytest.approx(cond.delta_bits_per_byte.estimate, abs=1e-9)
        assert works.interval == ex.t_interval(list(works.per_work.values()))
        d = cond.to_dict()
        assert d["per_work"] == works.per_work and d["n_works"] == 2 and d["works_method"] == "t-interval over works"
        assert d["ci95_works"] == [works.interval.low, works.interval.high] and d["verdict"] == works.verdict()
        assert d["delta_loss_per_work"] == cond.delta_loss_works.per_work


def test_figures_a_condition_cannot_move_are_named_and_equal_the_unmodified_model_s(swept):
    """The TopoFilter precedes every block: gamma cannot move its weights or its diagram, and the exact
    filter (topo=exact) changes w but not the soft-min's diagram; T reaches both."""
    plain, exact, _, gamma = swept.conditions
    assert gamma.to_dict()["unchanged"] == ["mean_topo_weight", "bottleneck_h0_mean"]
    np.testing.assert_array_equal(gamma.scores.mean_weight, plain.scores.mean_weight)
    np.testing.assert_array_equal(gamma.scores.bottleneck_h0, plain.scores.bottleneck_h0)
    assert exact.to_dict()["unchanged"] == ["bottleneck_h0_mean"] and plain.to_dict()["unchanged"] == []
    assert ex.unchanged_figures(qtg.Intervention(temperature=0.5)) == []
    assert ex.unchanged_figures(qtg.Intervention(ablate_heads={0: [1]}, positions="none")) == [
        "mean_topo_weight", "bottleneck_h0_mean"]


def test_sweep_sampled_windows_carry_attention_and_topology(small, swept):
    L, H = small.cfg.n_layers, small.cfg.n_heads
    for cond in swept.conditions:
        s = cond.scores
        assert s.attention_entropy.shape == (2, L, H) and np.isfinite(s.attention_entropy).all()
        assert (s.attended_distance > 0).all() and np.isfinite(s.bottleneck_h0).all()
    # gamma = 3 (micro starts at 1) reshapes attention; the exact TopoFilter does not touch the soft-min's diagram
    assert not np.allclose(swept.conditions[3].scores.attention_entropy, swept.conditions[0].scores.attention_entropy)
    np.testing.assert_allclose(swept.conditions[1].scores.bottleneck_h0, swept.conditions[0].scores.bottleneck_h0)
    # the bottleneck is qtg.topology.compare's, on the sampled window's own cloud
    window = swept.corpus.windows[int(swept.sample[0])]
    with torch.no_grad():
        out = small(torch.tensor([window[:-1]]), return_internals=True, map_blocks=())
    view = topology.approx_view(out, layer=1, model=small)
    expected = topology.compare(topology.exact_diagrams(view.points, maxdim=0, metric_input="points"), view)
    assert swept.conditions[0].scores.bottleneck_h0[0] == pytest.approx(expected.bottleneck_h0, rel=1e-9)
    text = json.dumps(swept.to_dict(windows=True))
    assert json.loads(text)["conditions"][0]["attention_entropy"] is not None


def test_sweep_is_reproducible(small, docs, swept):
    def numbers(result):
        d = result.to_dict(windows=True)
        for c in d["conditions"]:
            c.pop("seconds"), c.pop("tokens_per_second")
        return d
    again = ex.sweep(small, docs, [EXACT, OFF, GAMMA3], sample=2, resamples=300)
    assert numbers(again) == numbers(swept)


def test_sweep_refuses_and_cancels(small, small_baseline, docs):
    with pytest.raises(qtg.InterventionError, match="topo"):
        ex.sweep(small_baseline, docs, [EXACT])
    with pytest.raises(ex.ExperimentError, match="twice"):
        ex.sweep(small, docs, [OFF, OFF])
    with pytest.raises(qtg.QTGError, match="no text"):
        ex.sweep(small, [Document("e", "")], [OFF])
    stop, seen = threading.Event(), []

    def progress(done, total):
        seen.append(done)
        stop.set()  # as a Stop button would, from another thread

    with pytest.raises(ex.ExperimentCancelled, match="cancelled after"):
        ex.sweep(small, docs, [OFF], sample=0, batch_size=2, cancel=stop, on_progress=progress)
    assert seen == [2]


# --- head importance -----------------------------------------------------------------------------


def test_head_importance_ranks_every_head_for_qtg_and_baseline(small, small_baseline, docs):
    rankings = [ex.head_importance(m, docs, resamples=200) for m in (small, small_baseline)]
    for model, ranking in zip((small, small_baseline), rankings):
        cfg = model.cfg
        assert sorted(h.label for h in ranking.heads) == sorted(f"{b}:{h}" for b in range(cfg.n_layers)
                                                                for h in range(cfg.n_heads))
        deltas = [h.delta_loss.estimate for h in ranking.heads]
        assert deltas == sorted(deltas, reverse=True)
        top = ranking.heads[0]
        plain, ablated = evaluate(model, docs), evaluate(model, docs, intervene=qtg.Intervention(
            ablate_heads={top.block: [top.head]}))
        assert top.delta_loss.estimate == pytest.approx(ablated.loss - plain.loss, abs=1e-6)
    rows = ex.side_by_side(rankings)
    assert len(rows) == 8 and all(len(r) == 2 for r in rows)


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_checkpoint(tok, tmp_path_factory):
    model = qtg.build(qtg.get_tier("micro").replace(arch="baseline"), seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "base", tokenizer_json=tok.to_str())


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("exp") / "speech.txt"
    f.write_text(SAMPLE_TEXT[:300])
    return f


def test_cli_json_is_one_object_plain_first_and_agrees_with_eval(tiny_checkpoint, text_file):
    r = run_qtg("experiment", "--checkpoint", str(tiny_checkpoint), "--data", str(text_file), "--device", "cpu",
                "--intervene", "topo=off", "--intervene", "gamma=1", "--resamples", "200", "--json")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1
    out = json.loads(r.stdout)
    names = [c["name"] for c in out["conditions"]]
    assert names == ["plain", "topo=off", "gamma=1.0"]
    first = out["conditions"][0]
    assert first["delta_bits_per_byte"] == 0 and first["ci95"] == [0.0, 0.0]
    model = qtg.load(tiny_checkpoint).eval()
    assert first["bits_per_byte"] == pytest.approx(evaluate(model, text_file).bits_per_byte, rel=1e-6)
    off = out["conditions"][1]
    assert off["ci95"][0] <= off["delta_bits_per_byte"] <= off["ci95"][1] and off["mean_topo_weight"] == 1.0
    # one work: its own change, and no interval across works
    assert off["per_work"] == {"speech": pytest.approx(off["delta_bits_per_byte"], abs=1e-12)}
    assert off["n_works"] == 1 and off["ci95_works"] is None
    assert off["verdict"] == "no difference detected (one work: no interval across works)"


def test_cli_heads_side_by_side(tiny_checkpoint, baseline_checkpoint, text_file, capsys):
    code = main(["experiment", "--checkpoint", str(tiny_checkpoint), "--data", str(text_file), "--device", "cpu",
                 "--heads", "--baseline", str(baseline_checkpoint), "--resamples", "100", "--sample", "0"])
    out = capsys.readouterr().out
    assert code == 0
    ranks = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert ranks == [str(i) for i in range(1, 9)]  # 2 blocks x 4 heads, ranked
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    # rank, then per model: head, delta [low, high] over windows, and across works delta [-]: one work, no interval
    assert all(len(r) == 1 + 2 * 6 for r in rows) and all(r[6] == r[12] == "[-]" for r in rows)
    assert "across the one work (one work: no interval across works)." in out


@pytest.mark.parametrize("args, message", [
    (["--intervene", "bogus=1"], "unknown key 'bogus'"),
    (["--intervene", "topo=exact", "--baseline", "x"], "--baseline ranks a second model's heads: give --heads"),
    ([], "nothing to compare"),
])
def test_cli_refuses_bad_input_in_one_line(tiny_checkpoint, text_file, capsys, args, message):
    code = main(["experiment", "--checkpoint", str(tiny_checkpoint), "--data", str(text_file), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_cli_refuses_empty_data_and_a_baseline_given_topo(tiny_checkpoint, baseline_checkpoint, tmp_path, capsys):
    code = main(["experiment", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path), "--device", "cpu",
                 "--intervene", "topo=off"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(tmp_path) in err and len(err.splitlines()) == 1
    (tmp_path / "t.txt").write_text("Speak.")
    code = main(["experiment", "--checkpoint", str(baseline_checkpoint), "--data", str(tmp_path), "--device", "cpu",
                 "--intervene", "topo=exact"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no TopoFilter" in err and "topo" in err and len(err.splitlines()) == 1


def test_eval_takes_a_shipped_model_by_name(text_file, capsys):
    assert main(["eval", "--model", "nano-baseline", "--data", str(text_file), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"].startswith("nano-baseline")
    assert main(["eval", "--model", "no-such-model", "--data", str(text_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--model 'no-such-model' is not a shipped model" in err and "nano-baseline" in err
    with pytest.raises(SystemExit):  # one source only
        main(["eval", "--model", "nano", "--tier", "nano", "--data", str(text_file)])


# --- several models on the same windows -----------------------------------------------------------


def test_compare_models_pairs_windows_and_refuses_other_windows(small, small_baseline, docs, tok):
    scores = ex.compare_models({"qtg": small, "baseline": small_baseline, "again": small}, docs, resamples=300)
    first, base, again = scores
    assert first.delta_bits_per_byte is None and [s.name for s in scores] == ["qtg", "baseline", "again"]
    # each model's own figure is the sweep's unmodified bits per byte, i.e. qtg eval's
    assert first.bits_per_byte.estimate == pytest.approx(evaluate(small, docs).bits_per_byte, abs=1e-6)
    assert base.bits_per_byte.estimate == pytest.approx(evaluate(small_baseline, docs).bits_per_byte, abs=1e-6)
    d = base.delta_bits_per_byte  # paired: the difference of the two figures, with an interval around it
    assert d.estimate == pytest.approx(base.bits_per_byte.estimate - first.bits_per_byte.estimate, abs=1e-9)
    assert d.low <= d.estimate <= d.high and d.n == len(ex.prepare(small, docs).windows)
    assert again.delta_bits_per_byte.estimate == 0 and again.delta_bits_per_byte.width == 0  # a model against itself
    longer = qtg.build(qtg.get_tier("micro").replace(max_seq_len=2 * CONTEXT), seed=0).eval()
    longer.tokenizer = tok
    with pytest.raises(ex.ExperimentError, match="other windows"):
        ex.compare_models({"qtg": small, "longer": longer}, docs)
