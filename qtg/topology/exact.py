"""Exact Vietoris-Rips persistence diagrams of token states, with bounded work.

``exact_diagrams(x)`` takes the ``[N, 2d]`` states of one sequence (any
layer: ``out.states[k][b]``) or a precomputed ``[N, N]`` distance matrix, and
returns H0..H_maxdim in ripser.py's convention: a list of ``[n, 2]`` float64
arrays of (birth, death), infinite deaths as ``inf``, zero-length bars not
reported. The filtration value of an edge is its length (not half of it),
the metric is the TopoFilter's delta_ij = ||psi_i - psi_j||_2 on the full
real view of the complex state (docs/model.md, section 2), and homology is
over Z/2.

What the computation does, in order, and why each step keeps the result exact:

1. **Reading the input.** ``metric_input`` says whether rows are points or
   the matrix is distances. Left at ``"auto"``, a non-square array is points,
   a sparse matrix is refused, and a *square* array is read as distances
   when it is a valid distance matrix (finite, symmetric, non-negative, zero
   diagonal) and as points otherwise, with a ``UserWarning`` that says which
   reading was taken and why (a square array is ambiguous: ``[[0, 1], [1, 0]]``
   is both). Complex points (numpy or torch) are taken as their real
   ``[N, 2d]`` view, real half then imaginary half, the model's convention.
   A scipy sparse matrix is read, with ``metric_input="distances"``, when it
   stores every pair. Anything else (NaN, infinite distances, which would be
   missing edges, a nonzero diagonal, asymmetry, no coordinates):
   :class:`~qtg.errors.TopologyError` naming the problem.
2. **Duplicates removed**: points with identical rows (repeated tokens give
   identical QEmbed states), or in a distance matrix, rows that are
   identical (so the two are at distance 0 and equally far from every other
   point). Exact: a duplicate enters at filtration 0 joined to its twin and
   to everything its twin is joined to, so the complex collapses onto the
   twin at every scale; the duplicate adds one zero-length H0 bar, which is
   not reported. A distance matrix that is not a metric (a zero between two
   points that other points see differently, a broken triangle inequality)
   is kept whole: the Rips filtration of any symmetric dissimilarity is well
   defined, and the engines compute it as given.
3. **Point limit.** Above ``max_points`` distinct points, a subset is kept:
   farthest-point sampling by default (``subsample="first"`` keeps the first
   ones, ``"error"`` refuses). Not exact; ``.bounds.hausdorff`` is the
   Hausdorff distance from the kept points to all, and by Rips stability
   (Chazal, de Silva & Oudot, 2014) the bottleneck error is at most twice it.
4. **Distances** in float64, from points centred on their mean (the Gram
   form's rounding scales with the squared norms, so points far from the
   origin would lose digits): the Gram form (one matmul), with the pairs close
   enough for its cancellation error to matter recomputed as ||x_i - x_j||.
5. **Edge threshold.** By default the enclosing radius r = min_i max_j d_ij:
   from r on, some point is joined to all others, so the Rips complex is a
   cone, every bar is born and dies below r, and the cut is exact (Ripser uses
   the same cut; it needs no triangle inequality). A lower ``max_edge`` keeps
   every bar that is born and dies below it exactly, reports bars still alive
   there with death ``inf`` (ripser.py's convention), and drops bars born
   above it; ``.bounds`` says which happened.
6. **Engines** (:mod:`qtg.topology.backends`): ``"gudhi"``, ``"ripser"`` and
   ``"giotto-ph"`` compute every dimension with that library; ``"auto"``
   computes H0 from the minimum spanning tree (no complex) and H1+ with the
   engine ``benchmarks/bench_topology.py`` measured fastest (see
   :data:`AUTO_RIPS_ENGINE`). Every engine gives the exact diagrams of the
   float64 distances: ``mst`` and gudhi work in float64, and ripser.py and
   giotto-ph, which store float32, are given the ranks of the edge lengths,
   which float32 holds exactly (``backends`` explains why that is exact).
   ``.bounds.precision`` and ``.bounds.value_error`` say what was obtained:
   "float64" and 0, unless a float32 engine met more than 2^24 distinct edge
   lengths (from about 5,800 points), where its values are float32 and
   ``value_error`` is 2^-24 of the threshold. Two engines on the same input
   therefore agree number for number, and disagreement is a bug.
7. **Time budget.** ``time_budget`` bounds the whole call, every stage: the
   point limit and H0 by the spanning tree (in this process, checked every few
   iterations) and the Rips engine (in a child process, killed when the budget
   runs out or ``cancel`` is set); the error names the knobs. A
   :class:`~qtg.topology.budget.Budget` given instead is shared: several calls
   (two engines, a layer sweep) draw on one budget.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import sparse

from qtg.errors import TopologyError
from qtg.topology import backends
from qtg.topology.budget import Budget, as_budget

BACKENDS = ("auto", "gudhi", "ripser", "giotto-ph")
SUBSAMPLE = ("farthest", "first", "error")
METRIC_INPUTS = ("auto", "points", "distances")
# H1+ engine of backend="auto": the fastest in benchmarks/bench_topology.py (results in
# benchmarks/results/topology_cpu.json), on random clouds and on model states alike.
AUTO_RIPS_ENGINE = "giotto-ph"
# Interactive defaults (benchmarks/bench_topology.py): H0 by the spanning tree stays near a
# second up to 4096 points; H0+H1 of 1024 points within a few seconds.
DEFAULT_MAX_POINTS_H0 = 4096
DEFAULT_MAX_POINTS_RIPS = 1024
HARD_MAX_POINTS = 16384  # a float64 distance matrix of 2 GiB: beyond it, refuse instead of swapping
DEFAULT_TIME_BUDGET = 20.0  # seconds
MAX_DIM = 3
IN_PROCESS_BELOW = 64  # distinct points: H0+H1 of fewer takes milliseconds; no child process for it
_NEAR_REL = 1e-6  # Gram-form sq distances below this x the largest sq norm are recomputed directly
_RECOMPUTE_BYTES = 32 * 2**20  # each of the three [pairs, D] arrays of a chunk of that recomputation, at most
_CHECK_EVERY = 16  # points chosen by farthest-point sampling between two looks at the time budget
_SYM_RTOL = 1e-9


@dataclass
class Bounds:
    """What was bounded, or that nothing was, and how precise the values are. ``exact`` is True
    when the diagrams are the exact diagrams of the whole input (``value_error`` aside, which is 0
    unless a float32 engine met more than 2^24 distinct edge lengths)."""

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
    reading: str = "points"  # how the input was read: "points" or "distances"
    precision: str = "float64"  # of the reported values: "float64" (exact) or "float32"
    value_error: float = 0.0  # bound on |reported - exact| for every birth and death (and the bottleneck)

    @property
    def duplicates_removed(self) -> int:
        return self.points_given - self.points_distinct

    @property
    def bottleneck_bound(self) -> float:
        """Upper bound on the bottleneck distance to the exact diagrams of the whole input
        (threshold aside): 2 x Hausdorff distance (Rips stability), plus the value error."""
        return 2.0 * self.hausdorff + self.value_error

    @property
    def exact(self) -> bool:
        return self.subsample == "none" and self.threshold_exact

    def describe(self) -> str:
        """One line a person can read."""
        parts = [f"{self.points_given} {'points' if self.reading == 'points' else 'points (a distance matrix)'} "
                 "given"]
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
        if self.precision == "float64":
            parts.append("values exact in float64")
        else:
            parts.append(f"values in {self.precision}, within {self.value_error:.3g} of the exact ones")
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
    backend: str  # the engines that ran, e.g. "mst+giotto-ph"
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


# --- reading the input ---------------------------------------------------------------


def _real_view(x: Any) -> Any:
    """Complex numbers as their real ``[..., 2d]`` view: real half, then imaginary half (the model's
    convention), for numpy arrays and torch tensors alike; anything else unchanged."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_complex():
            return np.concatenate([x.real.double().numpy(), x.imag.double().numpy()], axis=-1)
        return x.double().numpy()
    if np.iscomplexobj(x):
        x = np.asarray(x)
        return np.concatenate([x.real, x.imag], axis=-1)
    return x


