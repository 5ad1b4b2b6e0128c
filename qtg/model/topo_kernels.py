"""TopoFilter kernels: distances between token states and the soft-min score, docs/model.md §2.

The TopoFilter (:class:`qtg.model.topo_filter.TopoFilter`) needs delta_ij = ||x_i - x_j||_2
between token states and, per token, the soft-min over earlier tokens

    s~_i = -T log sum_{j<i} exp(-delta_ij / T).

Distances use the Gram form ``|x|^2 + |y|^2 - 2<x, y>`` (no ``[N, N, 2d]``
tensor). In float32 its cancellation error is ~1e-6 in the *squared* distance,
which alone would leave repeated tokens 1e-3 apart instead of 0, so with the
token ids at hand equal ids read exactly 0 (elsewhere float32 moves w by < 1e-6,
tests/test_speed_exactness.py). Given points without ids, they are computed in
float64, where squared distances below 1e-12 read as 0. Those zeros get a zero
gradient: sqrt has an infinite derivative at 0.

:func:`soft_min_distance` is the training step's kernel: the same arithmetic as
the TopoFilter's composition, as one autograd Function with a hand-written
backward (benchmarks/bench_speed.py measures it against the composition).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qtg.model.fisher_rao import compute_dtype, no_autocast

# Distances whose square is below this read as 0 (float64 Gram-form resolution).
_DIST_SQ_FLOOR = 1e-12


def pairwise_distances(x: Tensor, y: Tensor, x_ids: Tensor | None = None, y_ids: Tensor | None = None) -> Tensor:
    """delta_ij = ||x_i - y_j||_2 by the Gram form, float32 (float64 for float64 x).

    Args: x ``[B, Nq, D]``, y ``[B, Nk, D]``; optionally the token ids ``[B, Nq]``,
    ``[B, Nk]`` the points are embeddings of. Returns ``[B, Nq, Nk]``.

    With ids (and x not float64) it is computed in float32 and reads exactly 0
    where the ids are equal (equal ids are equal points; the Gram form's
    cancellation alone would leave them ~1e-3 apart); elsewhere its rounding
    moves a distance by ~5e-7 (QEmbed points are unit vectors; in the shipped
    nano no two distinct tokens are closer than 0.5), w by < 1e-6
    (tests/test_speed_exactness.py). Without ids it is computed in float64, where squared distances
    below 1e-12 read as 0. Both give those zeros a zero gradient (sqrt has an
    infinite derivative at 0).
    """
    if x_ids is not None and y_ids is not None and x.dtype != torch.float64:
        return _distances_by_ids(x, y, x_ids, y_ids)
    out_dtype = compute_dtype(x)
    x, y = x.double(), y.double()
    with no_autocast(x):
        sq = (x * x).sum(-1).unsqueeze(-1) + (y * y).sum(-1).unsqueeze(-2) - 2.0 * (x @ y.transpose(-1, -2))
        far = sq > _DIST_SQ_FLOOR
        dist = torch.where(far, torch.sqrt(torch.where(far, sq, torch.ones_like(sq))), torch.zeros_like(sq))
    return dist.to(out_dtype)


def _distances_by_ids(x: Tensor, y: Tensor, x_ids: Tensor, y_ids: Tensor) -> Tensor:
    """:func:`pairwise_distances` in float32, exactly 0 where ``x_ids[b, i] == y_ids[b, j]``."""
    x, y = x.float(), y.float()
    with no_autocast(x):
        norms = (x * x).sum(-1).unsqueeze(-1) + (y * y).sum(-1).unsqueeze(-2)  # [B, Nq, Nk]
        sq = torch.baddbmm(norms, x, y.transpose(-1, -2), alpha=-2.0)  # |x|^2 + |y|^2 - 2<x, y>
    same = x_ids.unsqueeze(-1) == y_ids.unsqueeze(-2)  # [B, Nq, Nk]
    return torch.sqrt(sq.clamp(min=_DIST_SQ_FLOOR)).masked_fill(same, 0.0)


class _SoftMinDistance(torch.autograd.Function):
    """s~_i = -T log sum_{j<i} exp(-delta_ij / T) of N points among themselves, with a hand-written backward.

    The forward is :meth:`qtg.model.topo_filter.TopoFilter.forward`'s arithmetic (float32 distances by
    ids, :func:`_distances_by_ids`); it keeps W_ij = p_ij / delta_ij, p the
    soft-min's softmax weights (0 where j >= i), W = 0 where delta has no
    gradient (equal ids, squared distance below the floor) and on the first row.
    With sq_ij = |x_i|^2 + |x_j|^2 - 2 <x_i, x_j> and g = dL/ds~:

        dL/dsq_ij = g_i p_ij / (2 delta_ij) = g_i W_ij / 2 =: G_ij
        dL/dx_k   = 2 x_k (sum_j G_kj + sum_i G_ik) - 2 (G x + G^T x)_k

    one pass over ``[B, N, N]`` and two matmuls, where autograd through the
    composition (logsumexp, division, mask, sqrt, clamp, Gram form) takes about a dozen.
    """

    @staticmethod
    def forward(ctx, x: Tensor, ids: Tensor, temperature: float) -> Tensor:
        n = x.shape[1]
        delta = _distances_by_ids(x, x, ids, ids)  # [B, N, N], float32
        i = torch.arange(n, device=x.device).view(-1, 1)
        j = torch.arange(n, device=x.device).view(1, -1)
        keep = (j < i) | ((i == 0) & (j == 0))  # the first row's dummy entry, as in TopoFilter.forward
        logits = (delta / -temperature).masked_fill_(~keep, float("-inf"))
        # torch.logsumexp's own steps (bit for bit), keeping its exp(l - max) for the weights p
        top = logits.amax(dim=-1, keepdim=True)  # [B, N, 1], finite: every row keeps an entry
        e = logits.sub_(top).exp_()
        total = e.sum(dim=-1, keepdim=True)
        lse = total.log().add_(top).squeeze(-1)  # [B, N]
        soft = (-temperature * lse).masked_fill_((i == 0).view(1, -1), 0.0)
        w = e.div_(total).div_(delta)  # p / delta
        clamped = math.sqrt(_DIST_SQ_FLOOR)  # float32 sqrt(1e-12) rounds to float32(1e-6), the comparison's value
        no_grad = delta <= clamped  # equal ids (0) or clamped: no gradient, as in the composition
        no_grad[:, 0] = True  # the first token: s~_1 = 0
        ctx.save_for_backward(x, w.masked_fill_(no_grad, 0.0))
        return soft

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        g = w * (0.5 * grad).unsqueeze(-1)  # dL/dsq [B, N, N]
        sums = (g.sum(-1) + g.sum(-2)).unsqueeze(-1)  # [B, N, 1]
        gx = torch.baddbmm(torch.bmm(g, x), g.transpose(-1, -2), x)  # (G + G^T) x
        return (x * sums).sub_(gx).mul_(2.0), None, None


def soft_min_distance(x: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """s~ ``[B, N]`` of points ``x`` ``[B, N, 2d]`` with token ids ``[B, N]``, float32 (:class:`_SoftMinDistance`)."""
    return _SoftMinDistance.apply(x.float(), ids, temperature)

