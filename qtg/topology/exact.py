"""Exact Vietoris-Rips persistence diagrams of token states, with bounded work.

``exact_diagrams(x)`` takes the ``[N, 2d]`` states of one sequence (any
layer: ``out.states[k][b]``) or a precomputed ``[N, N]`` distance matrix, and
returns H0..H_maxdim in ripser.py's convention: a list of ``[n, 2]`` float64
arrays of (birth, death), infinite deaths as ``inf``, zero-length bars not
reported. The filtration value of an edge is its length (not half of it),
the metric is the spec's delta_ij = ||psi_i - psi_j||_2 on the full real
view of the complex state, and homology is over Z/2.

What the computation does, in order, and why each step keeps the result exact:

1. **Validation.** NaN/inf rows, fewer than 2 points, wrong shapes, a distance
   matrix that is not square, symmetric, non-negative with a zero diagonal:
   :class:`~qtg.errors.TopologyError` naming the problem.
2. **Duplicates removed** (repeated tokens give identical QEmbed states). Exact:
   a duplicate enters at filtration 0 joined to its twin, so it adds one
   zero-length H0 bar, which is not reported, and changes nothing else (the
   flag complexes are homotopy equivalent at every scale). The spec measured
   ripser at 55 s with duplicates and 6.4 s without.
3. **Point limit.** Above ``max_points`` distinct points, a subset is kept:
   farthest-point sampling by default (``subsample="first"`` keeps the first
   ones, ``"error"`` refuses). Not exact; ``.bounds.hausdorff`` is the
   Hausdorff distance from the kept points to all, and by Rips stability
   (Chazal, de Silva & Oudot, 2014) the bottleneck error is at most twice it.
4. **Distances** in float64: the Gram form (one matmul), with the pairs close
   enough for its cancellation error to matter recomputed as ||x_i - x_j||.
5. **Edge threshold.** By default the enclosing radius r = min_i max_j d_ij:
   above it the Rips complex is a cone, so every bar is born and dies below
   it, and the cut is exact (Ripser uses the same cut). A lower ``max_edge``
   keeps every bar that is born and dies below it exactly, reports bars still
   alive there with death ``inf`` (ripser.py's convention), and drops bars
   born above it; ``.bounds`` says which happened.
6. **Engines** (:mod:`qtg.topology.backends`): ``auto`` computes H0 from the
   minimum spanning tree (exact, no complex, float64) and H1+ with ripser.py,
   which measured faster than gudhi on real model states: H0+H1 of 512 nano
   states (4 layers) took ripser 0.05-0.22 s and gudhi with edge collapse
   0.17-2.4 s (without collapse 1.3-21 s). On 256 random unit vectors gudhi
   was 1.2x faster (2.2 s vs 2.7 s); ``backend="gudhi"`` is there for such
   clouds. giotto-ph (a ripser variant) measured no faster on one thread.
   Measured on this 2-core machine while two trainings ran; the table is
   ``benchmarks/bench_topology.py``.
7. **Time budget.** Rips engines run in a child process that is killed when
   ``time_budget`` runs out or ``cancel`` is set; the error names the knobs.
   H0 by the spanning tree runs in-process: its cost is bounded by the point
   limit (O(N^2), about 1 s at N = 4096 on this machine).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from qtg.errors import TopologyError
from qtg.topology import backends

BACKENDS = ("auto", "gudhi", "ripser")
SUBSAMPLE = ("farthest", "first", "error")
# Interactive defaults, measured here: H0 by the spanning tree takes 0.5-1 s
# for 4096 points; H0+H1 of 1024 nano states (4 windows joined) 0.2-0.8 s,
# of 1024 random unit vectors far more than the time budget.
DEFAULT_MAX_POINTS_H0 = 4096
DEFAULT_MAX_POINTS_RIPS = 1024
HARD_MAX_POINTS = 16384  # a float64 distance matrix of 2 GiB: beyond it, refuse instead of swapping
DEFAULT_TIME_BUDGET = 20.0  # seconds
MAX_DIM = 3
IN_PROCESS_BELOW = 64  # distinct points: H0+H1 of fewer takes milliseconds; no child process for it
_NEAR_REL = 1e-6  # Gram-form sq distances below this x the largest sq norm are recomputed directly
_RECOMPUTE_CHUNK = 1 << 16  # pairs per chunk of that recomputation
_SYM_RTOL = 1e-9


@dataclass
class Bounds:
    """What was bounded, or that nothing was. ``exact`` is True when the
    diagrams are the exact diagrams of the whole input."""

    points_given: int
    points_distinct: int  # after removing duplicates (exact)
    points_kept: int  # after the point limit
    subsample: str  # "none", "farthest" or "first"
    hausdorff: float  # from the kept points to all distinct points; 0 when none was dropped
    edge_threshold: float  # the Rips filtration is cut here
    threshold_source: str  # "enclosing radius" (exact) or "max_edge"
    threshold_exact: bool  # True when the cut is at or above the enclosing radius
    enclosing_radius: float
    time_budget: float | None
    kept_indices: list[int] = field(repr=False)  # into the input, in input order

    @property
    def duplicates_removed(self) -> int:
        return self.points_given - self.points_distinct

    @property
    def bottleneck_bound(self) -> float:
        """Upper bound on the bottleneck distance to the exact diagrams of the whole input
        (threshold aside): 2 x Hausdorff distance (Rips stability)."""
        return 2.0 * self.hausdorff

    @property
    def exact(self) -> bool:
        return self.subsample == "none" and self.threshold_exact

    def describe(self) -> str:
        """One line a person can read."""
        parts = [f"{self.points_given} points given"]
        if self.duplicates_removed:
            parts.append(f"{self.duplicates_removed} duplicates removed (exact: each only adds a zero-length H0 bar)")
        if self.subsample != "none":
            parts.append(f"{self.points_kept} of {self.points_distinct} distinct points kept by {self.subsample}-point "
                         f"sampling (Hausdorff {self.hausdorff:.4g}: bottleneck error <= {self.bottleneck_bound:.4g})")
        if self.threshold_exact:
            parts.append(f"edges cut at {self.edge_threshold:.4g} = enclosing radius (exact)")
        else:
            parts.append(f"edges cut at max_edge = {self.edge_threshold:.4g} < enclosing radius "
                         f"{self.enclosing_radius:.4g}: bars alive there have death inf, bars born above are absent")
        if self.time_budget is not None:
            parts.append(f"time budget {self.time_budget:g} s")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(duplicates_removed=self.duplicates_removed, exact=self.exact,
                 bottleneck_bound=self.bottleneck_bound, description=self.describe())
        return d


@dataclass
class ExactDiagrams:
    """Exact persistence diagrams (ripser.py convention) and how they were computed."""

    dgms: list[np.ndarray]  # per dimension [n, 2] (birth, death), inf deaths
    backend: str  # the engines that ran, e.g. "mst+ripser"
    requested_backend: str
    seconds: float  # wall time of the whole call
    bounds: Bounds
    diameter: float  # largest distance among the kept points
    stage_seconds: dict[str, float]

    @property
    def maxdim(self) -> int:
        return len(self.dgms) - 1

    def total_persistence(self, dim: int, cap: float | None = None) -> float:
        """Sum of bar lengths in ``dim``; infinite bars count up to ``cap`` (default: the edge threshold)."""
        dgm = self.dgms[dim]
        cap = self.bounds.edge_threshold if cap is None else cap
        if dim == 0:  # the oldest component never dies: it is the cloud, not a feature (sorted last)
            dgm = dgm[:-1]
        return float(np.sum(np.minimum(dgm[:, 1], cap) - dgm[:, 0]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: infinite deaths become null."""
        return {
            "dgms": [[[float(b), None if np.isinf(d) else float(d)] for b, d in dgm] for dgm in self.dgms],
            "bars": [len(dgm) for dgm in self.dgms],
            "backend": self.backend, "requested_backend": self.requested_backend,
            "seconds": self.seconds, "stage_seconds": self.stage_seconds,
            "diameter": self.diameter, "bounds": self.bounds.to_dict(),
        }