def _is_complex(x: Any) -> bool:
    return bool(x.is_complex()) if hasattr(x, "is_complex") else np.iscomplexobj(x)


def _float_array(x: Any) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TopologyError(f"cannot read the input as a float array: {e}") from None
    if arr.ndim != 2:
        hint = " (one sequence: pass states[k][b], not the batch)" if arr.ndim == 3 else ""
        raise TopologyError(f"expected [N, D] points or an [N, N] distance matrix, got shape {arr.shape}{hint}")
    if arr.shape[0] < 1:
        raise TopologyError(f"need at least 1 point, got shape {arr.shape}")
    return arr


def _from_sparse(m: Any) -> np.ndarray:
    """A scipy sparse distance matrix that stores every pair (in either triangle, or both, equal), dense."""
    n, k = m.shape
    if n != k:
        raise TopologyError(f"a distance matrix must be square, got a sparse matrix of shape {m.shape}")
    coo = sparse.coo_matrix(m)  # duplicate entries of one position are summed, as scipy reads them
    coo.sum_duplicates()
    row, col, val = coo.row.astype(np.intp), coo.col.astype(np.intp), coo.data.astype(np.float64)
    if np.any(val[row == col] != 0):
        raise TopologyError("a distance matrix must have a zero diagonal; this sparse matrix stores a nonzero "
                            "diagonal entry (vertex birth times are not supported)")
    off = row != col
    lo, hi, val = np.minimum(row, col)[off], np.maximum(row, col)[off], val[off]
    d = np.full((n, n), np.nan)
    d[lo, hi] = val
    d[hi, lo] = val
    if np.any(d[lo, hi] != val):  # a pair stored in both triangles with two values
        raise TopologyError("a sparse distance matrix stores two different values for one pair (i, j) and (j, i)")
    np.fill_diagonal(d, 0.0)
    missing = int(np.isnan(d).sum()) // 2
    if missing:
        raise TopologyError(f"a sparse distance matrix must store every pair: {missing} of {n * (n - 1) // 2} pairs "
                            "are missing, and missing edges are not supported (give every pair a finite distance; "
                            "max_edge cuts long edges)")
    return d


