"""Activation patching and attribution patching on a clean/corrupted prompt pair (docs/model.md §10).

    res = activation_patching(model, clean_ids, corrupt_ids, answer, wrong, site="heads")
    res.values        # [blocks, heads, positions]: 1 = the clean model's logit difference, 0 = the corrupted one's
    att = attribution_patching(model, clean_ids, corrupt_ids, answer, wrong, site="heads", compare=True)
    att.agreement     # Pearson r and top-k overlap with real patching

The metric is the logit difference at the last position, LD = logit[answer] -
logit[wrong] (logit[answer] alone without ``wrong``), normalised as

    (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt).

*Activation patching* runs the corrupted prompt with one site's activation (at
one block, head or position) taken from the clean run; many patches ride in one
batched forward pass, one row each. *Attribution patching* approximates every
patch at once to first order: ``grad LD(corrupt) . (a_clean - a_corrupt)``,
from one forward and one backward pass on the corrupted prompt and one
forward on the clean one (Nanda, "Attribution patching", 2023). The gradient
is taken through a zero added at each site, so no value changes and no
parameter's ``.grad`` is touched.

Sites (``site=``): ``"resid"`` (``blocks.{i}.resid_pre``, block x position
when ``positions``, else the whole stream by block), ``"heads"``
(``blocks.{i}.attn.head_out``, block x head, x position when ``positions``),
``"topo_w"`` (the TopoFilter's w by position, QTG only) and ``"mlp"``
(``blocks.{i}.mlp.out``, all positions, by block); any other site
name with positions on its second axis (``final_norm``, ``blocks.2.attn.out``,
...) is patched by position.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qtg.experiments.errors import ExperimentError
from qtg.model.activations import activation_names
from qtg.model.intervention import Intervention
from qtg.model.protocol import LanguageModel

SITES = ("resid", "heads", "topo_w", "mlp")
# patched rows per batched forward pass: memory grows with it, speed saturates well before (bench_patching.py)
BATCH_ROWS = 64

Unit = tuple[str, tuple[int, ...]]  # a site name and the index into its value after the batch dim


@dataclass
class Agreement:
    """How attribution patching's values match real patching's on the same units."""

    pearson: float
    top_k_overlap: float  # |top-k by |value| of one  and  of the other| / k
    k: int

    def to_dict(self) -> dict[str, float]:
        return {"pearson": self.pearson, "top_k_overlap": self.top_k_overlap, "k": self.k}


@dataclass
class PatchingResult:
    """Normalised effects of patching each unit of one site: ``values`` with one axis per entry of ``axes``."""

    values: np.ndarray
    labels: tuple[list[str], ...]  # per axis, e.g. (["0", "1"], ["0:To", "1:be"])
    axes: tuple[str, ...]  # e.g. ("block", "position")
    site: str
    method: str  # "activation" or "attribution"
    clean_metric: float  # LD on the clean prompt
    corrupt_metric: float  # LD on the corrupted prompt
    agreement: Agreement | None = None  # attribution with compare=True

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "method": self.method, "axes": list(self.axes), "labels": list(self.labels),
                "values": self.values.tolist(), "clean_metric": self.clean_metric,
                "corrupt_metric": self.corrupt_metric,
                "agreement": None if self.agreement is None else self.agreement.to_dict()}


def logit_difference(logits: Tensor, answer: int, wrong: int | None = None) -> Tensor:
    """LD ``[B]`` at the last position of ``logits`` ``[B, N, V]``: logit[answer] - logit[wrong] (or logit[answer])."""
    last = logits[:, -1].float()
    return last[:, answer] - (last[:, wrong] if wrong is not None else 0.0)


def site_units(model: LanguageModel, site: str, n_tokens: int, positions: bool = True,
               token_labels: Sequence[str] | None = None) -> tuple[list[Unit], tuple[int, ...], tuple[list[str], ...],
                                                                    tuple[str, ...]]:
    """The units one site is patched by: ``(units, shape, labels, axes)``, units in C order of ``shape``."""
    cfg = model.cfg
    pos = [f"{p}:{t}" for p, t in enumerate(token_labels)] if token_labels else [str(p) for p in range(n_tokens)]
    blocks, heads = [str(b) for b in range(cfg.n_layers)], [str(h) for h in range(cfg.n_heads)]
    if site == "resid" and not positions:
        units = [(f"blocks.{b}.resid_pre", (slice(None),)) for b in range(cfg.n_layers)]
        return units, (cfg.n_layers,), (blocks,), ("block",)
    if site == "resid":
        units = [(f"blocks.{b}.resid_pre", (p,)) for b in range(cfg.n_layers) for p in range(n_tokens)]
        return units, (cfg.n_layers, n_tokens), (blocks, pos), ("block", "position")
    if site == "heads" and positions:
        units = [(f"blocks.{b}.attn.head_out", (p, h)) for b in range(cfg.n_layers) for h in range(cfg.n_heads)
                 for p in range(n_tokens)]
        return units, (cfg.n_layers, cfg.n_heads, n_tokens), (blocks, heads, pos), ("block", "head", "position")
    if site == "heads":
        units = [(f"blocks.{b}.attn.head_out", (slice(None), h)) for b in range(cfg.n_layers)
                 for h in range(cfg.n_heads)]
        return units, (cfg.n_layers, cfg.n_heads), (blocks, heads), ("block", "head")
    if site == "topo_w":
        if cfg.arch != "qtg":
            raise ExperimentError(f"site 'topo_w': {cfg.label} has no TopoFilter (sites: resid, heads, mlp)")
        return [("topo.w", (p,)) for p in range(n_tokens)], (n_tokens,), (pos,), ("position",)
    if site == "mlp":
        if not cfg.ffn_hidden:
            raise ExperimentError(f"site 'mlp': {cfg.label} has no feed-forward layers")
        return [(f"blocks.{b}.mlp.out", ()) for b in range(cfg.n_layers)], (cfg.n_layers,), (blocks,), ("block",)
    if site in activation_names(cfg) and not site.endswith(("pattern", "distance")):  # any [B, N, ...] site
        return [(site, (p,)) for p in range(n_tokens)], (n_tokens,), (pos,), ("position",)
    raise ExperimentError(f"site must be one of {SITES} or a site name by position (e.g. final_norm), got {site!r}")


def _check_pair(model: LanguageModel, clean_ids: Tensor, corrupt_ids: Tensor, answer: int, wrong: int | None) -> None:
    for name, ids in (("clean_ids", clean_ids), ("corrupt_ids", corrupt_ids)):
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ExperimentError(f"{name} must be one prompt [1, N], got shape {tuple(ids.shape)}")
    if clean_ids.shape != corrupt_ids.shape:
        raise ExperimentError(f"the clean prompt has {clean_ids.shape[1]} tokens and the corrupted one "
                              f"{corrupt_ids.shape[1]}: patching pairs positions, so they must be the same length")
    for name, token in (("answer", answer), ("wrong", wrong)):
        if token is not None and not 0 <= token < model.cfg.vocab_size:
            raise ExperimentError(f"{name}: token id {token} outside the vocabulary 0..{model.cfg.vocab_size - 1}")


def _normalise(values: Sequence[float], clean: float, corrupt: float) -> np.ndarray:
    return (np.asarray(values, dtype=np.float64) - corrupt) / _gap(clean, corrupt)


def _index(unit_index: tuple, row: int) -> tuple:
    return (row, *unit_index)


@torch.no_grad()
def activation_patching(model: LanguageModel, clean_ids: Tensor, corrupt_ids: Tensor, answer: int,
                        wrong: int | None = None, site: str = "resid", positions: bool = True,
                        batch_rows: int = BATCH_ROWS, token_labels: Sequence[str] | None = None,
                        progress: Callable[[int, int], None] | None = None) -> PatchingResult:
    """Patch each unit of ``site`` from the clean run into the corrupted one; the normalised LD of each.

    Args:
        clean_ids, corrupt_ids: ``[1, N]`` each, the same N.
        answer, wrong: token ids of the metric (``wrong`` None: the answer's logit alone).
        site: ``"resid"``, ``"heads"``, ``"topo_w"`` or ``"mlp"``.
        positions: by position too (else each block's or head's every position at once; ``"resid"`` and
            ``"heads"``).
        batch_rows: patched rows per forward pass.
        progress: called with (units done, units) after each batch.
    """
    _check_pair(model, clean_ids, corrupt_ids, answer, wrong)
    units, shape, labels, axes = site_units(model, site, clean_ids.shape[1], positions, token_labels)
    names = sorted({name for name, _ in units})
    clean_out, clean = model.run_with_cache(clean_ids, names)
    corrupt_metric = float(logit_difference(model(corrupt_ids).logits, answer, wrong)[0])
    clean_metric = float(logit_difference(clean_out.logits, answer, wrong)[0])
    metrics: list[float] = []
    for start in range(0, len(units), batch_rows):
        chunk = units[start:start + batch_rows]
        by_name: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
        for row, (name, index) in enumerate(chunk):
            by_name[name].append((row, index))
        patch = {name: _row_patcher(clean[name], rows) for name, rows in by_name.items()}
        logits = model(corrupt_ids.expand(len(chunk), -1), intervene=Intervention(patch=patch)).logits
        metrics.extend(logit_difference(logits, answer, wrong).tolist())
        if progress is not None:
            progress(start + len(chunk), len(units))
    values = _normalise(metrics, clean_metric, corrupt_metric).reshape(shape)
    return PatchingResult(values, labels, axes, site, "activation", clean_metric, corrupt_metric)


def _row_patcher(clean: Tensor, rows: list[tuple[int, tuple]]) -> Callable[[Tensor], Tensor]:
    """A patch that gives row r the clean value at its unit's index, for each (r, index) of ``rows``."""
    def patch(value: Tensor) -> Tensor:
        value = value.clone()
        for row, index in rows:
            value[_index(index, row)] = clean[_index(index, 0)]
        return value
    return patch


def attribution_patching(model: LanguageModel, clean_ids: Tensor, corrupt_ids: Tensor, answer: int,
                         wrong: int | None = None, site: str = "resid", positions: bool = True,
                         compare: bool = False, top_k: int = 10,
                         token_labels: Sequence[str] | None = None) -> PatchingResult:
    """First-order estimates of :func:`activation_patching`'s values: ``grad LD . (a_clean - a_corrupt)``.

    Same arguments and shapes as :func:`activation_patching`. With ``compare``,
    real patching runs too and ``.agreement`` gives the Pearson correlation and
    the overlap of the ``top_k`` units by absolute value.
    """
    _check_pair(model, clean_ids, corrupt_ids, answer, wrong)
    units, shape, labels, axes = site_units(model, site, clean_ids.shape[1], positions, token_labels)
    names = sorted({name for name, _ in units})
    with torch.no_grad():
        clean_out, clean = model.run_with_cache(clean_ids, names)
    zeros: dict[str, Tensor] = {}

    def through_zero(name: str) -> Callable[[Tensor], Tensor]:
        def add(value: Tensor) -> Tensor:  # value + 0: the same numbers, and d LD / d zero = d LD / d value
            zeros[name] = torch.zeros_like(value, requires_grad=True)
            return value + zeros[name]
        return add

    with torch.enable_grad():
        corrupt_out, corrupt = model.run_with_cache(
            corrupt_ids, names, intervene=Intervention(patch={n: through_zero(n) for n in names}))
        metric = logit_difference(corrupt_out.logits, answer, wrong)[0]
        grads = dict(zip(names, torch.autograd.grad(metric, [zeros[n] for n in names])))
    clean_metric = float(logit_difference(clean_out.logits, answer, wrong)[0])
    corrupt_metric = float(metric.detach())
    effects = _unit_sums(units, {n: (grads[n] * (clean[n] - corrupt[n].detach()))[0] for n in names})
    values = (np.asarray(effects) / _gap(clean_metric, corrupt_metric)).reshape(shape)
    agreement = None
    if compare:
        real = activation_patching(model, clean_ids, corrupt_ids, answer, wrong, site, positions)
        agreement = agreement_of(values, real.values, top_k)
    return PatchingResult(values, labels, axes, site, "attribution", clean_metric, corrupt_metric, agreement)


def _unit_sums(units: list[Unit], contributions: dict[str, Tensor]) -> list[float]:
    """Each unit's sum of its site's per-element contributions (batch dropped), summed over the dims its index
    leaves open: one reduction per site, then a lookup per unit (thousands of units, no per-unit tensor op)."""
    reduced: dict[str, np.ndarray] = {}
    for name, index in units:
        if name not in reduced:
            c = contributions[name].double().numpy()
            reduced[name] = c.sum(axis=tuple(range(len(index), c.ndim)))
    return [float(np.sum(reduced[name][index])) for name, index in units]


def _gap(clean: float, corrupt: float) -> float:
    if clean == corrupt:
        raise ExperimentError("the clean and corrupted prompts give the same logit difference: nothing to patch")
    return clean - corrupt


def agreement_of(estimate: np.ndarray, real: np.ndarray, top_k: int = 10) -> Agreement:
    """Pearson r between two arrays of effects, and the overlap of their ``top_k`` units by absolute value."""
    a, b = np.ravel(estimate), np.ravel(real)
    k = min(top_k, a.size)
    r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    top_a, top_b = set(np.argsort(-np.abs(a))[:k]), set(np.argsort(-np.abs(b))[:k])
    return Agreement(r, len(top_a & top_b) / k, k)


@dataclass
class LogitAttribution:
    """Direct logit attribution at one position: what each component writes along the answer's direction.

    ``heads[b, h]`` and ``mlp[b]`` are the components' terms; ``embed`` the
    residual stream's start (QTG: the TopoFilter's output w * psi); ``bias`` the
    head's bias (none here: 0). Their sum is ``logit``, the model's own logit
    (difference), within float error.
    """

    heads: np.ndarray  # [blocks, heads]
    mlp: np.ndarray  # [blocks] (empty without feed-forward layers)
    embed: float
    bias: float
    logit: float

    def total(self) -> float:
        return float(self.heads.sum() + self.mlp.sum() + self.embed + self.bias)

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads.tolist(), "mlp": self.mlp.tolist(), "embed": self.embed, "bias": self.bias,
                "logit": self.logit}


