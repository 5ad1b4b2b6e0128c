"""qtg.topology: exact diagrams (two engines that must agree, analytic cases, bounds,
bad input) and the comparison with the TopoFilter's approximation. Point clouds stay
at <= 300 points so the file runs in seconds."""

from __future__ import annotations

import copy
import importlib
import json
import math
import multiprocessing as mp
import threading
import time

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.stats import spearmanr

from qtg import topology
from qtg.errors import TopologyError
from qtg.topology.compare import bottleneck, filter_scores
from qtg.topology.exact import AUTO_RIPS_ENGINE, BACKENDS
from tests.conftest import SAMPLE_TEXT
from tests.test_cli import run_qtg

RNG = np.random.default_rng(0)


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def finite(dgm: np.ndarray) -> np.ndarray:
    return dgm[np.isfinite(dgm[:, 1])]


@pytest.fixture(scope="module")
def micro_internals(micro):
    """~100 tokens through the micro model, with repeated tokens (duplicate QEmbed states)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 512, (1, 100), generator=g)
    ids[0, 60:75] = ids[0, 5:20]
    with torch.no_grad():
        out = micro(ids, return_internals=True)
    return ids, out


# --- two engines, one answer -------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 2])  # QEmbed (with duplicates) and the first block's output
def test_every_engine_gives_the_same_numbers_on_model_states(micro_internals, layer):
    # gudhi works in float64; ripser.py and giotto-ph are given exact ranks (backends.rank_edges), so
    # the four backends must agree number for number, not merely within a float32 rounding
    _, out = micro_internals
    points = out.states[layer][0]
    results = {b: topology.exact_diagrams(points, maxdim=1, backend=b, metric_input="points") for b in BACKENDS}
    assert len(results["gudhi"].dgms[1]) > 0, "a cloud without H1 would not test H1 agreement"
    for b in BACKENDS:
        assert results[b].bounds.precision == "float64" and results[b].bounds.value_error == 0.0
        for dim in (0, 1):
            np.testing.assert_array_equal(results[b].dgms[dim], results["gudhi"].dgms[dim], err_msg=f"{b} H{dim}")
    assert results["auto"].backend == f"mst+{AUTO_RIPS_ENGINE}"


def explicit_mst_lengths(dist: np.ndarray) -> np.ndarray:
    """scipy's spanning tree of the complete graph given as an explicit sparse graph (a dense input
    would read entries below 1e-8 as missing edges)."""
    i, j = np.triu_indices(len(dist), 1)
    graph = csr_matrix((dist[i, j], (i, j)), shape=dist.shape)
    return np.sort(minimum_spanning_tree(graph).data)


@pytest.mark.parametrize("backend", BACKENDS)
def test_h0_deaths_are_the_minimum_spanning_tree_edges(backend):
    x = unit_vectors(200, 16, seed=1)
    x[7] = x[3] + 1e-11  # a near twin: an edge of ~4e-11, which scipy's dense spanning tree would drop
    dist = topology.euclidean_distances(x)
    expected = explicit_mst_lengths(dist)
    assert expected.min() < 1e-10 and len(expected) == 199
    got = topology.exact_diagrams(x, maxdim=0, backend=backend).dgms[0]
    assert np.isinf(got[-1, 1]) and np.all(np.isfinite(got[:-1, 1])) and np.all(got[:, 0] == 0)
    np.testing.assert_allclose(np.sort(got[:-1, 1]), expected, rtol=1e-12, atol=0)


# --- analytic cases ---------------------------------------------------------------------


def circle(n: int, r: float, ambient: int) -> np.ndarray:
    angles = 2 * np.pi * np.arange(n) / n
    flat = r * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    frame, _ = np.linalg.qr(np.random.default_rng(n).standard_normal((ambient, 2)))  # an isometric embedding
    return flat @ frame.T


@pytest.mark.parametrize("n", [12, 13, 50])
@pytest.mark.parametrize("backend", BACKENDS)
def test_circle_has_one_long_h1_bar_of_the_known_size(n, backend):
    # n points evenly on a circle of radius r: edges joining points k steps apart have
    # length 2 r sin(pi k / n). The cycle is born when neighbours join (k = 1); the
    # Rips complex stays a circle while k / n < 1/3 and loses H1 at k = ceil(n / 3)
    # (Adamaszek & Adams, 2017), so the bar dies at 2 r sin(pi ceil(n/3) / n); for
    # n = 12 that is the inscribed equilateral triangle's side, r sqrt(3).
    r = 2.0
    birth, death = 2 * r * math.sin(math.pi / n), 2 * r * math.sin(math.pi * math.ceil(n / 3) / n)
    h1 = topology.exact_diagrams(circle(n, r, ambient=64), maxdim=1, backend=backend).dgms[1]
    lengths = h1[:, 1] - h1[:, 0]
    longest = h1[np.argmax(lengths)]
    # tolerance: the embedding rotates coordinates, so edges of equal length differ by rounding
    # (~1e-15 r); every engine reports float64 values (the float32 ones through exact ranks)
    tol = 1e-12 * r
    assert abs(longest[0] - birth) < tol and abs(longest[1] - death) < tol, (longest, birth, death)
    assert np.all(np.delete(lengths, np.argmax(lengths)) < tol), "only one H1 class should be visible"


def test_well_separated_clusters_give_the_known_h0_gaps():
    rho, centres = 0.05, np.array([0.0, 10.0, 25.0, 45.0])  # gaps 10, 15, 20 along one axis
    blobs = []
    for c in centres:
        noise = RNG.standard_normal((20, 8))
        noise *= rho * RNG.random((20, 1)) / np.linalg.norm(noise, axis=1, keepdims=True)  # inside a ball of radius rho
        blobs.append(noise + np.eye(8)[0] * c)
    h0 = topology.exact_diagrams(np.concatenate(blobs), maxdim=0).dgms[0]
    deaths = h0[:, 1]
    long = np.sort(deaths[np.isfinite(deaths) & (deaths > 1)])
    np.testing.assert_allclose(long, [10, 15, 20], atol=2 * rho)  # closest pair of two balls: gap +- 2 rho
    assert np.all(deaths[deaths <= 1] <= 2 * rho)  # within a cluster, no edge longer than its diameter
    assert np.isinf(deaths).sum() == 1 and len(h0) == 80


# --- the soft-min against the exact score --------------------------------------------------


@pytest.mark.parametrize("layer", [0, 2])
def test_softmin_converges_to_the_exact_score_as_temperature_goes_to_zero(micro, micro_internals, layer):
    _, out = micro_internals
    points = out.states[layer][0]
    n = points.shape[0]
    errors = []
    for t in (1e-1, 1e-2, 1e-3, 1e-4):
        topo = copy.copy(micro.topo)
        topo.temperature = t
        soft, exact, _ = filter_scores(topo, points)
        err = np.abs(soft - exact).max()
        assert err <= t * math.log(n) + 1e-5  # s - T log(i-1) <= s~ <= s
        errors.append(err)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3


def test_layer_one_is_the_filters_own_view_and_layer_zero_recomputes_it(micro, micro_internals):
    _, out = micro_internals
    own, again = topology.approx_view(out, layer=1), topology.approx_view(out, layer=0, model=micro)
    assert own.cloud_layer == again.cloud_layer == 0
    np.testing.assert_allclose(own.soft, again.soft, atol=1e-6)
    np.testing.assert_allclose(own.weights, again.weights, atol=1e-6)
    assert own.diagram.shape == (100, 2) and np.isinf(own.diagram[-1, 1])


# --- bounds -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_keeps_exactly_the_bars_below_it(backend):
    x = unit_vectors(120, 6, seed=2)
    full = topology.exact_diagrams(x, maxdim=1, backend=backend)
    h0, h1 = finite(full.dgms[0]), full.dgms[1]
    t = float(np.quantile(h0[:, 1], 0.95))
    # the cut must bite in both dimensions: H0 bars die above it, H1 bars die below it and are alive at it
    assert (h0[:, 1] > t).any() and (h1[:, 1] <= t).any() and ((h1[:, 0] <= t) & (h1[:, 1] > t)).any()
    cut = topology.exact_diagrams(x, maxdim=1, backend=backend, max_edge=t)
    assert cut.bounds.edge_threshold == t and cut.bounds.threshold_source == "max_edge"
    assert not cut.bounds.threshold_exact and not cut.bounds.exact and "bars alive there" in cut.bounds.describe()
    for dim in (0, 1):
        ref, got = full.dgms[dim], cut.dgms[dim]
        np.testing.assert_array_equal(finite(got), ref[ref[:, 1] <= t])  # same engine, same numbers
        alive = ref[(ref[:, 0] <= t) & (ref[:, 1] > t)]
        np.testing.assert_array_equal(np.sort(got[np.isinf(got[:, 1]), 0]), np.sort(alive[:, 0]))
    wide = topology.exact_diagrams(x, maxdim=1, backend=backend, max_edge=10.0)
    assert wide.bounds.threshold_exact and wide.bounds.edge_threshold == full.bounds.enclosing_radius
    assert full.bounds.exact and full.bounds.threshold_source == "enclosing radius"


def test_duplicates_are_removed_exactly():
    base = unit_vectors(50, 5, seed=3)
    x = np.concatenate([base, base[RNG.integers(0, 50, 40)]])[RNG.permutation(90)]
    ours = topology.exact_diagrams(x, maxdim=1, backend="gudhi", time_budget=None)
    assert ours.bounds.points_given == 90 and ours.bounds.points_distinct == 50 and ours.bounds.duplicates_removed == 40
    assert ours.bounds.exact and "duplicates removed" in ours.bounds.describe()
    import gudhi  # the reference: gudhi on every point, duplicates included (zero-length bars are not reported)

    st = gudhi.RipsComplex(points=x).create_simplex_tree(max_dimension=2)
    st.compute_persistence(homology_coeff_field=2)
    for dim in (0, 1):
        ref = np.asarray(st.persistence_intervals_in_dimension(dim)).reshape(-1, 2)
        assert len(ref) == len(ours.dgms[dim])
        assert bottleneck(ref, ours.dgms[dim]) < 1e-12
    one = topology.exact_diagrams(np.ones((4, 3)), maxdim=1)
    assert one.bounds.points_distinct == 1 and one.dgms[0].tolist() == [[0.0, math.inf]] and len(one.dgms[1]) == 0


@pytest.mark.parametrize("how", ["farthest", "first"])
def test_point_limit_reports_what_it_kept_and_a_valid_error_bound(how):
    x = unit_vectors(200, 4, seed=4)
    full = topology.exact_diagrams(x, maxdim=1)
    sub = topology.exact_diagrams(x, maxdim=1, max_points=40, subsample=how)
    b = sub.bounds
    assert (b.points_kept, b.subsample, b.exact) == (40, how, False) and b.hausdorff > 0
    if how == "first":
        assert b.kept_indices == list(range(40))
    dist = topology.euclidean_distances(x)
    assert np.isclose(b.hausdorff, dist[:, b.kept_indices].min(axis=1).max())
    for dim in (0, 1):  # Rips stability: bottleneck <= 2 x Hausdorff distance
        assert bottleneck(full.dgms[dim], sub.dgms[dim]) <= b.bottleneck_bound + 1e-9
    with pytest.raises(TopologyError, match=r"200 distinct points exceed max_points=40; raise max_points"):
        topology.exact_diagrams(x, max_points=40, subsample="error")


@pytest.mark.parametrize("backend", ["ripser", "giotto-ph"])  # giotto-ph runs threads inside the child
def test_time_budget_stops_the_work_and_names_the_knob(backend):
    x = unit_vectors(300, 128, seed=5)  # H2 of 300 unstructured points: minutes of work
    start = time.monotonic()
    with pytest.raises(TopologyError, match=r"time budget of 0\.5 s.*raise time_budget.*max_points.*max_edge"):
        topology.exact_diagrams(x, maxdim=2, backend=backend, time_budget=0.5)
    assert time.monotonic() - start < 5
    assert not mp.active_children(), "the worker process must be gone"


def test_cancel_event_stops_the_work():
    x = unit_vectors(300, 128, seed=5)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    start = time.monotonic()
    with pytest.raises(TopologyError, match="was cancelled after"):
        topology.exact_diagrams(x, maxdim=2, backend="gudhi", time_budget=None, cancel=cancel)
    assert time.monotonic() - start < 5 and not mp.active_children()


# --- bad input ----------------------------------------------------------------------------------


def _with(value, row=3):
    x = unit_vectors(10, 4)
    x[row, 1] = value
    return x


def _asymmetric():
    d = topology.euclidean_distances(unit_vectors(6, 3))
    d[0, 1] += 0.5
    return d


def _diagonal():
    d = topology.euclidean_distances(unit_vectors(6, 3))
    d[2, 2] = 0.1
    return d


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (_with(np.nan), {}, r"rows 3 contain NaN or inf \(1 of 10\)"),
        (_with(np.inf, row=7), {}, r"rows 7 contain NaN or inf"),
        (np.ones((0, 4)), {}, r"need at least 1 point, got shape \(0, 4\)"),
        (np.ones((5, 0)), {}, r"points need at least one coordinate, got shape \(5, 0\)"),
        (np.ones(5), {}, r"expected \[N, D\] points or an \[N, N\] distance matrix, got shape \(5,\)"),
        (np.ones((2, 5, 4)), {}, r"pass states\[k\]\[b\]"),
        ([["a", "b"], ["c", "d"]], {}, r"cannot read the input as a float array"),
        (_asymmetric(), {"metric_input": "distances"}, r"must be symmetric"),
        (np.ones((4, 5)), {"metric_input": "distances"}, r"must be square, got shape \(4, 5\)"),
        (-topology.euclidean_distances(unit_vectors(5, 3)), {"metric_input": "distances"}, r"non-negative"),
        (_diagonal(), {"metric_input": "distances"}, r"zero diagonal"),
        (unit_vectors(5, 3), {"backend": "dionysus"}, r"unknown backend 'dionysus'; valid: auto, gudhi, ripser, gio"),
        (unit_vectors(5, 3), {"maxdim": 7}, r"maxdim must be an integer from 0 to 3"),
        (unit_vectors(5, 3), {"max_points": 10**6}, r"max_points must lie in \[2, 16384\]"),
        (unit_vectors(5, 3), {"max_edge": -1.0}, r"max_edge must be a positive finite length"),
        (unit_vectors(5, 3), {"time_budget": 0}, r"time_budget must be positive"),
        (unit_vectors(5, 3), {"subsample": "random"}, r"subsample must be one of farthest, first, error"),
    ],
)
def test_bad_input_is_a_clear_error(data, kwargs, message):
    with pytest.raises(TopologyError, match=message):
        topology.exact_diagrams(data, **kwargs)


def test_a_distance_matrix_gives_the_same_diagrams_and_a_square_array_is_never_read_silently():
    x = unit_vectors(60, 5, seed=6)
    a = topology.exact_diagrams(x, maxdim=1)
    with pytest.warns(UserWarning, match=r"square 60x60 array is ambiguous; it was read as a distance matrix"):
        b = topology.exact_diagrams(topology.euclidean_distances(x), maxdim=1)
    c = topology.exact_diagrams(torch.tensor(x, dtype=torch.float64), maxdim=1)
    d = topology.exact_diagrams(topology.euclidean_distances(x), maxdim=1, metric_input="distances")
    assert (a.bounds.reading, b.bounds.reading, d.bounds.reading) == ("points", "distances", "distances")
    for dim in (0, 1):
        for other in (b, c, d):
            np.testing.assert_array_equal(a.dgms[dim], other.dgms[dim])


# --- the comparison -------------------------------------------------------------------------------


def test_distances_and_the_elder_rule_have_their_own_modules_and_keep_their_names():
    from qtg.topology import bottleneck_distance, elder, wasserstein_distance

    compare = importlib.import_module("qtg.topology.compare")  # the package's `compare` is the function
    assert topology.bottleneck is bottleneck_distance.bottleneck is compare.bottleneck
    assert topology.wasserstein_1 is wasserstein_distance.wasserstein_1 is compare.wasserstein_1
    assert topology.elder_persistence is elder.elder_persistence is compare.elder_persistence


def test_elder_rule_attributes_bars_to_the_younger_token():
    x = np.array([[0.0], [10.0], [1.0], [10.5]])  # tokens 0..3 on a line
    p = topology.elder_persistence(topology.euclidean_distances(x))
    # Kruskal: 0.5 joins {1},{3} -> 3 dies; 1 joins {0},{2} -> 2 dies; 9 joins {0,2},{1,3} -> 1 dies
    np.testing.assert_allclose(p, [np.inf, 9.0, 1.0, 0.5])


def test_elder_persistence_is_the_exact_h0_and_bounded_by_the_causal_score(micro_internals):
    _, out = micro_internals
    view = topology.approx_view(out, layer=1)
    exact = topology.exact_diagrams(view.points, maxdim=0)
    p = topology.elder_persistence(topology.euclidean_distances(view.points))
    np.testing.assert_allclose(np.sort(p[1:][p[1:] > 0]), finite(exact.dgms[0])[:, 1], rtol=1e-12)
    assert np.all(p[1:] <= view.exact[1:] + 1e-6)  # s is float32 in the model


def test_wasserstein_matches_hera():
    import gudhi.hera

    a = np.sort(RNG.random((40, 2)), axis=1)
    b = np.vstack([np.sort(RNG.random((30, 2)), axis=1), [[0.0, np.inf]]])
    a = np.vstack([a, [[0.2, np.inf]]])
    ours = topology.wasserstein_1(a, b)
    ref = gudhi.hera.wasserstein_distance(a, b, order=1, internal_p=np.inf, delta=1e-9)
    assert ours == pytest.approx(ref, rel=1e-8) and ours >= bottleneck(a, b)


def test_bottleneck_is_public_and_known_on_small_diagrams():
    a = np.array([[0.0, 1.0], [0.0, np.inf]])
    b = np.array([[0.0, 1.25], [0.5, np.inf]])
    assert topology.bottleneck is bottleneck
    assert topology.bottleneck(a, a) == pytest.approx(0.0, abs=1e-12)
    assert topology.bottleneck(a, b) == pytest.approx(0.5)  # the essential bars are matched birth to birth
    assert topology.bottleneck(a[:1], np.empty((0, 2))) == pytest.approx(0.5)  # to the diagonal: half of 1.0
    assert topology.bottleneck(a, a[:1]) == math.inf  # different numbers of essential bars


def test_compare_reports_everything_as_json(micro, micro_internals):
    _, out = micro_internals
    view = topology.approx_view(out, layer=1, model=micro)
    exact = topology.exact_diagrams(view.points, maxdim=1)
    c = topology.compare(exact, view)
    assert c.softmin_bound_holds and c.n_tokens == 100 and c.h1_bars == len(exact.dgms[1]) > 0
    assert 0 < c.bottleneck_h0 <= c.wasserstein1_h0
    assert -1 <= c.spearman_filter_vs_elder <= 1 and c.negative_soft > 0  # repeats sit at s = 0, s~ < 0
    # ranks on the distinct tokens leave out the repeats, which all tie at s = p = 0
    first = [i for i in range(1, 100) if view.exact[i] > 0]
    assert 0 < c.distinct_tokens == len(first) < 99
    assert c.spearman_filter_vs_elder_distinct == pytest.approx(spearmanr(view.soft[first], c.elder[first]).statistic)
    assert c.spearman_filter_vs_elder_distinct != pytest.approx(c.spearman_filter_vs_elder)
    lists = c.down_weighted_and_persistent + c.down_weighted_not_persistent + c.persistent_not_down_weighted
    assert 0 not in lists  # token 0 has no score
    down = set(np.flatnonzero(view.weights[1:] < 1) + 1)
    assert down == set(c.down_weighted_and_persistent) | set(c.down_weighted_not_persistent)
    d = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert d["elder"][0] is None and len(d["abs_error"]) == 100
    json.dumps(exact.to_dict(), allow_nan=False)
    with pytest.raises(TopologyError, match=r"computed on 50 points but the view has 100 tokens"):
        topology.compare(topology.exact_diagrams(view.points[:50]), view)


def test_approx_view_errors(micro_internals):
    _, out = micro_internals
    with pytest.raises(TopologyError, match=r"layer 9 does not exist: this model has layers 0\.\.3"):
        topology.approx_view(out, layer=9)
    with pytest.raises(TopologyError, match=r"layer 2 needs the model's TopoFilter settings.*pass model="):
        topology.approx_view(out, layer=2)
    with pytest.raises(TopologyError, match="return_internals=True"):
        topology.approx_view(type("Out", (), {"states": None})())


def test_causal_diagram_is_the_view_s_and_clips_negative_scores(micro_internals):
    """One bar per token: born at 0, dead at its causal score (clipped at 0), the first token's never."""
    view = topology.approx_view(micro_internals[1], layer=1)
    np.testing.assert_array_equal(topology.causal_diagram(view.soft), view.diagram)
    dgm = topology.causal_diagram(np.array([0.0, 0.5, -0.1, 2.0]))
    np.testing.assert_array_equal(dgm, [[0, 0.5], [0, 0], [0, 2.0], [0, np.inf]])


