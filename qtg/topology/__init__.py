"""Exact topology of token states beside the TopoFilter's approximation.

    from qtg import topology
    out = model(ids, return_internals=True)
    ex = topology.exact_diagrams(out.states[0][0], maxdim=1)   # H0, H1: ripser.py convention, bounded work
    view = topology.approx_view(out, layer=1)                  # s~, s, w and the implied H0 diagram
    cmp = topology.compare(ex, view)                           # bottleneck, W1, per-token errors, ranks
    topology.bottleneck(ex_gudhi.dgms[1], ex_ripser.dgms[1])    # any two diagrams (e.g. two engines' H1)
    topology.exact_mode_loss(model, ids)                       # what the soft-min costs in loss

:mod:`qtg.topology.exact` computes diagrams (engines in
:mod:`qtg.topology.backends`); :mod:`qtg.topology.compare` measures the
approximation, with the diagram distances of
:mod:`qtg.topology.bottleneck_distance` and :mod:`qtg.topology.wasserstein_distance`
and the elder-rule attribution of :mod:`qtg.topology.elder`. Figures live apart,
in :mod:`qtg.plots`.
"""

from qtg.errors import TopologyError
from qtg.topology.bottleneck_distance import bottleneck
from qtg.topology.compare import (
    ApproxView,
    Comparison,
    ExactModeResult,
    LayerComparison,
    approx_view,
    compare,
    exact_mode_loss,
    layer_sweep,
)
from qtg.topology.elder import elder_persistence
from qtg.topology.exact import Bounds, ExactDiagrams, euclidean_distances, exact_diagrams
from qtg.topology.wasserstein_distance import wasserstein_1

__all__ = [
    "ApproxView", "Bounds", "Comparison", "ExactDiagrams", "ExactModeResult", "LayerComparison", "TopologyError",
    "approx_view", "bottleneck", "compare", "elder_persistence", "euclidean_distances", "exact_diagrams",
    "exact_mode_loss", "layer_sweep", "wasserstein_1",
]
