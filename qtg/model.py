"""The QTG language model, as ``docs/model.md`` defines it.

Pipeline: token ids -> QEmbed (unit complex states) -> TopoFilter (causal,
approximate-persistence weights) -> n_layers x [pre-norm GeoAttention,
pre-norm SwiGLU] -> RMSNorm -> tied complex head.

Notable choices (where the definition is silent; docs/model.md §8 says why):

* Complex states are stored as real tensors ``[..., 2d]``: real half first,
  imaginary half second. ``Re<e_v, h>`` is then a plain dot product of the
  2d-wide views, so the tied head is ``F.linear(h, embedding_table)``.
* Linear layers have no bias (Llama convention); QEmbed keeps the seed's
  bias (its ``Linear(vocab, d)`` on one-hot input is a lookup plus a bias).
* TopoFilter distances use the Gram form in float32, exactly 0 where the
  token ids are equal (float64 without ids); kernels in :mod:`qtg.topo_kernels`.
  GeoAttention's kernels are in :mod:`qtg.fisher_rao`.
* Residual output projections are initialised with std / sqrt(2 n_layers)
  (GPT-2); the model is built on the ``meta`` device and initialised by
  :meth:`QTG.init_weights`, so a tier is never half-allocated.

Shapes: B batch, N tokens, V vocab, d complex width (2d real), H heads,
d_h = d / H.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from qtg.activations import NO_SITES, Names, Sites, select_names
from qtg.config import QTGConfig
from qtg.fisher_rao import (
    alibi_slopes,
    attention_explicit,
    attention_flex,
    attention_maps,
    attention_reference,
    attention_rows,
    compute_dtype,
    fr_sq,
    ragged_bias,
    score_bias,
    sqrt_simplex,
)
from qtg.intervention import NO_INTERVENTION, Intervention
from qtg.topo_filter import TopoFilter

log = logging.getLogger("qtg")

# On CPU, "auto" uses flex only from this length on: below it the matmul form
# is as fast and needs no compilation (benchmarks/bench_attention.py).
FLEX_MIN_LEN_CPU = 1024
IGNORE_INDEX = -100


@functools.cache  # once per device type, not once per layer and step (hashable key: nothing to guard)
def _say_flex_falls_back(device_type: str) -> None:
    log.warning("flex_attention has no backward on %s in torch %s: training uses the reference path",
                device_type, torch.__version__)


# --- outputs and cache ---------------------------------------------------------


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


@dataclass
class QTGCache:
    """Incremental-decoding state: everything earlier tokens contribute.

    ``points`` are the TopoFilter inputs (QEmbed outputs) of earlier tokens,
    ``keys[l]`` their keys and ``values[l]`` their values for block l (QTG's
    keys are float32 sqrt-simplex vectors). Each new token then costs O(N),
    not O(N^2). The baseline decoder uses the same class without ``points``.

    A *ragged* cache (``lengths`` set) holds rows of different lengths, as a
    batch of independent requests does (``qtg.serve``): row b's tokens fill
    slots ``0 .. lengths[b] - 1``, the slots after them up to ``length`` =
    max(lengths) are padding, and a step feeds one token per row, written at
    slot ``lengths[b]``. The model then masks and positions each row by its
    own length, so a row gets what it would get alone.
    """

    points: Tensor | None = None  # [B, P, 2d]
    ids: Tensor | None = None  # [B, P] the points' token ids (TopoFilter: exact zeros between equal ids)
    keys: list[Tensor] = field(default_factory=list)  # per block [B, H, P, d_h]
    values: list[Tensor] = field(default_factory=list)  # per block [B, H, P, d_h]
    length: int = 0  # P, tokens seen so far (ragged: the widest row)
    lengths: Tensor | None = None  # ragged only: [B] int64, each row's own token count

    def append(self, old: Tensor | None, new: Tensor, dim: int) -> Tensor:
        """``old`` (positions on ``dim``) followed by ``new``; ragged: each row's one new slot at its own length."""
        if old is None:
            return new
        if self.lengths is None:
            return torch.cat([old, new], dim=dim)
        assert new.shape[dim] == 1, "a ragged cache takes one token per row and step"
        out = torch.cat([old, torch.zeros_like(new)], dim=dim)  # one more slot: the widest row's
        rows = torch.arange(out.shape[0], device=out.device)
        index = (rows,) + (slice(None),) * (dim - 1) + (self.lengths,)
        out[index] = new.select(dim, 0)
        return out

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append block ``layer``'s new keys/values ``[B, H, N, d_h]``; return all ``[B, H, P+N, d_h]``."""
        if layer < len(self.keys):
            k = self.append(self.keys[layer], k, dim=2)
            v = self.append(self.values[layer], v, dim=2)
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys.append(k)
            self.values.append(v)
        return k, v

    def advance(self, n: int) -> None:
        """Called by the model once all blocks have read the old length."""
        self.length += n
        if self.lengths is not None:
            self.lengths = self.lengths + n


