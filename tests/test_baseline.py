"""The same-size dot-product baseline: causal, cacheable, counted, and the same size as QTG."""

import pytest
import torch

import qtg
from qtg.model.cache import QTGCache
from qtg.model.memory import closed_form_params, count_params


@pytest.fixture(scope="module", params=["rope", "alibi"])
def baseline(request):
    """The micro baseline with RoPE, and with ALiBi (the nano-baseline-alibi form)."""
    cfg = qtg.baseline_of(qtg.get_tier("micro")).replace(baseline_pos=request.param)
    return qtg.build(cfg, seed=0).eval()


@pytest.mark.parametrize("tier", ["micro", "nano", "7b"])
def test_same_size_as_qtg_up_to_bias_and_gamma(tier):
    cfg = qtg.get_tier(tier)
    extra = cfg.width + (cfg.n_heads * cfg.n_layers if cfg.learn_gamma else 0)
    assert count_params(qtg.baseline_of(cfg)) == count_params(cfg) - extra
    assert closed_form_params(qtg.baseline_of(cfg)) == count_params(qtg.baseline_of(cfg))


def test_baseline_is_causal(baseline, ids):
    changed = ids.clone()
    changed[:, 30:] = 1
    with torch.no_grad():
        a, b = baseline(ids, return_internals=True), baseline(changed, return_internals=True)
    torch.testing.assert_close(a.logits[:, :30], b.logits[:, :30], rtol=0, atol=1e-5)
    for ma, mb in zip(a.attention, b.attention):
        torch.testing.assert_close(ma[:, :, :30], mb[:, :, :30], rtol=0, atol=1e-6)
        torch.testing.assert_close(ma.sum(-1), torch.ones_like(ma.sum(-1)))
    assert not torch.allclose(a.logits[:, 30:], b.logits[:, 30:])
    assert a.topo_scores is None and a.distances is None


def test_baseline_cache_equals_full_forward(baseline, ids):
    with torch.no_grad():
        full = baseline(ids).logits
        cache = QTGCache()
        parts = [baseline(ids[:, :20], cache=cache).logits, baseline(ids[:, 20:23], cache=cache).logits]
        parts += [baseline(ids[:, t:t + 1], cache=cache).logits for t in range(23, ids.shape[1])]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_positions_make_order_matter(pos):
    """In one layer, the last token attends to a *set* of earlier tokens: without positions,
    swapping two of them changes nothing; RoPE and ALiBi must each make it matter."""
    cfg = qtg.baseline_of(qtg.get_tier("micro")).replace(n_layers=1, baseline_pos=pos)
    model = qtg.build(cfg, seed=0).eval()
    with torch.no_grad():
        a = model(torch.tensor([[5, 6, 7, 8]])).logits[0, -1]
        b = model(torch.tensor([[6, 5, 7, 8]])).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-4)


def test_baseline_trains(ids):
    model = qtg.build(qtg.baseline_of(qtg.get_tier("micro")), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first or out.loss.item()
    assert out.loss.item() < first / 2
    assert set(out.loss_terms) == {"ce"}


def test_alibi_maps_equal_the_hand_computation(ids):
    """softmax(q.k / sqrt(d_h) - m_h (i - j)) over j <= i, from the block's own projections."""
    cfg = qtg.baseline_of(qtg.get_tier("micro")).replace(baseline_pos="alibi")
    model = qtg.build(cfg, seed=0).eval()
    assert cfg.label == "micro-baseline" and cfg.replace(name="nano-baseline-alibi").label == "nano-baseline-alibi"
    with torch.no_grad():
        out = model(ids[:1, :24], return_internals=True)
        attn = model.blocks[0].attn
        x = model.blocks[0].attn_norm(out.states[0])  # [1, N, 2d], what the first block's attention reads
    H, dh, n = cfg.n_heads, cfg.head_dim, 24
    q = attn.wq(x).view(1, n, H, dh).transpose(1, 2)
    k = attn.wk(x).view(1, n, H, dh).transpose(1, 2)
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
    scores = q @ k.transpose(-1, -2) / dh ** 0.5 - slopes.view(-1, 1, 1) * (i - j)
    expected = scores.masked_fill(j > i, float("-inf")).softmax(-1)
    torch.testing.assert_close(out.attention[0], expected, rtol=0, atol=1e-6)