def _distance_problem(d: np.ndarray) -> str | None:
    """Why ``d`` is not a distance matrix this module accepts, or None."""
    n, m = d.shape
    if n != m:
        return f"a distance matrix must be square, got shape {d.shape}"
    if np.isnan(d).any():
        return f"distance-matrix {_rows(~np.isnan(d), 'NaN')}"
    if np.isinf(d).any():
        return (f"distance-matrix {_rows(~np.isinf(d), 'inf')}: missing edges (infinite distances) are not "
                "supported; give every pair a finite distance (max_edge cuts long edges)")
    if np.any(d < 0):
        return f"a distance matrix must be non-negative; its smallest entry is {d.min():.4g}"
    if np.any(np.diag(d) != 0):
        worst = np.abs(np.diag(d)).max()
        return (f"a distance matrix must have a zero diagonal (vertex birth times are not supported); its largest "
                f"diagonal entry is {worst:.4g}")
    asym = np.abs(d - d.T).max()
    if asym > _SYM_RTOL * max(d.max(), 1e-300):
        return (f"a distance matrix must be symmetric; |D - D^T| reaches {asym:.4g} (of entries up to {d.max():.4g}: "
                "symmetrise it, e.g. (D + D.T) / 2)")
    return None


def _rows(ok: np.ndarray, what: str) -> str:
    """The phrase ``rows 3, 7 contain <what> (2 of 10)`` for the rows of ``ok`` that are not all True."""
    bad = np.flatnonzero(~np.all(ok, axis=1))
    shown = ", ".join(str(i) for i in bad[:8]) + (", ..." if bad.size > 8 else "")
    return f"rows {shown} contain {what} ({bad.size} of {ok.shape[0]})"


def _check_points(x: np.ndarray) -> None:
    if x.shape[1] < 1:
        raise TopologyError(f"points need at least one coordinate, got shape {x.shape}")
    finite = np.isfinite(x)
    if not finite.all():
        raise TopologyError(f"{_rows(finite, 'NaN or inf')}; persistence needs finite values")