def check_ids(ids: Tensor, vocab_size: int) -> None:
    """A clear error for ids of the wrong shape or outside the vocabulary (not an IndexError deep inside)."""
    if ids.dim() != 2:
        raise ValueError(f"ids must be [B, N], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("ids is empty: at least one token is needed")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got ids from {lo} to {hi}")


# --- QEmbed --------------------------------------------------------------------


class QEmbed(nn.Module):
    """psi_i = (a_t + i b_t) / ||a_t + i b_t||_2 (docs/model.md §1).

    A lookup into a ``[V, 2d]`` table (real half, imaginary half) plus the
    seed's shared bias, normalised to a unit complex vector.
    """

    def __init__(self, cfg: QTGConfig):
        super().__init__()
        self.table = nn.Embedding(cfg.vocab_size, cfg.width)  # [V, 2d]
        self.bias = nn.Parameter(torch.zeros(cfg.width))  # [2d]

    def forward(self, ids: Tensor) -> Tensor:
        e = self.table(ids) + self.bias  # [B, N, 2d]
        return e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)


# --- GeoAttention ----------------------------------------------------------------


class GeoAttention(nn.Module):
    """Multi-head causal Fisher-Rao attention (docs/model.md §3; kernels in qtg.fisher_rao).

    ``gamma_h`` is fixed at ``gamma_init`` or learnt as ``exp(log_gamma_h)``.
    """

    def __init__(self, cfg: QTGConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.width, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.width, cfg.d_model, bias=False)
        self.wv = nn.Linear(cfg.width, cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.width, bias=False)
        self.log_gamma = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.learn_gamma else None

    def gamma(self, device: torch.device | None = None) -> Tensor:
        """Per-head gamma, float32 ``[H]``."""
        if self.log_gamma is not None:
            return self.log_gamma.float().exp()
        return torch.full((self.n_heads,), self.cfg.gamma_init, device=device)

    def _split(self, t: Tensor) -> Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, N, d_h]

    def choose_impl(self, x: Tensor, offset: int) -> str:
        """Which kernel runs: "flex" or "reference" (auto = the fastest correct path here)."""
        impl = self.cfg.attn_impl
        if impl == "reference" or offset > 0:
            return "reference"  # a decoding step: one query row, the matmul is O(N)
        training = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        cpu_training = training and x.device.type != "cuda"
        if impl == "flex":
            if cpu_training:
                _say_flex_falls_back(x.device.type)
                return "reference"
            return "flex"
        if x.device.type == "cuda":
            return "flex"
        return "flex" if not training and x.shape[1] >= FLEX_MIN_LEN_CPU else "reference"

    def forward(
        self, x: Tensor, cache: QTGCache | None = None, layer: int = 0, want_maps: bool = False,
        intervene: Intervention = NO_INTERVENTION, sites: Sites = NO_SITES,
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None, str]:
        """Args:
            x: ``[B, N, 2d]`` (normed).
            cache: extended in place with this block's keys and values.
            layer: this block's index (its cache slot and its key in ``intervene``).
            want_maps: also return (A, d_FR, gamma ``[H]`` as applied).
            intervene: gamma replacement/scale, ablated heads, positions off.
            sites: the call's named sites ``blocks.{layer}.attn.(pattern|distance|head_out)``; touching
                the pattern or the distance runs the matmul form with both maps materialised.

        Returns:
            out ``[B, N, 2d]``, the maps or None, the name of the kernel that ran.
        """
        sp = sqrt_simplex(self._split(self.wq(x)))  # [B, H, N, d_h], float32 (float64 for a float64 model)
        sk = sqrt_simplex(self._split(self.wk(x)))  # [B, H, N, d_h], likewise
        v = self._split(self.wv(x))  # [B, H, N, d_h]
        offset = 0
        if cache is not None:
            offset = cache.length
            sk, v = cache.extend(layer, sk, v)  # [B, H, P+N, d_h]
        gamma = intervene.gamma_for(layer, self.gamma(x.device))  # [H]
        alibi = self.cfg.pos == "alibi" and intervene.positions != "none"
        slopes = alibi_slopes(self.n_heads, x.device) if alibi else None
        impl = self.choose_impl(x, offset)
        ragged = cache is not None and cache.lengths is not None
        pattern, distance = f"blocks.{layer}.attn.pattern", f"blocks.{layer}.attn.distance"
        if sites and (sites.wants(pattern) or sites.wants(distance)):
            impl = "explicit"
            bias = (ragged_bias(slopes, cache.lengths, sk.shape[2], compute_dtype(sp)) if ragged else
                    score_bias(self.n_heads if alibi else None, offset, sp.shape[2], sk.shape[2], sp.device,
                               compute_dtype(sp)))
            out = attention_explicit(sp, sk, v, gamma, bias, lambda d: sites(distance, d),
                                     lambda a: sites(pattern, a))
        elif ragged:  # a ragged batch: each row at its own position
            out = attention_rows(sp, sk, v, gamma, slopes, cache.lengths)  # [B, H, 1, d_h]
        elif impl == "flex":
            out = attention_flex(sp, sk, v, gamma, slopes)
        else:  # ALiBi + causal mask: a block of one cached bias matrix (qtg.fisher_rao.score_bias)
            bias = score_bias(self.n_heads if alibi else None, offset, sp.shape[2], sk.shape[2], sp.device,
                              compute_dtype(sp))
            out = attention_reference(sp, sk, v, gamma, q_offset=offset, bias=bias)  # [B, H, N, d_h]
        # gamma rides with the maps: read here, where FSDP has gathered the parameters, it is a plain tensor
        maps = None
        if want_maps:  # a ragged row's query sits at its own length, its padding masked (qtg.serve asks these)
            bias = ragged_bias(slopes, cache.lengths, sk.shape[2], compute_dtype(sp)) if ragged else None
            maps = (*attention_maps(sp, sk, gamma, slopes, q_offset=offset, bias=bias), gamma.detach())
        return self.wo(merge_heads(out, intervene.head_mask(layer, self.n_heads, out.device), layer, sites)), maps, impl


