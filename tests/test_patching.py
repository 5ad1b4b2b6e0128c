"""Activation patching, attribution patching and direct logit attribution (qtg.experiments.patching)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qtg
from qtg.experiments import (
    ExperimentError,
    activation_patching,
    agreement_of,
    attribution_patching,
    direct_logit_attribution,
)

CORRUPT_AT = 9  # the one position where the corrupted prompt differs


@pytest.fixture(scope="module", params=["qtg", "baseline"])
def pair_model(request, micro_cfg):
    return qtg.build(micro_cfg.replace(arch=request.param), seed=4).eval()


@pytest.fixture(scope="module")
def prompts():
    clean = torch.randint(0, 60, (1, 16), generator=torch.Generator().manual_seed(3))
    corrupt = clean.clone()
    corrupt[0, CORRUPT_AT] = (corrupt[0, CORRUPT_AT] + 17) % 60
    return clean, corrupt


def test_the_whole_residual_stream_gives_one_and_an_unchanged_position_zero(pair_model, prompts):
    clean, corrupt = prompts
    whole = activation_patching(pair_model, clean, corrupt, answer=5, wrong=7, site="resid", positions=False)
    assert whole.values.shape == (pair_model.cfg.n_layers,) and whole.axes == ("block",)
    assert np.all(whole.values == 1.0)  # every block's whole stream from the clean run: the clean logits exactly
    by_pos = activation_patching(pair_model, clean, corrupt, answer=5, wrong=7, site="resid")
    assert by_pos.values.shape == (pair_model.cfg.n_layers, clean.shape[1])
    assert np.all(by_pos.values[:, :CORRUPT_AT] == 0.0)  # before the change clean = corrupt: patching does nothing
    if pair_model.cfg.arch == "baseline":  # the changed token's stream carries all of the change
        assert by_pos.values[0, CORRUPT_AT] == pytest.approx(1.0, abs=1e-6)
    # (QTG's later tokens also read the changed token's embedding through the TopoFilter's w, beside the stream)
    assert by_pos.clean_metric != by_pos.corrupt_metric


@pytest.mark.parametrize("site", ["heads", "mlp", "topo_w"])
def test_batched_patching_equals_one_patch_per_pass(pair_model, prompts, site):
    clean, corrupt = prompts
    if site == "topo_w" and pair_model.cfg.arch != "qtg":
        with pytest.raises(ExperimentError, match="no TopoFilter"):
            activation_patching(pair_model, clean, corrupt, 5, 7, site=site)
        return
    batched = activation_patching(pair_model, clean, corrupt, 5, 7, site=site)
    single = activation_patching(pair_model, clean, corrupt, 5, 7, site=site, batch_rows=1)
    np.testing.assert_allclose(batched.values, single.values, rtol=0, atol=1e-5)
    shapes = {"heads": (pair_model.cfg.n_layers, pair_model.cfg.n_heads, 16), "mlp": (pair_model.cfg.n_layers,),
              "topo_w": (16,)}
    assert batched.values.shape == shapes[site]
    assert np.abs(batched.values).max() > 0  # some unit matters


def test_attribution_is_exact_where_the_metric_is_linear_in_the_site(pair_model, prompts):
    """LD is linear in final_norm (the tied head reads it), so the first-order estimate is the real effect."""
    clean, corrupt = prompts
    real = activation_patching(pair_model, clean, corrupt, 5, 7, site="final_norm")
    estimate = attribution_patching(pair_model, clean, corrupt, 5, 7, site="final_norm")
    np.testing.assert_allclose(estimate.values, real.values, rtol=0, atol=1e-4)
    assert abs(real.values[-1] - 1.0) < 1e-5 and np.all(real.values[:-1] == 0.0)


def test_attribution_has_patchings_shapes_and_reports_its_agreement(pair_model, prompts):
    clean, corrupt = prompts
    for site in ("resid", "heads", "mlp"):
        att = attribution_patching(pair_model, clean, corrupt, 5, 7, site=site, compare=True, top_k=5)
        real = activation_patching(pair_model, clean, corrupt, 5, 7, site=site)
        assert att.values.shape == real.values.shape and att.labels == real.labels
        assert att.agreement == agreement_of(att.values, real.values, 5)
        assert -1.0 <= att.agreement.pearson <= 1.0
    assert not any(p.grad is not None for p in pair_model.parameters())  # no parameter's .grad was touched


def test_bad_pairs_are_refused_naming_what_is_wrong(pair_model, prompts):
    clean, _ = prompts
    with pytest.raises(ExperimentError, match="16 tokens and the corrupted one 15"):
        activation_patching(pair_model, clean, clean[:, :15], 5, 7)
    with pytest.raises(ExperimentError, match="wrong: token id"):
        attribution_patching(pair_model, clean, clean, 5, 10**6)
    with pytest.raises(ExperimentError, match="same logit difference"):
        activation_patching(pair_model, clean, clean, 5, 7)
    with pytest.raises(ExperimentError, match="site must be one of"):
        activation_patching(pair_model, clean, clean, 5, 7, site="blocks.0.attn.pattern")


@pytest.mark.parametrize("wrong", [None, 7])
def test_direct_logit_attribution_sums_to_the_logit(pair_model, prompts, wrong):
    clean, _ = prompts
    dla = direct_logit_attribution(pair_model, clean, answer=5, wrong=wrong)
    cfg = pair_model.cfg
    assert dla.heads.shape == (cfg.n_layers, cfg.n_heads) and dla.mlp.shape == (cfg.n_layers,)
    assert abs(dla.total() - dla.logit) < 1e-4 * max(1.0, abs(dla.logit))
    with torch.no_grad():
        logits = pair_model(clean).logits[0, -1]
    assert dla.logit == pytest.approx(float(logits[5] - (logits[wrong] if wrong is not None else 0.0)), abs=1e-6)
    # removing a head changes the logit by about its direct term when later layers barely read it (last block)
    last = cfg.n_layers - 1
    with torch.no_grad():
        ablated = pair_model(clean, intervene=qtg.Intervention(ablate_heads={last: [0]})).logits[0, -1]
    change = float(logits[5] - ablated[5]) - (0.0 if wrong is None else float(logits[wrong] - ablated[wrong]))
    assert change == pytest.approx(dla.heads[last, 0], abs=0.05 * max(1e-3, np.abs(dla.heads).max()) + 0.02)
