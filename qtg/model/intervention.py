"""Interventions: per-call edits of a forward pass, never of the module.

    out = model(ids, intervene=qtg.Intervention(topo="exact"))
    out = model(ids, intervene=qtg.Intervention(ablate_heads={0: [2]}, positions="none"))

An :class:`Intervention` is a frozen value passed with each call, the way
gpt-fast passes ``input_pos``: the weights are read, never written, so one
model serves any number of concurrent interventions with no copy and no lock.
The default ``Intervention()`` changes nothing (bitwise the plain output).

What each field does (``docs/model.md`` §6 has the formulas):

* ``topo`` - the TopoFilter's weight w_i = exp(-max(s_i' - theta, 0) / tau):
  ``"approx"`` (the model's own, s_i' = s~_i the soft-min), ``"exact"``
  (s_i' = s_i = min_{j<i} delta_ij, the exact causal H0 death), or ``"off"``
  (w_i = 1 for every token).
* ``theta``, ``tau``, ``temperature`` - replace the TopoFilter's threshold,
  scale and soft-min temperature T.
* ``gamma`` - replaces GeoAttention's per-head gamma: one float for every
  head of every block, or ``{block: tensor [H]}`` for some blocks;
  ``gamma_scale`` then multiplies whatever gamma is in force.
* ``ablate_heads`` - ``{block: [heads]}`` (both 0-based): those heads
  contribute nothing to their block's output (their slice of the attention
  output is zero before the output projection).
* ``positions`` - ``"none"`` removes the ALiBi term from every block's scores.
* ``topo_weight`` - a :class:`TopoWeight` rule that replaces the filter's w
  (a one-bit "seen earlier" gate, a weight by position, or both): a control
  that asks whether the graded score is needed at all.
* ``patch`` - ``{site name: tensor or function}`` replaces named activations
  (:mod:`qtg.model.activations`): a tensor of the site's shape (batch 1 broadcasts),
  or a function of the clean value. Applied after every other field.

The baseline decoder (:mod:`qtg.model.baseline`) takes head ablation and patches,
and refuses every other field by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from qtg.errors import QTGError
from qtg.model.activations import check_names

TOPO_MODES = ("approx", "exact", "off")
POSITION_MODES = ("model", "none")
# s_i below this is a repeat: QEmbed states are unit vectors, equal ids give s = 0 and distinct ones sit ~0.5+ apart
REPEAT_TOLERANCE = 1e-4
# The largest magnitude of a number an intervention sets, and the smallest tau and T: the forward pass runs in float32
# (largest value 3.4e38), multiplies gamma by gamma_scale and by squared distances of at most pi^2 / 4, and divides
# distances of order 1 by tau and T; within [1e-30, 1e30] all of it stays finite (gamma = 3e38 or tau = 1e-300 did not).
VALUE_LIMIT = 1e30


class InterventionError(QTGError, ValueError):
    """An intervention that does not fit the model it is applied to."""


@dataclass(frozen=True)
class TopoWeight:
    """A rule that replaces the TopoFilter's weight for one call (docs/model.md §6).

    Token i (0-based) *repeats* when its state equals an earlier token's, i.e.
    its exact causal score s_i = min_{j<i} delta_ij is 0; otherwise it is a
    first occurrence. The rule's weight is

        w_0 = 1                                  (no earlier token, as the filter has it)
        w_i = repeat                             for a repeat, when ``repeat`` is a number
        w_i = novel, or novel[i] for a profile   otherwise

    ``TopoWeight(novel=c)`` is the filter reduced to one bit ("seen earlier in
    this context"); ``TopoWeight(novel=profile, repeat=None)`` to where a token
    sits, whatever it is; ``TopoWeight(novel=profile)`` to the bit and the
    position, without the distances. Weights lie in [0, 1], as the filter's own.
    """

    novel: float | tuple[float, ...]
    repeat: float | None = 1.0

    def __post_init__(self) -> None:
        novel = self.novel
        if not isinstance(novel, Real):
            try:
                novel = tuple(float(v) for v in novel)
            except (TypeError, ValueError):
                raise InterventionError(f"topo_weight: novel must be a number or a sequence of numbers (a weight per "
                                        f"position), got {self.novel!r}") from None
            if not novel:
                raise InterventionError("topo_weight: the position profile is empty")
            object.__setattr__(self, "novel", novel)  # a tuple: hashable, and equal rules compare equal
        values = (*(novel if isinstance(novel, tuple) else (novel,)), *(() if self.repeat is None else (self.repeat,)))
        if not all(isinstance(v, Real) and _finite_number(float(v)) and 0.0 <= v <= 1.0 for v in values):
            raise InterventionError("topo_weight: every weight must lie in [0, 1], as the filter's own w does")

    def __str__(self) -> str:
        """``gate:0.45`` (the form :meth:`Intervention.parse` reads), ``position:256``, ``gate+position:256``."""
        if not isinstance(self.novel, tuple):
            return f"gate:{self.novel:g}" if self.repeat == 1.0 else f"novel:{self.novel:g},repeat:{self.repeat}"
        kind = "position" if self.repeat is None else "gate+position" if self.repeat == 1.0 else "position,repeat"
        return f"{kind}:{len(self.novel)}"

    def weights(self, exact: Tensor, position: Tensor) -> Tensor:
        """w ``[B, N]`` from the exact causal scores s ``[B, N]`` and the 0-based positions (broadcastable).

        Raises:
            InterventionError: a profile shorter than the positions it is asked for.
        """
        position = position.expand_as(exact)
        if isinstance(self.novel, tuple):
            reach = int(position.max())
            if reach >= len(self.novel):
                raise InterventionError(f"topo_weight: the position profile covers {len(self.novel)} positions, the "
                                        f"input reaches position {reach}")
            w = torch.tensor(self.novel, dtype=exact.dtype, device=exact.device)[position]
        else:
            w = torch.full_like(exact, float(self.novel))
        if self.repeat is not None:
            repeat = (exact < REPEAT_TOLERANCE) & (position > 0)
            w = torch.where(repeat, torch.full_like(w, float(self.repeat)), w)
        return torch.where(position == 0, torch.ones_like(w), w)


@dataclass(frozen=True)
class Intervention:
    """A per-call edit of the forward pass; the default changes nothing."""

    topo: str = "approx"
    theta: float | None = None
    tau: float | None = None
    temperature: float | None = None
    gamma: float | Mapping[int, Tensor] | None = None
    gamma_scale: float = 1.0
    ablate_heads: Mapping[int, Sequence[int]] = field(default_factory=dict)
    positions: str = "model"
    topo_weight: TopoWeight | None = None
    # compared by identity (tensors have no truth value): two interventions with patches are equal only when
    # they share one patch mapping; is_default and the engine's batching read it explicitly
    patch: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.topo not in TOPO_MODES:
            raise InterventionError(f"topo must be one of {TOPO_MODES}, got {self.topo!r}")
        if self.positions not in POSITION_MODES:
            raise InterventionError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        for name in ("theta", "tau", "temperature"):
            value = getattr(self, name)
            if value is not None and not (_finite_number(value) and abs(value) <= VALUE_LIMIT):
                raise InterventionError(f"{name} must be a finite number within ±{VALUE_LIMIT:g}, got {value!r}")
        for name in ("tau", "temperature"):
            value = getattr(self, name)
            if value is not None and value < 1 / VALUE_LIMIT:
                raise InterventionError(f"{name} must be > 0, at least {1 / VALUE_LIMIT:g}, got {value!r}")
        if not (_finite_number(self.gamma_scale) and 0 <= self.gamma_scale <= VALUE_LIMIT):
            raise InterventionError(f"gamma_scale must be a finite number in [0, {VALUE_LIMIT:g}], got "
                                    f"{self.gamma_scale!r}")
        gamma = self.gamma
        if isinstance(gamma, (int, float)) and not (_finite_number(gamma) and 0 <= gamma <= self.gamma_limit):
            raise InterventionError(f"gamma must be a finite number in [0, {self.gamma_limit:g}] (times gamma_scale, "
                                    f"at most {VALUE_LIMIT:g}), got {self.gamma!r}")
        if not isinstance(self.patch, Mapping) or not all(isinstance(k, str) for k in self.patch):
            raise InterventionError(f"patch must be a mapping {{site name: tensor or function}}, got {self.patch!r}")
        if not isinstance(self.ablate_heads, Mapping):
            raise InterventionError(f"ablate_heads must be a mapping {{block: [heads]}}, got {self.ablate_heads!r}")
        if self.topo_weight is not None:
            if not isinstance(self.topo_weight, TopoWeight):
                raise InterventionError(f"topo_weight must be a qtg.TopoWeight, got {type(self.topo_weight).__name__}")
            clash = [name for name in ("topo", "theta", "tau") if name in self.changed()]
            if clash:
                raise InterventionError(f"topo_weight replaces the filter's w, so {', '.join(clash)} would do nothing: "
                                        "give one or the other")

    @property
    def gamma_limit(self) -> float:
        """The largest gamma this intervention may set: gamma x gamma_scale stays within VALUE_LIMIT."""
        return VALUE_LIMIT / max(1.0, self.gamma_scale)

    # --- what the model asks -----------------------------------------------------
    @property
    def is_default(self) -> bool:
        """True when this intervention changes nothing."""
        return self == Intervention() and not self.patch

    def changed(self) -> list[str]:
        """Names of the fields that differ from the default."""
        default = Intervention()
        return [f.name for f in fields(self) if getattr(self, f.name) is not getattr(default, f.name)
                and getattr(self, f.name) != getattr(default, f.name)]

    def topo_values(self, theta: float, tau: float, temperature: float) -> tuple[float, float, float]:
        """The TopoFilter's (theta, tau, T), with this intervention's overrides."""
        return (theta if self.theta is None else float(self.theta), tau if self.tau is None else float(self.tau),
                temperature if self.temperature is None else float(self.temperature))

    def gamma_for(self, block: int, gamma: Tensor) -> Tensor:
        """Block ``block``'s gamma ``[H]`` after replacement and scaling (a new tensor, same dtype/device)."""
        if isinstance(self.gamma, Mapping):
            if block in self.gamma:
                gamma = torch.as_tensor(self.gamma[block], dtype=gamma.dtype, device=gamma.device)
        elif self.gamma is not None:
            gamma = torch.full_like(gamma, float(self.gamma))
        return gamma * self.gamma_scale if self.gamma_scale != 1.0 else gamma

    def head_mask(self, block: int, n_heads: int, device: torch.device | None = None) -> Tensor | None:
        """``[H]`` of 1.0 (kept) and 0.0 (ablated) for ``block``, or None when no head is ablated there."""
        heads = self.ablate_heads.get(block)
        if not heads:
            return None
        mask = torch.ones(n_heads, device=device)
        mask[list(heads)] = 0.0
        return mask

    # --- checking against a model -----------------------------------------------
    def check(self, model: Any) -> None:
        """Refuse, by field, what does not fit ``model`` (block and head ranges, gamma shapes, the baseline).

        Raises:
            InterventionError: one line naming the field.
        """
        cfg = model.cfg
        if self.patch:
            check_names(cfg, self.patch, "patch")
        if not getattr(model, "has_topofilter", False):
            unsupported = [name for name in self.changed() if name not in ("ablate_heads", "patch")]
            if unsupported:
                raise InterventionError(
                    f"the {cfg.arch} model ({cfg.name}) has no TopoFilter and no GeoAttention: it takes only "
                    f"ablate_heads, not {', '.join(unsupported)}")
        for block, heads in self.ablate_heads.items():
            _check_block(block, cfg.n_layers, "ablate_heads")
            bad = [h for h in heads if not (isinstance(h, int) and 0 <= h < cfg.n_heads)]
            if bad:
                raise InterventionError(f"ablate_heads[{block}]: head(s) {bad} out of range 0..{cfg.n_heads - 1}")
        rule = self.topo_weight
        if rule is not None and isinstance(rule.novel, tuple) and len(rule.novel) < cfg.max_seq_len:
            raise InterventionError(f"topo_weight: the position profile covers {len(rule.novel)} positions, the "
                                    f"model reads {cfg.max_seq_len}")
        if isinstance(self.gamma, Mapping):
            for block, value in self.gamma.items():
                _check_block(block, cfg.n_layers, "gamma")
                t = torch.as_tensor(value)
                limit = float(torch.tensor(self.gamma_limit, dtype=torch.float32))  # as a float32 gamma rounds
                if (t.shape != (cfg.n_heads,) or not bool(torch.isfinite(t).all()) or bool((t < 0).any())
                        or float(t.max()) > limit):
                    raise InterventionError(f"gamma[{block}] must be {cfg.n_heads} finite values in [0, "
                                            f"{self.gamma_limit:g}] (one per head), got shape {tuple(t.shape)}")

    # --- text form, for the command line -----------------------------------------
    @classmethod
    def parse(cls, spec: str) -> Intervention:
        """``"topo=exact"``, ``"gamma=1"``, ``"gamma=0:1,1,2,2;3:0.5,0.5,0.5,0.5"`` (per block, one value
        per head), ``"gamma_scale=0.5"``, ``"positions=none"``,
        ``"ablate=0:1,2;3:0"`` (block:heads), ``"theta=0.2,tau=0.5"``, ``"topo_weight=gate:0.45"`` (a one-bit
        gate: w = 1 for repeats, 0.45 for first occurrences; profiles by position need Python) -> an Intervention."""
        kwargs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in _split_top(spec))):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise InterventionError(f"intervention {spec!r}: expected key=value, got {part!r}")
            if key in ("topo", "positions"):
                kwargs[key] = value
            elif key == "gamma" and ":" in value:
                kwargs[key] = _parse_block_gamma(value)
            elif key in ("theta", "tau", "temperature", "gamma", "gamma_scale"):
                kwargs[key] = _number(key, value)
            elif key in ("ablate", "ablate_heads"):
                kwargs["ablate_heads"] = _parse_heads(value)
            elif key == "topo_weight":
                kind, _, c = value.partition(":")
                if kind.strip() != "gate":
                    raise InterventionError(f"topo_weight={value!r}: expected gate:C, a weight C in [0, 1] for first "
                                            "occurrences (repeats get 1)")
                kwargs[key] = TopoWeight(novel=_number(key, c.strip()))
            else:
                raise InterventionError(f"intervention {spec!r}: unknown key {key!r}; keys: topo, theta, tau, "
                                        "temperature, gamma, gamma_scale, ablate, positions, topo_weight")
        return cls(**kwargs)

    @property
    def name(self) -> str:
        """A short readable label, e.g. ``topo=exact gamma=1``; ``plain`` for the default."""
        parts = []
        for key in self.changed():
            value = getattr(self, key)
            if key == "ablate_heads":
                value = ";".join(f"{b}:{','.join(map(str, hs))}" for b, hs in sorted(value.items()))
                key = "ablate"
            elif isinstance(value, Mapping):
                value = "{" + ",".join(str(b) for b in sorted(value, key=str)) + "}"
            parts.append(f"{key}={value}")
        return " ".join(parts) or "plain"



