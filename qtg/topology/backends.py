"""The engines behind :func:`qtg.topology.exact_diagrams`, and the runner that bounds them.

Every engine takes a dense distance matrix (float64 lengths, or their ranks
for the float32 engines: see *Precision* below) and an edge threshold, and
returns diagrams in ripser.py's convention: one ``[n, 2]`` float64 array per
dimension, infinite deaths as ``inf``, zero-length bars dropped, rows sorted
by (death, birth).

* ``mst``: H0 only. The H0 barcode of a Vietoris-Rips filtration is the
  single-linkage dendrogram: each finite bar dies at one edge of the minimum
  spanning tree (Kruskal's algorithm is the H0 persistence algorithm; see
  Edelsbrunner & Harer, *Computational Topology*, 2010, ch. VII). No complex
  is built. The tree comes from Prim's algorithm on the dense matrix, O(N^2)
  in numpy, with no conversion to a sparse graph (scipy's
  ``minimum_spanning_tree`` would read zero-length edges as missing). The
  tests hold it equal to scipy's tree of an explicit sparse graph.
* ``gudhi``: the flag complex built from the thresholded edge matrix
  (``SimplexTree.create_from_array``), reduced by edge collapse (Boissonnat &
  Pritam, 2020: it preserves the persistence of the flag complex in every
  degree), expanded to dimension ``maxdim + 1`` and reduced over Z/2, with
  ``persistence_dim_max`` set when the complex stops below ``maxdim + 1``, so
  that the bars that never die in the highest dimension reported are there
  too. Collapse is repeated until the edge count stops falling. Filtration
  values are the float64 distances themselves.
* ``ripser``: ripser.py (Bauer, *Ripser*, 2021: implicit coboundaries,
  clearing, apparent pairs) over Z/2.
* ``giotto-ph``: ``gph.ripser_parallel`` (Burella Perez, Hauke, Lupo,
  Caorsi & Dassatti, 2021: Ripser made multithreaded and lock-free, after
  Morozov & Nigmetov) over Z/2, one thread per core this process may use, on
  the dense matrix. Its own edge collapse stays off
  (:data:`GIOTTO_COLLAPSE_EDGES`): in ``benchmarks/bench_topology.py
  --backends giotto-ph giotto-ph+collapse`` it cost far more than it saved.

**Precision.** ripser.py and giotto-ph store filtration values as float32,
which alone would move every value by up to 2^-24 of itself, merge values
closer than that, and drop the bars shorter than that. They are therefore
given the **ranks** of the distinct edge lengths (:func:`rank_edges`), not
the lengths: a Rips filtration's persistence pairs depend only on the order
of its edges (the value of a simplex is the largest of its edges, and a
strictly increasing relabelling commutes with that maximum), and float32
holds every integer up to 2^24 exactly. Their diagrams, read back through the
rank table, are then exactly the float64 diagrams, equal number for number to
gudhi's. Only a filtration with more than 2^24 distinct lengths below the
threshold (possible from about 5,800 points) is passed as float32 lengths;
:func:`engine_input` says so, and the error bound, which
:class:`~qtg.topology.Bounds` reports. ``mst`` and ``gudhi`` are float64
throughout.

``run_bounded`` runs an engine in a forked child process that it can kill, so
a time budget or a cancel event always returns control to the caller: the
C++ engines cannot be interrupted from a Python thread.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qtg.errors import TopologyError
from qtg.topology.budget import Budget

ENGINES = ("mst", "gudhi", "ripser", "giotto-ph")
FLOAT32_ENGINES = ("ripser", "giotto-ph")  # they store filtration values as float32: given ranks (see above)
EXACT_FLOAT32_INTEGERS = 2**24  # every integer up to this is a float32
FLOAT32_REL_ERROR = 2.0**-24  # float32 rounding: |fl(x) - x| <= 2^-24 |x|
_POLL_S = 0.02  # how often the parent checks the budget and the cancel event
_MAX_COLLAPSE_ROUNDS = 16  # edge collapse converges in a few rounds; this only guards a pathological case
_RANK_ROWS = 256  # rows per block when ranking edges
_CHECK_EVERY = 32  # vertices of Prim's algorithm between two looks at the time budget
GIOTTO_COLLAPSE_EDGES = False  # giotto-ph's edge collapse: slower in benchmarks/bench_topology.py (see above)


def sort_diagram(dgm: np.ndarray) -> np.ndarray:
    """``[n, 2]`` float64, zero-length bars dropped, rows sorted by (death, birth); infinite deaths last."""
    dgm = np.asarray(dgm, dtype=np.float64).reshape(-1, 2)
    dgm = dgm[dgm[:, 1] > dgm[:, 0]]
    return dgm[np.lexsort((dgm[:, 0], dgm[:, 1]))]


# --- H0 by the minimum spanning tree ---------------------------------------------------


def mst_edges(d: np.ndarray, check: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prim's algorithm on a dense distance matrix.

    Args:
        d: ``[N, N]`` symmetric distance matrix, N >= 1.
        check: called every :data:`_CHECK_EVERY` vertices; it raises to stop the work (a spent time budget).

    Returns:
        ``(u, v, length)``: the N - 1 tree edges in the order Prim added them
        (``v`` is the vertex added, ``u`` its nearest vertex already in the tree).
    """
    n = d.shape[0]
    best = d[0].astype(np.float64, copy=True)  # distance from the tree to each vertex
    src = np.zeros(n, dtype=np.intp)  # the tree vertex that distance is to
    done = np.zeros(n, dtype=bool)
    done[0], best[0] = True, np.inf
    us, vs, ws = np.empty(n - 1, np.intp), np.empty(n - 1, np.intp), np.empty(n - 1)
    for k in range(n - 1):
        if check is not None and k % _CHECK_EVERY == 0:
            check()
        j = int(np.argmin(best))
        us[k], vs[k], ws[k] = src[j], j, best[j]
        done[j], best[j] = True, np.inf
        closer = (d[j] < best) & ~done
        best[closer] = d[j][closer]
        src[closer] = j
    return us, vs, ws


