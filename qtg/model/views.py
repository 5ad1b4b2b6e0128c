"""What an inspection view of a model needs before it runs, and how its attention maps are shown.

A *view* is one forward pass kept for inspection (``return_internals=True``):
the states of every layer, the TopoFilter's scores and, for the blocks named
in ``map_blocks``, the ``[B, H, N, N]`` attention and Fisher-Rao distance maps;
a generation (a decoding cache, no maps); or a topology view (the states, then
exact diagrams of one layer's cloud and the TopoFilter's view of it, while the
forward's output is held). Its memory grows as ``N^2`` per
map, so a caller (the web app) estimates it with :func:`view_memory` and
refuses, or bounds the tokens with :func:`max_view_tokens`, *before* any work
starts, instead of meeting the allocator's out-of-memory error half-way.

    need = view_memory("7b", 2048, "bf16", map_blocks=1, device="cuda")
    need.request, need.total        # bytes beyond the weights; with the weights
    max_view_tokens("7b", 4 * 2**30, "bf16", map_blocks=1)

:func:`scale_maps` turns attention weights into what a heatmap of a long text
can show (a row of 90 keys is nearly white on a linear scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from qtg.model.config import QTGConfig
from qtg.model.memory import count_params, dtype_bytes
from qtg.model.model import FLEX_MIN_LEN_CPU
from qtg.model.tiers import resolve_config

KINDS = ("internals", "generate", "topology")
SCALES = ("linear", "log", "row")
LOG_FLOOR = 1e-6  # log scale: weights below this are drawn at it (log10 -> -6)

# Live [H, N, N] float tensors while one block scores its keys on the matmul path: BC, its squared
# arccos, the masked scores and their softmax (the attended values are O(N d)). Computing the kept
# maps again (``attention_maps``) holds as many while it runs.
_ATTENTION_TRANSIENTS = 4
# The TopoFilter's pairwise distances [B, N, N] and the masked logits of its soft-min.
_TOPO_TRANSIENTS = 3
# A topology view's float64 copies of the cloud [N, W]: the array read, its distinct rows, the centred points.
_CLOUD_COPIES = 3
# ...and of the kept points' [P, P] matrices: the distances, the ranks the float32 engines get, the engine's copy.
_KEPT_MATRICES = 3


@dataclass(frozen=True)
class ViewMemory:
    """Estimated bytes of one view, batch 1 (an upper bound: every transient counted at its peak).

    ``request`` is what the view allocates beyond the loaded weights; ``total`` includes them.
    """

    tier: str
    dtype: str
    kind: str
    n_tokens: int
    map_blocks: int
    weights: int
    states: int  # every layer's [N, width] states (internals only)
    maps: int  # the kept attention and distance maps
    working: int  # the largest transient: one block's scores, the TopoFilter's distances or the logits
    cache: int  # the decoding cache (generate only)
    topology: int = 0  # a topology view: what its exact diagrams and comparison hold beside the states

    @property
    def request(self) -> int:
        return self.states + self.maps + self.working + self.cache + self.topology

    @property
    def total(self) -> int:
        return self.weights + self.request

    def to_dict(self) -> dict:
        return {**asdict(self), "request": self.request, "total": self.total}


def _uses_flex(cfg: QTGConfig, n_tokens: int, device: str) -> bool:
    """Whether the model's attention runs the fused kernel (no ``N x N`` scores) for this length."""
    if cfg.arch != "qtg" or cfg.attn_impl == "reference":
        return False
    if cfg.attn_impl == "flex":
        return True
    return torch.device(device).type == "cuda" or n_tokens >= FLEX_MIN_LEN_CPU


