"""The TopoFilter's approximate view of a sequence, measured against exact H0.

For token i the TopoFilter (docs/model.md, section 2) computes, looking backwards only,

    s_i  = min_{j<i} delta_ij                       exact causal score (s_1 = 0)
    s~_i = -T log sum_{j<i} exp(-delta_ij / T)       soft-min, so s_i - T log(i-1) <= s~_i <= s_i
    w_i  = exp(-max(s~_i - theta, 0) / tau)

and reads s~_i as the death of token i's H0 bar: the implied diagram is
{(0, s~_i)}. The exact reference is the H0 diagram of the same cloud. To set
bars beside tokens, each exact bar is attributed to a token by the elder rule
(:mod:`qtg.topology.elder`): token i's elder persistence p_i satisfies
p_i <= s_i, so the causal score is an upper bound on the exact persistence.

Which cloud a layer means (``approx_view(internals, layer=k)``):

* ``layer=1`` is the TopoFilter itself: its own s~, s and w from the forward
  pass, and the cloud it measured, its input ``states[0]`` (QEmbed states).
  Exact diagrams of the filtered states ``states[1] = w psi`` are
  ``exact_diagrams(out.states[1][b])``.
* any other ``layer=k``: the cloud ``states[k]`` and the scores the model's
  TopoFilter formulas give on it at the model's T, theta, tau: what a
  TopoFilter placed there would compute. ``layer=0`` reproduces layer 1's
  numbers from scratch (a consistency check). Block states are not unit
  vectors and spread out with depth, so at theta = 0.1 nearly every token of
  a deep layer "would be filtered": that is the formula's verdict, not a bug.

Diagram distances: :mod:`qtg.topology.bottleneck_distance` and
:mod:`qtg.topology.wasserstein_distance` (L-infinity ground metric, finite
parts, the essential parts matched separately).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from qtg.errors import TopologyError
from qtg.model.config import QTGConfig
from qtg.model.decoder import QTGOutput
from qtg.model.intervention import Intervention
from qtg.model.protocol import LanguageModel
from qtg.model.topo_filter import TopoFilter
from qtg.topology.bottleneck_distance import bottleneck
from qtg.topology.elder import elder_persistence
from qtg.topology.exact import ExactDiagrams, euclidean_distances, exact_diagrams
from qtg.topology.wasserstein_distance import wasserstein_1

LAYER_NAMES = {0: "QEmbed", 1: "TopoFilter"}


def layer_name(k: int) -> str:
    """The name of a QTG model's state ``k`` (``model.state_names[k]``): QEmbed, TopoFilter, then block 0 ..."""
    return LAYER_NAMES.get(k, f"block {k - len(LAYER_NAMES)}")


def causal_diagram(scores: np.ndarray) -> np.ndarray:
    """The H0 diagram that causal death scores imply ``[N, 2]``: (0, max(score_i, 0)) for tokens 2..N, and
    (0, inf) for token 1, whose component is the one that never dies. A score below 0 (s~ of a token near an
    earlier twin) is clipped to 0: a bar cannot die before it is born. For s~ it is the TopoFilter's diagram
    (:attr:`ApproxView.diagram`); for the exact causal s, the diagram of looking only backwards."""
    deaths = np.concatenate([np.maximum(scores[1:], 0.0), [np.inf]])
    return np.stack([np.zeros_like(deaths), deaths], axis=1)


def _floats(a: np.ndarray) -> list[float | None]:
    """JSON-able list: non-finite values become None."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(a, dtype=np.float64)]


def _json_float(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


# --- the approximate view -----------------------------------------------------------------


@dataclass
class ApproxView:
    """Per token s~ (soft), s (exact causal), w, on one layer's cloud of one sequence."""

    layer: int
    cloud_layer: int  # index into internals.states of the points below
    points: np.ndarray = field(repr=False)  # [N, 2d] float64
    soft: np.ndarray  # s~ [N]
    exact: np.ndarray  # s [N]
    weights: np.ndarray  # w [N]
    temperature: float
    theta: float
    tau: float
    settings: str  # where T, theta, tau came from
    tokens: list[str] | None = None

    @property
    def n(self) -> int:
        return len(self.soft)

    @property
    def diagram(self) -> np.ndarray:
        """The implied H0 diagram, :func:`causal_diagram` of s~."""
        return causal_diagram(self.soft)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "layer_name": layer_name(self.layer), "cloud_layer": self.cloud_layer,
                "n_tokens": self.n, "soft": _floats(self.soft), "exact": _floats(self.exact),
                "weights": _floats(self.weights), "temperature": self.temperature, "theta": self.theta,
                "tau": self.tau, "settings": self.settings, "tokens": self.tokens}