def h0_from_mst(d: np.ndarray, threshold: float, check: Callable[[], None] | None = None) -> np.ndarray:
    """The exact H0 diagram: one bar (0, l) per tree edge l <= threshold, and one
    infinite bar per component left at the threshold (ripser.py's convention). ``check`` as in :func:`mst_edges`."""
    _, _, ws = mst_edges(d, check)
    finite = ws[ws <= threshold]
    n_inf = 1 + int((ws > threshold).sum())
    deaths = np.concatenate([finite, np.full(n_inf, np.inf)])
    return sort_diagram(np.stack([np.zeros_like(deaths), deaths], axis=1))


# --- exact values through float32 engines -------------------------------------------------


@dataclass(frozen=True)
class EngineInput:
    """What a Rips engine is given, and how to read its diagrams back.

    ``matrix`` ``[N, N]`` holds float64 lengths (gudhi), integer ranks as
    float32 (ripser.py, giotto-ph: exact), or float32 lengths (the same engines
    beyond 2^24 distinct lengths). ``values[r]`` is the float64 length of rank
    r, None when the matrix holds lengths. ``value_error`` bounds the distance
    from every reported value to the exact one (0 when exact).
    """

    matrix: np.ndarray
    threshold: float
    values: np.ndarray | None
    precision: str  # "float64" or "float32"
    value_error: float


