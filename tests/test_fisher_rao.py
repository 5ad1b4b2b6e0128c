"""The Fisher-Rao kernels on their own: d_FR^2, its gradient at BC = 1, float32 BC."""

import math

import pytest
import torch

from qtg.model.fisher_rao import (
    alibi_slopes,
    attention_maps,
    attention_reference,
    fr_sq,
    fr_sq_traceable,
    sqrt_simplex,
)

FR_SQ = [fr_sq, fr_sq_traceable]


@pytest.mark.parametrize("f", FR_SQ)
def test_fr_sq_equals_arccos_squared(f):
    bc = torch.linspace(0.0, 1.0, 10001, dtype=torch.float64)
    torch.testing.assert_close(f(bc), torch.acos(bc) ** 2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("f", FR_SQ)
def test_fr_sq_gradient_is_finite_and_tends_to_minus_two_at_one(f):
    bc = torch.tensor([0.5, 0.999, 1.0 - 1e-6, 1.0, 1.0 + 1e-7], dtype=torch.float64, requires_grad=True)
    f(bc).sum().backward()
    assert torch.isfinite(bc.grad).all()
    # analytic derivative -2 acos(x)/sqrt(1-x^2) where it is defined
    x = bc.detach()[:3]
    expected = -2 * torch.acos(x) / torch.sqrt(1 - x**2)
    torch.testing.assert_close(bc.grad[:3], expected, rtol=1e-6, atol=1e-9)
    assert bc.grad[3].item() == pytest.approx(-2.0)
    assert bc.grad[4].item() == pytest.approx(-2.0, abs=1e-6)


def test_both_fr_sq_forms_have_the_same_gradient():
    bc = torch.rand(2000, dtype=torch.float64) ** 0.05  # many values near 1
    grads = []
    for f in FR_SQ:
        x = bc.clone().requires_grad_(True)
        f(x).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-9)
    # autograd through a bare acos is exactly what fails here
    raw = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    (torch.acos(raw) ** 2).sum().backward()
    assert not torch.isfinite(raw.grad).all()


def test_sqrt_simplex_is_unit_norm_float32_even_from_bf16():
    x = torch.randn(3, 5, 16).to(torch.bfloat16)
    s = sqrt_simplex(x)
    assert s.dtype == torch.float32
    torch.testing.assert_close((s * s).sum(-1), torch.ones(3, 5), rtol=1e-5, atol=1e-6)


def test_identical_query_and_key_give_distance_zero_and_finite_grads():
    q = torch.randn(1, 2, 6, 8, requires_grad=True)
    sp = sqrt_simplex(q)
    v = torch.randn(1, 2, 6, 8, requires_grad=True)
    out = attention_reference(sp, sp, v, torch.ones(2))
    out.square().sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    _, dist = attention_maps(sp, sp, torch.ones(2))
    assert dist.diagonal(dim1=-2, dim2=-1).abs().max() < 2e-3  # BC = 1 up to float32 rounding


def test_alibi_slopes_follow_the_spec():
    s = alibi_slopes(4)
    torch.testing.assert_close(s, torch.tensor([2 ** (-8 * h / 4) for h in range(1, 5)]))


def test_gamma_one_bounds_the_contrast():
    """With gamma = 1 scores lie in [-(pi/2)^2, 0]: no key can get more than e^2.47 times another's weight."""
    sp = sqrt_simplex(torch.randn(1, 1, 32, 8) * 10)
    sk = sqrt_simplex(torch.randn(1, 1, 32, 8) * 10)
    attn, _ = attention_maps(sp, sk, torch.ones(1))
    row = attn[0, 0, -1]
    assert (row.max() / row.min()).item() <= math.exp((math.pi / 2) ** 2) * (1 + 1e-5)
