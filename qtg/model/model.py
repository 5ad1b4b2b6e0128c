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
  token ids are equal (float64 without ids); kernels in :mod:`qtg.model.topo_kernels`.
  GeoAttention's kernels are in :mod:`qtg.model.fisher_rao`.
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
from collections.abc import Collection, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from qtg.model.activations import NO_SITES, Sites
from qtg.model.cache import QTGCache
from qtg.model.config import QTGConfig
from qtg.model.decoder import IGNORE_INDEX, DecoderLM, QTGOutput
from qtg.model.fisher_rao import (
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
from qtg.model.intervention import NO_INTERVENTION, Intervention
from qtg.model.topo_filter import TopoFilter, TopoScores

log = logging.getLogger("qtg")

# On CPU, "auto" uses flex only from this length on: below it the matmul form
# is as fast and needs no compilation (benchmarks/bench_attention.py).
FLEX_MIN_LEN_CPU = 1024


@functools.cache  # once per device type, not once per layer and step (hashable key: nothing to guard)
def _say_flex_falls_back(device_type: str) -> None:
    log.warning("flex_attention has no backward on %s in torch %s: training uses the reference path",
                device_type, torch.__version__)


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
    """Multi-head causal Fisher-Rao attention (docs/model.md §3; kernels in qtg.model.fisher_rao).

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
        else:  # ALiBi + causal mask: a block of one cached bias matrix (qtg.model.fisher_rao.score_bias)
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

    ``attention`` is swappable so the baseline decoder (qtg.model.baseline) shares the
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

    def embed_points(self, ids: Tensor) -> Tensor:
        return self.embed(ids)

    def topo_scores(self, points: Tensor, past: Tensor | None = None, intervene: Intervention | None = None, *,
                    ids: Tensor | None = None, past_ids: Tensor | None = None,
                    lengths: Tensor | None = None) -> TopoScores:
        intervene = NO_INTERVENTION if intervene is None else intervene
        return self.topo(points, past, intervene, want_exact=True, lengths=lengths, ids=ids, past_ids=past_ids)

    # --- initialisation ---------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, parameters: Iterable[tuple[str, Tensor]] | None = None) -> None:
        """Initialise every parameter in place (also after ``to_empty``).

        ``parameters``: the ``(name, tensor)`` pairs to fill, in ``named_parameters`` order (default: this model's);
        sharding passes full-size stand-ins, so a sharded model draws the same numbers."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed.table.weight.device).manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters() if parameters is None else parameters:
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
            intervene: a :class:`~qtg.model.intervention.Intervention` for this call
                only (None: the model as it is). Pass the same one at every
                step of a cached decode.
            map_blocks: with ``return_internals``, the blocks whose ``[B, H, N, N]``
                maps are kept (None: all); the others' entries are None.
            sites: what to record at the named activations (:meth:`run_with_cache` builds it); None: only
                ``intervene.patch``'s replacements.
        """
        self.start_cache(ids, cache)
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
        if cache is not None:  # into slots after the filled part: the blocks read only keys and values
            cache.write_points(psi, ids if past is None or past_ids is not None else None)

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
            cache.advance(ids.shape[1])  # after the blocks: they read the old length
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