def test_exact_mode_loss_runs_both_scores_and_leaves_the_model_alone(micro, micro_internals):
    ids, _ = micro_internals
    before = {k: v.clone() for k, v in micro.state_dict().items()}
    res = topology.exact_mode_loss(micro, ids)
    assert all(torch.equal(v, before[k]) for k, v in micro.state_dict().items())
    plain = micro(ids[:, :-1], targets=ids[:, 1:])
    assert res.ce_approx == float(plain.loss_terms["ce"])  # the approximate run is the plain model
    assert res.tokens == 99 and math.isfinite(res.ce_exact) and res.ce_exact != res.ce_approx
    assert res.perplexity_exact == pytest.approx(math.exp(res.ce_exact))
    assert res.mean_weight_exact <= res.mean_weight_approx  # s >= s~, so w is never larger
    json.dumps(res.to_dict(), allow_nan=False)


def test_layer_sweep_covers_every_layer(micro, micro_internals):
    ids, _ = micro_internals
    sweep = topology.layer_sweep(micro, ids[:, :40], maxdim=1)
    assert [r.layer for r in sweep] == [0, 1, 2, 3] and [r.name for r in sweep] == micro.state_names
    assert micro.state_names[2:] == ["block 0", "block 1"]  # blocks from 0, as blocks.{b} sites and ablate_heads
    assert sweep[0].exact is sweep[1].exact  # the same cloud is computed once
    assert all(r.summary()["distinct_points"] <= 40 for r in sweep)