def merge_heads(out: Tensor, keep: Tensor | None, layer: int, sites: Sites) -> Tensor:
    """Heads ``[B, H, N, d_h]`` side by side ``[B, N, d]``, W_o's input: ablated heads (``keep`` ``[H]`` of 0/1)
    zeroed first, then the site ``blocks.{layer}.attn.head_out`` ``[B, N, H, d_h]`` (shared with the baseline)."""
    if keep is not None:  # an ablated head's slice of the output is zero before W_o
        out = out * keep.view(1, -1, 1, 1).to(out.dtype)
    B, _, N, _ = out.shape
    out = out.transpose(1, 2)  # [B, N, H, d_h]
    if sites:
        out = sites(f"blocks.{layer}.attn.head_out", out)
    return out.reshape(B, N, -1)  # [B, N, d]


# --- feed-forward and block --------------------------------------------------------


class SwiGLU(nn.Module):
    """FFN(x) = W_down (silu(W_gate x) * W_up x); gate and up share one matmul."""

    def __init__(self, cfg: QTGConfig):
        super().__init__()
        self.hidden = cfg.ffn_hidden
        self.w_in = nn.Linear(cfg.width, 2 * cfg.ffn_hidden, bias=False)  # [gate | up]
        self.w_out = nn.Linear(cfg.ffn_hidden, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).split(self.hidden, dim=-1)  # 2 x [B, N, hidden]
        return self.w_out(F.silu(gate) * up)


