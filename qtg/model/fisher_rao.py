"""Fisher-Rao (Bhattacharyya) attention kernels, docs/model.md §3.

Per head, queries and keys are mapped to the probability simplex,
``p_i = softmax(Q_i)`` and ``q_j = softmax(K_j)`` over the ``d_h`` features, and

    BC_ij   = sum_k sqrt(p_ik q_jk) = <sqrt p_i, sqrt q_j>        (a matmul)
    d_FR    = arccos(BC_ij) in [0, pi/2]
    score_ij = -gamma_h * d_FR(i, j)^2  [- m_h * (i - j) with ALiBi],  j <= i
    A = softmax_j(score),  out = A V

Two interchangeable implementations of the same function:

* :func:`attention_reference` - the matmul form with an explicit ``[B, H, Nq, Nk]``
  score matrix. Works on every device, has a backward everywhere.
* :func:`attention_flex` - ``torch.nn.attention.flex_attention`` with the score
  above as a ``score_mod`` and a causal block mask: fused, O(N) memory. In
  torch 2.13 it has no backward on CPU.

With gradients, :func:`attention_reference` runs :func:`fused_attention`: the
same arithmetic as one autograd Function with a hand-written backward, in
blocks of query rows (the training step's kernel on CPU).

Numerics (docs/model.md §8): BC is always computed in float32, also under
bf16 autocast (bf16 cannot resolve distances below ~0.09 near BC = 1); and
d_FR^2 uses :func:`fr_sq`, whose gradient stays finite at BC = 1 (where
arccos has an infinite derivative) and beyond it (rounding).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this 1 - BC, arccos(BC)^2 is evaluated by its Taylor series
# 2u + u^2/3 + 4u^3/45 (u = 1 - BC): truncation error ~u^4 < 1e-12.
_SERIES_BELOW = 1e-3


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for 16- and 32-bit inputs (BC needs it), float64 for float64 ones."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, skipping the call when it would do nothing (it costs ~4 us per decoding op)."""
    return x if x.dtype == dtype else x.to(dtype)


def sqrt_simplex(x: Tensor) -> Tensor:
    """sqrt(softmax(x)) over the last dim, in float32 (float64 for a float64 ``x``).

    Computed as exp(log_softmax(x) / 2), which never takes the square root of
    an underflowed probability (sqrt has an infinite derivative at 0).
    """
    return torch.exp(0.5 * F.log_softmax(as_dtype(x, compute_dtype(x)), dim=-1))


def fr_sq_traceable(bc: Tensor) -> Tensor:
    """d_FR^2 = arccos(BC)^2 with a finite gradient everywhere, as plain ops.

    d/dBC arccos(BC)^2 = -2 arccos(BC) / sqrt(1 - BC^2) -> -2 as BC -> 1, but
    autograd through ``acos`` gives inf * 0 = nan there. Near 1 (and above 1,
    which rounding produces when p = q) we use the series in u = 1 - BC; the
    ``acos`` branch sees a safe dummy input there, so neither branch of the
    ``where`` produces a non-finite gradient. Used inside flex's score_mod,
    which must be traceable; elsewhere :func:`fr_sq` does the same in less memory.
    """
    u = 1.0 - bc
    near = u < _SERIES_BELOW
    series = u * (2.0 + u * (1.0 / 3.0 + u * (4.0 / 45.0)))
    safe_bc = torch.where(near, torch.zeros_like(bc), bc).clamp(min=-1.0)
    exact = torch.acos(safe_bc) ** 2
    return torch.where(near, series, exact)


class _FrSq(torch.autograd.Function):
    """arccos(BC)^2 with a hand-written backward (:func:`fr_sq_grad`): saves one
    tensor, arccos(BC) (autograd through the where-branches would save six),
    and runs in place (benchmarks/bench_speed.py --ablate times it against the
    previous backward)."""

    @staticmethod
    def forward(ctx, bc: Tensor) -> Tensor:
        a = bc.clamp(max=1.0).acos_()  # rounding can push BC above 1
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        return fr_sq_grad(a).mul_(grad)


