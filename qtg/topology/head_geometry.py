"""The geometry only QTG's heads have: queries and keys as points of a sphere, and its topology.

    from qtg import topology
    geo = topology.head_geometry(model, ids, block=1, which="keys")   # exact H0/H1 per head
    geo.diagrams[2].dgms[1], geo.bars[2][1].total, geo.distances[2]    # head 2: H1, its total, [N, N]

GeoAttention maps each head's keys to the probability simplex,
q_j = softmax(K_j) over the head's d_h features (queries likewise), and
compares them through the Bhattacharyya coefficient BC = <sqrt p, sqrt q>
(:mod:`qtg.model.fisher_rao`). The square roots are unit vectors in the positive
orthant of the sphere S^{d_h - 1}, and the Fisher-Rao distance

    d_FR(p, q) = arccos <sqrt p, sqrt q>  in [0, pi/2]

is the great-circle (angle) distance between them: a true metric (the
sphere's geodesic distance), so the head's keys form a metric space whose
Vietoris-Rips diagrams :func:`qtg.topology.exact_diagrams` computes exactly.
The angle is evaluated as 2 arcsin(||sqrt p - sqrt q|| / 2), the same number
for unit vectors, because arccos loses half its digits near BC = 1 (two keys
1e-8 apart would read as 1e-8 +- 1e-8); the chord comes from
:func:`qtg.topology.euclidean_distances` in float64.

The points are read where the model computes them: a forward pre-hook on the
block's GeoAttention receives its normed input, which the head's own
``wk`` (``wq``) projects; :func:`qtg.model.fisher_rao.sqrt_simplex` then maps it, in
float64. An intervention changes the states, hence the points. The baseline
has dot-product heads, with no simplex and no such metric: it is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qtg.errors import TopologyError
from qtg.model.fisher_rao import sqrt_simplex
from qtg.model.intervention import Intervention
from qtg.model.protocol import LanguageModel
from qtg.topology.attention_graph import BarStats, bar_stats, check_block, check_heads, one_sequence
from qtg.topology.exact import DEFAULT_TIME_BUDGET, ExactDiagrams, euclidean_distances, exact_diagrams

WHICH = ("keys", "queries")


def fisher_rao_distances(s: Any) -> np.ndarray:
    """Pairwise Fisher-Rao distances between points given by their square roots on the simplex.

    Args:
        s: ``[N, d_h]`` sqrt-simplex points (rows of unit norm, non-negative), e.g. from
            :func:`qtg.model.fisher_rao.sqrt_simplex`.

    Returns:
        ``[N, N]`` float64 in [0, pi/2]: arccos <s_i, s_j>, as 2 arcsin(||s_i - s_j|| / 2); symmetric,
        zero diagonal.
    """
    x = s.detach().cpu().double().numpy() if hasattr(s, "detach") else np.asarray(s, dtype=np.float64)
    chord = euclidean_distances(x)
    return 2.0 * np.arcsin(np.minimum(chord / 2.0, 1.0))


def head_points(model: LanguageModel, ids: Any, block: int, which: str = "keys",
                intervene: Intervention | None = None) -> torch.Tensor:
    """Each head's keys (or queries) of one sequence as sqrt-simplex points.

    Args:
        model: a QTG model.
        ids: one sequence, ``[N]`` or ``[1, N]``.
        block: 0-based block index.
        which: ``"keys"`` or ``"queries"``.
        intervene: a :class:`qtg.Intervention` for the forward pass.

    Returns:
        ``[H, N, d_h]`` float64 on the CPU: sqrt(softmax) of the head's projection, rows of unit norm.

    Raises:
        TopologyError: the baseline (no simplex geometry), or a bad block, ``which`` or ids.
    """
    if not model.has_topofilter:
        raise TopologyError(f"the {model.arch} model {model.cfg.name!r} has dot-product heads: its queries and keys "
                            "have no simplex geometry (load a QTG model; attention_graph reads any model's maps)")
    check_block(model, block)
    if which not in WHICH:
        raise TopologyError(f"which must be 'keys' or 'queries', got {which!r}")
    site = f"blocks.{block}.resid_pre"  # the block's input: the projection norms it as the block does
    with torch.no_grad():
        _, acts = model.run_with_cache(one_sequence(ids).to(next(model.parameters()).device), [site],
                                       intervene=intervene)
        proj = model.attention_projection(block, which, acts[site])  # [1, N, H d_h]
    h, dh = model.cfg.n_heads, model.cfg.head_dim
    logits = proj[0].view(-1, h, dh).transpose(0, 1)  # [H, N, d_h]
    return sqrt_simplex(logits.detach().cpu().double())


@dataclass
class HeadGeometry:
    """Exact diagrams of each head's keys (or queries) under the Fisher-Rao metric."""

    block: int
    which: str
    heads: list[int]
    diagrams: list[ExactDiagrams]  # per head in ``heads``
    bars: list[list[BarStats]]  # per head, per dimension
    distances: np.ndarray = field(repr=False)  # [len(heads), N, N] float64

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (infinite deaths null, as :meth:`ExactDiagrams.to_dict`); no distance matrices."""
        return {"block": self.block, "which": self.which, "metric": "fisher-rao", "heads": self.heads,
                "diagrams": [d.to_dict() for d in self.diagrams],
                "bars": [[s.to_dict() for s in per_head] for per_head in self.bars]}


def head_geometry(
    model: LanguageModel,
    ids: Any,
    block: int,
    which: str = "keys",
    intervene: Intervention | None = None,
    heads: Sequence[int] | None = None,
    maxdim: int = 1,
    backend: str = "auto",
    max_points: int | None = None,
    time_budget: float | None = DEFAULT_TIME_BUDGET,
) -> HeadGeometry:
    """Exact H0..H_maxdim of each head's keys (or queries) as points of the sphere, Fisher-Rao metric.

    Args:
        model: a QTG model (the baseline is refused by name).
        ids: one sequence, ``[N]`` or ``[1, N]``.
        block: 0-based block index.
        which: ``"keys"`` or ``"queries"``.
        intervene: a :class:`qtg.Intervention` for the forward pass.
        heads: which heads (default all).
        maxdim, backend, max_points, time_budget: as for :func:`~qtg.topology.exact_diagrams`.

    Returns:
        :class:`HeadGeometry`.
    """
    heads = check_heads(model, heads)
    points = head_points(model, ids, block, which, intervene)  # [H, N, d_h]
    dist = np.stack([fisher_rao_distances(points[h]) for h in heads])  # [len(heads), N, N]
    dgms = [exact_diagrams(d, maxdim=maxdim, backend=backend, metric_input="distances", max_points=max_points,
                           time_budget=time_budget) for d in dist]
    return HeadGeometry(block=block, which=which, heads=heads, diagrams=dgms,
                        bars=[[bar_stats(x) for x in d.dgms] for d in dgms], distances=dist)
