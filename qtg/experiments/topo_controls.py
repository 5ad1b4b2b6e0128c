"""Controls for the TopoFilter: replace its weight w by a simpler rule and measure what the loss loses.

:class:`qtg.Intervention` covers the filter's own modes (``topo="approx"``, ``"exact"``,
``"off"``) and its theta, tau and T. A control asks a different question: does the model
need the graded score, or would a coarser rule of the same tokens do as well? Three rules
(``docs/model.md`` §2 has the filter they stand in for):

* :func:`one_bit_gate` - w_i = 1 when token i repeats an earlier state (s_i = 0), else a
  constant c: the filter reduced to one bit, "seen earlier in this context".
* :func:`position_weight` - w_i = profile[i], the same for every token at position i: the
  filter reduced to where a token sits, whatever it is.
* :func:`gated_position_weight` - 1 for repeats, profile[i] for first occurrences: the bit
  and the position, without the distances.

Token 0 keeps w = 1 under every rule, as the filter gives it (it has no earlier token).
A rule is applied by a forward hook on ``model.topo`` for the duration of a ``with`` block
(:func:`override_weights`); the weights of the model are never written, but the hook is
on the module, so one model must not serve other calls while a rule is in force.
:func:`control_sweep` scores a corpus under each rule with the sweep's paired bootstrap
against the unmodified model, window for window, so its intervals read like a sweep's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qtg.experiments.bootstrap import DEFAULT_RESAMPLES, Interval, paired_bootstrap
from qtg.experiments.corpus import Corpus
from qtg.experiments.errors import ExperimentError
from qtg.experiments.sweep import BITS_PER_NAT, LEVEL, SweepResult, sweep
from qtg.metrics import bits_per_byte

REPEAT_TOLERANCE = 1e-4  # s_i below this is a repeat: QEmbed states are unit vectors, distinct tokens sit ~0.5+ apart

# (repeat [B, N] bool, position [N] long, the filter's own w [B, N]) -> the weight to apply [B, N]
WeightFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class WeightRule:
    """A named replacement for the TopoFilter's weight."""

    name: str
    weight: WeightFn


def causal_min_distance(psi: Tensor, past: Tensor | None = None) -> Tensor:
    """The exact causal score s_i = min_{j<i} ||psi_i - psi_j|| (s = 0 for the very first token).

    Args:
        psi: ``[B, N, 2d]`` QEmbed states of the new tokens.
        past: ``[B, P, 2d]`` states of earlier tokens, or None.

    Returns:
        ``[B, N]`` float, the distance from each token to its nearest earlier token.
    """
    offset = 0 if past is None else past.shape[1]
    points = psi if past is None else torch.cat([past, psi], dim=1)
    delta = torch.cdist(psi.double(), points.double())  # [B, N, P+N]
    i = torch.arange(offset, offset + psi.shape[1], device=psi.device).view(-1, 1)
    earlier = torch.arange(points.shape[1], device=psi.device).view(1, -1) < i
    s = torch.where(earlier, delta, torch.full_like(delta, float("inf"))).amin(dim=-1)
    return torch.where(torch.isinf(s), torch.zeros_like(s), s).to(psi.dtype)


def _positions(psi: Tensor, past: Tensor | None) -> Tensor:
    offset = 0 if past is None else past.shape[1]
    return torch.arange(offset, offset + psi.shape[1], device=psi.device)


def _split_args(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None]:
    """(psi, past) from the TopoFilter's forward arguments, however they were passed."""
    if kwargs.get("lengths") is not None:  # rows at different positions: position = offset + i would be wrong
        raise ExperimentError("weight rules need one position per column: a ragged decoding cache is not supported")
    psi = args[0] if args else kwargs["psi"]
    past = args[1] if len(args) > 1 else kwargs.get("past")
    return psi, past