def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_block(block: Any, n_layers: int, what: str) -> None:
    if not (isinstance(block, int) and 0 <= block < n_layers):
        raise InterventionError(f"{what}: block {block!r} out of range 0..{n_layers - 1}")


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InterventionError(f"intervention {key}={value!r}: not a number") from None


def _split_top(spec: str) -> list[str]:
    """Split at commas that start a new key (``ablate=0:1,2`` keeps its head list)."""
    parts: list[str] = []
    for piece in spec.split(","):
        if parts and "=" not in piece:
            parts[-1] += "," + piece
        else:
            parts.append(piece)
    return parts


def _parse_heads(value: str) -> dict[int, list[int]]:
    """``"0:1,2;3:0"`` -> ``{0: [1, 2], 3: [0]}``."""
    out: dict[int, list[int]] = {}
    try:
        for group in filter(None, value.split(";")):
            block, _, heads = group.partition(":")
            out[int(block)] = [int(h) for h in heads.split(",") if h.strip()]
            if not out[int(block)]:
                raise ValueError(group)  # a block with no heads named is a typo, never "ablate nothing"
    except ValueError:
        raise InterventionError(f"ablate={value!r}: expected block:head,head;block:head (0-based integers)") from None
    return out


def _parse_block_gamma(value: str) -> dict[int, Tensor]:
    """``"0:1,1,2,2;3:0.5,0.5,0.5,0.5"`` -> ``{0: tensor([1, 1, 2, 2]), 3: tensor([.5, .5, .5, .5])}``
    (head counts are checked against a model by :meth:`Intervention.check`)."""
    out: dict[int, Tensor] = {}
    try:
        for group in filter(None, value.split(";")):
            block, _, values = group.partition(":")
            out[int(block)] = torch.tensor([float(v) for v in values.split(",") if v.strip()], dtype=torch.float32)
    except ValueError:
        raise InterventionError(f"gamma={value!r}: expected a number, or block:g,g,...;block:g,... "
                                "(one value per head)") from None
    return out


NO_INTERVENTION = Intervention()  # the default every forward uses
