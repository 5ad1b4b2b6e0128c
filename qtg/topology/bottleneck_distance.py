"""Bottleneck distance between two persistence diagrams.

The L-infinity ground metric (a point's distance to the diagonal is half its
persistence), on the finite parts: ``gudhi.bottleneck_distance`` with its
default e, exact up to the last bits of a double. The essential parts (bars
with infinite death) are matched separately, by birth
(:mod:`qtg.topology.diagram_parts`); different counts give ``inf``.
"""

from __future__ import annotations

import numpy as np

from qtg.topology.diagram_parts import essential_distance, split_diagram


def bottleneck(a: np.ndarray, b: np.ndarray) -> float:
    """Bottleneck distance (L-inf ground metric) between diagrams ``a`` ``[n, 2]`` and ``b`` ``[m, 2]``.

    gudhi on the finite parts, 1-D matching on the essential ones; the larger of the two.
    """
    import gudhi  # a heavy import, paid only by callers that measure diagrams

    fa, ea = split_diagram(a)
    fb, eb = split_diagram(b)
    # gudhi's default e is the smallest double: equal diagrams come back as ~1e-308, not 0
    finite = 0.0 if _same_points(fa, fb) else float(gudhi.bottleneck_distance(fa, fb))
    return max(finite, essential_distance(ea, eb, "max"))


def _same_points(a: np.ndarray, b: np.ndarray) -> bool:
    """The same multiset of (birth, death) points, in any order."""
    if a.shape != b.shape:
        return False
    order = lambda d: d[np.lexsort((d[:, 1], d[:, 0]))]  # noqa: E731
    return bool(np.array_equal(order(a), order(b)))
