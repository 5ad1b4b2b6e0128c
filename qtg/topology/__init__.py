"""Exact topology of token states beside the TopoFilter's approximation.

    from qtg import topology
    out = model(ids, return_internals=True)
    ex = topology.exact_diagrams(out.states[0][0], maxdim=1)   # H0, H1: ripser.py convention, bounded work
    view = topology.approx_view(out, layer=1)                  # s~, s, w and the implied H0 diagram
    cmp = topology.compare(ex, view)                           # bottleneck, W1, per-token errors, ranks
    topology.bottleneck(ex_gudhi.dgms[1], ex_ripser.dgms[1])    # any two diagrams (e.g. two engines' H1)
    topology.exact_mode_loss(model, ids)                       # what the soft-min costs in loss
    topology.attention_graph(out.attention[0][0, h])           # a head's attention map as a graph: H0/H1, Betti
    topology.prompt_distance(A, prompt_len)                    # TOHA: the prompt-to-continuation spanning forest

:mod:`qtg.topology.exact` computes diagrams (engines in
:mod:`qtg.topology.backends`); :mod:`qtg.topology.compare` measures the
approximation, with the diagram distances of
:mod:`qtg.topology.bottleneck_distance` and :mod:`qtg.topology.wasserstein_distance`
and the elder-rule attribution of :mod:`qtg.topology.elder`. Figures live apart,
in :mod:`qtg.plots.topology`.
"""

from qtg.errors import TopologyError
from qtg.topology.attention_graph import (
    THRESHOLDS,
    AttentionTopology,
    BarStats,
    attention_distances,
    attention_graph,
    bar_stats,
    head_attention_graphs,
)
from qtg.topology.bottleneck_distance import bottleneck
from qtg.topology.budget import Budget, BudgetExceeded
from qtg.topology.compare import (
    ApproxView,
    Comparison,
    ExactModeResult,
    LayerComparison,
    approx_view,
    causal_diagram,
    compare,
    exact_mode_loss,
    layer_sweep,
)
from qtg.topology.elder import elder_persistence
from qtg.topology.exact import Bounds, ExactDiagrams, euclidean_distances, exact_diagrams
from qtg.topology.head_geometry import HeadGeometry, fisher_rao_distances, head_geometry, head_points
from qtg.topology.prompt_forest import PromptForest, prompt_distance
from qtg.topology.wasserstein_distance import wasserstein_1

__all__ = [
    "ApproxView", "AttentionTopology", "BarStats", "Bounds", "Budget", "BudgetExceeded", "Comparison",
    "ExactDiagrams", "ExactModeResult", "HeadGeometry", "LayerComparison", "PromptForest", "THRESHOLDS",
    "TopologyError", "approx_view", "attention_distances", "attention_graph", "bar_stats", "bottleneck",
    "causal_diagram", "compare", "elder_persistence", "euclidean_distances", "exact_diagrams", "exact_mode_loss",
    "fisher_rao_distances", "head_attention_graphs", "head_geometry", "head_points", "layer_sweep", "prompt_distance",
    "wasserstein_1",
]
