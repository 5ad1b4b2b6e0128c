"""What QTG and its baseline share: the forward's output, the id check, and :class:`DecoderLM`.

:class:`DecoderLM` is the base both models derive from: the members of
:class:`qtg.model.protocol.LanguageModel` that read the same modules in either
(``embed``, ``blocks``, ``norm``), the state names, the call's checks and
:meth:`~DecoderLM.run_with_cache`. The layers themselves are in
:mod:`qtg.model.model` (QTG) and :mod:`qtg.model.baseline`.

Shapes: B batch, N tokens, V vocab, 2d the real width, H heads, d_h = d / H.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from qtg.model.activations import NO_SITES, Names, Sites, select_names
from qtg.model.cache import QTGCache
from qtg.model.config import QTGConfig
from qtg.model.intervention import NO_INTERVENTION, Intervention
from qtg.model.topo_filter import TopoScores

IGNORE_INDEX = -100

@dataclass
class QTGOutput:
    """What :meth:`QTG.forward` returns. Internals are None unless asked for, except the TopoFilter's
    weights, which every QTG forward computes anyway (``[B, N]``, small)."""

    logits: Tensor  # [B, N, V]
    loss: Tensor | None = None  # scalar, when targets are given
    loss_terms: dict[str, Tensor] | None = None  # ce, topo, geo, quantum
    states: list[Tensor] | None = None  # [B, N, 2d]: 0 QEmbed, 1 TopoFilter, then one per block
    topo_scores: Tensor | None = None  # s~ (soft-min, with the intervention's T), [B, N]
    topo_exact_scores: Tensor | None = None  # s (causal min distance), [B, N]
    topo_weights: Tensor | None = None  # w as applied (after the intervention), [B, N]; always set by QTG
    attention: list[Tensor | None] | None = None  # per block [B, H, N, N] (None where not in map_blocks)
    distances: list[Tensor | None] | None = None  # per block d_FR [B, H, N, N] in [0, pi/2], likewise
    gamma: list[Tensor | None] | None = None  # per block [H] as applied, likewise
    attn_impl: list[str] | None = None  # per block, which path ran


def check_ids(ids: Tensor, vocab_size: int, values: bool = True) -> None:
    """A clear error for ids of the wrong shape or outside the vocabulary (not an IndexError deep inside).

    ``values=False`` checks the shape alone: reading the range costs two host syncs on a GPU, so a
    decoding loop whose ids were checked once per request (:class:`QTGCache` ``checked_ids``) skips it."""
    if ids.dim() != 2:
        raise ValueError(f"ids must be [B, N], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("ids is empty: at least one token is needed")
    if not values:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got ids from {lo} to {hi}")


class DecoderLM(nn.Module):
    """What QTG and its baseline declare about themselves, so no caller sniffs: both implement
    :class:`qtg.model.protocol.LanguageModel`, the only members code outside :mod:`qtg.model` uses.

    Attributes:
        arch: ``"qtg"`` or ``"baseline"`` (the config's ``arch``).
        has_topofilter: whether the model has a TopoFilter (and GeoAttention): :meth:`embed_points` and
            :meth:`topo_scores` answer only then.
        keeps_cache: ``cache=`` (incremental decoding) is accepted.
        state_names: the names of the states ``out.states`` holds, in order.
        tokenizer: the tokenizer the weights were trained with, or None.
        checkpoint_dir: the checkpoint the weights came from, or None.
        random_weights: True until trained weights are loaded.
    """

    has_topofilter: bool = False
    keeps_cache: bool = True
    input_state_names: tuple[str, ...] = ()

    def __init__(self, cfg: QTGConfig):
        super().__init__()
        self.cfg = cfg
        self.arch: str = cfg.arch
        self.tokenizer: Any = None  # a tokenizers.Tokenizer; set by qtg.load and by training
        self.checkpoint_dir: Path | None = None
        self.random_weights: bool = True

    @property
    def state_names(self) -> list[str]:
        """The inputs' states, then ``block 0`` ... ``block L-1``: each block's output, numbered from 0 as
        ``blocks.{b}`` sites and ``Intervention(ablate_heads={b: ...})`` number them."""
        return [*self.input_state_names, *(f"block {b}" for b in range(self.cfg.n_layers))]

    def check_forward_args(self, intervene: Intervention | None, map_blocks: Collection[int] | None) -> Intervention:
        """The call's intervention (default: none), checked against this model; ``map_blocks`` in range."""
        intervene = NO_INTERVENTION if intervene is None else intervene
        if not isinstance(intervene, Intervention):
            raise TypeError(f"intervene must be a qtg.Intervention, got {type(intervene).__name__}")
        if intervene is not NO_INTERVENTION:
            intervene.check(self)
        if map_blocks is not None:
            bad = [b for b in map_blocks if not (isinstance(b, int) and 0 <= b < self.cfg.n_layers)]
            if bad:
                raise ValueError(f"map_blocks {bad} out of range 0..{self.cfg.n_layers - 1}")
        return intervene

    def layers(self) -> list[nn.Module]:
        """The blocks in order: what sharding wraps one by one (``qtg.distributed.parallelize``)."""
        return list(self.blocks)

    # --- the TopoFilter per token (QTG answers; a model without one says so) -------------------------
    def embed_points(self, ids: Tensor) -> Tensor:
        """The QEmbed states ``[B, N, 2d]`` of ``ids`` ``[B, N]``, the points the TopoFilter measures."""
        raise TypeError(self._no_topofilter())

    def topo_scores(self, points: Tensor, past: Tensor | None = None, intervene: Intervention | None = None, *,
                    ids: Tensor | None = None, past_ids: Tensor | None = None,
                    lengths: Tensor | None = None) -> TopoScores:
        """s~, s and w ``[B, N]`` of the tokens whose QEmbed states are ``points`` ``[B, N, 2d]`` after the
        earlier states ``past`` ``[B, P, 2d]`` (arguments as :meth:`TopoFilter.forward`'s), s always computed."""
        raise TypeError(self._no_topofilter())

    def _no_topofilter(self) -> str:
        return f"the {self.arch} model {self.cfg.name!r} has no TopoFilter (model.has_topofilter is False)"

    # --- what readers of the residual stream need (direct logit attribution, the lens) ---------------
    def final_norm(self, x: Tensor) -> Tensor:
        """The final RMSNorm of a state ``[..., 2d]`` (what the tied head reads)."""
        return self.norm(x)

    def attention_projection(self, layer: int, which: str, x: Tensor) -> Tensor:
        """Block ``layer``'s query (``which="queries"``) or key (``"keys"``) projection ``[B, N, H d_h]`` of its
        input ``x`` ``[B, N, 2d]`` (``blocks.{layer}.resid_pre``), normed as the block norms it."""
        if which not in ("keys", "queries"):
            raise ValueError(f"which must be 'keys' or 'queries', got {which!r}")
        block = self.blocks[layer]
        return (block.attn.wk if which == "keys" else block.attn.wq)(block.attn_norm(x))

    def unembedding(self) -> Tensor:
        """The tied output head ``[V, 2d]``: logits = final_norm(x) @ unembedding().T."""
        return self.embed.weight if isinstance(self.embed, nn.Embedding) else self.embed.table.weight

    def head_writers(self, layer: int) -> Tensor:
        """Block ``layer``'s W_o cut by head ``[H, 2d, d_h]``: head h writes ``W_o[h] @ head_out[..., h, :]``."""
        wo = self.blocks[layer].attn.wo.weight  # [2d, d]
        return wo.view(wo.shape[0], self.cfg.n_heads, self.cfg.head_dim).permute(1, 0, 2)

    def final_scale(self, x: Tensor) -> Tensor:
        """The final RMSNorm as a per-token linear map: ``g / rms(x)`` ``[..., 2d]`` (final_norm = x * this)."""
        norm = self.norm
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return norm.weight * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def start_cache(self, ids: Tensor, cache: QTGCache | None) -> None:
        """Check ``ids`` (their range too, unless the cache's owner checked them once per request) and make
        room in ``cache`` for them (its buffers are sized for ``max_seq_len`` at the first call)."""
        check_ids(ids, self.cfg.vocab_size, values=cache is None or not cache.checked_ids)
        if cache is not None:
            cache.reserve(ids.shape[0], ids.shape[1], self.cfg.max_seq_len)

    @staticmethod
    def call_sites(intervene: Intervention, sites: Sites | None) -> Sites:
        """The named sites of one call: ``sites`` as given (run_with_cache's), else the intervention's patches."""
        if sites is not None:
            return sites
        return Sites(patch=intervene.patch) if intervene.patch else NO_SITES

    def run_with_cache(self, ids: Tensor, names: Names = None, *, intervene: Intervention | None = None,
                       retain_grad: bool = False, **kwargs: Any) -> tuple[QTGOutput, dict[str, Tensor]]:
        """One forward pass that also returns its named activations (:mod:`qtg.model.activations`).

        Args:
            ids: token ids ``[B, N]``.
            names: the sites to keep: None (all), a list of names, or a predicate of a name.
                Only what is named is kept, so one name costs about what a plain forward does.
            intervene: the call's intervention (its ``patch`` applies before a site is recorded).
            retain_grad: keep each recorded tensor's gradient after ``backward`` (attribution).
            kwargs: the rest of :meth:`forward`'s arguments (``targets``, ``cache``, ...).

        Returns:
            ``(output, cache)``: the forward's output and ``{name: tensor}`` in the order the pass reached them.
        """
        record = select_names(self.cfg, names)
        intervene = NO_INTERVENTION if intervene is None else intervene
        sites = Sites(patch=intervene.patch, record=record, retain_grad=retain_grad)
        out = self(ids, intervene=intervene, sites=sites, **kwargs)
        return out, sites.cache