# --- input handling ---------------------------------------------------------------


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TopologyError(f"cannot read the input as a float array: {e}") from None
    if arr.ndim != 2:
        hint = " (one sequence: pass states[k][b], not the batch)" if arr.ndim == 3 else ""
        raise TopologyError(f"expected [N, D] points or an [N, N] distance matrix, got shape {arr.shape}{hint}")
    if arr.shape[0] < 2:
        raise TopologyError(f"need at least 2 points, got {arr.shape[0]}")
    return arr


def _looks_like_distances(arr: np.ndarray) -> bool:
    n, m = arr.shape
    return (n == m and np.all(np.isfinite(arr)) and np.all(np.diag(arr) == 0) and np.all(arr >= 0)
            and np.allclose(arr, arr.T, rtol=_SYM_RTOL, atol=0))


def _check_finite_rows(arr: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~np.all(np.isfinite(arr), axis=1))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:8]) + (", ..." if bad.size > 8 else "")
        raise TopologyError(f"{what} {shown} contain NaN or inf ({bad.size} of {arr.shape[0]}); "
                            "persistence needs finite values")


def _check_distances(d: np.ndarray) -> None:
    n, m = d.shape
    if n != m:
        raise TopologyError(f"a distance matrix must be square, got shape {d.shape}")
    _check_finite_rows(d, "distance-matrix rows")
    if np.any(d < 0):
        raise TopologyError(f"a distance matrix must be non-negative; its smallest entry is {d.min():.4g}")
    if np.any(np.diag(d) != 0):
        worst = np.abs(np.diag(d)).max()
        raise TopologyError(f"a distance matrix must have a zero diagonal; its largest diagonal entry is {worst:.4g}")
    asym = np.abs(d - d.T).max()
    if asym > _SYM_RTOL * max(d.max(), 1e-300):
        raise TopologyError(f"a distance matrix must be symmetric; |D - D^T| reaches {asym:.4g}")


