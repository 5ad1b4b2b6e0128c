"""qtg.experiments.topo_controls: weight rules in place of the TopoFilter's w, and their paired sweep.

Models are micro with a 32-token context and the small BPE of ``tiny_checkpoint``, as in test_experiments.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qtg
from qtg import experiments as ex
from qtg.data import Document
from qtg.experiments import topo_controls as tc
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


def _own(repeat, position, own):
    return own


def test_a_rule_that_returns_the_filters_own_weight_changes_nothing(micro, ids):
    with torch.no_grad():
        plain = micro(ids).logits
        with tc.override_weights(micro, tc.WeightRule("own", _own)):
            same = micro(ids).logits
        after = micro(ids).logits  # the hook is gone once the block ends
    assert torch.equal(plain, same) and torch.equal(plain, after)


def test_one_bit_gate_of_one_is_the_filter_switched_off(micro, ids):
    with torch.no_grad():
        off = micro(ids, intervene=qtg.Intervention(topo="off"))
        with tc.override_weights(micro, tc.one_bit_gate(1.0)):
            gated = micro(ids)
    torch.testing.assert_close(gated.logits, off.logits)
    assert torch.equal(gated.topo_weights, torch.ones_like(gated.topo_weights))


def test_one_bit_gate_weights_repeats_one_and_first_occurrences_c(micro, ids):
    with torch.no_grad(), tc.override_weights(micro, tc.one_bit_gate(0.3)):
        w = micro(ids).topo_weights  # [2, 64]
    for row in range(ids.shape[0]):
        seq = ids[row].tolist()
        repeat = torch.tensor([i > 0 and t in seq[:i] for i, t in enumerate(seq)])
        expected = torch.where(repeat, 1.0, 0.3)
        expected[0] = 1.0  # token 0 has no earlier token
        torch.testing.assert_close(w[row], expected)
    assert bool(repeat.any()) and not bool(repeat.all())


def test_position_weight_ignores_the_tokens(micro, ids):
    profile = np.linspace(1.0, 0.2, ids.shape[1])
    with torch.no_grad(), tc.override_weights(micro, tc.position_weight(profile)):
        w = micro(ids).topo_weights
    expected = torch.tensor(profile, dtype=w.dtype)
    expected[0] = 1.0
    torch.testing.assert_close(w, expected.expand_as(w))


def test_position_profile_too_short_and_a_model_without_filter_are_refused(micro, ids):
    with pytest.raises(qtg.experiments.ExperimentError, match="profile covers 8 positions"):
        with torch.no_grad(), tc.override_weights(micro, tc.position_weight(np.ones(8))):
            micro(ids)
    baseline = qtg.build(qtg.get_tier("micro").replace(arch="baseline"), seed=0)
    with pytest.raises(qtg.experiments.ExperimentError, match="no TopoFilter"):
        with tc.override_weights(baseline, tc.one_bit_gate(0.5)):
            pass
    with pytest.raises(qtg.experiments.ExperimentError, match="novel_weight"):
        tc.one_bit_gate(1.5)


def test_record_matches_the_models_own_scores(small, corpus):
    rec = tc.record_weights(small, corpus, batch_size=2)
    assert len(rec.weight) == int(corpus.tokens.sum())  # every input token once, no padding
    first = torch.tensor([corpus.windows[0][:-1]])
    with torch.no_grad():
        out = small(first, return_internals=True)
    n = first.shape[1]
    torch.testing.assert_close(torch.tensor(rec.exact[:n]), out.topo_exact_scores[0].double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(rec.weight[:n]), out.topo_weights[0].double())
    assert np.all(rec.weight[rec.repeat] == 1.0) and rec.repeat.any() and rec.novel.any()
    profile = rec.profile(CONTEXT, novel_only=True)
    assert profile[0] == 1.0 and profile.shape == (CONTEXT,)
    at = rec.novel & (rec.position == 5)
    assert profile[5] == pytest.approx(rec.weight[at].mean())


def test_control_sweep_is_paired_against_the_plain_model_and_reproducible(small, corpus):
    base = ex.sweep(small, corpus, [qtg.Intervention(topo="off")], sample=0, resamples=200)
    rules = [tc.one_bit_gate(1.0), tc.WeightRule("own", _own)]
    first = tc.control_sweep(small, corpus, rules, baseline=base, resamples=200)
    again = tc.control_sweep(small, corpus, rules, resamples=200)  # the plain model scored afresh
    off = base.conditions[1]
    gate, own = first
    assert gate.delta_loss.estimate == pytest.approx(off.delta_loss.estimate, abs=1e-6)  # w = 1 is topo=off
    assert gate.delta_loss.low == pytest.approx(off.delta_loss.low, abs=1e-6)
    assert own.delta_loss.estimate == 0.0 and own.delta_loss.width == 0.0
    assert own.bits_per_byte == pytest.approx(base.conditions[0].bits_per_byte.estimate)
    assert [r.to_dict() for r in first] == [r.to_dict() for r in again]
    with pytest.raises(ex.ExperimentError, match="other windows"):
        tc.control_sweep(small, corpus.subset(np.arange(1)), rules, baseline=base, resamples=200)