class Block(nn.Module):
    """x + GeoAttention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)) unless ffn_mult = 0.

    ``attention`` is swappable so the baseline decoder (qtg.baseline) shares the
    block; it must return (out, maps or None, name of the path that ran).
    """

    def __init__(self, cfg: QTGConfig, attention: type[nn.Module] = GeoAttention):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps) if cfg.ffn_hidden else None
        self.ffn = SwiGLU(cfg) if cfg.ffn_hidden else None

    def forward(self, x: Tensor, cache: QTGCache | None = None, layer: int = 0, want_maps: bool = False,
                intervene: Intervention = NO_INTERVENTION, sites: Sites = NO_SITES):
        if sites:
            x = sites(f"blocks.{layer}.resid_pre", x)
        a, maps, impl = self.attn(self.attn_norm(x), cache=cache, layer=layer, want_maps=want_maps,
                                  intervene=intervene, sites=sites)
        if sites:
            a = sites(f"blocks.{layer}.attn.out", a)
        x = x + a
        if self.ffn is not None:
            m = self.ffn(self.ffn_norm(x))
            x = x + (sites(f"blocks.{layer}.mlp.out", m) if sites else m)
        if sites:
            x = sites(f"blocks.{layer}.resid_post", x)
        return x, maps, impl


# --- the model -------------------------------------------------------------------