@contextlib.contextmanager
def override_weights(model: Any, rule: WeightRule) -> Iterator[None]:
    """Within the block, ``model``'s TopoFilter applies ``rule``'s weight instead of its own.

    Raises:
        ExperimentError: the model has no TopoFilter.
    """
    if not getattr(model, "has_topofilter", False):
        raise ExperimentError(f"model {model.cfg.name!r} has no TopoFilter: a weight rule needs a QTG model")

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        psi, past = _split_args(args, kwargs)
        position = _positions(psi, past)
        repeat = (causal_min_distance(psi, past) < REPEAT_TOLERANCE) & (position > 0)
        w = rule.weight(repeat, position, output.weights).to(output.weights.dtype)
        w = torch.where(position == 0, torch.ones_like(w), w)  # token 0: nothing earlier, w = 1 as the filter has it
        return type(output)(output.soft, output.exact, w)

    handle = model.topo.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def one_bit_gate(novel_weight: float) -> WeightRule:
    """w = 1 for a repeat of an earlier token, ``novel_weight`` for a first occurrence."""
    if not 0.0 <= novel_weight <= 1.0:
        raise ExperimentError(f"novel_weight must lie in [0, 1], got {novel_weight}")
    c = float(novel_weight)
    return WeightRule(f"one-bit gate (c = {c:.3f})",
                      lambda repeat, position, own: torch.where(repeat, torch.ones_like(own), torch.full_like(own, c)))


def _profile_at(profile: Sequence[float], position: Tensor, like: Tensor) -> Tensor:
    table = torch.as_tensor(np.asarray(profile, dtype=np.float64), dtype=like.dtype, device=like.device)
    if position.max().item() >= len(table):
        raise ExperimentError(f"the weight profile covers {len(table)} positions, the input reaches "
                              f"position {position.max().item()}")
    return table[position].expand_as(like)


def position_weight(profile: Sequence[float]) -> WeightRule:
    """w_i = ``profile[i]`` for every token at position i (0-based), repeat or not."""
    return WeightRule("position only", lambda repeat, position, own: _profile_at(profile, position, own))


def gated_position_weight(profile: Sequence[float]) -> WeightRule:
    """w = 1 for a repeat; ``profile[i]`` for a first occurrence at position i."""
    return WeightRule("one-bit gate x position",
                      lambda repeat, position, own: torch.where(repeat, torch.ones_like(own),
                                                                _profile_at(profile, position, own)))


# --- what the filter does, token by token ---------------------------------------------------------


@dataclass
class WeightRecord:
    """Every scored token of a corpus: its position, whether it repeats, and the filter's numbers."""

    position: np.ndarray  # [T] int64, 0-based position in its window
    repeat: np.ndarray  # [T] bool, an earlier token of the window has the same state (s = 0)
    weight: np.ndarray  # [T] float64, the filter's own w
    soft: np.ndarray  # [T] s~, the soft-min score
    exact: np.ndarray  # [T] s, the exact causal score

    @property
    def novel(self) -> np.ndarray:
        """``[T]`` first occurrences: not a repeat, and not token 0 (which has no earlier token)."""
        return ~self.repeat & (self.position > 0)

    def profile(self, length: int, novel_only: bool = False) -> np.ndarray:
        """``[length]`` mean w at each position (over first occurrences only with ``novel_only``;
        1.0 where no token was seen, and at position 0)."""
        keep = self.novel if novel_only else np.ones_like(self.repeat)
        out = np.ones(length)
        for i in range(1, length):
            at = keep & (self.position == i)
            if at.any():
                out[i] = self.weight[at].mean()
        return out