def _check_distances(d: np.ndarray) -> None:
    problem = _distance_problem(d)
    if problem is not None:
        raise TopologyError(problem)


def _square_reading(arr: np.ndarray) -> bool:
    """Read a square array under metric_input="auto": distances when it is a valid distance matrix.
    Always warns, saying which reading was taken. Returns True for points."""
    n = arr.shape[0]
    problem = _distance_problem(arr)
    if problem is None:
        taken, other = "a distance matrix", f"metric_input='points' to read it as {n} points in {n}-D"
    else:
        taken, other = f"{n} points in {n}-D (as a distance matrix: {problem})", "metric_input='distances'"
    warnings.warn(f"exact_diagrams: a square {n}x{n} array is ambiguous; it was read as {taken}. Pass {other}, "
                  "or the reading you mean, to decide.", UserWarning, stacklevel=5)
    return problem is not None


def read_input(data: Any, metric_input: str = "auto") -> tuple[np.ndarray, bool]:
    """Points or a distance matrix, validated (see the module docstring, step 1).

    Args:
        data: ``[N, D]`` points (numpy or torch, real or complex), an ``[N, N]`` distance matrix
            (dense, or scipy sparse with every pair stored).
        metric_input: ``"points"``, ``"distances"`` or ``"auto"``.

    Returns:
        ``(float64 array, is_points)``; complex points as ``[N, 2D]``.
    """
    if sparse.issparse(data):
        if metric_input != "distances":
            raise TopologyError("a scipy sparse matrix is read only as a distance matrix: pass "
                                "metric_input='distances' (or a dense array of points)")
        return _from_sparse(data), False
    if _is_complex(data) and metric_input == "distances":
        raise TopologyError("a distance matrix cannot be complex; complex points are read as their real [N, 2d] "
                            "view with metric_input='points'")
    arr = _float_array(_real_view(data))
    if metric_input == "points":
        is_points = True
    elif metric_input == "distances":
        is_points = False
    else:  # auto: only a square array is ambiguous, and then never silently
        is_points = arr.shape[0] != arr.shape[1] or arr.shape[0] == 1 or _square_reading(arr)
    if is_points:
        _check_points(arr)
    else:
        _check_distances(arr)
    return arr, is_points