def view_memory(tier: str | QTGConfig, n_tokens: int | None = None, dtype: str | torch.dtype = "fp32",
                map_blocks: int = 1, kind: str = "internals", device: str = "cpu",
                max_points: int = 1024) -> ViewMemory:
    """Bytes one view of ``n_tokens`` tokens needs, before it runs.

    Args:
        tier: a tier name or config.
        n_tokens: N, the tokens of the text (default: the full context).
        dtype: the weights' dtype; states are kept in it, scores and maps in float32 (float64 for fp64).
        map_blocks: how many blocks keep their ``[H, N, N]`` attention and distance maps
            (``model(..., map_blocks=[...])``); 0 for a view of the states only.
        kind: ``"internals"`` (one forward with ``return_internals``), ``"generate"``
            (a prefill of N tokens into a decoding cache, no states or maps kept) or ``"topology"``
            (internals, then exact diagrams of one layer's states, at most ``max_points`` of them, and
            the TopoFilter's view of the same tokens, with the forward's output held meanwhile).
        device: where it runs (picks the attention kernel: the fused one keeps no scores).
        max_points: a topology view's point limit P.

    Returns:
        :class:`ViewMemory`. With ``H`` heads, ``W = 2d`` and float bytes ``f``::

            states  = (layers + inputs) N W b          maps = map_blocks * 2 H N^2 f
            working = max(4 H N^2 f [matmul path], 3 N^2 f [TopoFilter], 2 N V f [logits],
                          (14 W + 3 h) N b [a block's activations])
            topology = N V f [the logits, held] + 3 N W 8 [float64 copies of the cloud]
                       + 3 N^2 8 [the TopoFilter's view, float64] + 3 P^2 8 [the kept points' matrices]

        The Rips engine's own complex lives in a child process and is not counted.
    """
    cfg = resolve_config(tier)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n = cfg.max_seq_len if n_tokens is None else int(n_tokens)
    if n < 0 or map_blocks < 0:
        raise ValueError(f"n_tokens and map_blocks must be >= 0, got {n} and {map_blocks}")
    b = dtype_bytes(dtype)
    f = 8 if b == 8 else 4
    qtg = cfg.arch == "qtg"
    internals = kind in ("internals", "topology")
    square = n * n * f
    scores = 0 if _uses_flex(cfg, n, device) else _ATTENTION_TRANSIENTS * cfg.n_heads * square
    maps_kept = min(map_blocks, cfg.n_layers) if internals else 0
    working = max(scores, _ATTENTION_TRANSIENTS * cfg.n_heads * square if maps_kept else 0,
                  _TOPO_TRANSIENTS * square if qtg else 0, 2 * n * cfg.vocab_size * f,
                  (14 * cfg.width + 3 * cfg.ffn_hidden) * n * b)
    n_states = cfg.n_layers + (2 if qtg else 1)
    return ViewMemory(
        tier=cfg.name, dtype=str(dtype), kind=kind, n_tokens=n, map_blocks=maps_kept,
        weights=count_params(cfg) * b,
        states=n_states * n * cfg.width * b if internals else 0,
        maps=maps_kept * 2 * cfg.n_heads * square,
        working=working,
        cache=0 if internals else n * (cfg.d_model * cfg.n_layers * (f + b) + cfg.width * b),
        topology=_topology_bytes(cfg, n, max_points, f) if kind == "topology" else 0,
    )


def _topology_bytes(cfg: QTGConfig, n: int, max_points: int, f: int) -> int:
    """What a topology view holds beside the states (see :func:`view_memory`)."""
    kept = min(n, max_points)
    return n * cfg.vocab_size * f + 8 * (_CLOUD_COPIES * n * cfg.width + _TOPO_TRANSIENTS * n * n
                                         + _KEPT_MATRICES * kept * kept)


def max_view_tokens(tier: str | QTGConfig, budget: int, dtype: str | torch.dtype = "fp32", map_blocks: int = 1,
                    kind: str = "internals", device: str = "cpu", max_points: int = 1024) -> int:
    """The largest N (up to the context) whose view's ``request`` fits ``budget`` bytes; 0 if none does."""
    cfg = resolve_config(tier)
    return most_tokens(lambda n: view_memory(cfg, n, dtype, map_blocks, kind, device, max_points).request <= budget,
                       cfg.max_seq_len)


def most_tokens(fits: Callable[[int], bool], context: int) -> int:
    """The largest N in 0..``context`` for which ``fits(N)`` holds, for a ``fits`` true up to some N and false
    beyond (a request's memory grows with N); 0 if none does. Bisection: log2(context) calls."""
    lo, hi = 0, context
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def scale_maps(maps: Tensor, scale: str = "linear") -> Tensor:
    """Attention weights as a heatmap shows them.

    Args:
        maps: ``[..., N, N]`` causal attention, rows summing to 1.
        scale: ``"linear"`` (as is), ``"log"`` (log10 a_ij, floored at 1e-6, so weights spread
            over many keys stay visible) or ``"row"`` (a_ij / max_j a_ij: each query's own
            pattern on [0, 1], however many keys it spreads over).

    Returns:
        float32 tensor of the same shape (masked cells stay whatever the input held there).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    a = maps.detach().float()
    if scale == "log":
        return torch.log10(a.clamp(min=LOG_FLOOR))
    if scale == "row":
        return a / a.amax(dim=-1, keepdim=True).clamp(min=1e-30)
    return a