def filter_scores(topo: TopoFilter | LanguageModel, points: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """s~, s, w for one sequence ``[N, D]`` by a TopoFilter's own formulas (a given one's, or a model's)."""
    with torch.no_grad():
        cloud = points.unsqueeze(0)
        scores = topo(cloud, want_exact=True) if isinstance(topo, TopoFilter) else topo.topo_scores(cloud)
    return tuple(t[0].double().cpu().numpy() for t in (scores.soft, scores.exact, scores.weights))


def _require_topo(model: LanguageModel) -> None:
    if not model.has_topofilter:
        raise TopologyError(f"the {model.arch} model {model.cfg.name!r} has no TopoFilter: load a QTG model")


def _settings(model: TopoFilter | LanguageModel | None) -> tuple[TopoFilter | LanguageModel, tuple[float, ...], str]:
    """What scores a cloud (``model`` itself when it is a TopoFilter, else the model's), its (T, theta, tau) and
    whose they are."""
    if isinstance(model, TopoFilter):
        return model, (model.temperature, model.theta, model.tau), "the given TopoFilter"
    if model is not None:
        _require_topo(model)
        c = model.cfg
        return model, (c.topo_temperature, c.topo_threshold, c.topo_tau), "the model's TopoFilter"
    topo = TopoFilter(QTGConfig())
    return topo, (topo.temperature, topo.theta, topo.tau), \
        "QTGConfig defaults (pass model= for the model's own T, theta, tau)"


def approx_view(internals: QTGOutput, layer: int = 1, batch: int = 0,
                model: TopoFilter | LanguageModel | None = None,
                tokens: Sequence[str] | None = None) -> ApproxView:
    """The TopoFilter's view of one sequence at one layer (see the module docstring for ``layer``).

    Args:
        internals: a ``QTGOutput`` from ``model(ids, return_internals=True)``.
        layer: index into ``internals.states``; 1 is the TopoFilter's own scores.
        batch: which sequence of the batch.
        model: the QTG model (or its TopoFilter) for T, theta, tau; required for ``layer != 1``.
        tokens: the token strings, for figures and reports.

    Returns:
        :class:`ApproxView`.
    """
    states = getattr(internals, "states", None)
    if states is None:
        raise TopologyError("internals carry no states: run the model with return_internals=True")
    if not 0 <= layer < len(states):
        raise TopologyError(f"layer {layer} does not exist: this model has layers 0..{len(states) - 1} "
                            "(0 QEmbed, 1 TopoFilter, then one per block)")
    if not 0 <= batch < states[0].shape[0]:
        raise TopologyError(f"batch {batch} out of range: the batch holds {states[0].shape[0]} sequences")
    if layer != 1 and model is None:
        raise TopologyError(f"layer {layer} needs the model's TopoFilter settings (T, theta, tau): pass model=")
    topo, (temperature, theta, tau), settings = _settings(model)
    cloud_layer = 0 if layer == 1 else layer
    points = states[cloud_layer][batch]
    if layer == 1:  # the model's own numbers from the forward pass
        soft, exact, w = (t[batch].detach().double().cpu().numpy()
                          for t in (internals.topo_scores, internals.topo_exact_scores, internals.topo_weights))
    else:
        soft, exact, w = filter_scores(topo, points)
    if tokens is not None and len(tokens) != len(soft):
        raise TopologyError(f"{len(tokens)} token strings for {len(soft)} tokens")
    return ApproxView(layer=layer, cloud_layer=cloud_layer, points=points.detach().double().cpu().numpy(),
                      soft=soft, exact=exact, weights=w, temperature=float(temperature),
                      theta=float(theta), tau=float(tau), settings=settings,
                      tokens=list(tokens) if tokens is not None else None)


# --- rank agreement ----------------------------------------------------------------------------


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None  # undefined for constant rankings
    return float(spearmanr(a, b).statistic)


# --- the comparison ----------------------------------------------------------------------------


@dataclass
class Comparison:
    """Exact H0 (and H1) against the TopoFilter's view of the same cloud.

    Token indices are 0-based; token 0 has no score and sits in no list. "Down-weighted"
    means w < 1 (s~ > theta); "persistent" means an elder-rule exact H0 bar longer than theta.
    """

    layer: int
    n_tokens: int
    bottleneck_h0: float
    wasserstein1_h0: float
    abs_error: np.ndarray  # |s~_i - s_i|
    elder: np.ndarray  # p_i, elder-rule exact H0 persistence (token 0: inf)
    spearman_filter_vs_elder: float | None  # s~ against p, tokens 1..N-1 (repeats included: they all tie at 0)
    spearman_filter_vs_causal: float | None  # s~ against s
    softmin_bound_holds: bool  # s_i - T log(i-1) <= s~_i <= s_i for every token
    theta: float
    down_weighted_and_persistent: list[int]  # s~ > theta and p > theta
    down_weighted_not_persistent: list[int]  # s~ > theta, p <= theta
    persistent_not_down_weighted: list[int]  # p > theta, s~ <= theta
    filter_agreement_exact_mode: float  # fraction of tokens 1..N-1 with [s~ > theta] == [s > theta]
    filter_agreement_elder: float  # fraction of tokens 1..N-1 with [s~ > theta] == [p > theta]
    h1_bars: int | None  # None when the exact diagrams stop at H0
    h1_total_persistence: float | None  # what no H0 score can see; inf bars count up to the edge threshold
    h1_max_persistence: float | None
    h1_truncated: int  # H1 bars still alive at a max_edge cut
    negative_soft: int  # tokens with s~ < 0, clipped to 0 in the implied diagram
    exact_is_bounded: bool  # the exact diagrams were subsampled or cut below the enclosing radius
    # s~ against p on the distinct tokens only: first occurrences, s > 0. A repeated state has s = p = 0 and
    # s~ <= 0, so the repeats tie at the bottom of both rankings and lift the correlation over all tokens
    spearman_filter_vs_elder_distinct: float | None = None
    distinct_tokens: int = 0  # tokens 1..N-1 whose state appears nowhere earlier (s > 0)
    method: str = ("bottleneck: gudhi.bottleneck_distance (exact to the last bits of a double); "
                   "W1: optimal assignment, scipy linear_sum_assignment (exact); L-inf ground metric; "
                   "finite parts, essential bars matched separately")

    @property
    def mean_abs_error(self) -> float:
        return float(self.abs_error[1:].mean()) if self.n_tokens > 1 else 0.0

    @property
    def max_abs_error(self) -> float:
        return float(self.abs_error.max())

    def to_dict(self) -> dict[str, Any]:
        d = {k: _json_float(v) for k, v in self.__dict__.items() if k not in ("abs_error", "elder")}
        d.update(abs_error=_floats(self.abs_error), elder=_floats(self.elder), mean_abs_error=self.mean_abs_error,
                 max_abs_error=self.max_abs_error, layer_name=layer_name(self.layer))
        return d


def _h1_summary(exact: ExactDiagrams) -> tuple[int | None, float | None, float | None, int]:
    if exact.maxdim < 1:
        return None, None, None, 0
    h1 = exact.dgms[1]
    lengths = np.minimum(h1[:, 1], exact.bounds.edge_threshold) - h1[:, 0]
    return (len(h1), float(lengths.sum()), float(lengths.max()) if len(h1) else 0.0,
            int(np.isinf(h1[:, 1]).sum()))


def compare(exact: ExactDiagrams, approx: ApproxView) -> Comparison:
    """Measure the TopoFilter's view against the exact diagrams of the same cloud.

    Args:
        exact: ``exact_diagrams(approx.points, ...)``.
        approx: from :func:`approx_view`.

    Returns:
        :class:`Comparison`.
    """
    if exact.bounds.points_given != approx.n:
        raise TopologyError(f"the exact diagrams were computed on {exact.bounds.points_given} points but the view "
                            f"has {approx.n} tokens: use exact_diagrams(view.points)")
    s, soft, theta = approx.exact, approx.soft, approx.theta
    p = elder_persistence(euclidean_distances(approx.points))
    count = np.maximum(np.arange(approx.n), 1)  # 0-based token i has i earlier tokens (>= 1 for the log)
    slack = 1e-5 * max(1.0, float(np.abs(s).max()))  # the model computes s~ and s in float32
    bound_ok = bool(np.all(soft <= s + slack) and np.all(soft >= s - approx.temperature * np.log(count) - slack))
    rest = slice(1, None)  # token 0 has no earlier token: no score, and its bar is the infinite one
    distinct = np.flatnonzero(s > 0)
    distinct = distinct[distinct > 0]
    down, exact_mode, persistent = soft > theta, s > theta, p > theta
    down[0] = exact_mode[0] = persistent[0] = False
    h1_bars, h1_total, h1_max, h1_trunc = _h1_summary(exact)
    implied = approx.diagram
    if not exact.bounds.threshold_exact:  # see the implied bars through the same window as the exact ones
        implied[implied[:, 1] > exact.bounds.edge_threshold, 1] = np.inf
    return Comparison(
        layer=approx.layer, n_tokens=approx.n,
        bottleneck_h0=bottleneck(exact.dgms[0], implied),
        wasserstein1_h0=wasserstein_1(exact.dgms[0], implied),
        abs_error=np.abs(soft - s), elder=p,
        spearman_filter_vs_elder=_spearman(soft[rest], p[rest]),
        spearman_filter_vs_causal=_spearman(soft[rest], s[rest]),
        softmin_bound_holds=bound_ok, theta=theta,
        down_weighted_and_persistent=np.flatnonzero(down & persistent).tolist(),
        down_weighted_not_persistent=np.flatnonzero(down & ~persistent).tolist(),
        persistent_not_down_weighted=np.flatnonzero(persistent & ~down).tolist(),
        filter_agreement_exact_mode=float(np.mean(down[rest] == exact_mode[rest])) if approx.n > 1 else 1.0,
        filter_agreement_elder=float(np.mean(down[rest] == persistent[rest])) if approx.n > 1 else 1.0,
        h1_bars=h1_bars, h1_total_persistence=h1_total, h1_max_persistence=h1_max, h1_truncated=h1_trunc,
        negative_soft=int((soft < 0).sum()), exact_is_bounded=not exact.bounds.exact,
        spearman_filter_vs_elder_distinct=_spearman(soft[distinct], p[distinct]), distinct_tokens=int(distinct.size),
    )


# --- every layer --------------------------------------------------------------------------------


@dataclass
class LayerComparison:
    """One layer of :func:`layer_sweep`: its exact diagrams, the filter's view and their comparison."""

    layer: int
    exact: ExactDiagrams
    view: ApproxView
    comparison: Comparison

    @property
    def name(self) -> str:
        return layer_name(self.layer)

    def summary(self) -> dict[str, Any]:
        """The per-layer numbers the summary curves plot."""
        c, e = self.comparison, self.exact
        return {"layer": self.layer, "name": self.name, "distinct_points": e.bounds.points_distinct,
                "diameter": e.diameter, "h0_total_persistence": e.total_persistence(0),
                "h1_bars": c.h1_bars, "h1_total_persistence": c.h1_total_persistence,
                "bottleneck_h0": c.bottleneck_h0, "wasserstein1_h0": c.wasserstein1_h0,
                "mean_abs_error": c.mean_abs_error, "spearman_filter_vs_elder": c.spearman_filter_vs_elder,
                "filter_agreement_elder": c.filter_agreement_elder,
                "mean_weight": float(self.view.weights.mean()), "seconds": e.seconds}

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "exact": self.exact.to_dict(), "view": self.view.to_dict(),
                "comparison": self.comparison.to_dict()}


