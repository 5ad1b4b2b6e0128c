"""TopoFilter controls: ``Intervention(topo_weight=qtg.TopoWeight(...))`` in place of the filter's w.

The rules are call arguments (docs/model.md §6): tested against brute-force weights from the token ids,
cached against uncached decoding, in the batching engine, in a paired sweep, and refused where they do
not fit. ``record_weights`` against the model's own internals. Corpus models are micro with a 32-token
context and the small BPE of ``tiny_checkpoint``, as in test_experiments.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qtg
from qtg import experiments as ex
from qtg.data.pipeline import Document
from qtg.experiments import topo_controls as tc
from qtg.experiments.heldout import heldout_documents
from qtg.generate import generate
from qtg.serve.engine import Engine
from tests.conftest import SAMPLE_TEXT

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 32


@pytest.fixture(scope="module")
def small(tiny_checkpoint):
    model = qtg.build(qtg.get_tier("micro").replace(max_seq_len=CONTEXT), seed=0).eval()
    model.tokenizer = qtg.load(tiny_checkpoint).tokenizer
    return model


@pytest.fixture(scope="module")
def corpus(small):
    return ex.prepare(small, [Document("speech", SAMPLE_TEXT[:600])])


def repeats(ids: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool from the ids alone: an earlier position holds the same token."""
    return torch.tensor([[i > 0 and t in row[:i] for i, t in enumerate(row)] for row in ids.tolist()])


def test_one_bit_gate_of_one_is_the_filter_switched_off(micro, ids):
    with torch.no_grad():
        off = micro(ids, intervene=qtg.Intervention(topo="off"))
        gated = micro(ids, intervene=tc.one_bit_gate(1.0))
    torch.testing.assert_close(gated.logits, off.logits)
    assert torch.equal(gated.topo_weights, torch.ones_like(gated.topo_weights))


def test_one_bit_gate_weights_repeats_one_and_first_occurrences_c(micro, ids):
    with torch.no_grad():
        plain = micro(ids)
        out = micro(ids, intervene=tc.one_bit_gate(0.3), return_internals=True)
        after = micro(ids)
    rep = repeats(ids)
    expected = torch.where(rep, 1.0, 0.3)
    expected[:, 0] = 1.0  # token 0 has no earlier token
    torch.testing.assert_close(out.topo_weights, expected)
    assert bool(rep.any()) and not bool(rep[:, 1:].all())
    torch.testing.assert_close(out.topo_scores, plain_scores(micro, ids))  # s~ is still reported as the model's
    assert torch.equal(after.logits, plain.logits)  # nothing stays behind on the module


def plain_scores(model, ids):
    with torch.no_grad():
        return model(ids, return_internals=True).topo_scores


def test_position_weight_ignores_the_tokens(micro, ids):
    profile = np.linspace(1.0, 0.2, micro.cfg.max_seq_len)
    with torch.no_grad():
        w = micro(ids, intervene=tc.position_weight(profile)).topo_weights
    expected = torch.tensor(profile[:ids.shape[1]], dtype=w.dtype)
    expected[0] = 1.0
    torch.testing.assert_close(w, expected.expand_as(w))


def test_gate_times_position_gives_repeats_one_and_first_occurrences_their_position(micro, ids):
    profile = np.linspace(0.9, 0.1, micro.cfg.max_seq_len)
    with torch.no_grad():
        w = micro(ids, intervene=tc.gated_position_weight(profile)).topo_weights
    expected = torch.where(repeats(ids), 1.0, torch.tensor(profile[:ids.shape[1]], dtype=w.dtype))
    expected[:, 0] = 1.0
    torch.testing.assert_close(w, expected)


@pytest.fixture(scope="module")
def lively():
    """micro with init_std 0.3: a random micro at 0.02 repeats one token, toothless for decoding."""
    return qtg.build(qtg.get_tier("micro").replace(init_std=0.3), seed=0).eval()


def test_a_rule_decodes_the_same_cached_and_uncached(lively, ids):
    """A cached step sees position P (the cache's length): the rule must read it, not 0."""
    iv = tc.gated_position_weight(np.linspace(0.9, 0.1, lively.cfg.max_seq_len))
    with torch.inference_mode():
        full = lively(ids, intervene=iv).topo_weights
        cache = qtg.QTGCache()
        lively(ids[:, :12], cache=cache, intervene=iv)
        steps = [lively(ids[:, t:t + 1], cache=cache, intervene=iv).topo_weights for t in range(12, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 12:], rtol=0, atol=1e-6)
    prompt = ids[:1, :12]
    cached = generate(lively, prompt, 20, temperature=0, intervene=iv)
    assert torch.equal(cached, generate(lively, prompt, 20, temperature=0, intervene=iv, use_cache=False))
    assert not torch.equal(cached, generate(lively, prompt, 20, temperature=0))  # the rule changed the text


