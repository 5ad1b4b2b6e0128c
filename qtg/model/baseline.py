"""A conventional decoder of the same size as a QTG tier, for side-by-side figures.

Same vocabulary, residual width 2d, layers, heads, SwiGLU and tied head as the
QTG config it is built from; only the parts that make QTG unusual change:

* a plain embedding lookup (no unit normalisation, no TopoFilter);
* dot-product attention (``F.scaled_dot_product_attention``, causal) with
  rotary positions (RoPE, base 10,000) on the ``d_h = d / H`` head width, or
  with GeoAttention's ALiBi bias -m_h (i - j) (``baseline_pos="alibi"``: the
  nano-baseline-alibi ablation, which separates the attention form from positions),
  projections 2d -> d -> 2d exactly as GeoAttention's, so the parameter
  counts differ only by QEmbed's bias and the per-head gamma;
* cross-entropy alone as the loss.

Built with ``qtg.build(cfg.replace(arch="baseline"))`` (or
``qtg.model.tiers.baseline_of(cfg)``); it shares :class:`QTGOutput` and
:class:`QTGCache` with the QTG model, so generation, training and the
explorer treat both the same way. Attention maps are returned when
internals are asked for; the topology fields stay None.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from qtg.model.activations import NO_SITES, Sites
from qtg.model.cache import QTGCache
from qtg.model.config import QTGConfig
from qtg.model.decoder import IGNORE_INDEX, DecoderLM, QTGOutput
from qtg.model.fisher_rao import alibi_slopes
from qtg.model.intervention import NO_INTERVENTION, Intervention
from qtg.model.model import Block, merge_heads

ROPE_BASE = 10_000.0


def rope_angles(n: int, head_dim: int, offset: int | Tensor, device) -> tuple[Tensor, Tensor]:
    """cos and sin ``[n, head_dim / 2]`` for positions offset .. offset + n - 1
    (``[B, 1, n, head_dim / 2]`` for per-row offsets ``[B]``, a ragged batch)."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if isinstance(offset, Tensor):
        pos = offset.view(-1, 1, 1, 1).float() + torch.arange(n, device=device, dtype=torch.float32).view(-1, 1)
        angles = pos * inv_freq  # [B, 1, n, d_h / 2]: the same products as outer's
    else:
        pos = torch.arange(offset, offset + n, device=device, dtype=torch.float32)
        angles = torch.outer(pos, inv_freq)  # [n, d_h / 2]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_2k, x_2k+1) of ``x`` ``[B, H, n, d_h]`` by the position's angles."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]  # [B, H, n, d_h / 2] each
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # [B, H, n, d_h / 2, 2]
    return rotated.flatten(-2).to(x.dtype)


def alibi_bias(slopes: Tensor, offset: int | Tensor, n_q: int, n_k: int) -> Tensor:
    """Additive bias ``[H, Nq, Nk]``: -m_h (i - j) for keys j <= i, -inf after (queries at offset..;
    per-row offsets ``[B]`` give ``[B, H, Nq, Nk]``)."""
    i = torch.arange(n_q, device=slopes.device, dtype=torch.float32).view(-1, 1)
    i = i + (offset.view(-1, 1, 1, 1).float() if isinstance(offset, Tensor) else offset)
    j = torch.arange(n_k, device=slopes.device, dtype=torch.float32).view(1, -1)
    bias = -slopes.view(-1, 1, 1) * (i - j)  # [H, Nq, Nk]
    return bias.masked_fill(j > i, float("-inf"))


