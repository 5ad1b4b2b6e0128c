"""qtg.topology.exact_diagrams on the hard cases of issue 14: bars that never die, distance
matrices that are not metrics, ambiguous and complex input, points far from the origin, the
precision of each backend, and the small edges of the input domain. Every backend is held to
the float64 gudhi reference of ``tests/test_topology_peers.py``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import sparse
from scipy.spatial.distance import pdist, squareform

from qtg import topology
from qtg.errors import TopologyError
from qtg.topology import backends
from qtg.topology.exact import BACKENDS
from tests.test_topology_peers import assert_matches_gudhi, sorted_bars

SQUARE = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0]])
OCTAHEDRON = np.concatenate([np.eye(3), -np.eye(3)])


# --- 1. bars that never die ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bars_alive_at_the_cut_are_reported_in_the_top_dimension(backend):
    # a square cut at its side: its cycle is alive there (the diagonals, 10 sqrt 2, are not in)
    square = topology.exact_diagrams(SQUARE, maxdim=1, max_edge=10.0, backend=backend)
    np.testing.assert_array_equal(square.dgms[1], [[10.0, np.inf]])
    # the octahedron's void: born at the edges (sqrt 2), killed at the antipodal diagonals (2)
    full = topology.exact_diagrams(OCTAHEDRON, maxdim=2, backend=backend)
    np.testing.assert_allclose(full.dgms[2], [[math.sqrt(2), 2.0]], rtol=1e-15)
    cut = topology.exact_diagrams(OCTAHEDRON, maxdim=2, max_edge=1.5, backend=backend)
    np.testing.assert_allclose(cut.dgms[2], [[math.sqrt(2), np.inf]], rtol=1e-15)
    for res, x in ((square, SQUARE), (full, OCTAHEDRON), (cut, OCTAHEDRON)):
        assert_matches_gudhi(res, squareform(pdist(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_point_identical_points_and_a_cut_below_every_edge(backend):
    for x in (np.ones((1, 3)), np.ones((7, 3))):  # one point, and seven copies of it
        res = topology.exact_diagrams(x, maxdim=1, backend=backend)
        np.testing.assert_array_equal(res.dgms[0], [[0.0, np.inf]])
        assert res.dgms[1].shape == (0, 2) and res.bounds.points_distinct == 1
    below = topology.exact_diagrams(SQUARE, maxdim=1, max_edge=1.0, backend=backend)
    np.testing.assert_array_equal(below.dgms[0], np.tile([0.0, np.inf], (4, 1)))  # four components stay apart
    assert below.dgms[1].shape == (0, 2)


# --- 2. distance matrices that are not metrics -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_between_points_that_others_see_differently_is_not_merged(backend):
    # d(0,1) = 0 but 2 sees 0 at 10 and 1 at 1: no metric. The Rips filtration joins 1-2 at 1.
    d = np.array([[0.0, 0.0, 10.0], [0.0, 0.0, 1.0], [10.0, 1.0, 0.0]])
    res = topology.exact_diagrams(d, maxdim=1, metric_input="distances", backend=backend)
    np.testing.assert_array_equal(res.dgms[0], [[0.0, 1.0], [0.0, np.inf]])
    assert res.bounds.points_distinct == 3
    assert_matches_gudhi(res, d, tol=0.0)
    # a true duplicate (a zero row pair that every point sees alike) is still removed, exactly
    twin = np.array([[0.0, 0.0, 3.0], [0.0, 0.0, 3.0], [3.0, 3.0, 0.0]])
    res = topology.exact_diagrams(twin, maxdim=1, metric_input="distances", backend=backend)
    assert res.bounds.points_distinct == 2
    assert_matches_gudhi(res, twin, tol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_broken_triangle_inequality_gives_the_rips_filtration_as_given(backend):
    # five points on a cycle with short sides and one chord far shorter than any path would allow
    rng = np.random.default_rng(11)
    d = squareform(pdist(rng.standard_normal((12, 3))))
    d[0, 5] = d[5, 0] = 1e-3  # the triangle inequality fails through every third point
    res = topology.exact_diagrams(d, maxdim=2, metric_input="distances", backend=backend)
    assert_matches_gudhi(res, d, tol=0.0)


# --- 3. the input type is never guessed silently -------------------------------------------------------


@pytest.mark.parametrize(
    "data, reading",
    [
        (np.array([[0.0, 1.0], [1.0, 0.0]]), "a distance matrix"),
        (np.ones((6, 6)) - np.eye(6), "a distance matrix"),
        (np.array([[1.0, 3.0], [3.0, 2.0]]), r"2 points in 2-D \(as a distance matrix: .*zero diagonal"),
    ],
)
def test_a_square_array_is_read_with_a_warning_that_says_how(data, reading):
    with pytest.warns(UserWarning, match=rf"is ambiguous; it was read as {reading}.*Pass metric_input="):
        topology.exact_diagrams(data, maxdim=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit reading never warns
        points = topology.exact_diagrams(data, maxdim=0, metric_input="points")
    assert points.bounds.reading == "points"
    assert_matches_gudhi(points, squareform(pdist(data)))  # rows as points in len(data)-D


def test_a_float32_cdist_matrix_is_named_for_what_it_is():
    x = torch.randn(100, 100, generator=torch.Generator().manual_seed(0)) * 30
    d32 = torch.cdist(x, x)  # float32: a diagonal of rounding noise
    assert float(d32.diagonal().abs().max()) > 0, "the case needs cdist's rounding on the diagonal"
    with pytest.warns(UserWarning, match=r"read as 100 points in 100-D \(as a distance matrix: .*zero diagonal"):
        topology.exact_diagrams(d32, maxdim=0)
    with pytest.raises(TopologyError, match=r"zero diagonal.*largest diagonal entry is"):
        topology.exact_diagrams(d32, maxdim=0, metric_input="distances")
    d = topology.euclidean_distances(x.double().numpy())
    skew = d * (1 + 1e-7 * np.triu(np.ones_like(d), 1))  # 1e-7 relative asymmetry
    with pytest.warns(UserWarning, match=r"read as 100 points in 100-D \(as a distance matrix: .*symmetric"):
        topology.exact_diagrams(skew, maxdim=0)
    with pytest.raises(TopologyError, match=r"must be symmetric; \|D - D\^T\| reaches .*\(D \+ D\.T\) / 2"):
        topology.exact_diagrams(skew, maxdim=0, metric_input="distances")
    fixed = topology.exact_diagrams((skew + skew.T) / 2, maxdim=0, metric_input="distances")
    truth = topology.exact_diagrams(x.double(), maxdim=0, metric_input="points")
    assert topology.bottleneck(fixed.dgms[0], truth.dgms[0]) <= 1e-6 * truth.diameter


# --- 4. complex input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [np.asarray, lambda z: torch.tensor(z, dtype=torch.complex128)])
def test_complex_points_are_their_real_view(make):
    z = make(np.array([[0.0], [1j], [2j]]))  # three points on the imaginary axis, 1 apart
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning: nothing is discarded
        res = topology.exact_diagrams(z, maxdim=0)
    np.testing.assert_array_equal(res.dgms[0], [[0.0, 1.0], [0.0, 1.0], [0.0, np.inf]])
    w = np.random.default_rng(2).standard_normal((30, 4)) + 1j * np.random.default_rng(3).standard_normal((30, 4))
    real_view = np.concatenate([w.real, w.imag], axis=1)  # the model's [N, 2d]: real half, imaginary half
    a, b = topology.exact_diagrams(make(w)), topology.exact_diagrams(real_view)
    for da, db in zip(a.dgms, b.dgms, strict=True):
        np.testing.assert_array_equal(da, db)
    with pytest.raises(TopologyError, match=r"a distance matrix cannot be complex"):
        topology.exact_diagrams(make(np.eye(3) * 1j), metric_input="distances")


# --- 5. far from the origin -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "gudhi"])
def test_points_far_from_the_origin_in_high_dimension(backend):
    # spread 1e5 around 1e8: far enough apart that no pair is recomputed from its difference, so
    # an uncentred Gram form keeps only ~1e-9 of the diameter (measured 8e-10 before centring)
    rng = np.random.default_rng(5)
    x = 1e8 + 1e5 * rng.standard_normal((24, 2048))
    exact = squareform(pdist(x))  # differences first: no cancellation against 1e8
    ours = topology.euclidean_distances(x)
    assert np.abs(ours - exact).max() <= 1e-12 * exact.max()
    res = topology.exact_diagrams(x, maxdim=1, backend=backend)
    assert_matches_gudhi(res, exact, tol=1e-12)


# --- 6. precision, stated and delivered ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_noise_bars_survive_every_engine(backend):
    # a 4-cycle with sides 1 and diagonals 1 + 1e-10 and 2: its H1 bar [1, 1 + 1e-10] is shorter
    # than float32 can see (2^-24 ~ 6e-8), so an engine that rounded to float32 would drop it
    d = np.array([[0, 1, 1 + 1e-10, 1], [1, 0, 1, 2], [1 + 1e-10, 1, 0, 1], [1, 2, 1, 0]], dtype=np.float64)
    res = topology.exact_diagrams(d, maxdim=1, metric_input="distances", backend=backend)
    np.testing.assert_array_equal(res.dgms[1], [[1.0, 1 + 1e-10]])
    assert res.bounds.precision == "float64" and res.bounds.value_error == 0.0
    assert "values exact in float64" in res.bounds.describe()
    assert_matches_gudhi(res, d, tol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_the_float64_numbers_on_a_random_cloud(backend):
    x = np.random.default_rng(8).standard_normal((40, 8))
    res = topology.exact_diagrams(x, maxdim=2, backend=backend)
    assert res.bounds.precision == "float64"
    assert_matches_gudhi(res, topology.euclidean_distances(x), tol=0.0)


@pytest.mark.parametrize("engine", backends.FLOAT32_ENGINES)
def test_past_the_exact_ranks_a_float32_engine_states_its_error(engine, monkeypatch):
    # with more distinct lengths than float32 integers (2^24; here lowered to 100), the engine gets
    # float32 lengths, and the result says so with a bound that it keeps
    monkeypatch.setattr(backends, "EXACT_FLOAT32_INTEGERS", 100)
    x = np.random.default_rng(9).standard_normal((40, 8)) * 1000
    res = topology.exact_diagrams(x, maxdim=1, backend=engine)
    b = res.bounds
    assert b.precision == "float32" and b.value_error == pytest.approx(2.0**-24 * b.edge_threshold)
    assert "values in float32, within" in b.describe() and b.bottleneck_bound == b.value_error
    ref = topology.exact_diagrams(x, maxdim=1, backend="gudhi")
    assert any(not np.array_equal(sorted_bars(a), sorted_bars(r)) for a, r in zip(res.dgms, ref.dgms, strict=True))
    for a, r in zip(res.dgms, ref.dgms, strict=True):
        assert topology.bottleneck(a, r) <= b.value_error


# --- 7. the edges of the input domain -------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (np.ones((5, 0)), {}, r"points need at least one coordinate, got shape \(5, 0\)"),
        (np.ones((0, 3)), {}, r"need at least 1 point, got shape \(0, 3\)"),
        (np.array([[0.0, np.inf], [np.inf, 0.0]]), {"metric_input": "distances"},
         r"rows 0, 1 contain inf \(2 of 2\): missing edges \(infinite distances\) are not supported"),
        (np.array([[0.0, np.nan], [np.nan, 0.0]]), {"metric_input": "distances"}, r"rows 0, 1 contain NaN"),
        (sparse.csr_matrix(np.ones((3, 3)) - np.eye(3)), {}, r"scipy sparse matrix is read only as a distance matrix"),
        (sparse.csr_matrix(np.ones((3, 4))), {"metric_input": "distances"}, r"sparse matrix of shape \(3, 4\)"),
        (sparse.csr_matrix([[0, 1, 0], [1, 0, 2], [0, 2, 0]]), {"metric_input": "distances"},
         r"must store every pair: 1 of 3 pairs are missing, and missing edges are not supported"),
    ],
)
def test_edges_of_the_input_domain_are_clear_errors(data, kwargs, message):
    with pytest.raises(TopologyError, match=message):
        topology.exact_diagrams(data, **kwargs)