def fr_sq_grad(a: Tensor) -> Tensor:
    """d/dx arccos(x)^2 at x = cos(a), for a = arccos(x) (BC in [0, 1]: a in [0, pi/2]): -2 a / sin(a), -2 at 0.

    Since sqrt(1 - x^2) = sin(arccos x), this is the textbook -2 arccos(x) /
    sqrt(1 - x^2) written in the saved ``a`` alone, in one fresh buffer (on the
    ``[B, H, N, N]`` maps of a training step every temporary costs more than
    the arithmetic). a / sin(a) keeps a few-ulp relative error right down to
    a -> 0 (float32 1.2e-7, float64 4e-16 against the exact derivative at the
    rounded x: tests/test_speed_exactness.py); only the 0/0 at a = 0 (BC = 1)
    needs its limit, which a floor of 1e-30 on a gives. The series
    2 + 2u/3 + 4u^2/15 in u = 1 - x, which the traced form
    :func:`fr_sq_traceable` keeps, is no more accurate in float32 and less so
    in float64.
    """
    a = a.clamp(min=1e-30)  # sin(1e-30) = 1e-30 exactly: the ratio is 1 at a = 0, not 0/0
    return torch.div(a, torch.sin(a), out=a).mul_(-2.0)  # a / sin(a) is bit-identical for a >= 1e-30


def fr_sq(bc: Tensor) -> Tensor:
    """d_FR^2 = arccos(BC)^2, finite gradient everywhere (-> -2 at BC = 1 and above)."""
    return _FrSq.apply(bc)


def alibi_slopes(n_heads: int, device: torch.device | str | None = None) -> Tensor:
    """ALiBi slopes m_h = 2^(-8h/H), h = 1..H (docs/model.md §3), float32 ``[H]``.

    Built once per (H, device) and shared (:data:`TABLES`): do not modify the result in place.
    """
    if torch.compiler.is_compiling():
        return _alibi_slopes(n_heads, device)
    return TABLES.slopes(n_heads, device)


def _alibi_slopes(n_heads: int, device: torch.device | str | None) -> Tensor:
    h = torch.arange(1, n_heads + 1, dtype=torch.float32, device=device)
    return torch.pow(2.0, -8.0 * h / n_heads)