class DotProductAttention(nn.Module):
    """Causal multi-head softmax(QK^T / sqrt(d_h) [+ ALiBi]) V, with RoPE unless ALiBi."""

    def __init__(self, cfg: QTGConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.alibi = cfg.baseline_pos == "alibi"
        self.wq = nn.Linear(cfg.width, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.width, cfg.d_model, bias=False)
        self.wv = nn.Linear(cfg.width, cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.width, bias=False)

    def _split(self, t: Tensor) -> Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, N, d_h]

    def forward(self, x: Tensor, cache: QTGCache | None = None, layer: int = 0, want_maps: bool = False,
                intervene: Intervention = NO_INTERVENTION, sites: Sites = NO_SITES):
        """Args: x ``[B, N, 2d]``; ``intervene`` may ablate heads and patch sites (nothing else applies here);
        touching ``blocks.{layer}.attn.pattern`` runs softmax(scores) V explicitly instead of SDPA.
        Returns out ``[B, N, 2d]``, the maps ``[B, H, N, P+N]`` or None, "sdpa" (or "explicit")."""
        offset = 0 if cache is None else cache.length
        if cache is not None and cache.lengths is not None:  # a ragged batch: each row at its own position
            offset = cache.lengths
        q, k, v = self._split(self.wq(x)), self._split(self.wk(x)), self._split(self.wv(x))  # [B, H, N, d_h]
        if not self.alibi:
            cos, sin = rope_angles(x.shape[1], self.head_dim, offset, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # [B, H, P+N, d_h]
        n_q, n_k = q.shape[2], k.shape[2]
        i = torch.arange(n_q, device=x.device).view(-1, 1)
        i = i + (offset.view(-1, 1, 1, 1) if isinstance(offset, Tensor) else offset)
        allowed = torch.arange(n_k, device=x.device).view(1, -1) <= i  # [Nq, Nk] (ragged [B, 1, Nq, Nk])
        bias = alibi_bias(alibi_slopes(self.n_heads, x.device), offset, n_q, n_k) if self.alibi else None
        pattern, impl = f"blocks.{layer}.attn.pattern", "sdpa"
        if sites and sites.wants(pattern):
            impl = "explicit"
            attn = sites(pattern, self.pattern(q, k, bias, allowed))
            out = (attn @ v.float()).to(v.dtype)
        elif self.alibi:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # [H, Nq, Nk] bias
        else:
            start = not isinstance(offset, Tensor) and offset == 0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if start else allowed, is_causal=start)
        maps = self.pattern(q, k, bias, allowed).detach() if want_maps else None
        keep = intervene.head_mask(layer, self.n_heads, out.device)
        return self.wo(merge_heads(out, keep, layer, sites)), maps, impl

    def pattern(self, q: Tensor, k: Tensor, bias: Tensor | None, allowed: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d_h) [+ ALiBi]) ``[B, H, Nq, Nk]`` in float32, causal."""
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


class Baseline(DecoderLM):
    """Embedding -> blocks (RoPE attention, SwiGLU) -> RMSNorm -> tied head."""

    has_topofilter = False
    input_state_names = ("embedding",)

    def __init__(self, cfg: QTGConfig):
        super().__init__(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg, DotProductAttention) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, parameters: Iterable[tuple[str, Tensor]] | None = None) -> None:
        """Same scheme (and ``parameters``) as QTG.init_weights: N(0, std), residual outputs scaled by 1/sqrt(2L)."""
        gen = torch.Generator(device=self.embed.weight.device).manual_seed(seed) if seed is not None else None
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters() if parameters is None else parameters:
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, out_std if name.endswith(("wo.weight", "w_out.weight")) else self.cfg.init_std,
                          generator=gen)

    def forward(self, ids: Tensor, targets: Tensor | None = None, return_internals: bool = False,
                cache: QTGCache | None = None, *, intervene: Intervention | None = None,
                map_blocks: Collection[int] | None = None, sites: Sites | None = None) -> QTGOutput:
        """Same contract as :meth:`qtg.model.model.QTG.forward` (topology fields stay None; of an
        intervention only ``ablate_heads`` and ``patch`` apply, the rest is refused by name)."""
        self.start_cache(ids, cache)
        intervene = self.check_forward_args(intervene, map_blocks)
        sites = self.call_sites(intervene, sites)
        x = self.embed(ids)  # [B, N, 2d]
        if sites:
            x = sites("embed", x)
        states, maps_all = [x], []
        for layer, block in enumerate(self.blocks):
            want_maps = return_internals and (map_blocks is None or layer in map_blocks)
            x, maps, _ = block(x, cache=cache, layer=layer, want_maps=want_maps, intervene=intervene, sites=sites)
            states.append(x)
            maps_all.append(maps)
        if cache is not None:
            cache.advance(ids.shape[1])
        h = self.norm(x)  # [B, N, 2d]
        logits = F.linear(sites("final_norm", h) if sites else h, self.embed.weight)  # [B, N, V]
        out = QTGOutput(logits=logits)
        if targets is not None:
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
            out.loss, out.loss_terms = ce, {"ce": ce.detach()}
        if return_internals:
            out.states, out.attention = states, maps_all
            out.attn_impl = ["sdpa"] * len(self.blocks)
        return out
