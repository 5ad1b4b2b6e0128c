"""The TopoFilter's trainable modes (config ``topo_filter``): "exact" (nano-exact) and "gate" (nano-gate).

Each is a model's own weight, so each must keep what the soft-min model keeps:
causality, cached = uncached, finite gradients, and it must actually be the rule it names.
"""

from __future__ import annotations

import pytest
import torch

import qtg
from qtg.model.cache import QTGCache

MODES = ["exact", "gate"]


@pytest.fixture(scope="module", params=MODES)
def moded(request, micro_cfg):
    cfg = micro_cfg.replace(topo_filter=request.param, topo_threshold=0.35, name=f"micro-{request.param}")
    return qtg.build(cfg, seed=1).eval()


def _repeating_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (2, 48), generator=g)  # a small alphabet: many repeats
    return ids


def test_own_weight_is_the_rule_it_names(moded):
    ids = _repeating_ids()
    with torch.no_grad():
        out = moded(ids, return_internals=True)
    s, w = out.topo_exact_scores, out.topo_weights
    if moded.cfg.topo_filter == "exact":
        expected = torch.exp(-torch.clamp(s - 0.35, min=0.0) / moded.cfg.topo_tau)
        torch.testing.assert_close(w, expected, rtol=0, atol=0)
        assert not torch.allclose(w, torch.exp(-torch.clamp(out.topo_scores - 0.35, min=0.0)))  # not s~
    else:
        repeat = s < 1e-4
        assert repeat.any() and (~repeat).any()
        assert torch.equal(w[repeat], torch.ones_like(w[repeat]))
        novel = torch.sigmoid(moded.topo.gate_logit.detach())
        torch.testing.assert_close(w[~repeat], novel.expand_as(w[~repeat]))


def test_future_tokens_never_change_the_past(moded):
    ids = _repeating_ids()
    changed = ids.clone()
    changed[:, 30:] = (changed[:, 30:] + 3) % 40
    with torch.no_grad():
        a, b = moded(ids, return_internals=True), moded(changed, return_internals=True)
    for name in ("logits", "topo_weights", "topo_exact_scores"):
        torch.testing.assert_close(getattr(a, name)[:, :30], getattr(b, name)[:, :30], rtol=0, atol=1e-5)
        assert not torch.equal(getattr(a, name)[:, 30:], getattr(b, name)[:, 30:])


def test_cached_decoding_equals_the_full_forward(moded):
    ids = _repeating_ids()
    with torch.no_grad():
        full = moded(ids).logits
        cache = QTGCache()
        parts = [moded(ids[:, :20], cache=cache).logits]
        parts += [moded(ids[:, t:t + 1], cache=cache).logits for t in range(20, ids.shape[1])]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_training_gradients_are_finite_and_reach_what_the_mode_trains(micro_cfg):
    ids = _repeating_ids()
    for mode in MODES:
        model = qtg.build(micro_cfg.replace(topo_filter=mode, topo_threshold=0.0), seed=0).train()
        out = model(ids[:, :-1], targets=ids[:, 1:])
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is None or bool(torch.isfinite(g).all()) for g in grads.values()), mode
        if mode == "gate":
            assert float(grads["topo.gate_logit"].abs()) > 0  # the one learnt number learns
        else:  # the exact score passes its gradient to the embedding through the min (theta 0: w < 1 somewhere)
            only_topo = qtg.build(micro_cfg.replace(topo_filter=mode, topo_threshold=0.0), seed=0).train()
            w = only_topo(ids).topo_weights
            w.sum().backward()
            assert float(only_topo.embed.table.weight.grad.abs().sum()) > 0