# --- the command line ---------------------------------------------------------------------------


def test_cli_topo_json_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path):
    page = tmp_path / "topo.html"
    r = run_qtg("topo", "--checkpoint", str(tiny_checkpoint), "--text", SAMPLE_TEXT[:300], "--layer", "all",
                "--json", "--html", str(page))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["model"] == "micro" and [x["summary"]["layer"] for x in d["layers"]] == [0, 1, 2, 3]
    layer1 = d["layers"][1]
    assert layer1["exact"]["backend"] == f"mst+{AUTO_RIPS_ENGINE}" and layer1["exact"]["bounds"]["exact"]
    assert layer1["exact"]["dgms"][0][-1][1] is None  # the infinite H0 bar
    assert len(layer1["view"]["tokens"]) == d["tokens"] and "ce_exact" in d["exact_mode"]
    c = layer1["comparison"]  # the rank correlation on the distinct tokens, beside the one with the tied repeats
    assert 0 < c["distinct_tokens"] < d["tokens"] - 1 and -1 <= c["spearman_filter_vs_elder_distinct"] <= 1
    assert page.exists() and "src=\"http" not in page.read_text()


def test_cli_topo_errors_are_one_line(tiny_checkpoint):
    r = run_qtg("topo", "--checkpoint", str(tiny_checkpoint), "--text", "To be or not", "--layer", "9")
    assert r.returncode == 2 and "--layer 9 does not exist" in r.stderr and "Traceback" not in r.stderr


