"""The elder rule: which token each exact H0 bar belongs to.

Edelsbrunner & Harer, *Computational Topology*, 2010, VII.1. Run Kruskal's
algorithm on the minimum-spanning-tree edges; when two components merge, the
younger one dies, and a component's age is the index of its earliest point,
so the later-index component dies. Point i's elder persistence p_i is then the
smallest r at which i is connected to an earlier point through edges <= r.
For tokens this gives p_i <= s_i = min_{j<i} delta_ij (a direct edge is one
such path), with equality when i's nearest earlier token is also its way into
the past. Point 0's component never dies (the infinite bar). Ties in edge
lengths do not change p.
"""

from __future__ import annotations

import numpy as np

from qtg.topology import backends


def elder_persistence(distances: np.ndarray) -> np.ndarray:
    """Per point, the length of the H0 bar the elder rule attributes to it (point 0: inf).

    Kruskal on the minimum spanning tree; a component is as old as its earliest
    index, and at each merge the younger dies. Duplicates die at 0.

    Args:
        distances: ``[N, N]`` distance matrix.

    Returns:
        ``[N]`` float64; the finite values, zeros dropped, are the exact H0 deaths.
    """
    n = distances.shape[0]
    us, vs, ws = backends.mst_edges(distances)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    p = np.full(n, np.inf)
    for k in np.argsort(ws, kind="stable"):
        a, b = root(int(us[k])), root(int(vs[k]))
        elder, younger = min(a, b), max(a, b)  # roots are each component's earliest index
        p[younger] = ws[k]
        parent[younger] = elder
    return p
