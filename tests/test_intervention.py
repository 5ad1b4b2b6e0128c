"""Interventions are per-call arguments (docs/model.md §6): the default changes nothing, each edit
does what it says, causality and the cache hold under every one, and one model serves many at once."""

from __future__ import annotations

import threading

import pytest
import torch

import qtg
from qtg.generate import generate
from qtg.model.cache import QTGCache
from qtg.model.intervention import VALUE_LIMIT, Intervention, InterventionError

GAMMAS = {1: torch.tensor([0.5, 1.0, 2.0, 4.0])}
EDITS = {
    "exact": Intervention(topo="exact"),
    "off": Intervention(topo="off"),
    "theta_tau_T": Intervention(theta=0.3, tau=0.5, temperature=0.05),
    "gamma": Intervention(gamma=1.0),
    "gamma_blocks_scaled": Intervention(gamma=GAMMAS, gamma_scale=3.0),
    "ablate": Intervention(ablate_heads={0: [1, 3], 1: [0]}),
    "no_positions": Intervention(positions="none"),
    "all_at_once": Intervention(topo="exact", gamma_scale=0.5, ablate_heads={1: [2]}, positions="none"),
}


@pytest.fixture(scope="module")
def alibi(micro_cfg):
    """micro with ALiBi and learnt gamma, gamma moved off its initial value so that edits show."""
    model = qtg.build(micro_cfg.replace(pos="alibi", learn_gamma=True), seed=0).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.log_gamma.copy_(torch.linspace(-0.5, 1.0, micro_cfg.n_heads))
    return model


@pytest.fixture(scope="module")
def base_model(micro_cfg):
    return qtg.build(micro_cfg.replace(arch="baseline"), seed=0).eval()


def _outputs(out) -> dict[str, torch.Tensor]:
    tensors = {"logits": out.logits, "w": out.topo_weights, "s_soft": out.topo_scores}
    tensors.update({f"state{i}": s for i, s in enumerate(out.states)})
    return tensors


def test_the_default_intervention_is_bitwise_the_plain_model(alibi, base_model, ids):
    for model in (alibi, base_model):
        with torch.no_grad():
            plain = model(ids, targets=ids.roll(-1, 1), return_internals=True)
            same = model(ids, targets=ids.roll(-1, 1), return_internals=True, intervene=Intervention())
        assert torch.equal(plain.logits, same.logits) and torch.equal(plain.loss, same.loss)
        assert all(torch.equal(a, b) for a, b in zip(plain.states, same.states))
        assert all(torch.equal(a, b) for a, b in zip(plain.attention, same.attention))
    assert Intervention().is_default and Intervention().name == "plain"


@pytest.mark.parametrize("name", sorted(EDITS))
def test_every_intervention_keeps_causality_and_changes_the_output(alibi, ids, name):
    k = 30
    later = ids.clone()
    later[:, k:] = (later[:, k:] * 7 + 3) % 512
    with torch.no_grad():
        a = alibi(ids, return_internals=True, intervene=EDITS[name])
        b = alibi(later, return_internals=True, intervene=EDITS[name])
        plain = alibi(ids)
    for key, ta in _outputs(a).items():
        torch.testing.assert_close(ta[:, :k], _outputs(b)[key][:, :k], rtol=0, atol=1e-6,
                                   msg=f"{name}: {key} leaked the future")
    for ma, mb in zip(a.attention, b.attention):
        torch.testing.assert_close(ma[:, :, :k, :k], mb[:, :, :k, :k], rtol=0, atol=1e-6)
    assert not torch.allclose(a.logits, plain.logits), f"{name} changed nothing"


def test_exact_weights_by_the_exact_causal_score_and_off_by_one(alibi, ids):
    cfg = alibi.cfg
    with torch.no_grad():
        plain = alibi(ids, return_internals=True)
        exact = alibi(ids, return_internals=True, intervene=Intervention(topo="exact"))
        tuned = alibi(ids, return_internals=True, intervene=Intervention(topo="exact", theta=0.4, tau=0.25))
        off = alibi(ids, targets=ids.roll(-1, 1), return_internals=True, intervene=Intervention(topo="off"))
    s = plain.topo_exact_scores
    torch.testing.assert_close(exact.topo_weights, torch.exp(-(s - cfg.topo_threshold).clamp(min=0) / cfg.topo_tau))
    torch.testing.assert_close(tuned.topo_weights, torch.exp(-(s - 0.4).clamp(min=0) / 0.25))
    torch.testing.assert_close(exact.topo_exact_scores, s)
    torch.testing.assert_close(exact.topo_scores, plain.topo_scores)  # s~ is still reported as computed
    assert torch.equal(off.topo_weights, torch.ones_like(off.topo_weights))
    assert torch.equal(off.states[1], off.states[0])  # w = 1: the filter passes psi through
    assert float(off.loss_terms["topo"]) == 0.0  # L_topo = mean (1 - w)^2