def no_autocast(t: Tensor):
    """Autocast off: inside, matmuls keep the dtype of their inputs (float32 BC, float64 distances).

    A no-op context where autocast is off already (entering torch.autocast costs ~14 us).
    """
    if not torch.is_autocast_enabled(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


# The additive score bias (ALiBi and the causal mask) depends only on i - j, so
# one square [H, L, L] matrix per (heads, device, dtype) serves every call as a
# block of rows and columns: training, prefill and each decoding row. Built once
# instead of per layer and token (5 ops each, 13 % of a decoding step). Above
# this size it is built per call instead (long contexts with many heads).
_BIAS_CACHE_BYTES = 64 * 2**20


class SharedTables:
    """The ALiBi slopes and the square score-bias matrices, built once per key and shared by every layer and call.

    Forward passes run in several threads at once (the app's request threads beside the decoding engine's
    loop), so one lock guards looking a table up, building it and growing it: each is built once however
    many threads ask together, and a grown matrix never gives way to a smaller one. The tables are plain
    tensors (built outside inference mode, so usable in and out of it): callers must not modify them.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # bias() takes slopes() under it
        self._slopes: dict[tuple[int, torch.device], Tensor] = {}
        self._bias: dict[tuple[int | None, torch.device, torch.dtype], Tensor] = {}

    def slopes(self, n_heads: int, device: torch.device | str | None) -> Tensor:
        """:func:`alibi_slopes`'s ``[H]``, built on first use."""
        key = (n_heads, torch.device(device or "cpu"))
        with self._lock:
            if key not in self._slopes:
                with torch.inference_mode(False), torch.no_grad():
                    self._slopes[key] = _alibi_slopes(n_heads, device)
            return self._slopes[key]

    def bias(self, n_heads: int | None, device: torch.device, dtype: torch.dtype, size: int) -> Tensor:
        """The ``[H or 1, S, S]`` bias of :func:`build_bias` from position 0, S >= ``size``: the one kept,
        or, when none is or it is smaller, one of exactly ``size`` built and kept instead."""
        key = (n_heads, torch.device(device), dtype)
        with self._lock:
            full = self._bias.get(key)
            if full is None or full.shape[-1] < size:
                with torch.inference_mode(False), torch.no_grad():
                    slopes = self.slopes(n_heads, device) if n_heads else None
                    full = self._bias[key] = build_bias(slopes, 0, size, size, device, dtype)
            return full


TABLES = SharedTables()  # the process's one set: every model of a shape shares its tables


def build_bias(slopes: Tensor | None, q_offset: int, nq: int, nk: int,
               device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
    """-m_h (i - j) for keys j <= i and -inf above the causal diagonal, queries at q_offset...

    Returns ``[H, Nq, Nk]`` (``[1, Nq, Nk]``, zeros and -inf, without slopes).
    Adding it equals subtracting ``m_h (i - j)`` and masking (negation is exact).
    """
    i = torch.arange(q_offset, q_offset + nq, device=device).view(-1, 1)  # query positions
    j = torch.arange(nk, device=device).view(1, -1)  # key positions
    if slopes is None:
        bias = torch.zeros(1, nq, nk, dtype=dtype, device=device)
    else:
        bias = -slopes.to(dtype).view(-1, 1, 1) * (i - j).clamp(min=0).to(dtype)
    return bias.masked_fill(j > i, float("-inf"))


def score_bias(n_heads: int | None, q_offset: int, nq: int, nk: int,
               device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`build_bias` with the slopes ``alibi_slopes(n_heads)`` (None: causal mask only), from the cache.

    Returns a view ``[H, Nq, Nk]`` (``[1, Nq, Nk]``) into the cached matrix; under
    ``torch.compile`` it is built in the graph instead (no Python state to guard on).
    """
    need = max(q_offset + nq, nk)
    size = max(256, 1 << (need - 1).bit_length())  # grow by powers of two: few rebuilds while decoding
    if torch.compiler.is_compiling() or (n_heads or 1) * size * size * dtype.itemsize > _BIAS_CACHE_BYTES:
        slopes = alibi_slopes(n_heads, device) if n_heads else None
        return build_bias(slopes, q_offset, nq, nk, device, dtype)
    return TABLES.bias(n_heads, device, dtype, size)[:, q_offset:q_offset + nq, :nk]


def _scores(sp: Tensor, sk: Tensor, gamma: Tensor, slopes: Tensor | None, q_offset: int,
            bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Masked scores and BC for queries at positions q_offset.. and keys at 0...

    Args:
        sp: sqrt of query distributions, float32 ``[B, H, Nq, d_h]``.
        sk: sqrt of key distributions, float32 ``[B, H, Nk, d_h]``.
        gamma: ``[H]``.  slopes: ``[H]`` or None (NoPE).
        bias: the additive ALiBi + mask bias ``[H or 1, Nq, Nk]`` (:func:`score_bias`);
            None builds it from ``slopes``.
    Returns:
        scores ``[B, H, Nq, Nk]`` with -inf above the causal diagonal, and BC.

    Without gradients the same arithmetic runs in place and without the
    autograd Function (a decoding step is bound by per-op overhead); the
    result is bit-identical to the autograd path.
    """
    nq, nk = sp.shape[-2], sk.shape[-2]
    dtype = compute_dtype(sp)
    with no_autocast(sp):  # autocast would run this matmul in bf16
        bc = as_dtype(sp, dtype) @ as_dtype(sk, dtype).transpose(-1, -2)  # [B, H, Nq, Nk], float32 (or float64)
    if bias is None:
        bias = build_bias(slopes, q_offset, nq, nk, sp.device, dtype)
    neg_gamma = -as_dtype(gamma, dtype).view(1, -1, 1, 1)
    if torch.is_grad_enabled():
        scores = fr_sq(bc) * neg_gamma
    else:  # fr_sq's forward, in place on a copy (bc is returned for the maps)
        scores = torch.acos_(bc.clamp(max=1.0))
        scores = scores.mul_(scores).mul_(neg_gamma)
    return scores.add_(as_dtype(bias, dtype)), bc


def attention_reference(
    sp: Tensor, sk: Tensor, v: Tensor, gamma: Tensor, slopes: Tensor | None = None, q_offset: int = 0,
    bias: Tensor | None = None,
) -> Tensor:
    """Causal Fisher-Rao attention, matmul form.

    Args:
        sp, sk: float32 sqrt-simplex queries ``[B, H, Nq, d_h]`` and keys ``[B, H, Nk, d_h]``.
        v: values ``[B, H, Nk, d_h]`` (any float dtype).
        gamma: ``[H]``; slopes: ``[H]`` ALiBi slopes or None.
        q_offset: absolute position of the first query (keys start at 0); a
            decoding step with a cache has ``Nq = 1, q_offset = Nk - 1``.
        bias: the ALiBi + mask bias from :func:`score_bias` (then ``slopes`` is
            not read), or None to build it from ``slopes``.
    Returns:
        ``[B, H, Nq, d_h]`` in v's dtype.
    """
    if torch.is_grad_enabled():  # training: the fused Function, blocks of query rows (:func:`fused_attention`)
        dtype = compute_dtype(sp)
        if bias is None:
            bias = build_bias(slopes, q_offset, sp.shape[-2], sk.shape[-2], sp.device, dtype)
        with no_autocast(sp):
            out = fused_attention(as_dtype(sp, dtype), as_dtype(sk, dtype), as_dtype(v, dtype),
                                  as_dtype(gamma, dtype), as_dtype(bias, dtype), q_offset)
        return as_dtype(out, v.dtype)
    scores, _ = _scores(sp, sk, gamma, slopes, q_offset, bias)
    attn = torch.softmax(scores, dim=-1)
    with no_autocast(attn):
        return as_dtype(attn @ as_dtype(v, attn.dtype), v.dtype)


# Query rows per block of :func:`fused_attention`; measured by benchmarks/bench_speed.py --ablate.
FUSED_BLOCK_ROWS = 32
# a = arccos(BC) is floored here so that a / sin(a) is never 0/0 (BC = 1): the floor's square underflows to 0,
# so the scores are unchanged, and ds * a / sin(a) = ds exactly for |ds| > 2^-46 (float32; 2^-422 float64).
_ACOS_FLOOR = {torch.float32: 2.0**-80, torch.float64: 2.0**-600}


class _FusedAttention(torch.autograd.Function):
    """softmax(-gamma arccos(BC)^2 + bias) V with BC = sp sk^T, one Function with a hand-written backward.

    The composition in :func:`_scores` walks the ``[B, H, Nq, Nk]`` maps about
    twenty times in a training step (each op, its autograd node, fresh
    temporaries). Here, per block of query rows, the forward runs in place on
    its own BC and saves only a = arccos(BC) and A; the backward reuses them in
    place. With s = -gamma a^2 + bias, A = softmax(s), out = A V:

        dV = A^T dout,   dA = dout V^T,   ds = A * (dA - rowsum(dA * A))
        dgamma_h = -sum ds a^2,   dBC = ds * (-gamma)(-2a / sin a) = 2 gamma (ds a) / sin a
        dsp = dBC sk,   dsk = dBC^T sp          (2 gamma_h is applied to the small products)

    Blocks of query rows skip the keys after their last query, which the
    causal bias masks anyway (44 % of the maps at N = 256 in blocks of 32), and keep the
    maps of one block in cache between its passes. ``bias`` must therefore be
    -inf above the causal diagonal (:func:`score_bias`, :func:`build_bias`).
    Not twice differentiable, and its backward runs once (it reuses the saved maps).
    """

    @staticmethod
    def forward(ctx, sp: Tensor, sk: Tensor, v: Tensor, gamma: Tensor, bias: Tensor, q_offset: int) -> Tensor:
        (B, H, nq, _), nk = sp.shape, sk.shape[-2]
        # [B*H, N, d]: a block's key slice [:, :k1] is then a strided view bmm takes as it is (4D slices are copied)
        sp3, sk3, v3 = (t.reshape(B * H, *t.shape[-2:]) for t in (sp, sk, v))
        neg_gamma = -gamma.view(1, -1, 1, 1)
        floor = _ACOS_FLOOR[sp.dtype]
        outs, maps = [], []
        for q0, q1, k1 in _row_blocks(nq, nk, q_offset):
            a = torch.bmm(sp3[:, q0:q1], sk3[:, :k1].transpose(1, 2)).clamp_(max=1.0).acos_().clamp_(min=floor)
            s = (a * a).view(B, H, q1 - q0, k1).mul_(neg_gamma).add_(bias[:, q0:q1, :k1])  # as in _scores
            attn = torch._softmax(s, -1, False, out=s).view(B * H, q1 - q0, k1)  # in place: A overwrites s
            outs.append(torch.bmm(attn, v3[:, :k1]))
            maps += [a, attn]
        ctx.save_for_backward(sp3, sk3, v3, gamma, *maps)
        ctx.q_offset = q_offset
        ctx.done = False
        return torch.cat(outs, dim=1).view(B, H, nq, v.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        if ctx.done:
            raise RuntimeError("fused Fisher-Rao attention: backward ran twice (retain_graph is not supported)")
        ctx.done = True
        sp3, sk3, v3, gamma, *maps = ctx.saved_tensors
        B, H, nq, _ = dout.shape
        dout3 = dout.reshape(B * H, nq, -1)
        dsp, dsk3, dv3 = [], torch.zeros_like(sk3), torch.zeros_like(v3)
        dgamma = torch.zeros_like(gamma) if ctx.needs_input_grad[3] else None
        for (q0, q1, k1), a, attn in zip(_row_blocks(nq, sk3.shape[1], ctx.q_offset), maps[0::2], maps[1::2],
                                         strict=True):
            g = dout3[:, q0:q1]
            dv3[:, :k1].add_(torch.bmm(attn.transpose(1, 2), g))  # (baddbmm_ into a slice loops)
            da = torch.bmm(g, v3[:, :k1].transpose(1, 2))
            ds = torch._softmax_backward_data(da, attn, -1, attn.dtype, grad_input=da)  # in place
            t = ds.mul_(a)  # ds * a
            sin_a = torch.sin(a)
            if dgamma is not None:  # -sum ds a^2 (a is not needed any more)
                dgamma.sub_(a.mul_(t).view(B, H, q1 - q0, k1).sum(dim=(0, 2, 3)))
            dbc = t.div_(sin_a)  # dBC / (2 gamma)
            dsp.append(torch.bmm(dbc, sk3[:, :k1]))
            dsk3[:, :k1].add_(torch.bmm(dbc.transpose(1, 2), sp3[:, q0:q1]))
        two_gamma = (2.0 * gamma).view(1, -1, 1, 1)
        dsp = torch.cat(dsp, dim=1).view(B, H, nq, -1).mul_(two_gamma)
        return dsp, dsk3.view(B, H, *sk3.shape[1:]).mul_(two_gamma), dv3.view(B, H, *v3.shape[1:]), dgamma, None, None


def _row_blocks(nq: int, nk: int, q_offset: int):
    """(first row, end row, keys seen) of each block of FUSED_BLOCK_ROWS query rows.

    Query i sees keys j <= q_offset + i, so a block needs none after its last query's position.
    """
    for q0 in range(0, nq, FUSED_BLOCK_ROWS):
        q1 = min(q0 + FUSED_BLOCK_ROWS, nq)
        yield q0, q1, min(nk, q_offset + q1)


def fused_attention(sp: Tensor, sk: Tensor, v: Tensor, gamma: Tensor, bias: Tensor, q_offset: int = 0) -> Tensor:
    """Causal Fisher-Rao attention as one autograd Function (:class:`_FusedAttention`), for training.

    Args:
        sp, sk: sqrt-simplex queries ``[B, H, Nq, d_h]`` and keys ``[B, H, Nk, d_h]``.
        v: values ``[B, H, Nk, d_v]``; gamma ``[H]``; all of one dtype (float32 or float64).
        bias: ``[H or 1, Nq, Nk]`` from :func:`score_bias` (-inf above the causal diagonal).
        q_offset: absolute position of the first query.
    Returns:
        ``[B, H, Nq, d_v]``, equal to :func:`attention_reference`'s composition up to the
        summation order (tests/test_speed_exactness.py).
    """
    return _FusedAttention.apply(sp, sk, v, gamma, bias, q_offset)


def attention_explicit(
    sp: Tensor, sk: Tensor, v: Tensor, gamma: Tensor, bias: Tensor,
    on_distance: Callable[[Tensor], Tensor], on_pattern: Callable[[Tensor], Tensor],
) -> Tensor:
    """:func:`attention_reference`'s matmul form with both maps materialised and open to replacement.

    ``on_distance`` sees d_FR ``[B, H, Nq, Nk]`` and returns the distances the
    scores then use (the same object: the scores are left as computed); ``on_pattern``
    sees A and returns the A that weights V. Without gradients, returning what
    they are given reproduces :func:`attention_reference` bit for bit. Used by
    the named sites ``blocks.{i}.attn.distance`` and ``.pattern`` (qtg.model.activations).
    """
    dtype = compute_dtype(sp)
    scores, bc = _scores(sp, sk, gamma, None, 0, bias)
    distance = torch.acos(bc.clamp(0.0, 1.0))
    new = on_distance(distance)
    if new is not distance:  # the same arithmetic as _scores, on the replaced distances
        scores = (new * new) * -as_dtype(gamma, dtype).view(1, -1, 1, 1) + as_dtype(bias, dtype)
    attn = on_pattern(torch.softmax(scores, dim=-1))
    with no_autocast(attn):
        return as_dtype(attn @ as_dtype(v, attn.dtype), v.dtype)


@torch.no_grad()
def attention_maps(
    sp: Tensor, sk: Tensor, gamma: Tensor, slopes: Tensor | None = None, q_offset: int = 0,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The full maps, for inspection: attention ``A`` and distances ``d_FR``.

    Both ``[B, H, Nq, Nk]`` float32; A is causal with rows summing to 1, d_FR
    lies in [0, pi/2] (also above the diagonal, where A is 0). ``bias`` as in
    :func:`attention_reference`.
    """
    scores, bc = _scores(sp, sk, gamma, slopes, q_offset, bias)
    return torch.softmax(scores, dim=-1), torch.acos(bc.clamp(0.0, 1.0))


# --- flex attention ----------------------------------------------------------


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process; torch.compile then keeps one
    kernel per shape family (dtype, head width, sequence length, ALiBi or not)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=32)
def causal_block_mask(n: int, device: str):
    """The causal block mask for length n on a device, built once and reused."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)


def _score_mod(gamma: Tensor, slopes: Tensor | None):
    """score_mod for flex: gamma (and slopes) are captured *tensors*, so the
    compiled kernel reads them at run time instead of baking in a float."""
    if slopes is None:

        def fisher_rao(score, b, h, q_idx, kv_idx):
            return -gamma[h] * fr_sq_traceable(score)

        return fisher_rao

    def fisher_rao_alibi(score, b, h, q_idx, kv_idx):
        return -gamma[h] * fr_sq_traceable(score) - slopes[h] * (q_idx - kv_idx)

    return fisher_rao_alibi


def attention_flex(sp: Tensor, sk: Tensor, v: Tensor, gamma: Tensor, slopes: Tensor | None = None) -> Tensor:
    """Causal Fisher-Rao attention through flex_attention (self-attention, Nq = Nk).

    Same arguments and result as :func:`attention_reference` with q_offset = 0.
    ``scale=1.0`` because flex multiplies QK^T by ``scale`` before the score_mod
    and BC must reach it unscaled.
    """
    n = sp.shape[-2]
    mask = causal_block_mask(n, str(sp.device))
    out = _compiled_flex()(
        sp, sk, v.float(),
        score_mod=_score_mod(gamma.float(), slopes),
        block_mask=mask, scale=1.0,
    )
    return out.to(v.dtype)


# --- ragged decoding steps: one query per row, each at its own position (qtg.serve) ---


def attention_rows(sp: Tensor, sk: Tensor, v: Tensor, gamma: Tensor, slopes: Tensor | None,
                   q_pos: Tensor) -> Tensor:
    """Fisher-Rao attention of one query per row, each at its own position (a ragged decoding step).

    The same score as :func:`attention_reference`,
    -gamma_h d_FR^2 - m_h (i - j), with i = ``q_pos[b]`` for row b and keys
    after it (that row's padding) masked.

    Args:
        sp: float32 sqrt-simplex queries ``[B, H, 1, d_h]``.
        sk: keys ``[B, H, K, d_h]``, row b's real ones in slots 0..q_pos[b].
        v: values ``[B, H, K, d_h]``.
        gamma: ``[H]``; slopes: ``[H]`` or None (no ALiBi).
        q_pos: ``[B]`` int64, each row's query position.
    Returns:
        ``[B, H, 1, d_h]`` in v's dtype.
    """
    dtype = compute_dtype(sp)
    with no_autocast(sp):
        bc = sp.to(dtype) @ sk.to(dtype).transpose(-1, -2)  # [B, H, 1, K]
    scores = -gamma.to(dtype).view(1, -1, 1, 1) * fr_sq(bc)
    dist = q_pos.view(-1, 1, 1, 1) - torch.arange(sk.shape[-2], device=sk.device)  # [B, 1, 1, K]: i - j
    if slopes is not None:
        scores = scores - slopes.to(dtype).view(1, -1, 1, 1) * dist.clamp(min=0).to(dtype)
    attn = torch.softmax(scores.masked_fill(dist < 0, float("-inf")), dim=-1)
    with no_autocast(attn):
        return (attn @ v.to(attn.dtype)).to(v.dtype)


def ragged_bias(slopes: Tensor | None, q_pos: Tensor, nk: int, dtype: torch.dtype) -> Tensor:
    """The score bias of one query per row at its own position: -m_h (i - j) for keys j <= i, -inf after.

    Args: slopes ``[H]`` or None (no ALiBi); q_pos ``[B]`` int64, row b's query position i; nk keys.
    Returns ``[B, H or 1, 1, K]``, the bias :func:`attention_rows` applies (for the maps of a ragged step).
    """
    dist = q_pos.view(-1, 1, 1, 1) - torch.arange(nk, device=q_pos.device)  # [B, 1, 1, K]: i - j
    bias = torch.zeros(dist.shape, dtype=dtype, device=q_pos.device)
    if slopes is not None:
        bias = -slopes.to(dtype).view(1, -1, 1, 1) * dist.clamp(min=0).to(dtype)
    return bias.masked_fill(dist < 0, float("-inf"))
