"""Topology over training: what each snapshot of a run (:mod:`qtg.training.snapshots`) does to one probe text.

    runs = analyse_run("runs/m", "To be, or not to be, that is the question.")
    [(a.step, a.ce, a.bottleneck_h0) for a in runs]      # loss falls; does the soft-min stay close to H0?

Per snapshot, from one forward pass of the probe (``ids[:-1]`` against the
targets ``ids[1:]``):

* ``loss`` (the training objective) and ``ce`` (nats per token) on the probe;
* per block and head: ``entropy`` of the attention rows
  (:func:`qtg.metrics.attention_stats`) and the head's attention-graph features
  (:func:`qtg.topology.attention_graph`: H0/H1 of distance 1 - max(a_ij, a_ji));
* QTG only (``None`` for the baseline): ``gamma`` per block and head as applied,
  the histogram of the TopoFilter weights ``w`` on [0, 1], the exact H0/H1
  diagram of the TopoFilter's cloud (the QEmbed states, docs/model.md §2), the
  implied H0 diagram {(0, s~_i)} and their bottleneck and W1 distances
  (:func:`qtg.topology.compare`).

Each analysis is computed once and cached as JSON, keyed by the snapshot
file's SHA-256, the probe's SHA-256, the analysis settings and
:data:`ANALYSIS_VERSION` (raise it when the numbers' meaning changes), so
scrubbing back over a run reads a small file. The cache lives in
``<run>/snapshots/analysis/`` when that is writable, else under the user cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qtg.atomic import atomic_text
from qtg.data.pipeline import user_cache_dir
from qtg.data.tokenizer import encode
from qtg.errors import TopologyError
from qtg.metrics import attention_stats
from qtg.model.protocol import LanguageModel
from qtg.topology.attention_graph import attention_graph
from qtg.topology.budget import Budget
from qtg.topology.compare import approx_view, compare
from qtg.topology.exact import exact_diagrams
from qtg.training.snapshots import SNAPSHOT_DIR, Snapshot, file_sha256, list_snapshots, load_snapshot

ANALYSIS_VERSION = "1"
CACHE_SUBDIR = "analysis"
W_BINS = 20  # histogram of w on [0, 1]
GRAPH_FEATURES = ("h0_total", "h1_count", "h1_total", "b0@0.1", "b1@0.1")  # per head, kept from attention_graph


@dataclass
class SnapshotAnalysis:
    """One snapshot's numbers on the probe. Lists indexed ``[block][head]``; diagrams ``[n, 2]`` (inf deaths)."""

    step: int
    snapshot: str  # the file name
    arch: str
    n_tokens: int  # tokens fed (the probe's first max_tokens, less the last, which is only a target)
    loss: float
    ce: float
    entropy: list[list[float]]  # nats, per block and head
    attention_features: list[list[dict[str, float]]]  # GRAPH_FEATURES per block and head
    gamma: list[list[float]] | None = None
    w_hist: list[int] | None = None  # W_BINS counts of w over [0, 1]
    w_mean: float | None = None
    bottleneck_h0: float | None = None  # exact H0 vs the implied {(0, s~_i)}, at the TopoFilter
    wasserstein1_h0: float | None = None
    exact_h0: np.ndarray | None = field(default=None, repr=False)
    exact_h1: np.ndarray | None = field(default=None, repr=False)
    approx_h0: np.ndarray | None = field(default=None, repr=False)
    seconds: float = 0.0  # time the computation took (not the cache read)
    from_cache: bool = False

    @property
    def has_topology(self) -> bool:
        return self.bottleneck_h0 is not None

    @property
    def wasserstein1_per_token(self) -> float | None:
        """W1 over the probe's tokens: the mean bar-to-bar mismatch (W1 sums over the N bars)."""
        return None if self.wasserstein1_h0 is None else self.wasserstein1_h0 / self.n_tokens

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: diagrams as lists with null for an infinite death."""
        d = asdict(self)
        for k in ("exact_h0", "exact_h1", "approx_h0"):
            d[k] = _dgm_out(getattr(self, k))
        d.pop("from_cache")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SnapshotAnalysis:
        d = dict(d)
        for k in ("exact_h0", "exact_h1", "approx_h0"):
            d[k] = _dgm_in(d.get(k))
        return cls(**d)


def _dgm_out(dgm: np.ndarray | None) -> list | None:
    if dgm is None:
        return None
    return [[float(b), None if np.isinf(x) else float(x)] for b, x in np.asarray(dgm, dtype=np.float64)]


def _dgm_in(rows: list | None) -> np.ndarray | None:
    if rows is None:
        return None
    arr = np.array([[b, np.inf if x is None else x] for b, x in rows], dtype=np.float64)
    return arr.reshape(-1, 2)


# --- one snapshot ---------------------------------------------------------------------------------


def probe_ids(model: LanguageModel, text: str, max_tokens: int) -> torch.Tensor:
    """The probe as ``[1, n]`` ids, n <= min(max_tokens, the model's context + 1); at least 2 tokens."""
    if not isinstance(text, str) or not text.strip():
        raise TopologyError("probe: give a non-empty text")
    if model.tokenizer is None:
        raise TopologyError("probe: this snapshot's run kept no tokenizer.json, so a text cannot be encoded")
    ids = encode(model.tokenizer, text)[: min(max_tokens, model.cfg.max_seq_len + 1)]
    if len(ids) < 2:
        raise TopologyError(f"probe: {len(ids)} token(s); the loss needs at least 2")
    return torch.tensor([ids], dtype=torch.long)


def _graph_features(maps: torch.Tensor, time_budget: float | Budget | None) -> list[dict[str, float]]:
    """GRAPH_FEATURES of each head's map ``[H, N, N]``."""
    out = []
    for a in maps:
        feats = attention_graph(a, maxdim=1, time_budget=time_budget).features()
        out.append({k: feats[k] for k in GRAPH_FEATURES})
    return out


@torch.no_grad()
def compute_analysis(model: LanguageModel, ids: torch.Tensor, step: int, name: str,
                     time_budget: float | None = None) -> SnapshotAnalysis:
    """Every number of :class:`SnapshotAnalysis` for ``model`` on ``ids`` ``[1, n]`` (no cache).

    Args:
        model: a QTG or baseline model (e.g. :func:`qtg.training.snapshots.load_snapshot`).
        ids: the probe, ``[1, n]``, n >= 2: ``ids[:, :-1]`` is fed, ``ids[:, 1:]`` are the targets.
        step: the training step, recorded.
        name: the snapshot's file name, recorded.
        time_budget: seconds allowed to each exact diagram (None: no limit, computed in this process).
    """
    t0 = time.perf_counter()
    x, y = ids[:, :-1], ids[:, 1:]
    out = model(x, targets=y, return_internals=True)
    maps = [m[0] for m in out.attention]  # per block [H, N, N]
    a = SnapshotAnalysis(
        step=step, snapshot=name, arch=model.arch, n_tokens=x.shape[1], loss=float(out.loss),
        ce=float(out.loss_terms["ce"]), entropy=[attention_stats(m).entropy.tolist() for m in maps],
        attention_features=[_graph_features(m, time_budget) for m in maps])
    if model.has_topofilter:
        view = approx_view(out, layer=1, model=model)
        exact = exact_diagrams(view.points, maxdim=1, time_budget=time_budget)
        cmp = compare(exact, view)
        w = view.weights
        a.gamma = [g.float().tolist() for g in out.gamma]
        a.w_hist = np.histogram(np.clip(w, 0.0, 1.0), bins=W_BINS, range=(0.0, 1.0))[0].tolist()
        a.w_mean = float(w.mean())
        a.bottleneck_h0, a.wasserstein1_h0 = cmp.bottleneck_h0, cmp.wasserstein1_h0
        a.exact_h0, a.exact_h1, a.approx_h0 = exact.dgms[0], exact.dgms[1], view.diagram
    a.seconds = time.perf_counter() - t0
    return a


def cache_folder(run_dir: Path) -> Path:
    """``<run>/snapshots/analysis`` when it can be written, else a folder under the user cache named by the run."""
    own = run_dir / SNAPSHOT_DIR / CACHE_SUBDIR
    try:
        own.mkdir(parents=True, exist_ok=True)
        if os.access(own, os.W_OK):
            return own
    except OSError:
        pass
    tag = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    other = user_cache_dir() / "snapshot-analysis" / tag
    other.mkdir(parents=True, exist_ok=True)
    return other


def cache_key(snapshot: Snapshot, probe: str, max_tokens: int) -> str:
    """SHA-256 over the snapshot's bytes, the probe text, the settings and :data:`ANALYSIS_VERSION`."""
    parts = [ANALYSIS_VERSION, file_sha256(snapshot.path), hashlib.sha256(probe.encode("utf-8")).hexdigest(),
             str(max_tokens)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def analyse_snapshot(snapshot: Snapshot | str | os.PathLike, probe: str, *, max_tokens: int = 128,
                     use_cache: bool = True, cache_dir: str | os.PathLike | None = None,
                     time_budget: float | Budget | None = None) -> SnapshotAnalysis:
    """One snapshot's :class:`SnapshotAnalysis` on ``probe``: read from the cache, or computed and cached.

    Args:
        snapshot: a :class:`~qtg.training.snapshots.Snapshot` or a snapshot file.
        probe: the text (its first ``max_tokens`` tokens are used).
        max_tokens: probe length cap (the model's context + 1 caps it too).
        use_cache: False computes afresh and writes nothing.
        cache_dir: where the JSON files go (default :func:`cache_folder` of the run).
        time_budget: seconds allowed to each exact diagram (None: no limit), or one
            :class:`~qtg.topology.budget.Budget` for them all.

    Returns:
        The analysis; ``from_cache`` says whether it was read from disk.
    """
    snap = snapshot if isinstance(snapshot, Snapshot) else _as_snapshot(Path(snapshot))
    file = None
    if use_cache:
        folder = Path(cache_dir) if cache_dir is not None else cache_folder(snap.run_dir)
        file = folder / f"{snap.path.stem}-{cache_key(snap, probe, max_tokens)}.json"
        if file.is_file():
            try:
                hit = SnapshotAnalysis.from_dict(json.loads(file.read_text(encoding="utf-8")))
                hit.from_cache = True
                return hit
            except (json.JSONDecodeError, TypeError, ValueError):
                pass  # a damaged cache file is recomputed and replaced
    model = load_snapshot(snap.path)
    result = compute_analysis(model, probe_ids(model, probe, max_tokens), snap.step, snap.path.name, time_budget)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_text(file, json.dumps(result.to_dict(), allow_nan=False))
    return result


def _as_snapshot(path: Path) -> Snapshot:
    for s in list_snapshots(path.parent.parent):
        if s.path.resolve() == path.resolve():
            return s
    raise TopologyError(f"snapshot: {path} is not a snapshot of a run (<run>/snapshots/step_XXXXXX.safetensors)")


def analyse_run(run_dir: str | os.PathLike, probe: str, **kwargs: Any) -> list[SnapshotAnalysis]:
    """:func:`analyse_snapshot` of every snapshot of a run, by step (keyword arguments passed on)."""
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise TopologyError(f"run: {run_dir} holds no snapshots (train it with --snapshot-every K)")
    return [analyse_snapshot(s, probe, **kwargs) for s in snaps]
