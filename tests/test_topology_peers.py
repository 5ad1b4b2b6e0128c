"""qtg.topology.exact_diagrams on its peers' own test cases.

Each test ports the data and the property of one case from the test suite of
ripser.py (scikit-tda/ripser.py, ``test/test_ripser.py``) or giotto-ph
(giotto-ai/giotto-ph, ``gph/python/test/test_ripser.py``), written here in our
own terms: where the peer takes a feature this module refuses (missing edges,
vertex birth times, negative lengths), the port asserts the refusal by name.
Every backend is also held to a float64 gudhi reference computed apart from
our pipeline (no duplicate removal, no edge collapse, no ranks), by bottleneck
distance relative to the diameter. Clouds stay at tens of points.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from scipy import sparse
from scipy.spatial.distance import pdist, squareform

from qtg import topology
from qtg.errors import TopologyError
from qtg.topology import backends
from qtg.topology.exact import BACKENDS

GUDHI_REL_TOL = 1e-9  # of the diameter: what "matches float64 gudhi" means (issue 14)


def gudhi_reference(d: np.ndarray, maxdim: int, threshold: float) -> list[np.ndarray]:
    """H0..H_maxdim of the Rips filtration of ``d`` up to ``threshold``, by gudhi in float64, on every
    point as given (a reference independent of exact_diagrams' own steps)."""
    import gudhi

    st = gudhi.RipsComplex(distance_matrix=d, max_edge_length=threshold).create_simplex_tree(max_dimension=maxdim + 1)
    st.compute_persistence(homology_coeff_field=2, persistence_dim_max=True)
    return [np.asarray(st.persistence_intervals_in_dimension(k)).reshape(-1, 2) for k in range(maxdim + 1)]


def sorted_bars(dgm: np.ndarray) -> np.ndarray:
    dgm = np.asarray(dgm, dtype=np.float64).reshape(-1, 2)
    return dgm[np.lexsort((dgm[:, 0], dgm[:, 1]))]


def assert_matches_gudhi(result: topology.ExactDiagrams, d: np.ndarray, tol: float = GUDHI_REL_TOL,
                         maxdim: int | None = None) -> None:
    """H0..H_maxdim (default all) of ``result`` within ``tol`` x diameter (bottleneck) of the float64
    gudhi reference on ``d``; ``tol=0`` asks for the same numbers."""
    maxdim = result.maxdim if maxdim is None else maxdim
    ref = gudhi_reference(d, maxdim, result.bounds.edge_threshold)
    scale = float(d.max())
    for k, (ours, theirs) in enumerate(zip(result.dgms[:maxdim + 1], ref, strict=True)):
        assert len(ours) == len(theirs), f"H{k}: {len(ours)} bars against gudhi's {len(theirs)}"
        if tol == 0:
            np.testing.assert_array_equal(sorted_bars(ours), sorted_bars(theirs), err_msg=f"H{k}")
        else:
            assert topology.bottleneck(ours, theirs) <= tol * scale, f"H{k} differs from float64 gudhi"


def random_dissimilarity(n: int, seed: int) -> np.ndarray:
    """A symmetric matrix of positive float32 values, zero diagonal: no triangle inequality
    (giotto-ph's ``get_dense_distance_matrices`` strategy, drawn with a fixed seed)."""
    rng = np.random.default_rng(seed)
    dm = np.triu(rng.uniform(1e-3, 10.0, (n, n)).astype(np.float32), k=1).astype(np.float64)
    return dm + dm.T


# --- ripser.py, test/test_ripser.py ---------------------------------------------------------------


def test_square_input_warns_and_non_square_distances_are_refused():
    """ripser.py TestTransform.test_input_warnings and test_non_square_dist_matrix: a square array
    without the flag warns; a non-square "distance matrix" is refused. Ours names the reading taken."""
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match=r"square 3x3 array is ambiguous; it was read as 3 points in 3-D"):
        topology.exact_diagrams(rng.random((3, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a non-square array can only be points: nothing to warn about
        assert topology.exact_diagrams(rng.random((3, 10))).bounds.reading == "points"
    with pytest.raises(TopologyError, match=r"a distance matrix must be square, got shape \(3, 10\)"):
        topology.exact_diagrams(rng.random((3, 10)), metric_input="distances")


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxdim_gives_one_diagram_per_dimension(backend):
    """ripser.py TestParams.test_defaults and test_maxdim: 100 random points in the unit cube;
    the default gives H0 and H1, maxdim=k gives k + 1 diagrams."""
    data = np.random.default_rng(3100).random((100, 3))
    assert len(topology.exact_diagrams(data, backend=backend).dgms) == 2
    for maxdim in (0, 1, 2):
        res = topology.exact_diagrams(data, maxdim=maxdim, backend=backend)
        assert len(res.dgms) == maxdim + 1
        # the reference stops at H1: a plain Rips complex of 100 points up to tetrahedra takes seconds
        assert_matches_gudhi(res, squareform(pdist(data)), maxdim=min(maxdim, 1))
    h2 = {b: topology.exact_diagrams(data, maxdim=2, backend=b).dgms[2] for b in ("gudhi", backend)}
    assert len(h2["gudhi"]) > 0
    np.testing.assert_array_equal(h2[backend], h2["gudhi"])


def test_a_threshold_keeps_fewer_h1_bars():
    """ripser.py TestParams.test_thresh: a threshold of 0.1 on 100 random points in the unit cube
    leaves fewer H1 bars than the full filtration."""
    data = np.random.default_rng(3100).random((100, 3))
    cut = topology.exact_diagrams(data, max_edge=0.1)
    assert len(cut.dgms[1]) < len(topology.exact_diagrams(data).dgms[1])
    assert_matches_gudhi(cut, squareform(pdist(data)))


def two_circles(n: int, rng: np.random.RandomState) -> np.ndarray:
    """Concentric circles of radii 1 and 0.8, n // 2 evenly spaced points each, shuffled: the shape
    of ``sklearn.datasets.make_circles(n)``, which ripser.py's sparse tests use."""
    t = np.linspace(0, 2 * np.pi, n // 2, endpoint=False)
    ring = np.stack([np.cos(t), np.sin(t)], axis=1)
    return np.concatenate([ring, 0.8 * ring])[rng.permutation(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_thresholded_cloud_and_missing_edges(backend):
    """ripser.py TestParams.test_sparse: circles + 5 x circles at threshold 1.1. Ripser gives the same
    H1 from the dense cloud cut at 1.1 and from a sparse matrix of the edges <= 1.1; missing edges are
    unsupported here, so the sparse matrix is refused by name and the cut matches float64 gudhi."""
    rng = np.random.RandomState(10)
    data = two_circles(100, rng) + 5 * two_circles(100, rng)
    d = squareform(pdist(data))
    cut = topology.exact_diagrams(data, max_edge=1.1, backend=backend)
    assert not cut.bounds.threshold_exact and len(cut.dgms[1]) > 0
    assert_matches_gudhi(cut, d)
    kept = sparse.coo_matrix(np.where(d <= 1.1, d, 0.0))
    with pytest.raises(TopologyError, match=r"must store every pair: \d+ of 4950 pairs are missing"):
        topology.exact_diagrams(kept, metric_input="distances")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cube_surface_has_one_h2_bar_dying_at_one(backend):
    """ripser.py TestParams.test_sphere_sparse_H2: the grid (spacing 1/4) on the surface of the unit
    cube, threshold 1.5: exactly one H2 bar, which dies at 1.0. The six faces share their edges, so
    the 150 grid points hold 98 distinct ones (removed exactly). The void is born when the diagonals
    of the grid squares, sqrt(2)/4, fill the surface with triangles."""
    segment, endpoints = [np.linspace(0, 1, 5)], [np.linspace(0, 1, 2)]
    face = segment * 2 + endpoints
    coords = np.array([v for k in range(3) for v in itertools.product(*(face[k:] + face[:k]))])
    res = topology.exact_diagrams(coords, maxdim=2, max_edge=1.5, backend=backend)
    assert res.bounds.points_given == 150 and res.bounds.points_distinct == 98
    h2 = res.dgms[2]
    assert h2.shape == (1, 2) and abs(h2[0, 1] - 1.0) <= 1e-15 and abs(h2[0, 0] - np.sqrt(2) / 4) <= 1e-15


def test_vertex_birth_times_are_refused_by_name():
    """ripser.py TestParams.test_full_nonzerobirths: D = [[1, 3], [3, 2]] as a distance matrix reads
    its diagonal as vertex births (H0 [[1, inf], [2, 3]]). Not supported here: refused by name, and
    without the flag the square array is read as two points, with a warning saying so."""
    d = np.array([[1.0, 3.0], [3.0, 2.0]])
    with pytest.raises(TopologyError, match=r"zero diagonal \(vertex birth times are not supported\)"):
        topology.exact_diagrams(d, maxdim=0, metric_input="distances")
    with pytest.warns(UserWarning, match=r"read as 2 points in 2-D \(as a distance matrix: .*zero diagonal"):
        res = topology.exact_diagrams(d, maxdim=0)
    np.testing.assert_allclose(res.dgms[0], [[0.0, np.sqrt(5.0)], [0.0, np.inf]], rtol=1e-15)  # (1,3)-(3,2)


def test_subsampled_cloud_and_its_distance_matrix_agree():
    """ripser.py TestParams.test_greedyperm_dm_vs_pc: 100 Gaussian points in 3-D, a greedy
    (farthest-point) subsample of 20, from the points and from their distance matrix: the same
    diagrams and the same error bound."""
    x = np.random.default_rng(100).standard_normal((100, 3))
    a = topology.exact_diagrams(x, max_points=20)
    b = topology.exact_diagrams(squareform(pdist(x)), max_points=20, metric_input="distances")
    assert a.bounds.kept_indices == b.bounds.kept_indices and a.bounds.points_kept == 20
    assert np.isclose(a.bounds.hausdorff, b.bounds.hausdorff, rtol=1e-12)
    for da, db in zip(a.dgms, b.dgms, strict=True):
        np.testing.assert_allclose(da, db, rtol=1e-12)


def test_subsampled_circle_stays_within_twice_the_covering_radius():
    """ripser.py TestParams.test_greedyperm_circlebottleneck: 40 random points on the unit circle and
    a greedy subsample of 10: the covering radius is positive and H1 moves by at most twice it."""
    t = 2 * np.pi * np.random.default_rng(40).random(40)
    x = np.stack([np.cos(t), np.sin(t)], axis=1)
    full = topology.exact_diagrams(x)
    sub = topology.exact_diagrams(x, max_points=10)
    assert sub.bounds.hausdorff > 0 and not sub.bounds.exact
    assert topology.bottleneck(full.dgms[1], sub.dgms[1]) <= sub.bounds.bottleneck_bound
    assert_matches_gudhi(full, squareform(pdist(x)))


# --- shared by both: a sparse matrix that stores every pair ------------------------------------------

# ripser.py TestParams.test_sparse_format and giotto-ph test_coo_results_independent_of_order
COO_DATA = np.array([6.0, 8.0, 2.0, 4.0, 5.0, 9.0, 10.0, 3.0, 1.0, 1.0])
COO_ROW = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
COO_COL = np.array([4, 1, 3, 2, 4, 3, 2, 3, 4, 4])
COO_H0 = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 2.0], [0.0, 5.0], [0.0, np.inf]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_matrix_in_any_format_and_triangle(backend):
    """giotto-ph test_coo_results_independent_of_order (ripser.py test_sparse_format): the ten pairs of
    five points as COO give H0 [[0,1],[0,1],[0,2],[0,5],[0,inf]] and no H1, and CSR gives the same.
    giotto-ph test_coo_below_diagonal_and_mixed_same_as_above: the same pairs stored below the
    diagonal, or mixed, give the same. Two different values for one pair are refused here (giotto-ph
    keeps the upper one)."""
    above = sparse.coo_matrix((COO_DATA, (COO_ROW, COO_COL)), shape=(5, 5))
    swap = np.arange(10) % 2 == 0
    mixed = sparse.coo_matrix((COO_DATA, (np.where(swap, COO_COL, COO_ROW), np.where(swap, COO_ROW, COO_COL))),
                              shape=(5, 5))
    for m in (above, above.tocsr(), above.T, mixed, above + above.T):
        res = topology.exact_diagrams(m, metric_input="distances", backend=backend)
        np.testing.assert_array_equal(res.dgms[0], COO_H0)
        assert res.dgms[1].shape == (0, 2)
        assert_matches_gudhi(res, above.toarray() + above.T.toarray())
    conflict = sparse.coo_matrix((np.append(COO_DATA, 7.0), (np.append(COO_ROW, 4), np.append(COO_COL, 0))),
                                 shape=(5, 5))
    with pytest.raises(TopologyError, match=r"two different values for one pair"):
        topology.exact_diagrams(conflict, metric_input="distances", backend=backend)
    with pytest.raises(TopologyError, match=r"scipy sparse matrix is read only as a distance matrix"):
        topology.exact_diagrams(above, backend=backend)


# --- giotto-ph, gph/python/test/test_ripser.py --------------------------------------------------------


@pytest.mark.parametrize("seed, n", [(0, 2), (1, 7), (2, 16), (3, 30)])
@pytest.mark.parametrize("halve", [False, True])
def test_random_dissimilarities_every_engine_agrees(seed, n, halve):
    """giotto-ph test_collapse_consistent_with_no_collapse_dense: random symmetric float32 matrices
    (2 to 30 points, no triangle inequality) up to H3, cut at max/2 or not. Collapse or not, every
    engine must give the float64 gudhi reference exactly (giotto-ph compares collapse with none; our
    gudhi backend collapses, the others do not)."""
    d = random_dissimilarity(n, seed)
    max_edge = float(d.max()) / 2 if halve else None
    maxdim = min(3, n - 1)
    results = {b: topology.exact_diagrams(d, maxdim=maxdim, max_edge=max_edge, metric_input="distances", backend=b)
               for b in BACKENDS}
    for b, res in results.items():
        assert res.bounds.precision == "float64", b
        assert_matches_gudhi(res, d, tol=0.0)


def test_giotto_ph_gives_the_same_diagrams_on_any_number_of_threads(monkeypatch):
    """giotto-ph test_multithread_consistent: 1 to 5 threads give the same diagrams (up to H3)."""
    d = random_dissimilarity(24, seed=5)
    job = backends.engine_input("giotto-ph", d, float(d.max(axis=1).min()))
    runs = []
    for threads in range(1, 6):
        monkeypatch.setattr(backends, "cores", lambda t=threads: t)
        runs.append(backends.unrank(backends.giotto_diagrams(job.matrix, 3, job.threshold), job.values))
    assert sum(len(x) for x in runs[0]) > 24, "too few bars to test anything"
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_negative_lengths_are_refused_by_name():
    """giotto-ph test_collapser_with_negative_weights: negative entries and a negative diagonal
    (vertex weights). Not supported here: refused, naming the smallest entry."""
    rng = np.random.default_rng(20)
    dm = rng.random((20, 20))
    dm = (dm + dm.T) / 2 - 0.2
    np.fill_diagonal(dm, 0.0)
    with pytest.raises(TopologyError, match=r"must be non-negative; its smallest entry is -0\.1"):
        topology.exact_diagrams(dm, metric_input="distances")


def test_infinite_entries_are_refused_as_missing_edges():
    """giotto-ph's dense strategy draws infinite entries (edges that never appear). Not supported:
    refused as missing edges, naming the rows."""
    d = random_dissimilarity(6, seed=9)
    d[1, 4] = d[4, 1] = np.inf
    with pytest.raises(TopologyError, match=r"rows 1, 4 contain inf \(2 of 6\): missing edges"):
        topology.exact_diagrams(d, metric_input="distances")