def test_the_engine_gives_ragged_rows_under_a_rule_their_weights_and_tokens_alone(lively):
    """Rows of lengths 5, 19, 11 decode in one ragged batch, each at its own position."""
    iv = tc.gated_position_weight(np.linspace(0.9, 0.1, lively.cfg.max_seq_len))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g) for n in (5, 19, 11)]
    engine = Engine(lively, start=False)
    reqs = [engine.submit(p, 10, temperature=0, intervene=iv, topo=True) for p in prompts]
    while not engine.idle:
        engine.step()
    assert engine.stats.max_rows == 3
    for p, req in zip(prompts, reqs):
        events = [e for e in req if e.token is not None]
        tokens = [e.token for e in events]
        assert tokens == generate(lively, p, 10, temperature=0, intervene=iv)[0, len(p):].tolist()
        with torch.inference_mode():
            w = lively(torch.cat([p, torch.tensor(tokens)]).view(1, -1), intervene=iv).topo_weights[0]
        got = [t.weight for t in req.prompt_topo] + [e.topo.weight for e in events]
        torch.testing.assert_close(torch.tensor(got), w[:len(got)], rtol=0, atol=1e-6)


def test_a_rule_trains_with_finite_gradients(micro_cfg, ids):
    model = qtg.build(micro_cfg, seed=0)
    out = model(ids, targets=ids.roll(-1, dims=1), intervene=tc.one_bit_gate(0.5))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert out.loss_terms["topo"] > 0  # L_topo reads the applied w: first occurrences at 0.5


def test_rules_that_do_not_fit_are_refused_by_name(micro, ids):
    with pytest.raises(qtg.InterventionError, match="profile covers 8 positions"):
        micro(ids, intervene=tc.position_weight(np.ones(8)))
    baseline = qtg.build(qtg.get_tier("micro").replace(arch="baseline"), seed=0)
    with pytest.raises(qtg.InterventionError, match="topo_weight"):
        baseline(ids, intervene=tc.one_bit_gate(0.5))
    with pytest.raises(qtg.InterventionError, match=r"\[0, 1\]"):
        tc.one_bit_gate(1.5)
    with pytest.raises(qtg.InterventionError, match="empty"):
        tc.position_weight([])
    with pytest.raises(qtg.InterventionError, match="theta"):
        qtg.Intervention(theta=0.2, topo_weight=qtg.TopoWeight(0.5))
    with pytest.raises(qtg.InterventionError, match="gate:C"):
        qtg.Intervention.parse("topo_weight=0.5")


def test_the_gate_parses_from_text_and_names_itself():
    iv = qtg.Intervention.parse("topo_weight=gate:0.45")
    assert iv == tc.one_bit_gate(0.45) and iv.name == "topo_weight=gate:0.45"
    assert qtg.Intervention.parse(iv.name) == iv
    rule = tc.position_weight(np.ones(4)).topo_weight
    assert rule == qtg.TopoWeight([1.0] * 4, repeat=None) and hash(rule) == hash(qtg.TopoWeight((1.0,) * 4, None))


def test_record_matches_the_models_own_scores(small, corpus):
    rec = tc.record_weights(small, corpus, batch_size=2)
    assert len(rec.weight) == int(corpus.tokens.sum())  # every input token once, no padding
    first = torch.tensor([corpus.windows[0][:-1]])
    with torch.no_grad():
        out = small(first, return_internals=True)
    n = first.shape[1]
    torch.testing.assert_close(torch.tensor(rec.exact[:n]), out.topo_exact_scores[0].double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(rec.weight[:n]), out.topo_weights[0].double())
    assert np.array_equal(rec.repeat[:n], repeats(first)[0].numpy())
    assert np.all(rec.weight[rec.repeat] == 1.0) and rec.repeat.any() and rec.novel.any()
    profile = rec.profile(CONTEXT, novel_only=True)
    assert profile[0] == 1.0 and profile.shape == (CONTEXT,)
    at = rec.novel & (rec.position == 5)
    assert profile[5] == pytest.approx(rec.weight[at].mean())


def test_rules_sweep_paired_against_the_plain_model(small, corpus):
    rec = tc.record_weights(small, corpus)
    rules = [tc.one_bit_gate(1.0), tc.position_weight(rec.profile(CONTEXT)), qtg.Intervention(topo="off")]
    first = ex.sweep(small, corpus, rules, sample=0, resamples=200)
    again = ex.sweep(small, corpus, rules, sample=0, resamples=200)
    plain, gate, position, off = first.conditions
    assert gate.delta_loss.estimate == pytest.approx(off.delta_loss.estimate, abs=1e-6)  # w = 1 is topo=off
    assert gate.delta_loss.low == pytest.approx(off.delta_loss.low, abs=1e-6)
    assert gate.mean_topo_weight == 1.0 and position.mean_topo_weight < 1.0
    assert position.delta_loss.estimate != 0.0
    timeless = lambda r: [{k: v for k, v in c.items() if k not in ("seconds", "tokens_per_second")}  # noqa: E731
                          for c in r.to_dict()["conditions"]]
    assert timeless(first) == timeless(again)  # seeded: the same call gives the same numbers


