"""Named activations (qtg.model.activations): run_with_cache and Intervention(patch=...), QTG and baseline alike."""

from __future__ import annotations

import pytest
import torch

import qtg
from qtg.generate import generate
from qtg.model.activations import ActivationError, activation_names
from qtg.model.cache import QTGCache


@pytest.fixture(scope="module", params=["qtg", "baseline"])
def pair_model(request, micro_cfg):
    return qtg.build(micro_cfg.replace(arch=request.param), seed=2).eval()


def _ids(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 60, (2, n), generator=torch.Generator().manual_seed(1))


def test_every_documented_name_is_recorded_with_its_shape(pair_model):
    cfg, ids = pair_model.cfg, _ids()
    B, N, H = *ids.shape, cfg.n_heads
    with torch.no_grad():
        out, cache = pair_model.run_with_cache(ids)
    assert list(cache) == activation_names(cfg)  # every site, in the order the pass reaches them
    shapes = {"embed": (B, N, cfg.width), "topo.scores": (B, N), "topo.w": (B, N), "topo.out": (B, N, cfg.width),
              "final_norm": (B, N, cfg.width)}
    for i in range(cfg.n_layers):
        shapes.update({f"blocks.{i}.resid_pre": (B, N, cfg.width), f"blocks.{i}.attn.pattern": (B, H, N, N),
                       f"blocks.{i}.attn.distance": (B, H, N, N), f"blocks.{i}.attn.head_out": (B, N, H, cfg.head_dim),
                       f"blocks.{i}.attn.out": (B, N, cfg.width), f"blocks.{i}.mlp.out": (B, N, cfg.width),
                       f"blocks.{i}.resid_post": (B, N, cfg.width)})
    for name, value in cache.items():
        assert tuple(value.shape) == shapes[name], name
    # the values are what they say: the stream adds up, the pattern is causal and sums to 1, the head sees final_norm
    torch.testing.assert_close(cache["blocks.0.resid_post"], cache["blocks.0.resid_pre"] + cache["blocks.0.attn.out"]
                               + cache["blocks.0.mlp.out"])
    pattern = cache["blocks.1.attn.pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(B, H, N))
    assert float(pattern.triu(1).abs().max()) == 0.0
    torch.testing.assert_close(out.logits, cache["final_norm"] @ pair_model.unembedding().T)
    if cfg.arch == "qtg":
        torch.testing.assert_close(cache["topo.out"], cache["embed"] * cache["topo.w"].unsqueeze(-1))
        assert torch.equal(cache["topo.w"], out.topo_weights)


def test_names_keep_only_what_is_asked(pair_model):
    with torch.no_grad():
        _, one = pair_model.run_with_cache(_ids(), ["blocks.1.resid_post"])
        _, some = pair_model.run_with_cache(_ids(), lambda n: n.endswith("attn.out"))
    assert list(one) == ["blocks.1.resid_post"]
    assert list(some) == [f"blocks.{i}.attn.out" for i in range(pair_model.cfg.n_layers)]
    with pytest.raises(ActivationError, match="blocks.9.resid_post"):
        pair_model.run_with_cache(_ids(), ["blocks.9.resid_post"])


@pytest.mark.parametrize("how", ["tensor", "function"])
def test_patching_a_value_with_itself_changes_nothing_bit_for_bit(pair_model, how):
    ids = _ids()
    with torch.no_grad():
        plain = pair_model(ids).logits
        for name in activation_names(pair_model.cfg):
            recorded, cache = pair_model.run_with_cache(ids, [name])
            patch = cache[name].clone() if how == "tensor" else (lambda v: v * 1.0)
            patched = pair_model(ids, intervene=qtg.Intervention(patch={name: patch})).logits
            if name == "embed" and pair_model.cfg.arch == "qtg":
                # a patched embedding is measured by the TopoFilter in float64 (its ids no longer name the
                # points), not by ids in float32
                torch.testing.assert_close(patched, plain, rtol=0, atol=1e-5)
                continue
            assert torch.equal(patched, recorded.logits), name  # the site's own path, unchanged by its patch
            if name.endswith("attn.pattern") and pair_model.cfg.arch == "baseline":  # softmax(QK)V, not SDPA
                torch.testing.assert_close(patched, plain, rtol=0, atol=1e-5)
            else:
                assert torch.equal(patched, plain), name


def test_patching_everything_downstream_from_a_clean_run_reproduces_its_logits(pair_model):
    clean, corrupt = _ids(), _ids().flip(1)
    with torch.no_grad():
        # not the patterns: recording one makes the baseline compute softmax(QK)V instead of SDPA
        target, cache = pair_model.run_with_cache(clean, lambda n: not n.endswith("pattern"))
        for name in activation_names(pair_model.cfg):
            if name.endswith(("pattern", "distance", "head_out", "attn.out", "mlp.out", "topo.scores", "topo.w")):
                continue  # partial sites: the rest of the stream still comes from the corrupted run
            logits = pair_model(corrupt, intervene=qtg.Intervention(patch={name: cache[name]})).logits
            if name == "embed" and pair_model.cfg.arch == "qtg":  # TopoFilter distances in float64, see above
                torch.testing.assert_close(logits, target.logits, rtol=0, atol=1e-5)
            else:
                assert torch.equal(logits, target.logits), name
            assert not torch.equal(pair_model(corrupt).logits, target.logits)


def test_a_patch_changes_what_it_names_and_composes_with_other_fields(micro_cfg):
    model = qtg.build(micro_cfg, seed=2).eval()
    ids = _ids()
    ablate = qtg.Intervention(ablate_heads={1: [0]})
    both = qtg.Intervention(ablate_heads={1: [0]}, patch={"topo.w": torch.ones(1, ids.shape[1])})
    with torch.no_grad():
        out, cache = model.run_with_cache(ids, ["topo.w", "blocks.1.attn.head_out"], intervene=both)
        assert torch.equal(cache["topo.w"], torch.ones(2, ids.shape[1]))  # broadcast over the batch
        assert float(cache["blocks.1.attn.head_out"][:, :, 0].abs().max()) == 0.0  # the ablation still applies
        off = model(ids, intervene=qtg.Intervention(topo="off", ablate_heads={1: [0]}))
    assert torch.equal(out.logits, off.logits)  # w = 1 by patch is w = 1 by topo="off"
    assert not torch.equal(out.logits, model(ids, intervene=ablate).logits)
    with pytest.raises(ActivationError, match="does not fit"):
        model(ids, intervene=qtg.Intervention(patch={"topo.w": torch.ones(3)}))
    with pytest.raises(qtg.InterventionError, match="patch"):
        qtg.Intervention(patch=[("topo.w", 1)])


def test_the_baseline_refuses_qtg_only_sites_by_name(micro_cfg):
    base = qtg.build(micro_cfg.replace(arch="baseline"), seed=0)
    with pytest.raises(ActivationError, match="topo.w"):
        base(_ids(), intervene=qtg.Intervention(patch={"topo.w": torch.ones(1, 24)}))


def test_patches_apply_in_the_cache_and_in_generation(micro_cfg):
    model = qtg.build(micro_cfg, seed=2).eval()
    ids = _ids()[:1]
    scale = qtg.Intervention(patch={"blocks.0.attn.out": lambda v: 0.5 * v, "final_norm": lambda v: -v})
    with torch.no_grad():
        full = model(ids, intervene=scale).logits
        cache = QTGCache()
        parts = [model(ids[:, :10], cache=cache, intervene=scale).logits]
        parts += [model(ids[:, t:t + 1], cache=cache, intervene=scale).logits for t in range(10, ids.shape[1])]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    a = generate(model, ids[:, :8], 12, temperature=0, use_cache=True, intervene=scale)
    b = generate(model, ids[:, :8], 12, temperature=0, use_cache=False, intervene=scale)
    plain = generate(model, ids[:, :8], 12, temperature=0, use_cache=True)
    assert torch.equal(a, b) and not torch.equal(a, plain)


def test_record_and_patch_keep_gradients_for_attribution(micro_cfg):
    model = qtg.build(micro_cfg, seed=2)
    out, cache = model.run_with_cache(_ids(), ["blocks.0.resid_post"], retain_grad=True)
    out.logits[:, -1, 3].sum().backward()
    grad = cache["blocks.0.resid_post"].grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