class DecoderLM(nn.Module):
    """What QTG and its baseline declare about themselves, so no caller sniffs.

    Attributes:
        arch: ``"qtg"`` or ``"baseline"`` (the config's ``arch``).
        has_topofilter: whether the model has a TopoFilter (and GeoAttention).
        state_names: the names of the states ``out.states`` holds, in order.
        tokenizer: the tokenizer the weights were trained with, or None.
        checkpoint_dir: the checkpoint the weights came from, or None.
        random_weights: True until trained weights are loaded.
    """

    has_topofilter: bool = False
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
        return [*self.input_state_names, *(f"block {i + 1}" for i in range(self.cfg.n_layers))]

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

    # --- what readers of the residual stream need (direct logit attribution, the lens) ---------------
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

    @staticmethod
    def call_sites(intervene: Intervention, sites: Sites | None) -> Sites:
        """The named sites of one call: ``sites`` as given (run_with_cache's), else the intervention's patches."""
        if sites is not None:
            return sites
        return Sites(patch=intervene.patch) if intervene.patch else NO_SITES

    def run_with_cache(self, ids: Tensor, names: Names = None, *, intervene: Intervention | None = None,
                       retain_grad: bool = False, **kwargs: Any) -> tuple[QTGOutput, dict[str, Tensor]]:
        """One forward pass that also returns its named activations (:mod:`qtg.activations`).

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


class QTG(DecoderLM):
    """QEmbed -> TopoFilter -> Blocks -> RMSNorm -> tied head, with the four-term loss."""

    has_topofilter = True
    input_state_names = ("QEmbed", "TopoFilter")

    def __init__(self, cfg: QTGConfig):
        super().__init__(cfg)
        self.embed = QEmbed(cfg)
        self.topo = TopoFilter(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)

    # --- initialisation ---------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter in place (also after ``to_empty``)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed.table.weight.device).manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("log_gamma"):
                p.fill_(math.log(self.cfg.gamma_init))
            elif name.endswith("gate_logit"):
                p.zero_()
            elif name.endswith("embed.bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w_out.weight")):
                p.normal_(0.0, out_std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)

    # --- forward ----------------------------------------------------------------
    def forward(
        self,
        ids: Tensor,
        targets: Tensor | None = None,
        return_internals: bool = False,
        cache: QTGCache | None = None,
        *,
        intervene: Intervention | None = None,
        map_blocks: Collection[int] | None = None,
        sites: Sites | None = None,
    ) -> QTGOutput:
        """Args:
            ids: token ids ``[B, N]``.
            targets: next-token ids ``[B, N]`` (``-100`` ignored) -> ``.loss``.
            return_internals: also return states, topology scores and
                attention maps (materialised for inspection; costs memory).
            cache: a :class:`QTGCache`; ids then continue the cached tokens and
                the cache is extended in place.
            intervene: a :class:`~qtg.intervention.Intervention` for this call
                only (None: the model as it is). Pass the same one at every
                step of a cached decode.
            map_blocks: with ``return_internals``, the blocks whose ``[B, H, N, N]``
                maps are kept (None: all); the others' entries are None.
            sites: what to record at the named activations (:meth:`run_with_cache` builds it); None: only
                ``intervene.patch``'s replacements.
        """
        check_ids(ids, self.cfg.vocab_size)
        intervene = self.check_forward_args(intervene, map_blocks)
        sites = self.call_sites(intervene, sites)
        past = None if cache is None else cache.points
        psi = self.embed(ids)  # [B, N, 2d], unit norm
        ids_for_topo = ids
        if sites and sites.wants("embed"):
            psi = sites("embed", psi)
            if sites.patches("embed"):  # the ids no longer name the points: the TopoFilter measures them (float64)
                ids_for_topo = None
        lengths = None if cache is None else cache.lengths  # ragged rows: each its own length
        past_ids = None if cache is None else cache.ids
        topo = self.topo(psi, past, intervene, want_exact=return_internals, lengths=lengths,
                         ids=ids_for_topo, past_ids=past_ids, sites=sites)  # [B, N] each
        filtered = psi * topo.weights.unsqueeze(-1).to(psi.dtype)  # [B, N, 2d]
        if sites:
            filtered = sites("topo.out", filtered)
        if cache is not None:
            cache_points = cache.append(past, psi, dim=1)
            cache_ids = cache.append(past_ids, ids, dim=1) if past is None or past_ids is not None else None

        x = filtered
        states, attention, distances, gammas, impls = [psi, filtered], [], [], [], []
        for layer, block in enumerate(self.blocks):
            want_maps = return_internals and (map_blocks is None or layer in map_blocks)
            x, maps, impl = block(x, cache=cache, layer=layer, want_maps=want_maps, intervene=intervene,
                                  sites=sites)
            impls.append(impl)
            if return_internals:
                states.append(x)
                attention.append(maps[0] if maps else None)
                distances.append(maps[1] if maps else None)
                gammas.append(maps[2] if maps else None)
        if cache is not None:
            cache.points, cache.ids = cache_points, cache_ids  # after the blocks: they read the old length
            cache.advance(ids.shape[1])
        h = self.norm(x)  # [B, N, 2d]
        logits = F.linear(sites("final_norm", h) if sites else h, self.embed.table.weight)  # [B, N, V]: Re<e_v, h>

        out = QTGOutput(logits=logits, topo_weights=topo.weights)
        if targets is not None:
            out.loss, out.loss_terms = self.loss(logits, targets, topo.weights, filtered)
        if return_internals:
            out.states = states
            out.topo_scores, out.topo_exact_scores = topo.soft, topo.exact
            out.attention, out.distances = attention, distances
            out.gamma = gammas
            out.attn_impl = impls
        return out

    def loss(self, logits: Tensor, targets: Tensor, w: Tensor, filtered: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """L = L_CE + l_topo L_topo + l_geo L_geo + l_q L_quantum (docs/model.md §4).

        L_topo = mean (1 - w_i)^2;  L_geo = mean arccos(sqrt p_model(y))^2, the
        Fisher-Rao distance to the one-hot target;  L_quantum = mean
        (1 - ||psi_i||^4) after filtering. CE and geo skip targets of -100.
        """
        logp = F.log_softmax(logits.to(compute_dtype(logits)), dim=-1)  # [B, N, V]
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        logp_y = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [B, N]
        n_valid = valid.sum().clamp(min=1)
        ce = -(logp_y * valid).sum() / n_valid
        geo = (fr_sq(torch.exp(0.5 * logp_y)) * valid).sum() / n_valid
        topo = ((1.0 - w) ** 2).mean()
        quantum = (1.0 - filtered.to(compute_dtype(filtered)).norm(dim=-1) ** 4).mean()
        c = self.cfg
        total = ce + c.lambda_topo * topo + c.lambda_geo * geo + c.lambda_quantum * quantum
        return total, {"ce": ce.detach(), "topo": topo.detach(), "geo": geo.detach(), "quantum": quantum.detach()}