def test_equal_diagrams_are_at_bottleneck_zero_exactly():
    """gudhi's default tolerance is the smallest double: equal diagrams must read 0, not ~1e-308."""
    a = np.array([[0.0, 1.5], [0.2, 0.9], [0.3, 0.31], [0.0, np.inf]])
    assert topology.bottleneck(a, a[::-1].copy()) == 0.0
    assert topology.bottleneck(a, a + [0.0, 1e-3]) == pytest.approx(1e-3)  # a real difference still shows


def test_recomputing_near_pairs_holds_memory_bounded_by_bytes_not_pairs():
    """Near pairs are recomputed from their differences in chunks. A chunk of 65,536 pairs of 6,144-wide 7b
    states once took 3 GiB per array (a /topology request on 7b peaked 7 GiB above its model)."""
    import tracemalloc

    two = np.random.default_rng(0).standard_normal((2, 256))
    x = np.repeat(two, 200, axis=0)  # repeated tokens: 79,600 pairs at distance 0 are near, to redo
    tracemalloc.start()
    try:
        d = topology.euclidean_distances(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    far = np.linalg.norm(two[0] - two[1])
    assert np.array_equal(d, np.where(np.equal.outer(np.arange(400) // 200, np.arange(400) // 200), 0.0, d))
    assert np.allclose(d[0, 200:], far, rtol=1e-12) and peak < 160 * 2**20, f"{peak / 2**20:.0f} MiB"
