"""The QTG model against its definition (docs/model.md): causality, its
formulas recomputed literally, the two attention paths, finite gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import qtg
from qtg.model.cache import QTGCache


def _all_outputs(out) -> dict[str, torch.Tensor]:
    """Every per-position output: logits, states, topo scores/weights, attention rows."""
    tensors = {"logits": out.logits, "s_soft": out.topo_scores, "s_exact": out.topo_exact_scores,
               "w": out.topo_weights}
    tensors.update({f"state{i}": s for i, s in enumerate(out.states)})
    tensors.update({f"attn{i}": a.transpose(1, 2) for i, a in enumerate(out.attention)})  # [B, N, H, N]
    return tensors


@pytest.mark.parametrize("impl", ["reference", "flex"])
def test_future_tokens_never_change_the_past(micro, micro_flex, ids, impl):
    model = micro if impl == "reference" else micro_flex
    k = 37
    changed = ids.clone()
    changed[:, k] = (changed[:, k] + 1) % 512
    changed[:, k + 5] = (changed[:, k + 5] + 7) % 512
    with torch.no_grad():
        a, b = model(ids, return_internals=True), model(changed, return_internals=True)
    assert a.attn_impl == [impl] * len(model.blocks)
    for name, ta in _all_outputs(a).items():
        tb = _all_outputs(b)[name]
        torch.testing.assert_close(ta[:, :k], tb[:, :k], rtol=0, atol=1e-5, msg=f"{name} leaked the future")
        assert not torch.equal(ta[:, k:], tb[:, k:]) or name.startswith("attn"), f"{name} ignores token {k}"


def test_causality_in_float64(micro_cfg):
    model = qtg.build(micro_cfg, dtype="fp64", seed=3).eval()
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(5))
    changed = ids.clone()
    changed[0, 20:] = 7
    with torch.no_grad():
        a, b = model(ids, return_internals=True), model(changed, return_internals=True)
    # float64 end to end: TopoFilter distances, BC and the maps are not rounded to float32 on the way
    assert a.topo_scores.dtype == a.distances[0].dtype == a.attention[0].dtype == torch.float64
    for name, ta in _all_outputs(a).items():
        torch.testing.assert_close(ta[:, :20], _all_outputs(b)[name][:, :20], rtol=0, atol=1e-12)


def test_internals_shapes_and_ranges(micro, ids):
    cfg = micro.cfg
    with torch.no_grad():
        out = micro(ids, return_internals=True)
    B, N = ids.shape
    assert out.logits.shape == (B, N, cfg.vocab_size)
    assert len(out.states) == 2 + cfg.n_layers
    assert all(s.shape == (B, N, cfg.width) for s in out.states)
    torch.testing.assert_close(out.states[0].norm(dim=-1), torch.ones(B, N))  # QEmbed is unit norm
    for t in (out.topo_scores, out.topo_exact_scores, out.topo_weights):
        assert t.shape == (B, N)
    assert (out.topo_weights > 0).all() and (out.topo_weights <= 1).all()
    # the soft-min never exceeds the exact minimum and is within T log(i) of it
    T = cfg.topo_temperature
    s, s_soft = out.topo_exact_scores, out.topo_scores
    assert (s_soft <= s + 1e-5).all()
    bound = T * torch.log(torch.arange(1, N + 1).clamp(min=1).float())
    assert (s - s_soft <= bound + 1e-5).all()
    assert s[:, 10].abs().max() == 0  # token 10 repeats token 3: distance 0
    for A, D, g in zip(out.attention, out.distances, out.gamma):
        assert A.shape == D.shape == (B, cfg.n_heads, N, N) and g.shape == (cfg.n_heads,)
        torch.testing.assert_close(A.sum(-1), torch.ones(B, cfg.n_heads, N))
        assert (A.triu(1) == 0).all()
        assert D.min() >= 0 and D.max() <= math.pi / 2


def test_attention_is_softmax_of_minus_gamma_distance_squared(micro, ids):
    with torch.no_grad():
        out = micro(ids, return_internals=True)
    N = ids.shape[1]
    i, j = torch.arange(N).view(-1, 1), torch.arange(N).view(1, -1)
    slopes = qtg.model.fisher_rao.alibi_slopes(micro.cfg.n_heads).view(1, -1, 1, 1)
    for A, D, g in zip(out.attention, out.distances, out.gamma):
        score = -g.view(1, -1, 1, 1) * D.double() ** 2 - slopes * (i - j).clamp(min=0)
        expected = score.masked_fill(j > i, float("-inf")).softmax(-1)
        torch.testing.assert_close(A.double(), expected, rtol=0, atol=2e-5)


def test_internals_are_not_computed_unless_asked(micro, ids):
    with torch.no_grad():
        out = micro(ids)
    assert out.states is None and out.attention is None and out.topo_exact_scores is None and out.loss is None
    assert out.topo_weights.shape == ids.shape  # computed by every forward, so always returned


def test_bad_ids_get_a_clear_error(micro):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\); got ids from 0 to 600"):
        micro(torch.tensor([[0, 600]]))
    with pytest.raises(ValueError, match=r"ids must be \[B, N\]"):
        micro(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="empty"):
        micro(torch.zeros(1, 0, dtype=torch.long))


# --- a literal re-computation of docs/model.md, loops over tokens and heads -------


def _literal_forward(model: qtg.QTG, tokens: list[int]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """docs/model.md §1-§4, written out with loops in float64 numpy."""
    cfg = model.cfg
    P = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    N, d, H, dh, T = len(tokens), cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.topo_temperature

    def rmsnorm(x, w):
        return x / math.sqrt(float(np.mean(x * x)) + cfg.norm_eps) * w

    # 1. QEmbed: psi = (a + ib) / |a + ib|, stored as [re | im]
    psi = []
    for t in tokens:
        e = P["embed.table.weight"][t] + P["embed.bias"]
        psi.append(e / math.sqrt(sum(c * c for c in e)))
    # 2. TopoFilter
    weights, x = [], []
    for i in range(N):
        if i == 0:
            s_soft = 0.0
        else:
            deltas = [math.sqrt(float(np.sum((psi[i] - psi[j]) ** 2))) for j in range(i)]
            s_soft = -T * math.log(sum(math.exp(-dl / T) for dl in deltas))
        w = math.exp(-max(s_soft - cfg.topo_threshold, 0.0) / cfg.topo_tau)
        weights.append(w)
        x.append(w * psi[i])
    # 3-4. blocks
    attn_maps = []
    for b in range(cfg.n_layers):
        pre = f"blocks.{b}."
        h = [rmsnorm(xi, P[pre + "attn_norm.weight"]) for xi in x]
        gamma = np.exp(P[pre + "attn.log_gamma"]) if cfg.learn_gamma else np.full(H, cfg.gamma_init)
        A_all = np.zeros((H, N, N))
        heads_out = [np.zeros(d) for _ in range(N)]
        for hd in range(H):
            sl = slice(hd * dh, (hd + 1) * dh)
            m = 2.0 ** (-8.0 * (hd + 1) / H)

            def softmax(z):
                z = np.exp(z - z.max())
                return z / z.sum()

            p = [softmax(P[pre + "attn.wq.weight"][sl] @ hi) for hi in h]
            q = [softmax(P[pre + "attn.wk.weight"][sl] @ hi) for hi in h]
            v = [P[pre + "attn.wv.weight"][sl] @ hi for hi in h]
            for i in range(N):
                scores = []
                for j in range(i + 1):
                    bc = sum(math.sqrt(p[i][k] * q[j][k]) for k in range(dh))
                    dist = math.acos(min(bc, 1.0))
                    scores.append(-gamma[hd] * dist**2 - (m * (i - j) if cfg.pos == "alibi" else 0.0))
                a = softmax(np.array(scores))
                A_all[hd, i, : i + 1] = a
                heads_out[i][sl] = sum(a[j] * v[j] for j in range(i + 1))
        attn_maps.append(A_all)
        x = [xi + P[pre + "attn.wo.weight"] @ o for xi, o in zip(x, heads_out)]
        if cfg.ffn_hidden:
            new = []
            for xi in x:
                hi = rmsnorm(xi, P[pre + "ffn_norm.weight"])
                gate_up = P[pre + "ffn.w_in.weight"] @ hi
                gate, up = gate_up[: cfg.ffn_hidden], gate_up[cfg.ffn_hidden:]
                new.append(xi + P[pre + "ffn.w_out.weight"] @ (gate / (1 + np.exp(-gate)) * up))
            x = new
    # head: logit_v = Re<e_v, h>
    logits = np.array([[float(P["embed.table.weight"][v] @ rmsnorm(xi, P["norm.weight"]))
                        for v in range(cfg.vocab_size)] for xi in x])
    return logits, np.array(weights), attn_maps


@pytest.mark.parametrize("variant", ["micro", "seed_faithful"])
def test_model_matches_a_literal_recomputation_of_the_spec(micro_cfg, variant):
    cfg = micro_cfg if variant == "micro" else qtg.seed_faithful(micro_cfg)
    model = qtg.build(cfg, seed=11).eval()
    if cfg.learn_gamma:
        with torch.no_grad():
            model.blocks[0].attn.log_gamma.copy_(torch.tensor([0.0, 0.5, 1.0, 2.0]))  # not all 1
    tokens = [5, 17, 5, 300, 42, 17, 9]
    logits, weights, maps = _literal_forward(model, tokens)
    with torch.no_grad():
        out = model(torch.tensor([tokens]), return_internals=True)
    np.testing.assert_allclose(out.topo_weights[0].numpy(), weights, rtol=1e-4, atol=1e-5)
    for got, want in zip(out.attention, maps):
        np.testing.assert_allclose(got[0].numpy(), want, atol=1e-4)
    np.testing.assert_allclose(out.logits[0].numpy(), logits, rtol=1e-4, atol=1e-4)


# --- the two attention paths ------------------------------------------------------


def test_flex_equals_reference_in_inference(micro, micro_flex, ids):
    with torch.no_grad():
        ref, flex = micro(ids), micro_flex(ids, return_internals=True)
    assert flex.attn_impl == ["flex"] * len(micro.blocks)
    rel = ((flex.logits - ref.logits).abs().max() / ref.logits.abs().max()).item()
    assert rel <= 1e-5


def test_flex_compiles_once_and_reads_gamma_at_run_time(micro_cfg, micro_flex, ids):
    """A changed gamma must change the output without a recompile (gamma is a tensor, not a baked float)."""
    from torch._dynamo.utils import counters

    model = qtg.build(micro_cfg.replace(attn_impl="flex"), seed=0).eval()
    model.load_state_dict(micro_flex.state_dict())
    ref = qtg.build(micro_cfg.replace(attn_impl="reference"), seed=0).eval()
    with torch.no_grad():
        model(ids)  # warm: compiled already by other tests or now
        graphs = counters["stats"]["unique_graphs"]
        for lg in (0.0, 1.5):
            for m in (model, ref):
                for blk in m.blocks:
                    blk.attn.log_gamma.fill_(lg)
            got, want = model(ids).logits, ref(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            model(ids.flip(0))  # other tokens, same shape
    assert counters["stats"]["unique_graphs"] == graphs, "flex attention recompiled for the same shape"


def test_flex_training_on_cpu_falls_back_to_reference_and_says_so(micro_cfg, ids, caplog, monkeypatch):
    qtg.model.model._say_flex_falls_back.cache_clear()
    model = qtg.build(micro_cfg.replace(attn_impl="flex"), seed=0)
    with caplog.at_level("WARNING", logger="qtg"):
        out = model(ids, targets=ids.roll(-1, 1), return_internals=True)
        out.loss.backward()
        model(ids, targets=ids)
    assert out.attn_impl == ["reference"] * len(model.blocks)
    assert sum("no backward" in r.message for r in caplog.records) == 1  # once, not per layer or step


def test_auto_picks_reference_for_short_cpu_inputs(micro, ids):
    with torch.no_grad():
        assert micro(ids, return_internals=True).attn_impl == ["reference"] * len(micro.blocks)


# --- gradients ---------------------------------------------------------------------


def _assert_finite_grads(model):
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_finite_gradients_with_repeated_tokens(micro_cfg):
    """All tokens equal: every TopoFilter distance is 0 and every query equals its key (BC = 1)."""
    model = qtg.build(micro_cfg, seed=0)
    ids = torch.full((2, 32), 7)
    out = model(ids, targets=ids)
    out.loss.backward()
    _assert_finite_grads(model)


def test_finite_gradients_when_queries_equal_keys(micro_cfg, ids):
    model = qtg.build(micro_cfg, seed=0)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.wk.weight.copy_(blk.attn.wq.weight)  # Q = K
    model(ids, targets=ids.roll(-1, 1)).loss.backward()
    _assert_finite_grads(model)


def test_finite_gradients_under_bf16_autocast_with_float32_bc(micro_cfg, ids):
    model = qtg.build(micro_cfg, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, targets=ids.roll(-1, 1), return_internals=True)
    out.loss.backward()
    _assert_finite_grads(model)
    assert out.distances[0].dtype == torch.float32


# --- cache --------------------------------------------------------------------------


def test_cached_forward_equals_full_forward(micro, ids):
    """Prefill 40 tokens, then feed the rest one at a time: the same logits as one pass."""
    with torch.no_grad():
        full = micro(ids).logits
        cache = QTGCache()
        parts = [micro(ids[:, :40], cache=cache).logits]
        for t in range(40, ids.shape[1]):
            parts.append(micro(ids[:, t:t + 1], cache=cache).logits)
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


# --- learning -------------------------------------------------------------------------


@pytest.mark.slow
def test_micro_learns_a_tiny_corpus(micro_cfg):
    text = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
            "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. ")
    data = torch.tensor(list(text.encode()) * 4)
    torch.manual_seed(0)
    model = qtg.build(micro_cfg, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        starts = torch.randint(0, len(data) - 65, (8,), generator=g)
        batch = torch.stack([data[s:s + 65] for s in starts])
        loss = model(batch[:, :-1], targets=batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last <= first / 2, f"loss {first:.3f} -> {last:.3f}"