def rank_edges(d: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The order of the edges <= ``threshold``, as float32 integers.

    Args:
        d: ``[N, N]`` float64 distances, zero diagonal. threshold: the edge cut.

    Returns:
        ``(ranks [N, N] float32, values [k] float64, rank threshold)``: ``values`` are
        the distinct lengths <= threshold with 0 first, ``ranks[i, j]`` is the index of
        ``d[i, j]`` in them (``k`` for longer edges, which the engine then leaves out),
        and the rank threshold is ``k - 1``. None when ``k`` exceeds 2^24 (float32
        would round the ranks).
    """
    n = d.shape[0]
    rows = [d[i, i + 1:] for i in range(n)]  # the upper triangle, row by row: no N^2 index arrays
    values = np.unique(np.concatenate([np.zeros(1)] + [r[r <= threshold] for r in rows]))
    if len(values) > EXACT_FLOAT32_INTEGERS:
        return None
    ranks = np.empty(d.shape, dtype=np.float32)
    for start in range(0, n, _RANK_ROWS):  # in row blocks: searchsorted's int64 output stays small
        block = d[start:start + _RANK_ROWS]
        ranks[start:start + _RANK_ROWS] = np.where(block <= threshold, np.searchsorted(values, block), len(values))
    return ranks, values, float(len(values) - 1)


def engine_input(engine: str, d: np.ndarray, threshold: float) -> EngineInput:
    """The matrix and threshold to give ``engine`` (ranks for the float32 engines), with the precision."""
    if engine not in FLOAT32_ENGINES:
        return EngineInput(d, threshold, None, "float64", 0.0)
    ranked = rank_edges(d, threshold)
    if ranked is None:  # more distinct lengths than float32 integers: the engine's own rounding
        lengths = d.astype(np.float32)
        lengths[d > threshold] = np.inf  # rounding is monotone, so no edge <= threshold rounds above fl(threshold)
        cut = float(np.float32(threshold))
        return EngineInput(lengths, cut, None, "float32", FLOAT32_REL_ERROR * threshold)
    ranks, values, rank_threshold = ranked
    return EngineInput(ranks, rank_threshold, values, "float64", 0.0)


def unrank(dgms: list[np.ndarray], values: np.ndarray | None) -> list[np.ndarray]:
    """Diagrams in ranks back to float64 lengths (infinite deaths stay infinite); sorted."""
    if values is None:
        return [sort_diagram(x) for x in dgms]
    out = []
    for dgm in dgms:
        dgm = np.asarray(dgm, dtype=np.float64).reshape(-1, 2)
        finite = np.isfinite(dgm)
        read = np.full(dgm.shape, np.inf)
        read[finite] = values[np.rint(dgm[finite]).astype(np.intp)]
        out.append(sort_diagram(read))
    return out


# --- Rips engines ------------------------------------------------------------------------


def gudhi_diagrams(d: np.ndarray, maxdim: int, threshold: float) -> list[np.ndarray]:
    """H0..H_maxdim with gudhi: flag complex of the edges <= threshold, edge collapse, expansion."""
    import gudhi

    st = gudhi.SimplexTree.create_from_array(np.ascontiguousarray(d, dtype=np.float64), max_filtration=threshold)
    if maxdim >= 1:  # collapse changes nothing for H0, which is read off the graph anyway
        previous = -1
        for _ in range(_MAX_COLLAPSE_ROUNDS):
            if st.num_simplices() == previous:
                break
            previous = st.num_simplices()
            st.collapse_edges(1)  # gudhi 3.13: a negative count is silently a no-op, so loop here
    st.expansion(maxdim + 1)
    # gudhi leaves out the top dimension of the complex unless persistence_dim_max is set. That dimension
    # is maxdim + 1 (not reported) when the complex reaches it; when it does not (a square cut at its side
    # has no triangles, a single point no edge), it is one we report, bars that never die included.
    # Only then is the flag set: otherwise it would cost a full reduction of the (maxdim + 1)-simplices.
    st.compute_persistence(homology_coeff_field=2, persistence_dim_max=st.dimension() <= maxdim)
    return [sort_diagram(st.persistence_intervals_in_dimension(k)) for k in range(maxdim + 1)]


def ripser_diagrams(d: np.ndarray, maxdim: int, threshold: float) -> list[np.ndarray]:
    """H0..H_maxdim with ripser.py on the dense matrix, edges <= threshold (values as given: ranks or float32)."""
    from ripser import ripser

    dgms = ripser(d, maxdim=maxdim, thresh=float(threshold), distance_matrix=True, coeff=2)["dgms"]
    return [np.asarray(x, dtype=np.float64) for x in dgms]


def cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def giotto_diagrams(d: np.ndarray, maxdim: int, threshold: float) -> list[np.ndarray]:
    """H0..H_maxdim with giotto-ph on the dense matrix, edges <= threshold, on every core (no edge collapse).

    A finite ``thresh`` sends giotto-ph through a sparse copy of the matrix; ``inf`` keeps it dense and
    cuts at the enclosing radius itself. A threshold at or above the enclosing radius changes nothing
    (the complex is a cone from there), so that case is given ``inf`` and no sparse copy is made.
    """
    from gph import ripser_parallel

    cut = np.inf if threshold >= d.max(axis=1).min() else float(threshold)
    dgms = ripser_parallel(d, maxdim=maxdim, thresh=cut, metric="precomputed", coeff=2,
                           collapse_edges=GIOTTO_COLLAPSE_EDGES and maxdim >= 1, n_threads=cores())["dgms"]
    return [np.asarray(x, dtype=np.float64) for x in dgms]


def engine_diagrams(engine: str, d: np.ndarray, maxdim: int, threshold: float) -> list[np.ndarray]:
    """Dispatch by name; ``mst`` gives H0 only. ``d`` and ``threshold`` as :func:`engine_input` made them.

    Safe from any number of threads at once: the engine's first call in this process runs alone first
    (:func:`warm_up`)."""
    warm_up(engine)
    return _dispatch(engine, d, maxdim, threshold)


def _dispatch(engine: str, d: np.ndarray, maxdim: int, threshold: float) -> list[np.ndarray]:
    if engine == "mst":
        return [h0_from_mst(d, threshold)]
    if engine == "gudhi":
        return gudhi_diagrams(d, maxdim, threshold)
    if engine == "ripser":
        return ripser_diagrams(d, maxdim, threshold)
    if engine == "giotto-ph":
        return giotto_diagrams(d, maxdim, threshold)
    raise TopologyError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")


# --- first use, one thread at a time -------------------------------------------------------
#
# giotto-ph's extension (pybind11) fills a function-local C++ static on its first call, and does so while
# importing a Python module. Two threads making their first call at once deadlock the whole process: one
# holds the static's initialisation guard (``__cxa_guard_acquire``) and waits for the GIL, the other holds
# the GIL and waits for the guard (8 threads in a fresh process hung 5 runs of 5; issue 23). So each native
# engine's first call in a process runs alone, under one lock, on a tiny input that takes each of its code
# paths (a cut below the enclosing radius, and one at or above it: giotto-ph's sparse and dense routes);
# every later call runs freely. The warm-up also happens before a child process is forked for an engine
# (:func:`preload`), so no child inherits a guard held by a thread that does not exist in it.
# gudhi and ripser.py showed no such race, but nothing documents them thread-safe on first use: same rule.

NATIVE_ENGINES = ("gudhi", "ripser", "giotto-ph")
_first_use = threading.Lock()
_ready: set[str] = set()
# four points on a unit square: enclosing radius sqrt(2); H0 and one H1 bar
_SQUARE = np.array([[0.0, 1.0, 2.0**0.5, 1.0], [1.0, 0.0, 1.0, 2.0**0.5],
                    [2.0**0.5, 1.0, 0.0, 1.0], [1.0, 2.0**0.5, 1.0, 0.0]])
_WARM_UP_CUTS = (1.2, 2.0)  # below the enclosing radius (a sparse route), above it (the dense route)


def warm_up(engine: str) -> None:
    """Make ``engine``'s first calls in this process, alone (no-op after the first time, or for ``mst``)."""
    if engine in _ready or engine not in NATIVE_ENGINES:
        return
    with _first_use:
        if engine in _ready:
            return
        for cut in _WARM_UP_CUTS:
            m = _SQUARE.astype(np.float32) if engine in FLOAT32_ENGINES else _SQUARE
            _dispatch(engine, m, 1, cut)
        _ready.add(engine)


def preload(engine: str) -> None:
    """Import an engine's library in this process and make its first calls (:func:`warm_up`), so a forked
    child neither pays for the import (ripser.py and giotto-ph import scikit-learn, every time, in a fresh
    child) nor initialises the library itself."""
    warm_up(engine)


# --- bounded, cancellable execution ---------------------------------------------------


def _child(conn, fn: Callable, args: tuple) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # report everything: the parent turns it into one clear error
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _context() -> mp.context.BaseContext:
    # fork: the child shares the distance matrix copy-on-write and starts in
    # milliseconds. It only runs numpy and the C++ engines, never torch, so
    # the parent's idle torch threads do not matter. Elsewhere: spawn.
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def run_bounded(fn: Callable, args: tuple, budget: Budget, what: str) -> Any:
    """``fn(*args)`` in a child process, killed when ``budget`` runs out or its cancel event is set.

    Args:
        fn, args: a picklable top-level function and its arguments.
        budget: the time left and the cancel event (:class:`~qtg.topology.budget.Budget`); one with neither
            runs ``fn`` in this process, unbounded.
        what: the request in words, for the error message.

    Raises:
        BudgetExceeded: the budget ran out, or the work was cancelled.
        TopologyError: the child failed or died (for example killed for memory).
    """
    if not budget.limited:
        return fn(*args)
    budget.check(what)  # nothing is started for a budget already spent
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args), daemon=True)
    proc.start()
    send.close()  # the child holds the only writer: a dead child reads as EOF
    try:
        while True:
            if recv.poll(_POLL_S):
                try:
                    status, payload = recv.recv()
                except EOFError:
                    raise TopologyError(budget.died(what, proc.exitcode)) from None
                if status == "error":
                    raise TopologyError(f"{what} failed: {payload}")
                return payload
            budget.check(what)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        recv.close()
