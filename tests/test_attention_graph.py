"""qtg.topology's attention topology: the attention graph (known answers, engines that agree, the
paper's features), the Fisher-Rao geometry of QTG's heads, and the prompt distance, rebuilt and live.
Maps stay at <= 64 tokens, models at the micro preset."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

import qtg
from qtg.errors import TopologyError
from qtg.topology.attention_graph import (
    THRESHOLDS,
    BarStats,
    attention_distances,
    attention_graph,
    bar_stats,
    head_attention_graphs,
)
from qtg.topology.exact import exact_diagrams
from qtg.topology.head_geometry import fisher_rao_distances, head_geometry, head_points
from qtg.topology.prompt_forest import PromptForest, contracted_distances, prompt_distance

pytestmark = pytest.mark.usefixtures("one_thread")

ENGINES = ("gudhi", "ripser", "auto")


def causal_map(n: int, seed: int, sharpness: float = 3.0, kind: str = "soft") -> np.ndarray:
    """A random causal attention map ``[n, n]`` (rows sum to 1, zeros above the diagonal).

    kind: "soft" (softmax of Gaussian scores), "hard" (each row uniform over a random subset: ties,
    exact zeros and, in the first rows, exact ones) or "uniform" (row i is 1/(i+1) everywhere).
    """
    rng = np.random.default_rng(seed)
    if kind == "soft":
        scores = sharpness * rng.standard_normal((n, n))
    elif kind == "hard":
        scores = np.where(rng.random((n, n)) < 0.2, 0.0, -np.inf)
        np.fill_diagonal(scores, 0.0)
    else:
        scores = np.zeros((n, n))
    scores = np.where(np.tril(np.ones((n, n), dtype=bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def micro_maps(micro):
    """48 tokens through micro: attention maps of both blocks ``[2, H, 48, 48]`` and the ids."""
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = micro(ids, return_internals=True)
    return ids, torch.stack([a[0] for a in out.attention]), out


@pytest.fixture(scope="module")
def micro_baseline(micro_cfg):
    return qtg.build(qtg.baseline_of(micro_cfg), seed=0).eval()


# --- the graph: known answers -------------------------------------------------------------


RING = np.array([0.9, 0.8, 0.7, 0.6, 0.9, 0.8, 0.7, 0.65])  # a_{k, k+1 mod 8}


def ring_map(weak: float = 0.05) -> np.ndarray:
    """8 tokens in a ring of strong links RING, every other pair ``weak``; symmetric."""
    n = len(RING)
    a = np.full((n, n), weak)
    for k, w in enumerate(RING):
        a[k, (k + 1) % n] = a[(k + 1) % n, k] = w
    np.fill_diagonal(a, 0.0)
    return a


@pytest.mark.parametrize("backend", ENGINES)
def test_a_ring_of_strong_links_has_exactly_one_h1_bar(backend):
    g = attention_graph(ring_map(), backend=backend)
    # the cycle is born with its weakest link (1 - 0.6) and filled when the chords arrive (1 - 0.05)
    np.testing.assert_array_equal(g.diagrams.dgms[1], [[1.0 - 0.6, 1.0 - 0.05]])
    # H0 is the ring's spanning tree: every link but the weakest, and the component that never dies
    h0 = g.diagrams.dgms[0]
    np.testing.assert_array_equal(h0[:-1, 1], np.sort(1.0 - RING)[:-1])
    assert np.isinf(h0[-1, 1]) and (h0[:, 0] == 0).all()


def test_ring_betti_numbers_at_the_papers_thresholds():
    g = attention_graph(ring_map())
    assert g.thresholds == THRESHOLDS
    # t <= 0.05: the complete graph K8 (28 edges); 0.1..0.5: the ring alone; 0.75: the links >= 0.75,
    # (0,1), (1,2), (4,5), (5,6): two paths and two lone tokens
    assert g.edges == [28, 28, 8, 8, 8, 4]
    assert g.betti0 == [1, 1, 1, 1, 1, 4]
    assert g.betti1 == [21, 21, 1, 1, 1, 0]


@pytest.mark.parametrize("causal", [False, True])
def test_a_complete_graph_with_equal_weights_has_no_h1(causal):
    n = 10
    a = np.full((n, n), 0.3)
    np.fill_diagonal(a, 0.0)
    if causal:  # the lower triangle alone gives the same graph: w_ij = max(a_ij, a_ji)
        a = np.tril(a)
    for backend in ENGINES:
        g = attention_graph(a, backend=backend)
        assert len(g.diagrams.dgms[1]) == 0
        h0 = g.diagrams.dgms[0]
        np.testing.assert_array_equal(h0[:-1], [[0.0, 1.0 - 0.3]] * (n - 1))
        assert np.isinf(h0[-1, 1])
    assert g.betti0 == [1, 1, 1, 1, n, n] and g.betti1 == [36, 36, 36, 36, 0, 0]  # t <= 0.3: K10
    assert g.bars[1].count == 0 and g.bars[1].total == 0.0


@pytest.mark.parametrize("backend", ENGINES)
def test_two_components_keep_two_h0_bars_to_the_end(backend):
    # two groups of five, strongly linked inside, with no attention between them: d = 1 across
    rng = np.random.default_rng(5)
    a = np.zeros((10, 10))
    for group in (slice(0, 5), slice(5, 10)):
        a[group, group] = rng.uniform(0.5, 0.9, (5, 5))
    np.fill_diagonal(a, 0.0)
    g = attention_graph(a, backend=backend)
    h0 = g.diagrams.dgms[0]
    # the filtration is cut at the enclosing radius, 1 here: the oldest class never dies, and the
    # second lives until the largest distance 1 joins the groups; every other bar dies inside a group
    assert g.diagrams.bounds.edge_threshold == 1.0
    assert np.isinf(h0[-1, 1]) and h0[-2, 1] == 1.0
    assert (h0[:-2, 1] <= 0.5).all() and len(h0) == 10
    assert all(b0 >= 2 for b0 in g.betti0)
    assert g.bars[0].infinite == 1 and g.bars[0].max == 1.0


# --- the graph: engines and features --------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_gudhi_and_ripser_agree_number_for_number_on_attention_graphs(seed):
    a = causal_map(40, seed, sharpness=4.0)
    results = {b: attention_graph(a, backend=b) for b in ENGINES}
    assert len(results["gudhi"].diagrams.dgms[1]) > 0, "a graph without H1 would not test H1 agreement"
    for backend in ("ripser", "auto"):
        for x, y in zip(results["gudhi"].diagrams.dgms, results[backend].diagrams.dgms):
            np.testing.assert_array_equal(x, y)


def test_engines_agree_on_a_model_map(micro_maps):
    _, maps, _ = micro_maps
    a = maps[1, 2]
    results = [attention_graph(a, backend=b).diagrams.dgms for b in ENGINES]
    for other in results[1:]:
        for x, y in zip(results[0], other):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("seed", [2, 3])
def test_graph_betti0_counts_the_h0_bars_alive_at_one_minus_t(seed):
    # the graph at attention t is the Rips 1-skeleton at r = 1 - t: its components are the H0 bars alive there
    a = causal_map(40, seed, sharpness=2.0)
    g = attention_graph(a, maxdim=0)
    deaths = g.diagrams.dgms[0][:, 1]
    w = np.maximum(a, a.T)
    np.fill_diagonal(w, 0.0)
    for t, b0, b1, edges in zip(g.thresholds, g.betti0, g.betti1, g.edges):
        assert b0 == int((deaths > 1.0 - t).sum())
        keep = np.triu(w >= t, k=1)
        assert edges == int(keep.sum())
        components = connected_components(csr_matrix(keep), directed=False)[0]
        assert b1 == edges - 40 + components


def test_bar_statistics():
    s = bar_stats(np.array([[0.0, 1.0], [0.5, 3.5], [0.0, np.inf]]))
    assert (s.count, s.total, s.mean, s.max, s.infinite) == (2, 4.0, 2.0, 3.0, 1)
    assert s.entropy == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert bar_stats(np.array([[0.0, np.inf]])) == BarStats(0, 0.0, 0.0, 0.0, 0.0, 1)


def test_to_dict_is_json_with_null_infinities_and_named_features():
    g = attention_graph(ring_map())
    d = json.loads(json.dumps(g.to_dict(), allow_nan=False))
    assert d["diagrams"]["dgms"][0][-1][1] is None  # the infinite H0 bar
    assert d["betti1"] == g.betti1 and d["bars"][1]["count"] == 1
    assert d["features"]["b1@0.5"] == 1.0 and d["features"]["h1_total"] == pytest.approx(0.95 - 0.4)


@pytest.mark.parametrize("bad, match", [
    (np.ones((3, 4)), "A: an attention map must be square"),
    (np.ones((2, 3, 3)) / 3, "one head"),
    (np.full((3, 3), 1.5), r"A: attention weights must lie in \[0, 1\]"),
    (np.full((3, 3), np.nan), "NaN"),
    (np.zeros((0, 0)), "at least one token"),
])
def test_bad_maps_are_refused_by_name(bad, match):
    with pytest.raises(TopologyError, match=match):
        attention_graph(bad)


def test_bad_thresholds_are_refused():
    with pytest.raises(TopologyError, match="thresholds"):
        attention_graph(ring_map(), thresholds=[0.1, 0.0])


def test_distances_of_a_causal_map():
    a = causal_map(6, 0)
    d = attention_distances(a)
    i, j = np.tril_indices(6, k=-1)
    np.testing.assert_array_equal(d[i, j], 1.0 - a[i, j])  # a_ji = 0 above the diagonal: d = 1 - a_ij
    np.testing.assert_array_equal(d, d.T)
    assert (np.diag(d) == 0).all()


@pytest.mark.parametrize("which_model", ["qtg", "baseline"])
def test_head_attention_graphs_read_the_models_maps(micro, micro_baseline, micro_maps, which_model):
    ids, maps, _ = micro_maps
    model = micro if which_model == "qtg" else micro_baseline
    graphs = head_attention_graphs(model, ids[0], block=1, heads=[0, 3], maxdim=0)
    with torch.no_grad():
        own = model(ids, return_internals=True).attention[1][0]
    for g, h in zip(graphs, [0, 3]):
        np.testing.assert_array_equal(g.diagrams.dgms[0], attention_graph(own[h], maxdim=0).diagrams.dgms[0])
    with pytest.raises(TopologyError, match="block"):
        head_attention_graphs(model, ids, block=2)


# --- QTG's heads on the sphere ----------------------------------------------------------------


def test_head_points_are_the_points_the_model_attends_with(micro, micro_maps):
    ids, _, out = micro_maps
    for block in (0, 1):
        sp, sk = head_points(micro, ids, block, "queries"), head_points(micro, ids, block, "keys")
        assert sp.shape == (4, 48, 16) and sp.dtype == torch.float64
        torch.testing.assert_close(sk.norm(dim=-1), torch.ones(4, 48, dtype=torch.float64))
        d = torch.acos((sp @ sk.transpose(-1, -2)).clamp(0.0, 1.0))  # [H, N, N]
        # the model's own d_FR, float32 (arccos there resolves ~1e-4 near BC = 1)
        torch.testing.assert_close(d.float(), out.distances[block][0], atol=1e-3, rtol=0)


def test_fisher_rao_distances_are_the_sphere_angle_and_a_metric():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.standard_normal((30, 8)))
    s = qtg.model.fisher_rao.sqrt_simplex(logits).numpy()
    d = fisher_rao_distances(s)
    np.testing.assert_allclose(d, np.arccos(np.clip(s @ s.T, 0.0, 1.0)), atol=1e-7)
    assert (d >= 0).all() and d.max() <= math.pi / 2 and (np.diag(d) == 0).all()
    np.testing.assert_array_equal(d, d.T)
    triangle = d[:, None, :] - d[:, :, None] - d[None, :, :]  # d_ik - d_ij - d_jk <= 0
    assert triangle.max() <= 1e-12
    # two points 1e-9 apart: arccos of their inner product (1 to 1e-18) would read 0 or ~1.5e-8
    theta = 1e-9
    close = np.array([[1.0, 0.0], [math.cos(theta), math.sin(theta)]])
    assert fisher_rao_distances(close)[0, 1] == pytest.approx(theta, rel=1e-6)


def test_head_geometry_engines_agree(micro, micro_maps):
    ids, _, _ = micro_maps
    geo = {b: head_geometry(micro, ids, 1, "keys", backend=b) for b in ("gudhi", "ripser")}
    assert sum(len(d.dgms[1]) for d in geo["gudhi"].diagrams) > 0, "no H1 to compare"
    for x, y in zip(geo["gudhi"].diagrams, geo["ripser"].diagrams):
        for a, b in zip(x.dgms, y.dgms):
            np.testing.assert_array_equal(a, b)
    g = geo["gudhi"]
    assert g.heads == [0, 1, 2, 3] and g.distances.shape == (4, 48, 48)
    assert g.bars[0][1].count == len(g.diagrams[0].dgms[1])
    d = json.loads(json.dumps(g.to_dict(), allow_nan=False))
    assert d["metric"] == "fisher-rao" and len(d["diagrams"]) == 4


def test_head_geometry_follows_the_intervention(micro, micro_maps):
    ids, _, _ = micro_maps
    plain = head_points(micro, ids, 0, "queries")
    off = head_points(micro, ids, 0, "queries", intervene=qtg.Intervention(topo="off"))
    assert (plain - off).abs().max() > 1e-4  # w = 1 changes block 0's input, hence its queries


def test_head_geometry_refuses_the_baseline_and_bad_arguments(micro, micro_baseline, micro_maps):
    ids, _, _ = micro_maps
    with pytest.raises(TopologyError, match="baseline.*dot-product heads"):
        head_geometry(micro_baseline, ids, 0)
    with pytest.raises(TopologyError, match="which"):
        head_geometry(micro, ids, 0, which="values")
    with pytest.raises(TopologyError, match="heads"):
        head_geometry(micro, ids, 0, heads=[4])
    with pytest.raises(TopologyError, match="one sequence"):
        head_geometry(micro, ids.repeat(2, 1), 0)


# --- the prompt distance --------------------------------------------------------------------------


def kruskal_total(d: np.ndarray) -> float:
    """Minimum spanning tree length of a complete graph by Kruskal, union-find by hand."""
    n = d.shape[0]
    root = list(range(n))

    def find(x: int) -> int:
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    total = 0.0
    for i, j in sorted(itertools.combinations(range(n), 2), key=lambda e: d[e]):
        ri, rj = find(i), find(j)
        if ri != rj:
            root[ri] = rj
            total += d[i, j]
    return total


@pytest.mark.parametrize("kind, seed, prompt_len", [("soft", 0, 1), ("soft", 1, 7), ("hard", 2, 5),
                                                     ("uniform", 0, 3)])
def test_prompt_distance_is_the_spanning_forest_to_the_prompt(kind, seed, prompt_len):
    a = causal_map(30, seed, kind=kind)
    score = prompt_distance(a, prompt_len)
    d = attention_distances(a)
    d[:prompt_len, :prompt_len] = 0.0  # TOHA: the prompt is one place
    # brute force, three ways: Kruskal on the whole graph, scipy's tree of the contracted graph (every
    # length + 1, since scipy reads a 0 as a missing edge; a tree has 30 - P edges), exact H0
    assert score == pytest.approx(kruskal_total(d), abs=1e-12)
    m = contracted_distances(a, prompt_len)
    shifted = minimum_spanning_tree(csr_matrix(np.triu(m + 1.0, k=1))).sum() - (m.shape[0] - 1)
    assert score == pytest.approx(shifted, abs=1e-12)
    for backend in ("gudhi", "auto"):
        h0 = exact_diagrams(d, maxdim=0, backend=backend, metric_input="distances")
        assert score == pytest.approx(h0.total_persistence(0), abs=1e-12)


def test_prompt_distance_edge_cases():
    a = causal_map(8, 0)
    assert prompt_distance(a, 8) == 0.0
    assert prompt_distance(a, 7) == pytest.approx(1.0 - a[7, :7].max())  # one token: its nearest prompt token
    for bad in (0, 9, 1.5, True):
        with pytest.raises(TopologyError, match="prompt_len"):
            prompt_distance(a, bad)


# --- live: the incremental forest -----------------------------------------------------------------


def check_forest(forest: PromptForest, a: np.ndarray) -> None:
    """The forest's edges are a spanning tree of the contracted graph with the map's lengths."""
    p, n = forest.prompt_len, forest.n_tokens
    d = attention_distances(a[:n, :n])
    edges = forest.edges()
    assert len(edges) == n - p
    root = {}

    def find(x):
        x = -1 if x < p else x  # the prompt is one vertex
        while root.get(x, x) != x:
            x = root[x]
        return x

    for i, j, length in edges:
        assert i > j and i >= p
        assert length == d[i, j]
        ri, rj = find(i), find(j)
        assert ri != rj, "a cycle"
        root[ri] = rj
    assert math.fsum(e[2] for e in edges) == pytest.approx(forest.total, abs=1e-12)


@pytest.mark.parametrize("kind", ["soft", "hard", "uniform"])
@pytest.mark.parametrize("prompt_len", [1, 4, 12])
def test_the_live_forest_equals_a_rebuild_at_every_step(kind, prompt_len):
    for seed in range(3):
        a = causal_map(40, seed, sharpness=1.0 + seed, kind=kind)
        forest = PromptForest(prompt_len)
        for i in range(prompt_len, 40):
            live = forest.add(a[i, :i + 1])
            assert live == pytest.approx(prompt_distance(a[:i + 1, :i + 1], prompt_len), abs=1e-12), (seed, i)
        check_forest(forest, a)


def test_the_live_forest_equals_a_rebuild_on_model_maps(micro_maps):
    _, maps, _ = micro_maps
    for block, head in [(0, 0), (0, 3), (1, 1), (1, 2)]:
        a = maps[block, head].double().numpy()
        live = PromptForest.trace(a, 6)
        rebuilt = [prompt_distance(a[:i + 1, :i + 1], 6) for i in range(6, 48)]
        np.testing.assert_allclose(live, rebuilt, atol=1e-12, rtol=0)


@pytest.mark.parametrize("which_model", ["qtg", "baseline"])
def test_decoding_rows_are_the_causal_maps_rows(micro, micro_baseline, micro_maps, which_model):
    # what the live forest assumes: the map is causal (exact zeros above the diagonal, so
    # d_ij = 1 - a_ij) and a row, once computed, never changes: a cached decoding step's row equals
    # the full map's row, and the forest fed those rows agrees with the rebuild on the full map
    model = micro if which_model == "qtg" else micro_baseline
    ids, _, _ = micro_maps
    ids = ids[:, :24]
    with torch.no_grad():
        full = model(ids, return_internals=True).attention
        cache = qtg.QTGCache()
        model(ids[:, :5], cache=cache)
        forests = {(b, h): PromptForest(5) for b in (0, 1) for h in (0, 3)}
        for i in range(5, 24):
            step = model(ids[:, i:i + 1], cache=cache, return_internals=True).attention
            for (b, h), forest in forests.items():
                row = step[b][0, h, 0]  # [i + 1]: keys 0..i
                torch.testing.assert_close(row, full[b][0, h, i, :i + 1], atol=1e-6, rtol=0)
                forest.add(row)
    for (b, h), forest in forests.items():
        a = full[b][0, h].double().numpy()
        assert (np.triu(a, k=1) == 0).all()
        assert forest.total == pytest.approx(prompt_distance(a, 5), abs=1e-5)


def test_the_live_forest_refuses_what_it_cannot_update():
    forest = PromptForest(3)
    with pytest.raises(TopologyError, match="row: token 3 needs its 3 weights"):
        forest.add(np.full(5, 0.2))
    with pytest.raises(TopologyError, match="row: attention weights"):
        forest.add(np.array([0.5, 0.5, 1.5]))
    with pytest.raises(TopologyError, match="causal"):
        PromptForest.trace(np.full((5, 5), 0.2), 2)
    with pytest.raises(TopologyError, match="prompt_len"):
        PromptForest(0)