# --- the controls beside the filter (the app's "w from" toggle) --------------------------------------


def hand_record() -> tc.WeightRecord:
    """Two windows of three tokens: positions 0 1 2 | 0 1 2; the second window's token 1 repeats its token 0."""
    return tc.WeightRecord(position=np.array([0, 1, 2, 0, 1, 2]), repeat=np.array([0, 0, 0, 0, 1, 0], dtype=bool),
                           weight=np.array([1.0, 0.2, 0.5, 1.0, 1.0, 0.6]), soft=np.zeros(6),
                           exact=np.array([0.0, 0.4, 0.7, 0.0, 0.0, 0.3]))


def test_calibration_is_w_by_position_and_the_mean_w_of_first_occurrences():
    cal = tc.calibration_of(hand_record(), length=4, windows=2, source="hand")
    # position 1: (0.2 + 1.0) / 2; position 2: (0.5 + 0.6) / 2; position 3 unseen and position 0: 1
    assert cal.profile == pytest.approx((1.0, 0.6, 0.55, 1.0))
    assert cal.gate == pytest.approx((0.2 + 0.5 + 0.6) / 3)  # first occurrences only: the repeat's 1.0 left out
    exact = [0.0, 0.5, 0.0, 0.9]  # token 2 repeats
    assert cal.weights("gate", exact) == pytest.approx([1.0, cal.gate, 1.0, cal.gate])
    assert cal.weights("position", exact) == pytest.approx([1.0, 0.6, 0.55, 1.0])  # repeat or not
    with pytest.raises(ex.ExperimentError, match="control must be one of"):
        cal.rule("bogus")
    none_novel = tc.WeightRecord(position=np.array([0, 1]), repeat=np.array([False, True]), weight=np.ones(2),
                                 soft=np.zeros(2), exact=np.zeros(2))
    with pytest.raises(ex.ExperimentError, match="no first occurrence"):
        tc.calibration_of(none_novel, 2, 1, "hand")


def test_against_control_gives_the_share_of_w_position_explains():
    cal = tc.Calibration(profile=(1.0, 0.2, 0.4, 0.6), gate=0.5, windows=1, tokens=4, source="hand")
    w, exact = [1.0, 0.3, 0.3, 0.6], [0.0, 0.5, 0.6, 0.7]
    by_position = tc.against_control(cal, "position", w, exact)
    # tokens 1..3: residuals 0.1, -0.1, 0 (squared sum 0.02); w - mean w: -0.1, -0.1, 0.2 (squared sum 0.06)
    assert by_position.position_share == pytest.approx(1 - 0.02 / 0.06)
    assert by_position.mean_abs_difference == pytest.approx(0.2 / 3)
    assert by_position.correlation == pytest.approx(np.corrcoef([0.3, 0.3, 0.6], [0.2, 0.4, 0.6])[0, 1])
    assert list(by_position.shown) == pytest.approx([1.0, 0.2, 0.4, 0.6])  # the control's w, not the filter's
    gate = tc.against_control(cal, "gate", w, exact)
    assert list(gate.shown) == pytest.approx([1.0, 0.5, 0.5, 0.5]) and gate.correlation is None  # a constant
    plain = tc.against_control(cal, None, w, exact)
    assert list(plain.shown) == w and plain.correlation is None and plain.position_share == by_position.position_share
    assert "Position alone explains 67 %" in by_position.describe()
    assert tc.against_control(cal, "position", [1.0, 0.2, 0.4, 0.6], exact).position_share == pytest.approx(1.0)


def test_calibrate_reads_the_validation_works_and_refuses_the_baseline(small):
    cal = tc.calibrate(small, max_windows=3)
    val = ex.prepare(small, heldout_documents(small, "val"), max_windows=3)
    assert cal == tc.calibration_of(tc.record_weights(small, val), CONTEXT, 3, "the validation works")
    assert len(cal.profile) == CONTEXT and 0.0 < cal.gate < 1.0
    with torch.no_grad():  # the control's w, applied by the model, is the rule's w of its exact scores
        out = small(torch.tensor([val.windows[0][:-1]]), intervene=cal.intervention("position"), return_internals=True)
    assert out.topo_weights[0].tolist() == pytest.approx(list(cal.weights("position", out.topo_exact_scores[0])))
    baseline = qtg.build(qtg.get_tier("micro").replace(arch="baseline"), seed=0)
    with pytest.raises(ex.ExperimentError, match="no TopoFilter"):
        tc.calibrate(baseline)


def test_mean_applied_weight_leaves_out_token_0_whose_w_is_1_under_every_rule():
    assert tc.mean_applied_weight([1.0, 0.2, 0.4]) == pytest.approx(0.3)
    assert tc.mean_applied_weight(torch.tensor([1.0, 0.5], dtype=torch.bfloat16)) == 0.5
    assert np.isnan(tc.mean_applied_weight([1.0]))