@torch.no_grad()
def direct_logit_attribution(model: LanguageModel, ids: Tensor, answer: int, wrong: int | None = None,
                             position: int = -1) -> LogitAttribution:
    """Each head's and MLP's direct contribution to logit[answer] (- logit[wrong]) at ``position``.

    The final RMSNorm is linear once its scale g / rms(x) is frozen at the
    clean residual stream (as TransformerLens does), so with u = E[answer] - E[wrong]
    (the tied head's rows) and x = embed + sum_heads W_o[h] z_h + sum_mlp m:

        logit difference = <u, x * g / rms(x)> = sum over components c of <u, c * g / rms(x)>.
    """
    cfg = model.cfg
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ExperimentError(f"ids must be one prompt [1, N], got shape {tuple(ids.shape)}")
    _check_pair(model, ids, ids, answer, wrong)
    last = f"blocks.{cfg.n_layers - 1}.resid_post"
    start = "topo.out" if cfg.arch == "qtg" else "embed"
    out, cache = model.run_with_cache(ids, lambda n: n in (start, last) or n.endswith(("attn.head_out", "mlp.out")))
    E = model.unembedding().float()
    u = E[answer] - (E[wrong] if wrong is not None else 0.0)  # [2d]
    direction = u * model.final_scale(cache[last][0, position].float())  # [2d]: <u, c * scale> = <direction, c>
    heads = np.zeros((cfg.n_layers, cfg.n_heads))
    mlp = np.zeros(cfg.n_layers if cfg.ffn_hidden else 0)
    for b in range(cfg.n_layers):
        z = cache[f"blocks.{b}.attn.head_out"][0, position].float()  # [H, d_h]
        writes = torch.einsum("hed,hd->he", model.head_writers(b).float(), z)  # [H, 2d]
        heads[b] = (writes @ direction).numpy()
        if cfg.ffn_hidden:
            mlp[b] = float(cache[f"blocks.{b}.mlp.out"][0, position].float() @ direction)
    embed = float(cache[start][0, position].float() @ direction)
    logit = float(out.logits[0, position, answer] - (out.logits[0, position, wrong] if wrong is not None else 0.0))
    return LogitAttribution(heads, mlp, embed, 0.0, logit)