def layer_sweep(model: LanguageModel, ids: torch.Tensor, batch: int = 0, layers: Sequence[int] | None = None,
                tokens: Sequence[str] | None = None, intervene: Intervention | None = None,
                **exact_kwargs: Any) -> list[LayerComparison]:
    """Exact diagrams, filter view and comparison for each layer (default: all) of one sequence.

    Args:
        model: a QTG model. ids: ``[B, N]`` token ids. batch: which sequence.
        layers: indices into ``states`` (default every one). tokens: token strings.
        intervene: run the forward pass under this intervention (the states change with it).
        exact_kwargs: passed to :func:`~qtg.topology.exact_diagrams` (maxdim, backend, max_edge, ...).
    """
    _require_topo(model)
    with torch.no_grad():
        out = model(ids, return_internals=True, map_blocks=(), intervene=intervene)
    layers = range(len(out.states)) if layers is None else layers
    results, cache = [], {}
    for k in layers:
        view = approx_view(out, layer=k, batch=batch, model=model, tokens=tokens)
        if view.cloud_layer not in cache:  # layers 0 and 1 share the QEmbed cloud
            cache[view.cloud_layer] = exact_diagrams(view.points, **{"metric_input": "points", **exact_kwargs})
        exact = cache[view.cloud_layer]
        results.append(LayerComparison(layer=k, exact=exact, view=view, comparison=compare(exact, view)))
    return results


