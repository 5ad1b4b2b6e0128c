"""The TopoFilter: causal approximate-persistence weights of the QEmbed states, docs/model.md §2.

Its distance kernels and the training step's soft-min Function live in
:mod:`qtg.model.topo_kernels`; :class:`qtg.model.model.QTG` applies it once, before the
first block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from qtg.model.activations import NO_SITES, Sites
from qtg.model.config import QTGConfig
from qtg.model.intervention import NO_INTERVENTION, REPEAT_TOLERANCE, Intervention
from qtg.model.topo_kernels import pairwise_distances, soft_min_distance


@dataclass
class TopoScores:
    """What the TopoFilter computes for N tokens: all ``[B, N]``, float32 (float64 in a float64 model)."""

    soft: Tensor  # s~, the soft-min distance to earlier tokens
    exact: Tensor | None  # s, the exact minimum (None unless asked for or used)
    weights: Tensor  # w, as applied to the states


class TopoFilter(nn.Module):
    """Causal approximate-persistence weights (docs/model.md §2).

    For the Vietoris-Rips filtration of the token states, token i's singleton
    H0 component dies at its nearest-neighbour distance. Looking backwards only:

        s_i  = min_{j<i} delta_ij                          (exact; s_1 = 0)
        s~_i = -T log sum_{j<i} exp(-delta_ij / T)          (soft-min; s~_1 = 0)
        w_i  = exp(-max(s~_i - theta, 0) / tau),   psi_i <- w_i psi_i

    An :class:`~qtg.model.intervention.Intervention` may weight by s instead of s~
    (``topo="exact"``; no gradient flows through s), switch the filter off
    (``"off"``: w = 1), override theta, tau and T for one call, or replace w
    by a coarser rule of s and the position (``topo_weight``).

    The config's ``topo_filter`` sets the model's own weight, what
    ``topo="approx"`` means: s~ (the default), s with its gradient through the
    min (``"exact"``, nano-exact), the one-bit gate ``w_i = 1`` if ``s_i = 0``
    else ``sigmoid(gate_logit)``, a learnt constant (``"gate"``, nano-gate), or
    w = 1 (``"off"``, nano-notopo). ``topo="exact"`` still applies the exact
    filter to any of them.
    """

    def __init__(self, cfg: QTGConfig):
        super().__init__()
        self.theta = cfg.topo_threshold
        self.tau = cfg.topo_tau
        self.temperature = cfg.topo_temperature
        self.own_mode = cfg.topo_filter  # what topo="approx" (the model's own) means
        # nano-gate's one learnt number: the weight of a first occurrence, sigmoid(0) = 0.5 at initialisation
        self.gate_logit = nn.Parameter(torch.zeros(())) if cfg.topo_filter == "gate" else None

    def own_needs_exact(self, intervene: Intervention) -> bool:
        """True when this call's weight comes from the exact score s (the model's own, or an intervention's)."""
        own = intervene.topo == "approx" and intervene.topo_weight is None
        return intervene.topo == "exact" or intervene.topo_weight is not None or (
            own and self.own_mode in ("exact", "gate"))

    def forward(self, psi: Tensor, past: Tensor | None = None, intervene: Intervention = NO_INTERVENTION,
                want_exact: bool = False, lengths: Tensor | None = None, ids: Tensor | None = None,
                past_ids: Tensor | None = None, sites: Sites = NO_SITES) -> TopoScores:
        """Scores and weights of the tokens of ``psi``, which follow ``past``.

        Args:
            psi: ``[B, N, 2d]`` QEmbed states of the new tokens.
            past: ``[B, P, 2d]`` states of earlier tokens, or None.
            intervene: the call's intervention (mode, theta, tau, T).
            want_exact: also return s (it is computed anyway when ``topo="exact"``).
            lengths: ``[B]`` for a ragged ``past`` (see :class:`QTGCache`): row b's
                earlier tokens are its first ``lengths[b]`` points, the rest padding.
            ids, past_ids: the token ids ``[B, N]`` of ``psi`` and ``[B, P]`` of ``past``
                (None when there is no past). Given, the distances are computed in
                float32 with exact zeros between equal ids (:func:`pairwise_distances`);
                without them, in float64.
            sites: the call's named sites ``topo.scores`` and ``topo.w`` (:mod:`qtg.model.activations`).
        """
        theta, tau, temperature = intervene.topo_values(self.theta, self.tau, self.temperature)
        need_exact = want_exact or self.own_needs_exact(intervene)
        offset = 0 if past is None else past.shape[1]
        if past is not None and past.shape[1] > 0 and psi.shape[1] == 1:  # a decoding step (ragged too)
            soft, hard = self.step_scores(psi, past, ids, past_ids, temperature, need_exact, lengths)
            position = (None if intervene.topo_weight is None else
                        torch.tensor([offset], device=psi.device) if lengths is None else lengths.view(-1, 1))
            return self.result(soft, hard, intervene, position, theta, tau, sites)
        if (past is None and ids is not None and lengths is None and psi.dtype != torch.float64
                and not need_exact and torch.is_grad_enabled()):  # training
            return self.result(soft_min_distance(psi, ids, temperature), None, intervene, None, theta, tau, sites)
        # s is a constant of the inputs except when it is the model's own trained weight (nano-exact)
        exact_grad = self.own_mode == "exact" and intervene.topo == "approx" and intervene.topo_weight is None
        soft, hard, position = self.masked_scores(psi, past, ids, past_ids, lengths, temperature,
                                                  need_exact, exact_grad)
        return self.result(soft, hard, intervene, position, theta, tau, sites)

    @staticmethod
    def masked_scores(psi: Tensor, past: Tensor | None, ids: Tensor | None, past_ids: Tensor | None,
                      lengths: Tensor | None, temperature: float, exact: bool,
                      exact_grad: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """s~ and s ``[B, N]`` of the N tokens of ``psi`` after the P points of ``past``, and their 0-based
        positions (``[N]``, or ``[B, N]`` for a ragged ``past``).

        The general path of :meth:`forward` (a prompt, a chunk of tokens, ragged rows; arguments as there):
        every token against every point, the earlier ones kept by a mask. s is None unless ``exact``, and
        carries its gradient (through the min) only when ``exact_grad``.
        """
        offset = 0 if past is None else past.shape[1]
        points = psi if past is None else torch.cat([past, psi], dim=1)  # [B, P+N, 2d]
        delta = pairwise_distances(psi, points, ids, TopoFilter.point_ids(points, past, ids, past_ids))  # [B, N, P+N]
        i = torch.arange(offset, offset + psi.shape[1], device=psi.device).view(-1, 1)
        if lengths is not None:  # ragged: row b's new tokens follow its own lengths[b] points, [B, N, 1]
            i = i - offset + lengths.view(-1, 1, 1)
        j = torch.arange(points.shape[1], device=psi.device).view(1, -1)
        earlier = j < i  # [N, P+N]
        first = i == 0  # [N, 1]: the first token has no earlier point
        # The first row gets one finite dummy entry so logsumexp's gradient is
        # not nan there; its value is discarded by the final where.
        keep = earlier | (first & (j == 0))
        logits = (delta / -temperature).masked_fill_(~keep, float("-inf"))  # = -delta / T where kept
        soft = -temperature * torch.logsumexp(logits, dim=-1)  # [B, N]
        soft = torch.where(first[..., 0], torch.zeros_like(soft), soft)
        hard = None
        if exact:
            inf = torch.full_like(delta, float("inf"))
            hard = torch.where(earlier, delta, inf).amin(dim=-1)  # its gradient reaches the nearest earlier point
            hard = hard if exact_grad else hard.detach()
            hard = torch.where(first[..., 0], torch.zeros_like(hard), hard)
        return soft, hard, i[..., 0]  # positions [N] or, ragged, [B, N]

    @staticmethod
    def point_ids(points: Tensor, past: Tensor | None, ids: Tensor | None, past_ids: Tensor | None) -> Tensor | None:
        """The ids ``[B, P+N]`` of ``points`` (the past's, then the new tokens'), or None when they are not all
        known: a caller that keeps only points (no ``past_ids``) gets the float64 path."""
        if past is None or ids is None:
            return ids
        if past_ids is None:
            return None
        point_ids = torch.cat([past_ids, ids], dim=1)  # [B, P+N]
        return point_ids if point_ids.shape == points.shape[:2] else None  # out of step with the points: not trusted

    @staticmethod
    def step_scores(psi: Tensor, past: Tensor, ids: Tensor | None, past_ids: Tensor | None, temperature: float,
                    exact: bool, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """s~ and s (None unless ``exact``) ``[B, 1]`` of one new token per row after P >= 1 points.

        A decoding step: every point of ``past`` ``[B, P, 2d]`` is earlier than
        ``psi`` ``[B, 1, 2d]``, so no mask, no first-token case and no
        concatenation are needed (a step is bound by per-op overhead). Same
        values as the general path, up to the summation order of the logsumexp.
        A ragged ``past`` (``lengths`` ``[B]``: row b's first ``lengths[b]`` points are its own, the rest
        padding) masks each row's padding instead (no copy of the cache either).
        """
        if ids is None or past_ids is None or past_ids.shape != past.shape[:2]:
            ids = past_ids = None  # the float64 path, as in forward
        delta = pairwise_distances(psi, past, ids, past_ids)  # [B, 1, P]
        if lengths is None:
            soft = -temperature * torch.logsumexp(delta / -temperature, dim=-1)  # [B, 1]
            return soft, delta.amin(dim=-1).detach() if exact else None
        padding = torch.arange(past.shape[1], device=past.device) >= lengths.view(-1, 1, 1)  # [B, 1, P]
        first = lengths.view(-1, 1) == 0  # [B, 1]: a row with no earlier point scores 0
        soft = -temperature * torch.logsumexp((delta / -temperature).masked_fill_(padding, float("-inf")), dim=-1)
        hard = None
        if exact:
            hard = delta.masked_fill(padding, float("inf")).amin(dim=-1).detach().masked_fill_(first, 0.0)
        return soft.masked_fill_(first, 0.0), hard

    def result(self, soft: Tensor, hard: Tensor | None, intervene: Intervention, position: Tensor | None,
               theta: float, tau: float, sites: Sites = NO_SITES) -> TopoScores:
        """The weights, with both scores ``[B, N]``: from s~ (s for ``topo="exact"``; 1 for ``"off"``) at the
        call's ``theta`` and ``tau``, or the intervention's ``topo_weight`` rule of s and the 0-based
        ``position`` (given whenever the rule is). The sites ``topo.scores`` (s~, before w reads it) and
        ``topo.w`` (after) may record or replace them."""
        if sites:
            soft = sites("topo.scores", soft)
        mode = self.own_mode if intervene.topo == "approx" else intervene.topo
        if intervene.topo_weight is not None:
            w = intervene.topo_weight.weights(hard, position)
        elif mode == "off":
            w = torch.ones_like(soft)
        elif mode == "gate":  # the first token has s = 0, so it keeps w = 1 as under the filter
            novel = torch.sigmoid(self.gate_logit.float()).to(hard.dtype)
            w = torch.where(hard < REPEAT_TOLERANCE, torch.ones_like(hard), novel.expand_as(hard))
        else:
            w = self.weights(hard if mode == "exact" else soft, theta, tau)
        if sites:
            w = sites("topo.w", w)
        return TopoScores(soft, hard, w)

    @staticmethod
    def weights(score: Tensor, theta: float, tau: float) -> Tensor:
        """w = exp(-max(score - theta, 0) / tau), same shape as ``score``."""
        return torch.exp(-torch.clamp(score - theta, min=0.0) / tau)