def _distinct_points(x: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row, in input order."""
    _, first = np.unique(x, axis=0, return_index=True)
    return np.sort(first)


def _distinct_in_matrix(d: np.ndarray) -> np.ndarray:
    """First index of each group of points at distance 0 from each other (a pseudometric's points)."""
    zero = (d == 0)
    np.fill_diagonal(zero, False)
    if not zero.any():
        return np.arange(d.shape[0])
    _, labels = connected_components(csr_matrix(zero), directed=False)
    _, first = np.unique(labels, return_index=True)
    return np.sort(first)


def euclidean_distances(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """||x_i - y_j||_2 in float64: Gram form, near pairs recomputed directly.

    The Gram form |x|^2 + |y|^2 - 2<x, y> loses a few ulps of the largest
    squared norm S to cancellation, which alone would put distinct points up to
    ~1e-8 sqrt(S) apart at 0. Pairs with a squared distance below 1e-6 S are
    recomputed from their difference (in chunks, so memory stays bounded), so
    every distance has a relative error below about 1e-9. Returns
    ``[len(x), len(y)]``, exactly symmetric when ``y`` is None.
    """
    same = y is None
    y = x if same else y
    nx, ny = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    sq = x @ y.T
    sq *= -2.0
    sq += nx[:, None]
    sq += ny[None, :]
    i, j = np.nonzero(sq < _NEAR_REL * max(nx.max(), ny.max()))
    for start in range(0, len(i), _RECOMPUTE_CHUNK):
        a, b = i[start:start + _RECOMPUTE_CHUNK], j[start:start + _RECOMPUTE_CHUNK]
        diff = x[a] - y[b]
        sq[a, b] = np.einsum("ij,ij->i", diff, diff)
    np.maximum(sq, 0.0, out=sq)
    d = np.sqrt(sq, out=sq)
    if same:
        np.fill_diagonal(d, 0.0)
        np.minimum(d, d.T, out=d)  # Gram rounding differs by a few ulps across the diagonal
    return d


# --- the point limit ------------------------------------------------------------------


def _farthest_first(dist_to: Any, n: int, k: int) -> tuple[np.ndarray, float]:
    """Greedy farthest-point order from point 0: (k chosen indices, Hausdorff distance to all n)."""
    chosen = [0]
    gap = dist_to(0).copy()
    for _ in range(k - 1):
        j = int(np.argmax(gap))
        chosen.append(j)
        np.minimum(gap, dist_to(j), out=gap)
    return np.sort(np.array(chosen)), float(gap.max())


def _limit(arr: np.ndarray, is_points: bool, limit: int, how: str) -> tuple[np.ndarray, str, float]:
    """(indices kept among ``arr``'s rows, how they were chosen, Hausdorff distance)."""
    n = arr.shape[0]
    if n <= limit:
        return np.arange(n), "none", 0.0
    if how == "error":
        raise TopologyError(f"{n} distinct points exceed max_points={limit}; raise max_points (--max-points) "
                            "or allow subsampling (subsample='farthest' or 'first')")

    def dist_to(i: int) -> np.ndarray:
        return euclidean_distances(arr[i:i + 1], arr)[0] if is_points else arr[i]

    if how == "first":
        kept = np.arange(limit)
        gap = np.full(n, np.inf)
        for i in kept:
            np.minimum(gap, dist_to(int(i)), out=gap)
        return kept, "first", float(gap.max())
    kept, hausdorff = _farthest_first(dist_to, n, limit)
    return kept, "farthest", hausdorff


# --- the public function ----------------------------------------------------------------


def _check_args(maxdim: int, backend: str, max_edge: float | None, max_points: int | None,
                time_budget: float | None, metric_input: str, subsample: str) -> None:
    if not isinstance(maxdim, (int, np.integer)) or not 0 <= maxdim <= MAX_DIM:
        raise TopologyError(f"maxdim must be an integer from 0 to {MAX_DIM}, got {maxdim!r}")
    if backend not in BACKENDS:
        raise TopologyError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if max_edge is not None and not (np.isfinite(max_edge) and max_edge > 0):
        raise TopologyError(f"max_edge must be a positive finite length, got {max_edge!r}")
    if max_points is not None and not (2 <= max_points <= HARD_MAX_POINTS):
        raise TopologyError(f"max_points must lie in [2, {HARD_MAX_POINTS}] (its distance matrix takes "
                            f"max_points^2 x 8 bytes), got {max_points!r}")
    if time_budget is not None and not time_budget > 0:
        raise TopologyError(f"time_budget must be positive seconds or None, got {time_budget!r}")
    if metric_input not in ("auto", "points", "distances"):
        raise TopologyError(f"metric_input must be 'auto', 'points' or 'distances', got {metric_input!r}")
    if subsample not in SUBSAMPLE:
        raise TopologyError(f"subsample must be one of {', '.join(SUBSAMPLE)}, got {subsample!r}")


def _engines(backend: str, maxdim: int) -> tuple[str, str | None]:
    """(engine for H0, engine for H1..maxdim or None)."""
    if backend == "auto":
        return "mst", ("ripser" if maxdim >= 1 else None)
    return backend, backend


def _prepare(data: Any, metric_input: str, limit: int,
             subsample: str) -> tuple[np.ndarray, np.ndarray, int, int, str, float]:
    """Validated, deduplicated, limited distances.

    Returns:
        (D, kept indices into the input, points given, distinct points, how chosen, Hausdorff distance).
    """
    arr = _as_array(data)
    is_points = metric_input == "points" or (metric_input == "auto" and not _looks_like_distances(arr))
    if is_points:
        _check_finite_rows(arr, "rows")
        distinct = _distinct_points(arr)
    else:
        _check_distances(arr)
        distinct = _distinct_in_matrix(arr)
    sub = arr[distinct] if is_points else arr[np.ix_(distinct, distinct)]
    keep, how, hausdorff = _limit(sub, is_points, limit, subsample)
    kept = distinct[keep]
    d = euclidean_distances(arr[kept]) if is_points else arr[np.ix_(kept, kept)]
    return d, kept, arr.shape[0], len(distinct), how, hausdorff


def exact_diagrams(
    points_or_distances: Any,
    maxdim: int = 1,
    backend: str = "auto",
    max_edge: float | None = None,
    max_points: int | None = None,
    time_budget: float | None = DEFAULT_TIME_BUDGET,
    metric_input: str = "auto",
    subsample: str = "farthest",
    cancel: threading.Event | None = None,
) -> ExactDiagrams:
    """Exact Vietoris-Rips persistence diagrams H0..H_maxdim (see the module docstring).

    Args:
        points_or_distances: ``[N, D]`` points (numpy or torch; e.g. ``out.states[k][b]``) or an
            ``[N, N]`` distance matrix.
        maxdim: highest homology dimension (0 to 3).
        backend: ``"auto"`` (H0 by the spanning tree, H1+ by ripser.py), ``"gudhi"`` or ``"ripser"``
            (every dimension from that library).
        max_edge: cut the filtration at this edge length (default: the enclosing radius, exact).
        max_points: distinct points kept (default 4096 for H0 only, 1024 otherwise).
        time_budget: seconds before the Rips engine is stopped (None: no limit, in this process).
        metric_input: ``"points"``, ``"distances"``, or ``"auto"``: a square, symmetric, non-negative
            matrix with a zero diagonal is read as distances.
        subsample: above ``max_points``: ``"farthest"`` (default), ``"first"`` or ``"error"``.
        cancel: a ``threading.Event``; setting it stops the Rips engine.

    Returns:
        :class:`ExactDiagrams`.

    Raises:
        TopologyError: bad input, or work beyond the bounds (the message names the knob).
    """
    _check_args(maxdim, backend, max_edge, max_points, time_budget, metric_input, subsample)
    t0 = time.perf_counter()
    limit = max_points or (DEFAULT_MAX_POINTS_H0 if maxdim == 0 else DEFAULT_MAX_POINTS_RIPS)
    d, kept, given, distinct, how, hausdorff = _prepare(points_or_distances, metric_input, limit, subsample)
    enclosing = float(d.max(axis=1).min())
    threshold = enclosing if max_edge is None else min(float(max_edge), enclosing)
    bounds = Bounds(points_given=given, points_distinct=distinct, points_kept=len(kept), subsample=how,
                    hausdorff=hausdorff, edge_threshold=threshold,
                    threshold_source="enclosing radius" if threshold == enclosing else "max_edge",
                    threshold_exact=threshold >= enclosing, enclosing_radius=enclosing,
                    time_budget=time_budget, kept_indices=kept.tolist())
    t1 = time.perf_counter()
    dgms, engine_names, stage = _compute(d, maxdim, backend, threshold, time_budget, cancel)
    stage = {"prepare": t1 - t0, **stage}
    return ExactDiagrams(dgms=dgms, backend="+".join(engine_names), requested_backend=backend,
                         seconds=time.perf_counter() - t0, bounds=bounds, diameter=float(d.max()),
                         stage_seconds=stage)


def _compute(d: np.ndarray, maxdim: int, backend: str, threshold: float, time_budget: float | None,
             cancel: threading.Event | None) -> tuple[list[np.ndarray], list[str], dict[str, float]]:
    h0_engine, rips_engine = _engines(backend, maxdim)
    names, stage, dgms = [], {}, []
    if h0_engine == "mst":
        t = time.perf_counter()
        dgms = [backends.h0_from_mst(d, threshold)]
        stage["mst"] = time.perf_counter() - t
        names.append("mst")
    if rips_engine is not None:
        t = time.perf_counter()
        what = f"{rips_engine} H0..H{maxdim} of {d.shape[0]} points"
        tiny = d.shape[0] < IN_PROCESS_BELOW and maxdim <= 1 and cancel is None
        budget = None if tiny else time_budget
        backends.preload(rips_engine)
        rips = backends.run_bounded(backends.engine_diagrams, (rips_engine, d, maxdim, threshold), budget, what, cancel)
        dgms = dgms + rips[len(dgms):]  # keep the float64 spanning-tree H0 when it ran
        stage[rips_engine] = time.perf_counter() - t
        names.append(rips_engine)
    return dgms, names, stage