# --- exact mode -----------------------------------------------------------------------------------


@dataclass
class ExactModeResult:
    """Cross-entropy on the same tokens with the soft-min s~ (as trained) and with the exact s."""

    tokens: int  # predicted tokens
    ce_approx: float  # nats per token
    ce_exact: float
    perplexity_approx: float
    perplexity_exact: float
    loss_approx: float  # the model's total loss (CE + lambda terms)
    loss_exact: float
    mean_weight_approx: float
    mean_weight_exact: float
    filtered_approx: int  # tokens with w < 1
    filtered_exact: int

    @property
    def delta_ce(self) -> float:
        """ce_exact - ce_approx: positive when the exact score costs loss."""
        return self.ce_exact - self.ce_approx

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "delta_ce": self.delta_ce,
                "perplexity_ratio": self.perplexity_exact / self.perplexity_approx}


def exact_mode_loss(model: LanguageModel, ids: torch.Tensor, intervene: Intervention | None = None) -> ExactModeResult:
    """Cross-entropy and perplexity of ``model`` predicting ``ids[:, 1:]`` (``ids`` ``[B, N]``),
    with the approximate and with the exact TopoFilter (``Intervention(topo="exact")``).

    Args:
        intervene: the rest of the call's intervention (theta, gamma, ...), applied to both runs;
            its ``topo`` is set to "approx" and to "exact" in turn.
    """
    _require_topo(model)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise TopologyError(f"exact mode needs ids [B, N] with N >= 2, got shape {tuple(ids.shape)}")
    base = intervene or Intervention()
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        approx = model(inputs, targets=targets, intervene=dataclasses.replace(base, topo="approx"))
        exact = model(inputs, targets=targets, intervene=dataclasses.replace(base, topo="exact"))
    ce_a, ce_e = float(approx.loss_terms["ce"]), float(exact.loss_terms["ce"])
    w_soft, w_hard = approx.topo_weights, exact.topo_weights
    return ExactModeResult(
        tokens=int(targets.numel()), ce_approx=ce_a, ce_exact=ce_e,
        perplexity_approx=math.exp(ce_a), perplexity_exact=math.exp(ce_e),
        loss_approx=float(approx.loss), loss_exact=float(exact.loss),
        mean_weight_approx=float(w_soft.mean()), mean_weight_exact=float(w_hard.mean()),
        filtered_approx=int((w_soft < 1).sum()), filtered_exact=int((w_hard < 1).sum()),
    )
