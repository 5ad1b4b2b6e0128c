"""The speed changes of issue 18 §3 keep the model's numbers (benchmarks/bench_speed.py times them).

* fr_sq's in-place backward -2 a / sin(a) equals the exact derivative to a few ulp, and the previous
  where-branch formula to 1e-6;
* the cached ALiBi + mask bias is, block for block, the bias built per call;
* without gradients attention runs without the autograd Function, bit-identical to the autograd path;
* TopoFilter distances in float32 with exact zeros between equal ids: |dw| <= 1e-6 against float64 on
  thousands of tokens of text, and a cache keeps the ids beside the points;
* qtg.malloc.keep_freed_memory stops the page faults of repeated large temporaries.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qtg
from qtg.fisher_rao import (
    _SERIES_BELOW,
    alibi_slopes,
    attention_maps,
    attention_reference,
    build_bias,
    fr_sq,
    score_bias,
    sqrt_simplex,
)
from qtg.model import pairwise_distances

CORPUS = Path(__file__).resolve().parent.parent / "assets" / "corpus" / "hamlet.txt.gz"


def _bc_near_one(dtype: torch.dtype) -> torch.Tensor:
    """BC values on [0, 1] crowded towards 1 (where the derivative is 0/0-prone), plus 1 and just above it."""
    tiny = 1e-15 if dtype == torch.float64 else 1e-7
    u = torch.logspace(torch.log10(torch.tensor(tiny)).item(), 0, 20001, dtype=torch.float64)
    return torch.cat([1.0 - u, torch.rand(2000, dtype=torch.float64)]).to(dtype).clamp(0, 1)


@pytest.mark.parametrize("dtype, exact_tol, prev_tol", [(torch.float32, 3e-7, 1e-6), (torch.float64, 1e-14, 1e-10)])
def test_fr_sq_backward_is_the_exact_derivative(dtype, exact_tol, prev_tol):
    bc = _bc_near_one(dtype)
    x = torch.cat([bc, torch.tensor([1.0, 1.0 + 1e-7], dtype=dtype)]).requires_grad_(True)
    fr_sq(x).backward(torch.ones_like(x))
    grad = x.grad[:-2]
    xd = bc.double()
    interior = xd < 1
    exact = -2 * torch.acos(xd) / torch.sqrt((1 - xd) * (1 + xd))
    rel = ((grad.double() - exact) / exact).abs()[interior]
    assert rel.max() <= exact_tol
    assert (x.grad[-2:] == -2).all() and (grad[~interior] == -2).all()  # BC = 1 and above: the limit
    # the previous backward (the series near 1, the quotient elsewhere), recomputed here
    xc = bc.clamp(max=1.0)
    u = 1.0 - xc
    previous = torch.where(u < _SERIES_BELOW, -(2.0 + u * (2.0 / 3.0 + u * (4.0 / 15.0))),
                           -2.0 * torch.acos(xc) * torch.rsqrt((u * (1.0 + xc)).clamp(min=1e-30)))
    torch.testing.assert_close(grad, previous, rtol=prev_tol, atol=0)


def test_cached_bias_is_the_bias_built_per_call():
    for heads in (4, None):
        slopes = alibi_slopes(heads) if heads else None
        # training, a longer prefill (the cache grows), decoding rows, a chunk after a prefix
        for offset, nq, nk in [(0, 64, 64), (0, 300, 300), (17, 1, 18), (299, 1, 300), (5, 7, 12)]:
            got = score_bias(heads, offset, nq, nk, torch.device("cpu"), torch.float32)
            want = build_bias(slopes, offset, nq, nk, "cpu", torch.float32)
            assert got.shape == want.shape and torch.equal(got, want), (heads, offset, nq, nk)
    # the decoding row at position i sees every key j <= i and the ALiBi distance i - j
    row = score_bias(4, 9, 1, 10, torch.device("cpu"), torch.float32)
    assert torch.isfinite(row).all()
    torch.testing.assert_close(row[:, 0, 0], -alibi_slopes(4) * 9)


def _attention_inputs(nq: int, nk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sp = sqrt_simplex(torch.randn(2, 4, nq, 16, generator=g))
    sk = sqrt_simplex(torch.randn(2, 4, nk, 16, generator=g))
    sk[:, :, 3] = sp[:, :, 0] if nq == nk else sk[:, :, 3]  # one BC = 1 pair
    v = torch.randn(2, 4, nk, 16, generator=g)
    return sp, sk, v, torch.rand(4, generator=g) + 0.5


@pytest.mark.parametrize("nq, nk", [(24, 24), (1, 24)])
def test_no_grad_attention_is_bit_identical_to_the_autograd_path(nq, nk):
    sp, sk, v, gamma = _attention_inputs(nq, nk)
    slopes = alibi_slopes(4)
    offset = nk - nq
    bias = score_bias(4, offset, nq, nk, torch.device("cpu"), torch.float32)
    with torch.enable_grad():
        gamma_g = gamma.clone().requires_grad_(True)
        with_grad = attention_reference(sp, sk, v, gamma_g, q_offset=offset, bias=bias)
        assert with_grad.grad_fn is not None  # the autograd Function ran
    with torch.no_grad():
        without = attention_reference(sp, sk, v, gamma, q_offset=offset, bias=bias)
        built = attention_reference(sp, sk, v, gamma, slopes, q_offset=offset)  # bias built from slopes
    with torch.inference_mode():
        inference = attention_reference(sp, sk, v, gamma, q_offset=offset, bias=bias)
    assert torch.equal(with_grad.detach(), without)
    assert torch.equal(without, built) and torch.equal(without, inference)
    attn, dist = attention_maps(sp, sk, gamma, slopes, q_offset=offset)  # the maps path keeps BC intact
    assert torch.isfinite(dist).all() and dist.min() >= 0
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, nq))


def test_model_no_grad_forward_is_bit_identical(micro, ids):
    with torch.enable_grad():
        micro.zero_grad(set_to_none=True)
        with_grad = micro(ids, targets=ids)
        assert with_grad.loss.requires_grad
    with torch.inference_mode():
        without = micro(ids, targets=ids)
    assert torch.equal(with_grad.logits.detach(), without.logits)
    assert torch.equal(with_grad.loss.detach(), without.loss)


@pytest.fixture(scope="module")
def nano_text():
    model = qtg.load("nano").float().eval()
    text = gzip.open(CORPUS, "rt", encoding="utf-8").read()[:80_000]
    ids = torch.tensor(model.tokenizer.encode(text).ids[:16 * 256]).view(16, 256)  # 4096 tokens
    return model, ids


def test_float32_distances_match_float64_on_text(nano_text):
    model, ids = nano_text
    with torch.no_grad():
        psi = model.embed(ids)
        fast = model.topo(psi, ids=ids)  # float32, exact zeros by id
        slow = model.topo(psi)  # float64, no ids
        d32 = pairwise_distances(psi, psi, ids, ids)
    same = ids.unsqueeze(-1) == ids.unsqueeze(-2)
    assert (same.sum() - same.diagonal(dim1=-2, dim2=-1).sum()) > 1000  # the text repeats tokens: the test has teeth
    assert d32.dtype == torch.float32 and torch.equal(d32 == 0, same)
    assert (fast.weights - slow.weights).abs().max() <= 1e-6
    assert (fast.soft - slow.soft).abs().max() <= 1e-6  # a repeated token 1e-3 away instead of 0 would show here
    assert fast.weights.min() < 0.9  # some weights are not 1: w itself is compared, not a constant


def test_cache_keeps_the_ids_beside_the_points(micro, ids):
    cache = qtg.QTGCache()
    with torch.inference_mode():
        full = micro(ids).topo_weights
        micro(ids[:, :40], cache=cache)
        steps = [micro(ids[:, t:t + 1], cache=cache).topo_weights for t in range(40, ids.shape[1])]
    assert torch.equal(cache.ids, ids) and cache.points.shape[:2] == ids.shape
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 40:], rtol=0, atol=1e-6)
    # ids out of step with the points are not trusted: the float64 path is used instead
    psi = micro.embed(ids[:, 40:41])
    stale = micro.topo(psi, cache.points, ids=ids[:, 40:41], past_ids=ids[:1])
    fresh = micro.topo(psi, cache.points)
    torch.testing.assert_close(stale.weights, fresh.weights, rtol=0, atol=0)


_FAULTS_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from qtg.malloc import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def one_round():
        ts = [torch.ones(3 * 2**20) for _ in range(4)]  # 4 x 12 MiB temporaries, freed together
        del ts
    for _ in range(3):
        one_round()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        one_round()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_the_page_faults():
    # glibc's default mmap threshold adapts (run to run, 0 to 20,000 faults here); fixed at 128 KiB, every
    # temporary is mapped and unmapped, as on a step's first steps: keep_freed_memory must override it
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                                       env=env, check=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 100_000  # 10 rounds x 4 x 3072 pages
    assert faults["keep"] < 300
