"""How far a continuation strays from its prompt in an attention graph (TOHA), rebuilt or live.

    from qtg import topology
    topology.prompt_distance(A, prompt_len=12)           # one map [N, N]: rebuild, O(N^2)
    forest = topology.PromptForest(prompt_len=12)         # live: one token at a time, O(N) each
    forest.add(out.attention[block][0, head, -1])         # the new token's row (its keys 0..i)
    forest.total                                          # == prompt_distance(A[:i+1, :i+1], 12)

**The score.** On the attention graph of :mod:`qtg.topology.attention_graph`
(d_ij = 1 - max(a_ij, a_ji)), set every distance *inside* the prompt (tokens
0..P-1) to 0 and take the H0 total persistence of the result: the sum of the
finite H0 bar lengths. H0 persistence is single linkage, i.e. Kruskal's
algorithm, so every finite bar dies at one edge of a minimum spanning tree;
the prompt's zero edges merge it into one vertex at r = 0 (bars of length 0),
and the total is the length of a minimum spanning tree of the graph with the
prompt contracted to one vertex R, the edge from R to token k having length
min_{p<P} d_pk. Equivalently: the lightest forest that joins every
continuation token to the prompt. (TOHA, 2025, scores continuations this way.)

**Live, O(N) per token.** For a causal map, a new token i brings edges to the
earlier tokens only, of length 1 - a_ij (a_ji = 0 for j < i: the causal mask
makes it exactly 0), and the earlier rows never change (row j sees tokens
<= j only). Adding token i therefore adds one vertex z with n edges to a graph
whose minimum spanning tree T is known, and an MST of the new graph lies in
T plus those n edges (an edge outside T is heaviest on a cycle of T and stays
so). :class:`PromptForest` finds it by Chin & Houck's insertion (1978, "Algorithms
for updating minimal spanning trees"), with T rooted at R, in one post-order
pass: for a vertex u, let m_u be the heaviest edge on the lightest route from
u down its subtree to z (a route ends with a new edge (x, z), x in the subtree),

    m_u = min( (u, z),  min over children c of max((u, c), m_c) ),

because the routes from u to z through different children are parallel paths
between u and z: the MST keeps the route with the lightest maximum whole and
drops the maximum of every other. At each child the lighter of (u, c) and m_c
is kept, the heavier competes for m_u, and m_R is kept at the end: n edges,
O(n) work, no matrix. Ties are broken by an edge id, so the comparison order
is strict; any MST has the same total. For a map that is not causal (an
encoder's), earlier rows change with every token: use :func:`prompt_distance`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qtg.errors import TopologyError
from qtg.topology.attention_graph import attention_distances
from qtg.topology.backends import mst_edges

_WEIGHT_TOL = 1e-5  # as attention_graph: float32 softmax weights may exceed 1 by a few ulps


def _check_prompt_len(prompt_len: Any, n: int | None = None) -> int:
    if not isinstance(prompt_len, (int, np.integer)) or isinstance(prompt_len, bool) or prompt_len < 1:
        raise TopologyError(f"prompt_len must be an integer >= 1, got {prompt_len!r}")
    if n is not None and prompt_len > n:
        raise TopologyError(f"prompt_len {prompt_len} exceeds the map's {n} tokens")
    return int(prompt_len)


def contracted_distances(A: Any, prompt_len: int) -> np.ndarray:
    """The attention-graph distances with the prompt contracted to vertex 0.

    Args:
        A: ``[N, N]`` attention map (entries in [0, 1]).
        prompt_len: P, 1 <= P <= N.

    Returns:
        ``[1 + N - P, 1 + N - P]`` float64: vertex 0 is the prompt, vertex k >= 1 token P + k - 1;
        d(0, k) = min_{p<P} d_{p, P+k-1}.
    """
    d = attention_distances(A)
    p = _check_prompt_len(prompt_len, d.shape[0])
    m = np.empty((1 + d.shape[0] - p,) * 2)
    m[1:, 1:] = d[p:, p:]
    m[0, 1:] = m[1:, 0] = d[:p, p:].min(axis=0)
    m[0, 0] = 0.0
    return m


def prompt_distance(A: Any, prompt_len: int) -> float:
    """TOHA's score: the length of the minimum spanning forest joining the continuation to the prompt.

    Equal to the H0 total persistence of the attention-graph distances with the prompt block set
    to 0 (module docstring). A rebuild: Prim's algorithm on the contracted matrix, O(N^2).

    Args:
        A: ``[N, N]`` attention map of one head (causal or not), entries in [0, 1].
        prompt_len: P, the tokens 0..P-1 that are the prompt (1 <= P <= N).

    Returns:
        The total length, in [0, N - P]; 0 when the continuation is empty.
    """
    m = contracted_distances(A, prompt_len)
    return float(mst_edges(m)[2].sum()) if m.shape[0] > 1 else 0.0


class PromptForest:
    """:func:`prompt_distance` of a growing causal map, updated one token at a time in O(N).

    Vertex 0 is the prompt, vertex k >= 1 the k-th continuation token (token ``prompt_len + k - 1``).
    The tree is kept rooted at the prompt as parent pointers: ``(k, parent[k])`` is an edge of
    length ``length[k]``. Plain Python lists: every step is a scalar walk over the tree, which
    lists serve faster than numpy arrays.
    """

    def __init__(self, prompt_len: int):
        self.prompt_len = _check_prompt_len(prompt_len)
        self._parent = [0]  # [n]; the root's entry is unused
        self._length = [0.0]  # [n]: length of the edge to the parent (0 at the root)
        self._anchor = [0]  # [n]: the prompt token nearest to vertex k

    @property
    def n_tokens(self) -> int:
        """Tokens so far, the prompt included."""
        return self.prompt_len + len(self._parent) - 1

    @property
    def total(self) -> float:
        """The current spanning-forest length (0 before the first continuation token)."""
        return math.fsum(self._length)

    def add(self, row: Any) -> float:
        """Add the next token, given its attention row over the earlier tokens.

        Args:
            row: ``[i]`` weights a_i0..a_i,i-1 of the new token i (``i = n_tokens``), or ``[i + 1]``
                with its own weight a_ii last (ignored): e.g. ``out.attention[block][0, head, -1]``
                from a cached decoding step, or ``A[i, :i + 1]`` of a full causal map.

        Returns:
            The new :attr:`total`.
        """
        wz, anchor = self._edges_of(row)
        src, dropped = self._routes(wz)
        self._relink(wz, src, dropped)
        self._anchor.append(anchor)
        return self.total

    def _edges_of(self, row: Any) -> tuple[list[float], int]:
        """(lengths ``[n]`` from the new vertex to vertices 0..n-1, the prompt token nearest to it)."""
        i = self.n_tokens
        if hasattr(row, "detach"):
            row = row.detach().cpu().double().numpy()
        a = np.asarray(row, dtype=np.float64).reshape(-1)
        if a.size not in (i, i + 1):
            raise TopologyError(f"row: token {i} needs its {i} weights over earlier tokens (or {i + 1} with its "
                                f"own), got {a.size}")
        a = a[:i]
        if not np.isfinite(a).all() or a.min() < -_WEIGHT_TOL or a.max() > 1.0 + _WEIGHT_TOL:
            raise TopologyError(f"row: attention weights must be finite and lie in [0, 1] (token {i})")
        a = np.clip(a, 0.0, 1.0)
        p = self.prompt_len
        anchor = int(np.argmax(a[:p]))
        return [1.0 - float(a[anchor]), *(1.0 - a[p:]).tolist()], anchor

    def _post_order(self) -> list[int]:
        """The non-root vertices, children before parents (a breadth-first order, reversed)."""
        children: list[list[int]] = [[] for _ in self._parent]
        for v, u in enumerate(self._parent[1:], start=1):
            children[u].append(v)
        order = [0]
        for v in order:  # grows while it is read: breadth-first
            order.extend(children[v])
        return order[:0:-1]

    def _routes(self, wz: list[float]) -> tuple[list[int], list[int]]:
        """Chin & Houck's pass (module docstring) for the new vertex z = n.

        Candidates are (length, id) pairs, so every comparison is strict: id ``c < n`` is the
        tree edge (c, parent[c]), id ``n + u`` the new edge (u, z).

        Returns:
            ``src``: per vertex u, the child whose route u's lightest route to z follows, or -1 when
            it is u's own edge (u, z); ``dropped``: the tree edges (by lower vertex) that leave.
        """
        n = len(self._parent)
        parent, length = self._parent, self._length
        best = list(zip(wz, range(n, 2 * n)))  # m_u, starting from the direct edge (u, z)
        src = [-1] * n
        dropped = []
        for c in self._post_order():
            edge, route = (length[c], c), best[c]
            heavier = edge if route < edge else route  # the lighter of the two stays in the tree
            u = parent[c]
            if heavier < best[u]:
                heavier, best[u], src[u] = best[u], heavier, c  # the old best leaves instead
            if heavier[1] < n:  # a tree edge leaves; a new edge that loses is simply not added
                dropped.append(heavier[1])
        return src, dropped

    def _relink(self, wz: list[float], src: list[int], dropped: list[int]) -> None:
        """The new tree as parent pointers rooted at the prompt again.

        z hangs from the end of the prompt's route. Below each tree edge (v, parent[v]) that left,
        v now reaches the root through its own route v -> src[v] -> ... -> x -> z, whose edges all
        stay: their parent pointers turn around, and x hangs from z. The routes are disjoint, so
        this is O(n) in all.
        """
        n = len(self._parent)
        parent, length = self._parent + [0], self._length + [0.0]
        x = 0
        while src[x] >= 0:
            x = src[x]
        parent[n], length[n] = x, wz[x]
        for v in dropped:
            while src[v] >= 0:
                w = src[v]
                parent[v], length[v] = w, self._length[w]  # the edge (v, w) was w's edge to its parent v
                v = w
            parent[v], length[v] = n, wz[v]
        self._parent, self._length = parent, length

    def edges(self) -> list[tuple[int, int, float]]:
        """The forest as (token, token, length) with the later token first; a continuation token
        joined to the prompt is joined to the prompt token it attends to most."""
        p, out = self.prompt_len, []
        for k in range(1, len(self._parent)):
            j = self._parent[k]
            other = p + j - 1 if j else self._anchor[k]
            out.append((p + k - 1, other, self._length[k]) if other < p + k - 1
                       else (other, p + k - 1, self._length[k]))
        return out

    @classmethod
    def trace(cls, A: Any, prompt_len: int) -> np.ndarray:
        """The score after each continuation token of a causal map, built incrementally.

        Args:
            A: ``[N, N]`` causal attention map.
            prompt_len: P, 1 <= P <= N.

        Returns:
            ``[N - P]`` float64: entry k is ``prompt_distance(A[:P+k+1, :P+k+1], P)``.
        """
        a = np.asarray(A.detach().cpu().double().numpy() if hasattr(A, "detach") else A, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise TopologyError(f"A: an attention map must be square [N, N], got shape {a.shape}")
        if np.triu(a, k=1).any():
            raise TopologyError("A: the incremental forest needs a causal map (a_ij = 0 for j > i); for any "
                                "other map use prompt_distance, which reads max(a_ij, a_ji)")
        forest = cls(_check_prompt_len(prompt_len, a.shape[0]))
        return np.array([forest.add(a[i, :i]) for i in range(forest.prompt_len, a.shape[0])])