@torch.inference_mode()
def record_weights(model: Any, corpus: Corpus, batch_size: int = 8) -> WeightRecord:
    """Run ``model`` over the corpus windows and keep, for every input token, what its TopoFilter did."""
    if not getattr(model, "has_topofilter", False):
        raise ExperimentError(f"model {model.cfg.name!r} has no TopoFilter")
    parts: list[tuple[np.ndarray, ...]] = []

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        psi, past = _split_args(args, kwargs)
        s = causal_min_distance(psi, past)
        position = _positions(psi, past).expand_as(s)
        parts.append(tuple(t.double().cpu().numpy() for t in (position, s, output.weights, output.soft)))

    device = next(model.parameters()).device
    handle = model.topo.register_forward_hook(hook, with_kwargs=True)
    keep = []
    try:
        for start in range(0, len(corpus.windows), batch_size):
            group = corpus.windows[start:start + batch_size]
            width = max(len(w) for w in group) - 1
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.bool)
            for row, w in enumerate(group):
                ids[row, :len(w) - 1] = torch.tensor(w[:-1])
                mask[row, :len(w) - 1] = True
            model(ids.to(device), intervene=None)
            keep.append(mask.numpy())
    finally:
        handle.remove()
    flat = [np.concatenate([p[k][m] for p, m in zip(parts, keep)]) for k in range(4)]
    position = flat[0].astype(np.int64)
    return WeightRecord(position=position, repeat=(flat[1] < REPEAT_TOLERANCE) & (position > 0),
                        weight=flat[2], soft=flat[3], exact=flat[1])


# --- a corpus under each rule -----------------------------------------------------------------------


@dataclass
class ControlResult:
    """One weight rule over the corpus, against the unmodified model on the same windows."""

    name: str
    loss: float  # nats per predicted token
    bits_per_byte: float
    delta_loss: Interval  # nats per token, rule minus unmodified, paired bootstrap
    delta_bits_per_byte: Interval
    mean_weight: float  # token-weighted mean of the applied w

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "loss": self.loss, "bits_per_byte": self.bits_per_byte,
                "delta_loss": self.delta_loss.estimate, "delta_loss_ci95": [self.delta_loss.low, self.delta_loss.high],
                "delta_bits_per_byte": self.delta_bits_per_byte.estimate,
                "ci95": [self.delta_bits_per_byte.low, self.delta_bits_per_byte.high], "mean_weight": self.mean_weight}


def control_sweep(model: Any, corpus: Corpus, rules: Sequence[WeightRule], *, baseline: SweepResult | None = None,
                  batch_size: int = 8, seed: int = 0, resamples: int = DEFAULT_RESAMPLES) -> list[ControlResult]:
    """Score ``corpus`` under each rule; paired 95 % CIs against the unmodified model.

    Args:
        model: a QTG model.
        corpus: the windows (:func:`qtg.experiments.prepare`), the same for every rule.
        rules: the weight rules.
        baseline: a :func:`~qtg.experiments.sweep` result on the same corpus, whose unmodified
            condition is reused (None: it is scored here).
        batch_size, seed, resamples: as :func:`~qtg.experiments.sweep` takes them; the bootstrap
            resamples the same windows as a sweep with the same seed.

    Returns:
        One :class:`ControlResult` per rule, in order.
    """
    kw = {"batch_size": batch_size, "seed": seed, "resamples": resamples, "sample": 0}
    if baseline is None:
        baseline = sweep(model, corpus, [], **kw)
    elif baseline.corpus.windows != corpus.windows:
        raise ExperimentError("baseline was computed on other windows: pass the sweep of this corpus")
    plain = baseline.conditions[0].scores.nll
    tokens, n_bytes = corpus.tokens, corpus.n_bytes
    boot = {"resamples": resamples, "level": LEVEL, "seed": seed}
    out = []
    for rule in rules:
        with override_weights(model, rule):
            nll = sweep(model, corpus, [], desc=rule.name, **kw).conditions[0]
        out.append(ControlResult(
            name=rule.name, loss=float(nll.scores.nll.sum() / tokens.sum()),
            bits_per_byte=bits_per_byte(float(nll.scores.nll.sum()), int(n_bytes.sum())),
            delta_loss=paired_bootstrap(nll.scores.nll, plain, tokens, **boot),
            delta_bits_per_byte=paired_bootstrap(nll.scores.nll * BITS_PER_NAT, plain * BITS_PER_NAT, n_bytes, **boot),
            mean_weight=float(nll.mean_topo_weight)))
    return out
