"""The topology of an attention map read as a weighted graph (Kushnareva et al., 2021).

    from qtg import topology
    out = model(ids, return_internals=True, map_blocks=[1])
    g = topology.attention_graph(out.attention[1][0, 2])      # block 1, head 2: diagrams and features
    g.betti0, g.betti1, g.bars[1].total, g.features()
    gs = topology.head_attention_graphs(model, ids, block=1)  # every head of a block, QTG or baseline

**The graph.** Tokens are vertices; the pair i != j is joined with the weight
w_ij = max(a_ij, a_ji) and the *distance* d_ij = 1 - w_ij: strongly attended
pairs are close. A causal map holds only its lower triangle (a_ji = 0 for
j > i), so w_ij is simply the weight the later token gives the earlier one.
The diagonal (a token attending to itself) is not an edge: d_ii = 0. The
entries of ``A`` must lie in [0, 1]; rows need not sum to 1 (hand-made graphs
are welcome), though a model's rows do.

**Diagrams.** d is a symmetric dissimilarity with values in [0, 1], usually not
a metric; its Vietoris-Rips filtration (the flag complex of the edges with
d_ij <= r, for growing r) is well defined all the same, and
:func:`qtg.topology.exact_diagrams` computes its exact H0/H1 diagrams as given
(``metric_input="distances"``), every backend giving the same float64 numbers.
The filtration is cut at the enclosing radius min_i max_j d_ij (exact: the
complex is a cone from there), so the oldest H0 class is the only infinite
bar; two components that no attention joins (d = 1 between them) keep two
bars until r = 1, where the second dies.

**Features** (the paper's):

* Betti numbers of the *graph* thresholded at attention t (default 0.025,
  0.05, 0.1, 0.25, 0.5, 0.75): keep the edges with w_ij >= t; b0 is its number
  of connected components and b1 its cycle rank |E| - |V| + b0 (the first Betti
  number of the graph as a 1-complex: triangles are not filled, unlike the
  Rips H1 above). The graph at t is the Rips 1-skeleton at r = 1 - t, so b0(t)
  is the number of H0 bars alive there; thresholds are applied to w, not to
  1 - w, so no rounding moves an edge across them.
* Bar statistics per dimension, over the finite bars: count, total length,
  mean, maximum and the persistent entropy -sum_k p_k log p_k with
  p_k = l_k / sum l (nats). With no finite bar, every statistic is 0; the
  infinite bars are counted apart (``infinite``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from qtg.errors import TopologyError
from qtg.model.intervention import Intervention
from qtg.model.protocol import LanguageModel
from qtg.topology.budget import Budget
from qtg.topology.exact import DEFAULT_TIME_BUDGET, ExactDiagrams, exact_diagrams

THRESHOLDS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75)  # Kushnareva et al. (2021)
# float32 softmax rows can carry weights a few ulps above 1; beyond this, the map is refused
_WEIGHT_TOL = 1e-5


# --- reading a map ------------------------------------------------------------------------


def attention_weights(A: Any, name: str = "A") -> np.ndarray:
    """The symmetric edge weights w_ij = max(a_ij, a_ji) of one attention map, zero diagonal.

    Args:
        A: ``[N, N]`` attention map (numpy or torch), entries in [0, 1]; a causal map
            holds its lower triangle.
        name: what to call ``A`` in error messages.

    Returns:
        ``[N, N]`` float64, symmetric, entries in [0, 1], zero diagonal.

    Raises:
        TopologyError: not one square map, empty, non-finite, or entries outside [0, 1].
    """
    if hasattr(A, "detach"):  # a torch tensor
        A = A.detach().cpu().double().numpy()
    try:
        a = np.array(A, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TopologyError(f"{name}: cannot read the attention map as a float array: {e}") from None
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        hint = " (one head: pass maps[b, h], not the batch or every head)" if a.ndim > 2 else ""
        raise TopologyError(f"{name}: an attention map must be square [N, N], got shape {a.shape}{hint}")
    if a.shape[0] < 1:
        raise TopologyError(f"{name}: an attention map needs at least one token, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise TopologyError(f"{name}: the attention map holds NaN or inf")
    lo, hi = a.min(), a.max()
    if lo < -_WEIGHT_TOL or hi > 1.0 + _WEIGHT_TOL:
        raise TopologyError(f"{name}: attention weights must lie in [0, 1], got values from {lo:.4g} to {hi:.4g}")
    np.clip(a, 0.0, 1.0, out=a)
    w = np.maximum(a, a.T)
    np.fill_diagonal(w, 0.0)
    return w


def attention_distances(A: Any, name: str = "A") -> np.ndarray:
    """d_ij = 1 - max(a_ij, a_ji), zero diagonal: ``[N, N]`` float64 in [0, 1] (see the module docstring)."""
    d = 1.0 - attention_weights(A, name)
    np.fill_diagonal(d, 0.0)
    return d


# --- features -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BarStats:
    """Statistics of the finite bars of one diagram; 0 where there is no finite bar."""

    count: int
    total: float  # sum of lengths
    mean: float
    max: float
    entropy: float  # persistent entropy, nats
    infinite: int  # bars that never die (not in the statistics)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def bar_stats(dgm: np.ndarray) -> BarStats:
    """Count, total, mean, max and entropy of the finite bar lengths of ``dgm`` ``[n, 2]`` (birth, death)."""
    dgm = np.asarray(dgm, dtype=np.float64).reshape(-1, 2)
    finite = np.isfinite(dgm[:, 1])
    lengths = dgm[finite, 1] - dgm[finite, 0]
    total = float(lengths.sum())
    if total <= 0.0:
        return BarStats(len(lengths), 0.0, 0.0, 0.0, 0.0, int((~finite).sum()))
    p = lengths[lengths > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    return BarStats(len(lengths), total, total / len(lengths), float(lengths.max()), entropy, int((~finite).sum()))


def graph_betti(weights: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
                ) -> tuple[list[int], list[int], list[int]]:
    """Betti numbers of the graph of the edges with weight >= t, for each threshold t.

    Args:
        weights: ``[N, N]`` symmetric edge weights (from :func:`attention_weights`), zero diagonal.
        thresholds: attention levels in (0, 1].

    Returns:
        ``(b0, b1, edges)``, one entry per threshold: components, cycle rank |E| - |V| + b0, |E|.
    """
    n = weights.shape[0]
    upper = np.triu(weights, k=1)
    b0, b1, edges = [], [], []
    for t in thresholds:
        i, j = np.nonzero(upper >= t)
        graph = sparse.coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
        components = int(connected_components(graph, directed=False)[0])
        b0.append(components)
        b1.append(len(i) - n + components)
        edges.append(len(i))
    return b0, b1, edges


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    try:
        ts = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise TopologyError(f"thresholds must be numbers in (0, 1], got {thresholds!r}") from None
    bad = [t for t in ts if not 0.0 < t <= 1.0]
    if bad or not ts:
        raise TopologyError(f"thresholds must be numbers in (0, 1], got {list(ts)}")
    return ts


# --- the result -----------------------------------------------------------------------------


@dataclass
class AttentionTopology:
    """Exact diagrams of one attention graph, with the paper's features."""

    n_tokens: int
    diagrams: ExactDiagrams  # H0..H_maxdim of d = 1 - max(a_ij, a_ji)
    thresholds: tuple[float, ...]
    betti0: list[int]  # per threshold: components of the graph with weights >= t
    betti1: list[int]  # per threshold: its cycle rank
    edges: list[int]  # per threshold: its edge count
    bars: list[BarStats]  # per dimension
    distances: np.ndarray = field(repr=False)  # [N, N] float64

    def features(self) -> dict[str, float]:
        """One flat, named feature vector: ``b0@0.1``, ``b1@0.1``, ``h0_total``, ``h1_entropy``, ..."""
        out: dict[str, float] = {}
        for t, b0, b1 in zip(self.thresholds, self.betti0, self.betti1):
            out[f"b0@{t:g}"], out[f"b1@{t:g}"] = float(b0), float(b1)
        for dim, stats in enumerate(self.bars):
            for key in ("count", "total", "mean", "max", "entropy"):
                out[f"h{dim}_{key}"] = float(getattr(stats, key))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (infinite deaths become null, as in :meth:`ExactDiagrams.to_dict`); no distance matrix."""
        return {"n_tokens": self.n_tokens, "diagrams": self.diagrams.to_dict(), "thresholds": list(self.thresholds),
                "betti0": self.betti0, "betti1": self.betti1, "edges": self.edges,
                "bars": [s.to_dict() for s in self.bars], "features": self.features()}


def attention_graph(
    A: Any,
    maxdim: int = 1,
    backend: str = "auto",
    thresholds: Sequence[float] = THRESHOLDS,
    max_points: int | None = None,
    time_budget: float | Budget | None = DEFAULT_TIME_BUDGET,
) -> AttentionTopology:
    """Exact H0..H_maxdim of an attention map's graph, with Betti and bar features (module docstring).

    Args:
        A: ``[N, N]`` attention map of one head (numpy or torch), entries in [0, 1].
        maxdim: highest homology dimension (0 to 3; the paper uses 1).
        backend: an :func:`~qtg.topology.exact_diagrams` backend; all give the same numbers.
        thresholds: attention levels in (0, 1] for the graph Betti numbers.
        max_points, time_budget: as for :func:`~qtg.topology.exact_diagrams` (``.diagrams.bounds``
            says whether anything was bounded).

    Returns:
        :class:`AttentionTopology`.

    Raises:
        TopologyError: a bad map or argument (one line naming it), or work beyond the bounds.
    """
    ts = _check_thresholds(thresholds)
    w = attention_weights(A)
    d = 1.0 - w
    np.fill_diagonal(d, 0.0)
    dgms = exact_diagrams(d, maxdim=maxdim, backend=backend, metric_input="distances",
                          max_points=max_points, time_budget=time_budget)
    b0, b1, edges = graph_betti(w, ts)
    return AttentionTopology(n_tokens=d.shape[0], diagrams=dgms, thresholds=ts, betti0=b0, betti1=b1, edges=edges,
                             bars=[bar_stats(x) for x in dgms.dgms], distances=d)


# --- the heads of a model -------------------------------------------------------------------


def one_sequence(ids: Any) -> torch.Tensor:
    """Token ids as ``[1, N]`` int64 (given ``[N]`` or ``[1, N]``)."""
    t = torch.as_tensor(ids)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] != 1 or t.shape[1] < 1:
        raise TopologyError(f"ids must be one sequence, [N] or [1, N], got shape {tuple(t.shape)}")
    return t.long()


def check_block(model: LanguageModel, block: int) -> None:
    n = model.cfg.n_layers
    if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or not 0 <= block < n:
        raise TopologyError(f"block must be an integer in 0..{n - 1} (0-based), got {block!r}")


def check_heads(model: LanguageModel, heads: Sequence[int] | None) -> list[int]:
    n = model.cfg.n_heads
    if heads is None:
        return list(range(n))
    heads = list(heads)
    bad = [h for h in heads if not (isinstance(h, (int, np.integer)) and 0 <= h < n)]
    if bad or not heads:
        raise TopologyError(f"heads must be indices in 0..{n - 1}, got {heads}")
    return [int(h) for h in heads]


def head_attention_graphs(model: LanguageModel, ids: Any, block: int, heads: Sequence[int] | None = None,
                          intervene: Intervention | None = None, **kwargs: Any) -> list[AttentionTopology]:
    """:func:`attention_graph` of each head's map in one block, for QTG and the baseline alike.

    Args:
        model: a QTG or baseline model (``qtg.load``/``qtg.build``).
        ids: one sequence, ``[N]`` or ``[1, N]``.
        block: 0-based block index.
        heads: which heads (default all).
        intervene: a :class:`qtg.Intervention` for the forward pass.
        **kwargs: passed to :func:`attention_graph` (maxdim, backend, thresholds, ...).

    Returns:
        One :class:`AttentionTopology` per head, in the order of ``heads``.
    """
    check_block(model, block)
    heads = check_heads(model, heads)
    with torch.no_grad():
        out = model(one_sequence(ids).to(next(model.parameters()).device), return_internals=True,
                    intervene=intervene, map_blocks=[block])
    maps = out.attention[block][0]  # [H, N, N]
    return [attention_graph(maps[h], **kwargs) for h in heads]
