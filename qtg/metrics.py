"""Numbers every part of the project reports the same way: bits per byte, per-head attention statistics.

The CLI, the app, the experiments and the notebooks all call these, so a
figure means one thing wherever it is printed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood of a text (nats) in bits per UTF-8 byte of that text.

    Tokenizer-independent: models with different vocabularies compare on the same footing
    when ``nll_nats`` sums every token needed to produce the ``n_bytes`` bytes.
    """
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {n_bytes}")
    return nll_nats / math.log(2) / n_bytes


@dataclass
class AttentionStats:
    """Per-head summaries of causal attention rows, each ``[H]`` float64, averaged over batch and queries."""

    entropy: Tensor  # nats; a row spread evenly over k keys has log k
    normalised_entropy: Tensor  # entropy / log(keys the row sees): 1 is uniform, 0 is one key
    max_weight: Tensor  # the largest weight in the row
    attended_distance: Tensor  # sum_j a_ij (i - j), in tokens

    def to_dict(self) -> dict[str, list[float]]:
        return {k: v.tolist() for k, v in self.__dict__.items()}


def attention_stats(maps: Tensor, first_query: int = 1, q_offset: int = 0) -> AttentionStats:
    """Per-head statistics of attention maps.

    Args:
        maps: ``[B, H, Nq, Nk]`` or ``[H, Nq, Nk]`` causal attention (rows sum to 1).
        first_query: rows before this query index are left out (row 0 sees one key:
            its entropy is 0 whatever the head does, so the default skips it).
        q_offset: absolute position of the first query row (keys start at 0).

    Returns:
        :class:`AttentionStats`, each field ``[H]``.
    """
    a = maps.double()
    if a.dim() == 3:
        a = a.unsqueeze(0)  # [1, H, Nq, Nk]
    if a.dim() != 4:
        raise ValueError(f"attention maps must be [B, H, Nq, Nk] or [H, Nq, Nk], got {tuple(maps.shape)}")
    nq, nk = a.shape[-2:]
    if not 0 <= first_query < nq:
        raise ValueError(f"first_query must lie in 0..{nq - 1}, got {first_query}")
    a = a[:, :, first_query:]  # [B, H, n, Nk]
    i = torch.arange(q_offset + first_query, q_offset + nq, dtype=torch.float64).view(-1, 1)  # query positions
    j = torch.arange(nk, dtype=torch.float64).view(1, -1)
    entropy = -(a * a.clamp(min=1e-300).log()).sum(-1)  # [B, H, n]
    seen = (i + 1).view(-1)  # keys each query sees
    normalised = torch.where(seen > 1, entropy / seen.clamp(min=2).log(), torch.zeros_like(entropy))
    distance = (a * (i - j).clamp(min=0)).sum(-1)  # [B, H, n]
    mean = lambda t: t.mean(dim=(0, 2))  # noqa: E731 - over batch and queries -> [H]
    return AttentionStats(mean(entropy), mean(normalised), mean(a.amax(-1)), mean(distance))