def test_topofilter_overrides_equal_a_model_configured_that_way(alibi, ids):
    edit = Intervention(theta=0.3, tau=0.5, temperature=0.05)
    other = qtg.build(alibi.cfg.replace(topo_threshold=0.3, topo_tau=0.5, topo_temperature=0.05), seed=0).eval()
    other.load_state_dict(alibi.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(alibi(ids, intervene=edit).logits, other(ids).logits, rtol=0, atol=0)


def test_positions_none_equals_the_same_weights_without_alibi(alibi, ids):
    nope = qtg.build(alibi.cfg.replace(pos="none"), seed=0).eval()
    nope.load_state_dict(alibi.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(alibi(ids, intervene=Intervention(positions="none")).logits, nope(ids).logits,
                                   rtol=0, atol=0)


def test_gamma_replacement_and_scale_reach_the_scores(alibi, ids):
    learnt = [block.attn.gamma().detach() for block in alibi.blocks]
    with torch.no_grad():
        one = alibi(ids, return_internals=True, intervene=Intervention(gamma=1.0))
        some = alibi(ids, return_internals=True, intervene=Intervention(gamma=GAMMAS, gamma_scale=3.0))
    assert all(torch.equal(g, torch.ones(4)) for g in one.gamma)
    torch.testing.assert_close(some.gamma[0], learnt[0] * 3.0)
    torch.testing.assert_close(some.gamma[1], GAMMAS[1] * 3.0)
    # the maps are those of the applied gamma: softmax_j(-gamma d^2 - m (i - j))
    n = ids.shape[1]
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    slopes = qtg.model.fisher_rao.alibi_slopes(4).view(1, -1, 1, 1)
    scores = -some.gamma[1].view(1, -1, 1, 1) * some.distances[1] ** 2 - slopes * (i - j).clamp(min=0)
    expected = scores.masked_fill(j > i, float("-inf")).softmax(-1)
    torch.testing.assert_close(some.attention[1], expected, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(block.attn.gamma().detach(), g) for block, g in zip(alibi.blocks, learnt))


@pytest.mark.parametrize("which", ["qtg", "baseline"])
def test_head_ablation_equals_zeroing_its_slice_of_the_output_projection(alibi, base_model, ids, which):
    model = alibi if which == "qtg" else base_model
    heads = {0: [1], 1: [0, 3]}
    edited = type(model)(model.cfg).eval()
    edited.load_state_dict(model.state_dict())
    d_h = model.cfg.head_dim
    with torch.no_grad():
        for block, hs in heads.items():
            for h in hs:
                edited.blocks[block].attn.wo.weight[:, h * d_h:(h + 1) * d_h] = 0.0
        by_hand = edited(ids).logits
        ablated = model(ids, intervene=Intervention(ablate_heads=heads)).logits
    torch.testing.assert_close(ablated, by_hand, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ablated, model(ids).logits)


@pytest.mark.parametrize("name", sorted(EDITS))
def test_cached_equals_uncached_under_every_intervention(alibi, ids, name):
    edit = EDITS[name]
    with torch.no_grad():
        full = alibi(ids[:1], intervene=edit).logits
        cache = QTGCache()
        parts = [alibi(ids[:1, :20], cache=cache, intervene=edit).logits]
        for t in range(20, ids.shape[1]):
            parts.append(alibi(ids[:1, t:t + 1], cache=cache, intervene=edit).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    prompt = ids[:, :12]
    for options in (dict(temperature=0), dict(temperature=1.0, seed=3)):  # sampling reads the whole distribution
        cached = generate(alibi, prompt, 24, use_cache=True, intervene=edit, **options)
        assert torch.equal(cached, generate(alibi, prompt, 24, use_cache=False, intervene=edit, **options))


def test_flex_path_takes_the_intervention(micro_cfg, alibi, ids):
    flex = qtg.build(alibi.cfg.replace(attn_impl="flex"), seed=0).eval()
    flex.load_state_dict(alibi.state_dict())
    edit = EDITS["all_at_once"]
    with torch.no_grad():
        out = flex(ids, intervene=edit, return_internals=True)
        ref = alibi(ids, intervene=edit)
    assert out.attn_impl == ["flex"] * micro_cfg.n_layers
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)


def test_threads_with_different_interventions_share_one_model(alibi, ids):
    edits = list(EDITS.values()) + [Intervention()]
    with torch.no_grad():
        alone = [alibi(ids, intervene=e).logits for e in edits]
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(len(edits))

    def work(k: int) -> None:
        barrier.wait()  # start together, so the calls interleave
        with torch.no_grad():
            for _ in range(3):
                results[k] = alibi(ids, intervene=edits[k]).logits

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(edits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, expected in enumerate(alone):
        assert torch.equal(results[k], expected), f"thread {k} ({edits[k].name}) saw another's intervention"


def test_map_blocks_keeps_only_the_maps_asked_for(alibi, ids):
    with torch.no_grad():
        out = alibi(ids, return_internals=True, map_blocks=[1])
        full = alibi(ids, return_internals=True)
    assert out.attention[0] is None and out.distances[0] is None
    assert torch.equal(out.attention[1], full.attention[1]) and torch.equal(out.logits, full.logits)
    with pytest.raises(ValueError, match=r"map_blocks \[5\] out of range 0\.\.1"):
        alibi(ids, return_internals=True, map_blocks=[5])


def test_bad_interventions_are_refused_by_name(alibi, base_model, ids):
    with pytest.raises(InterventionError, match="topo must be one of"):
        Intervention(topo="exactly")
    with pytest.raises(InterventionError, match="tau must be > 0"):
        Intervention(tau=0.0)
    with pytest.raises(InterventionError, match="theta must be a finite number"):
        Intervention(theta=float("nan"))
    with pytest.raises(InterventionError, match=r"ablate_heads: block 7 out of range 0\.\.1"):
        alibi(ids, intervene=Intervention(ablate_heads={7: [0]}))
    with pytest.raises(InterventionError, match=r"ablate_heads\[0\]: head\(s\) \[4\] out of range 0\.\.3"):
        alibi(ids, intervene=Intervention(ablate_heads={0: [4]}))
    with pytest.raises(InterventionError, match=r"gamma\[1\] must be 4 finite values"):
        alibi(ids, intervene=Intervention(gamma={1: torch.ones(3)}))
    with pytest.raises(InterventionError, match="no TopoFilter .* takes only ablate_heads, not topo, positions"):
        base_model(ids, intervene=Intervention(topo="off", positions="none"))
    base_model(ids, intervene=Intervention(ablate_heads={0: [0]}))  # what does apply is taken
    with pytest.raises(TypeError, match="intervene must be a qtg.Intervention"):
        alibi(ids, intervene={"topo": "off"})


def test_the_text_form_reads_what_the_cli_passes():
    edit = Intervention.parse("topo=exact,ablate=0:1,2;1:0,gamma_scale=0.5")
    assert edit == Intervention(topo="exact", ablate_heads={0: [1, 2], 1: [0]}, gamma_scale=0.5)
    assert edit.name == "topo=exact gamma_scale=0.5 ablate=0:1,2;1:0"
    assert Intervention.parse("gamma=1").gamma == 1.0
    per_block = Intervention.parse("gamma=0:1,1,2,2;1:0.5,0.5,0.5,0.5,topo=off")
    assert per_block.topo == "off" and set(per_block.gamma) == {0, 1}
    assert per_block.gamma[0].tolist() == [1.0, 1.0, 2.0, 2.0] and per_block.gamma[1].tolist() == [0.5] * 4
    with pytest.raises(InterventionError, match="one value per head"):
        Intervention.parse("gamma=0:1,x")
    with pytest.raises(InterventionError, match="unknown key 'gama'"):
        Intervention.parse("gama=1")
    with pytest.raises(InterventionError, match="not a number"):
        Intervention.parse("theta=high")
    for typo in ("ablate=0;1", "ablate=0:"):  # a block with no heads is refused, not read as "ablate nothing"
        with pytest.raises(InterventionError, match="expected block:head"):
            Intervention.parse(typo)


@pytest.mark.parametrize("spec, field", [
    ("gamma=1e300", "gamma"), ("gamma=3e38", "gamma"), ("gamma=1e30,gamma_scale=1e30", "gamma"),
    ("gamma_scale=1e300", "gamma_scale"), ("tau=1e-300", "tau"), ("temperature=1e-300", "temperature"),
    ("temperature=1e300", "temperature"), ("theta=-1e300", "theta"),
])
def test_values_that_would_overflow_float32_are_refused_by_name(spec, field):
    """gamma = 1e300 overflowed float32; gamma = 3e38, gamma_scale = 1e300, tau = 1e-300 and T = 1e-300 or
    1e300 gave inf/nan logits (the OpenAI API answered them 500)."""
    with pytest.raises(InterventionError, match=f"^{field} must be"):
        Intervention.parse(spec)


def test_at_the_value_limits_the_forward_pass_stays_finite(alibi, ids):
    heads = alibi.cfg.n_heads
    with pytest.raises(InterventionError, match=r"gamma\[1\] must be 4 finite values in \[0, 1e\+29\]"):
        alibi(ids, intervene=Intervention(gamma={1: torch.full((heads,), VALUE_LIMIT)}, gamma_scale=10.0))
    limits = [Intervention(gamma=VALUE_LIMIT), Intervention(gamma=1.0, gamma_scale=VALUE_LIMIT),
              Intervention(gamma={1: torch.full((heads,), VALUE_LIMIT)}),
              Intervention(theta=-VALUE_LIMIT, tau=1 / VALUE_LIMIT, temperature=1 / VALUE_LIMIT),
              Intervention(topo="exact", theta=VALUE_LIMIT, tau=VALUE_LIMIT, temperature=VALUE_LIMIT)]
    with torch.no_grad():
        for edit in limits:
            out = alibi(ids, intervene=edit, return_internals=True)
            assert bool(torch.isfinite(out.logits).all()), edit.name
            assert all(bool(torch.isfinite(t).all()) for t in (out.topo_scores, out.topo_weights)), edit.name
