"""Exact 1-Wasserstein distance between two persistence diagrams.

L-infinity ground metric; the finite parts by an optimal assignment with
diagonal copies, the essential parts matched separately by birth
(:mod:`qtg.topology.diagram_parts`).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from qtg.topology.diagram_parts import essential_distance, split_diagram


def wasserstein_1(a: np.ndarray, b: np.ndarray) -> float:
    """Exact 1-Wasserstein distance (L-inf ground metric) by optimal assignment.

    The n + m square problem: point-to-point costs, each point's own diagonal
    copy at half its persistence, diagonal-to-diagonal free (Kerber, Morozov &
    Nigmetov, 2017, section 2). O((n + m)^3) time, (n + m)^2 memory.

    Args:
        a: ``[n, 2]`` diagram. b: ``[m, 2]`` diagram.

    Returns:
        The distance; ``inf`` when the counts of essential bars differ.
    """
    fa, ea = split_diagram(a)
    fb, eb = split_diagram(b)
    n, m = len(fa), len(fb)
    if n + m == 0:
        return essential_distance(ea, eb, "sum")
    cost = np.full((n + m, n + m), np.inf)
    cost[:n, :m] = np.maximum(np.abs(fa[:, None, 0] - fb[None, :, 0]), np.abs(fa[:, None, 1] - fb[None, :, 1]))
    cost[n:, m:] = 0.0
    cost[np.arange(n), m + np.arange(n)] = (fa[:, 1] - fa[:, 0]) / 2
    cost[n + np.arange(m), np.arange(m)] = (fb[:, 1] - fb[:, 0]) / 2
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].sum()) + essential_distance(ea, eb, "sum")