def _distinct_rows(x: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row, in input order. For a distance matrix
    with a zero diagonal, identical rows i, j have d_ij = d_jj = 0 and see every point alike."""
    _, first = np.unique(x, axis=0, return_index=True)
    return np.sort(first)


def euclidean_distances(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """||x_i - y_j||_2 in float64: centred, Gram form, near pairs recomputed directly.

    Both sets are first centred on x's mean (distances do not change; the Gram
    form's rounding, a few ulps of the largest squared norm S, shrinks from
    the squared distance to the origin to the squared spread). Pairs with a
    squared distance below 1e-6 S are then recomputed from their difference (in
    chunks, so memory stays bounded), so every distance has a relative error
    below about 1e-9. Returns ``[len(x), len(y)]``, exactly symmetric when
    ``y`` is None.
    """
    same = y is None
    centre = x.mean(axis=0)
    x = x - centre
    y = x if same else y - centre
    nx, ny = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    sq = x @ y.T
    sq *= -2.0
    sq += nx[:, None]
    sq += ny[None, :]
    i, j = np.nonzero(sq < _NEAR_REL * max(nx.max(), ny.max()))
    if same:  # the diagonal is 0 (set below): only pairs of distinct indices need recomputing
        i, j = i[i != j], j[i != j]
    # chunks of pairs sized by bytes, not pairs: 65,536 pairs of 6,144-wide states (7b) once took 3 GiB apiece
    chunk = max(1, _RECOMPUTE_BYTES // (8 * x.shape[1]))
    for start in range(0, len(i), chunk):
        a, b = i[start:start + chunk], j[start:start + chunk]
        diff = x[a] - y[b]
        sq[a, b] = np.einsum("ij,ij->i", diff, diff)
    np.maximum(sq, 0.0, out=sq)
    d = np.sqrt(sq, out=sq)
    if same:
        np.fill_diagonal(d, 0.0)
        np.minimum(d, d.T, out=d)  # Gram rounding differs by a few ulps across the diagonal
    return d


# --- the point limit ------------------------------------------------------------------


def _farthest_first(dist_to: Any, n: int, k: int, budget: Budget) -> tuple[np.ndarray, float]:
    """Greedy farthest-point order from point 0: (k chosen indices, Hausdorff distance to all n)."""
    chosen = [0]
    gap = dist_to(0).copy()
    for i in range(k - 1):
        if i % _CHECK_EVERY == 0:
            budget.check(f"choosing {k} of {n} points")
        j = int(np.argmax(gap))
        chosen.append(j)
        np.minimum(gap, dist_to(j), out=gap)
    return np.sort(np.array(chosen)), float(gap.max())


def _limit(arr: np.ndarray, is_points: bool, limit: int, how: str,
           budget: Budget) -> tuple[np.ndarray, str, float]:
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
            if i % _CHECK_EVERY == 0:
                budget.check(f"the Hausdorff distance of the first {limit} of {n} points")
            np.minimum(gap, dist_to(int(i)), out=gap)
        return kept, "first", float(gap.max())
    kept, hausdorff = _farthest_first(dist_to, n, limit, budget)
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
    if time_budget is not None and not isinstance(time_budget, Budget) and not time_budget > 0:
        raise TopologyError(f"time_budget must be positive seconds, a Budget or None, got {time_budget!r}")
    if metric_input not in METRIC_INPUTS:
        raise TopologyError(f"metric_input must be 'auto', 'points' or 'distances', got {metric_input!r}")
    if subsample not in SUBSAMPLE:
        raise TopologyError(f"subsample must be one of {', '.join(SUBSAMPLE)}, got {subsample!r}")


def _engines(backend: str, maxdim: int) -> tuple[str, str | None]:
    """(engine for H0, engine for H1..maxdim or None)."""
    if backend == "auto":
        return "mst", (AUTO_RIPS_ENGINE if maxdim >= 1 else None)
    return backend, backend


def _prepare(data: Any, metric_input: str, limit: int, subsample: str,
             budget: Budget) -> tuple[np.ndarray, np.ndarray, int, int, str, float, bool]:
    """Validated, deduplicated, limited distances.

    Returns:
        (D, kept indices into the input, points given, distinct points, how chosen, Hausdorff distance,
        whether the input was read as points).
    """
    arr, is_points = read_input(data, metric_input)
    distinct = _distinct_rows(arr)
    sub = arr[distinct] if is_points else arr[np.ix_(distinct, distinct)]
    keep, how, hausdorff = _limit(sub, is_points, limit, subsample, budget)
    kept = distinct[keep]
    d = euclidean_distances(arr[kept]) if is_points else arr[np.ix_(kept, kept)]
    return d, kept, arr.shape[0], len(distinct), how, hausdorff, is_points


def exact_diagrams(
    points_or_distances: Any,
    maxdim: int = 1,
    backend: str = "auto",
    max_edge: float | None = None,
    max_points: int | None = None,
    time_budget: float | Budget | None = DEFAULT_TIME_BUDGET,
    metric_input: str = "auto",
    subsample: str = "farthest",
    cancel: threading.Event | None = None,
) -> ExactDiagrams:
    """Exact Vietoris-Rips persistence diagrams H0..H_maxdim (see the module docstring).

    Args:
        points_or_distances: ``[N, D]`` points (numpy or torch, real or complex; e.g.
            ``out.states[k][b]``) or an ``[N, N]`` distance matrix (dense, or scipy sparse storing
            every pair, with ``metric_input="distances"``).
        maxdim: highest homology dimension (0 to 3).
        backend: ``"auto"`` (H0 by the spanning tree, H1+ by :data:`AUTO_RIPS_ENGINE`), ``"gudhi"``,
            ``"ripser"`` or ``"giotto-ph"`` (every dimension from that library). All give the exact
            float64 diagrams (``.bounds.precision``).
        max_edge: cut the filtration at this edge length (default: the enclosing radius, exact).
        max_points: distinct points kept (default 4096 for H0 only, 1024 otherwise).
        time_budget: seconds for the whole call, every stage (None: no limit, the engine in this process), or
            a :class:`~qtg.topology.budget.Budget` shared with other calls (its cancel event, not ``cancel``).
        metric_input: ``"points"``, ``"distances"``, or ``"auto"``: a non-square array is points; a
            square one is distances when it is a valid distance matrix, points otherwise, and a
            ``UserWarning`` says which reading was taken.
        subsample: above ``max_points``: ``"farthest"`` (default), ``"first"`` or ``"error"``.
        cancel: a ``threading.Event``; setting it stops the work.

    Returns:
        :class:`ExactDiagrams`.

    Raises:
        TopologyError: bad input, or work beyond the bounds (the message names the knob).
        BudgetExceeded: (a TopologyError) the time budget ran out or ``cancel`` was set.
    """
    _check_args(maxdim, backend, max_edge, max_points, time_budget, metric_input, subsample)
    budget = as_budget(time_budget, cancel)
    budget.check("the exact diagrams")
    t0 = time.perf_counter()
    limit = max_points or (DEFAULT_MAX_POINTS_H0 if maxdim == 0 else DEFAULT_MAX_POINTS_RIPS)
    d, kept, given, distinct, how, hausdorff, is_points = _prepare(points_or_distances, metric_input, limit,
                                                                   subsample, budget)
    enclosing = float(d.max(axis=1).min())
    threshold = enclosing if max_edge is None else min(float(max_edge), enclosing)
    t1 = time.perf_counter()
    dgms, engine_names, stage, job = _compute(d, maxdim, backend, threshold, budget)
    bounds = Bounds(points_given=given, points_distinct=distinct, points_kept=len(kept), subsample=how,
                    hausdorff=hausdorff, edge_threshold=threshold,
                    threshold_source="enclosing radius" if threshold == enclosing else "max_edge",
                    threshold_exact=threshold >= enclosing, enclosing_radius=enclosing,
                    time_budget=budget.seconds, kept_indices=kept.tolist(),
                    reading="points" if is_points else "distances",
                    precision=job.precision if job else "float64", value_error=job.value_error if job else 0.0)
    return ExactDiagrams(dgms=dgms, backend="+".join(engine_names), requested_backend=backend,
                         seconds=time.perf_counter() - t0, bounds=bounds, diameter=float(d.max()),
                         stage_seconds={"prepare": t1 - t0, **stage})


def _compute(d: np.ndarray, maxdim: int, backend: str, threshold: float, budget: Budget
             ) -> tuple[list[np.ndarray], list[str], dict[str, float], backends.EngineInput | None]:
    """(diagrams, engines that ran, seconds per stage, what the Rips engine was given or None)."""
    h0_engine, rips_engine = _engines(backend, maxdim)
    names, stage, dgms, job = [], {}, [], None
    if h0_engine == "mst":
        t = time.perf_counter()
        h0 = f"H0 (spanning tree) of {d.shape[0]} points"
        dgms = [backends.h0_from_mst(d, threshold, check=lambda: budget.check(h0))]
        stage["mst"] = time.perf_counter() - t
        names.append("mst")
    if rips_engine is not None:
        t = time.perf_counter()
        job = backends.engine_input(rips_engine, d, threshold)
        what = f"{rips_engine} H0..H{maxdim} of {d.shape[0]} points"
        backends.preload(rips_engine)
        if d.shape[0] < IN_PROCESS_BELOW and maxdim <= 1:  # milliseconds: no child process, checked before and after
            budget.check(what)
            raw = backends.engine_diagrams(rips_engine, job.matrix, maxdim, job.threshold)
            budget.check(what)
        else:
            raw = backends.run_bounded(backends.engine_diagrams, (rips_engine, job.matrix, maxdim, job.threshold),
                                       budget, what)
        rips = backends.unrank(raw, job.values)
        dgms = dgms + rips[len(dgms):]  # keep the float64 spanning-tree H0 when it ran
        stage[rips_engine] = time.perf_counter() - t
        names.append(rips_engine)
    return dgms, names, stage, job
