"""What the diagram distances share: a diagram's finite and essential parts.

A persistence diagram in ripser.py's convention is an ``[n, 2]`` array of
(birth, death) with infinite deaths for the bars that never die (the
essential part). The distances in :mod:`qtg.topology.bottleneck_distance` and
:mod:`qtg.topology.wasserstein_distance` match the finite parts as points in
the plane and the essential parts separately: an essential bar can only be
matched to an essential bar, and those are points on the line of births.
"""

from __future__ import annotations

import math

import numpy as np


def split_diagram(dgm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(finite points ``[n, 2]``, sorted births ``[k]`` of the infinite ones)."""
    dgm = np.asarray(dgm, dtype=np.float64).reshape(-1, 2)
    inf = np.isinf(dgm[:, 1])
    return dgm[~inf], np.sort(dgm[inf, 0])


def essential_distance(a: np.ndarray, b: np.ndarray, agg: str) -> float:
    """Distance between two sorted lists of essential births: ``agg`` "max" (bottleneck) or "sum" (W1).

    Infinite when the counts differ: an essential bar has no finite partner.
    Matching in sorted order is optimal for points on a line.
    """
    if len(a) != len(b):
        return math.inf
    gaps = np.abs(a - b)
    return float(gaps.max() if agg == "max" and len(gaps) else gaps.sum())
