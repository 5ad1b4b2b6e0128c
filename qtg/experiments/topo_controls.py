"""Controls for the TopoFilter: replace its weight w by a simpler rule and measure what the loss loses.

:class:`qtg.Intervention` covers the filter's own modes (``topo="approx"``, ``"exact"``,
``"off"``) and its theta, tau and T. A control asks a different question: does the model
need the graded score, or would a coarser rule of the same tokens do as well? Each rule
below is an ``Intervention(topo_weight=qtg.TopoWeight(...))`` (``docs/model.md`` §6), so
it is an argument of one call and runs in :func:`qtg.experiments.sweep` like any other
condition, paired window for window against the unmodified model:

* :func:`one_bit_gate` - w_i = 1 when token i repeats an earlier state (s_i = 0), else a
  constant c: the filter reduced to one bit, "seen earlier in this context".
* :func:`position_weight` - w_i = profile[i], the same for every token at position i: the
  filter reduced to where a token sits, whatever it is.
* :func:`gated_position_weight` - 1 for repeats, profile[i] for first occurrences: the bit
  and the position, without the distances.

:func:`record_weights` measures what the filter does token by token, from which the
rules' constants are calibrated (on other windows than those they are scored on):
:func:`calibrate` measures them on the validation works (:class:`Calibration`), and
:func:`against_control` sets a control's w beside the filter's for the tokens of one text,
with how far they agree and how much of w's variance position alone explains (the app's
"w from" toggle shows these).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qtg.data.documents import Document
from qtg.experiments.corpus import Corpus
from qtg.experiments.errors import ExperimentError
from qtg.experiments.heldout import heldout_documents
from qtg.experiments.sweep import prepare
from qtg.model.intervention import REPEAT_TOLERANCE, Intervention, TopoWeight
from qtg.model.protocol import LanguageModel


def one_bit_gate(novel_weight: float) -> Intervention:
    """w = 1 for a repeat of an earlier token, ``novel_weight`` for a first occurrence."""
    return Intervention(topo_weight=TopoWeight(novel=novel_weight))


def position_weight(profile: Sequence[float]) -> Intervention:
    """w_i = ``profile[i]`` for every token at position i (0-based), repeat or not."""
    return Intervention(topo_weight=TopoWeight(novel=profile, repeat=None))


def gated_position_weight(profile: Sequence[float]) -> Intervention:
    """w = 1 for a repeat; ``profile[i]`` for a first occurrence at position i."""
    return Intervention(topo_weight=TopoWeight(novel=profile))


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
def record_weights(model: LanguageModel, corpus: Corpus, batch_size: int = 8) -> WeightRecord:
    """Run ``model`` over the corpus windows and keep, for every input token, what its TopoFilter did."""
    if not model.has_topofilter:
        raise ExperimentError(f"model {model.cfg.name!r} has no TopoFilter")
    device = next(model.parameters()).device
    columns: list[list[np.ndarray]] = [[], [], [], []]  # position, s, w, s~ of the real (unpadded) tokens
    for start in range(0, len(corpus.windows), batch_size):
        group = corpus.windows[start:start + batch_size]
        width = max(len(w) for w in group) - 1
        ids = torch.zeros(len(group), width, dtype=torch.long)
        real = torch.zeros(len(group), width, dtype=torch.bool)
        for row, w in enumerate(group):
            ids[row, :len(w) - 1] = torch.tensor(w[:-1])
            real[row, :len(w) - 1] = True
        # padding sits after each row's tokens, so causality keeps it out of their scores
        out = model(ids.to(device), return_internals=True, map_blocks=())  # no attention maps kept
        position = torch.arange(width).expand(len(group), width)
        for column, t in zip(columns, (position, out.topo_exact_scores, out.topo_weights, out.topo_scores)):
            column.append(t.double().cpu().numpy()[real.numpy()])
    position, exact, weight, soft = (np.concatenate(c) for c in columns)
    position = position.astype(np.int64)
    return WeightRecord(position=position, repeat=(exact < REPEAT_TOLERANCE) & (position > 0),
                        weight=weight, soft=soft, exact=exact)


# --- the controls beside the filter, token by token ------------------------------------------------

# the controls a view may set beside the filter's w: key -> what a reader is told it is
CONTROLS = {"position": "position only", "gate": "one-bit gate"}
CALIBRATION_WINDOWS = 48  # validation windows the constants are measured on, as notebook 02 does


@dataclass(frozen=True)
class Calibration:
    """The constants of the two controls, measured on windows other than the tokens they are set beside.

    ``profile[i]`` is the filter's mean w over every token at position i (the position-only rule);
    ``gate`` its mean w over first occurrences (the one-bit gate's weight for them; repeats get 1).
    """

    profile: tuple[float, ...]
    gate: float
    windows: int
    tokens: int
    source: str  # where the windows came from, in words

    def rule(self, control: str) -> TopoWeight:
        """The :class:`~qtg.TopoWeight` of ``control`` (a key of :data:`CONTROLS`)."""
        if control == "position":
            return TopoWeight(novel=self.profile, repeat=None)
        if control == "gate":
            return TopoWeight(novel=self.gate)
        raise ExperimentError(f"control must be one of {list(CONTROLS)}, got {control!r}")

    def intervention(self, control: str) -> Intervention:
        """``Intervention(topo_weight=...)``: the model run with ``control``'s w in place of the filter's."""
        return Intervention(topo_weight=self.rule(control))

    def weights(self, control: str, exact: Sequence[float]) -> np.ndarray:
        """``[N]`` the control's w of the tokens 0..N-1 of one sequence, from their exact causal scores s."""
        s = torch.as_tensor(np.asarray(exact, dtype=np.float64)).view(1, -1)
        return self.rule(control).weights(s, torch.arange(s.shape[1]).view(1, -1))[0].numpy()

    def describe(self) -> str:
        """Where the constants came from, and what they are, in words."""
        return (f"{self.windows} windows ({self.tokens:,} tokens) of {self.source} (first occurrences: mean w "
                f"{self.gate:.3f}; mean w by position from {self.profile[1]:.3f} at position 1 to "
                f"{self.profile[-1]:.3f} at position {len(self.profile) - 1})")

    def to_dict(self) -> dict[str, Any]:
        return {"profile": list(self.profile), "gate": self.gate, "windows": self.windows, "tokens": self.tokens,
                "source": self.source}


def calibration_of(record: WeightRecord, length: int, windows: int, source: str) -> Calibration:
    """The controls' constants from a :class:`WeightRecord`: w by position over ``length`` positions, and the
    mean w of first occurrences.

    Raises:
        ExperimentError: a record with no first occurrence (no gate constant to measure).
    """
    if not record.novel.any():
        raise ExperimentError(f"{source}: no first occurrence among the tokens recorded: nothing to calibrate on")
    return Calibration(profile=tuple(float(v) for v in record.profile(length)),
                       gate=float(record.weight[record.novel].mean()), windows=windows, tokens=len(record.weight),
                       source=source)


def calibrate(model: LanguageModel, data: str | os.PathLike | Sequence[Document] | None = None, *,
              tokenizer: Any = None, max_windows: int = CALIBRATION_WINDOWS, seed: int = 0) -> Calibration:
    """Measure the controls' constants on ``max_windows`` windows (drawn with ``seed``) of ``data``; by default
    the validation works of the bundled corpus, split as the model's training split it: never the tokens a
    view shows beside them, nor the test works a sweep scores.

    Raises:
        ExperimentError: a model without a TopoFilter, or data with no first occurrence.
    """
    if not model.has_topofilter:
        raise ExperimentError(f"model {model.cfg.name!r} has no TopoFilter: there is no w to calibrate a control on")
    source = "the validation works" if data is None else "the data given"
    docs = heldout_documents(model, "val") if data is None else data
    corpus = prepare(model, docs, tokenizer=tokenizer, max_windows=max_windows, seed=seed)
    return calibration_of(record_weights(model, corpus), model.cfg.max_seq_len, len(corpus.windows), source)


@dataclass(frozen=True)
class ControlComparison:
    """The filter's w of one sequence beside a control's w of the same tokens, and how much of w is position.

    The figures read the tokens after the first (token 0 has w = 1 under every rule).
    """

    control: str | None  # a key of CONTROLS, or None: the filter's own w only
    weight: np.ndarray  # [N] the filter's w
    control_weight: np.ndarray | None  # [N] the control's w of the same tokens
    position_weight: np.ndarray  # [N] the position-only control's w (what position alone predicts)
    correlation: float | None  # Pearson r of w and the control's w (None: no control, or a constant)
    mean_abs_difference: float | None  # mean |w - w_control|
    position_share: float | None  # 1 - sum (w - w_pos)^2 / sum (w - mean w)^2 (None: fewer than 2 tokens or flat w)

    @property
    def shown(self) -> np.ndarray:
        """The w a view draws: the control's when one is set, else the filter's."""
        return self.weight if self.control_weight is None else self.control_weight

    def describe(self) -> str:
        """The figures in plain words."""
        n = len(self.weight) - 1
        if n < 1:
            return "one token: nothing to compare (the first token's w is 1 under every rule)"
        share = ("not defined (w is the same for every token)" if self.position_share is None else
                 f"{100 * self.position_share:.0f} %")
        lines = [f"Position alone explains {share} of the variance of the filter's w over these {n} tokens "
                 "(1 − squared error of the position-only w / variance of w; below 0 when it predicts worse "
                 "than w's own mean)."]
        if self.control is not None:
            r = "not defined (one of them is constant)" if self.correlation is None else f"{self.correlation:.2f}"
            lines.append(f"The {CONTROLS[self.control]} control's w against the filter's: correlation {r}, mean |w − "
                         f"w_control| = {self.mean_abs_difference:.3f}; mean w {self.weight[1:].mean():.3f} "
                         f"(filter), {self.control_weight[1:].mean():.3f} ({CONTROLS[self.control]}).")
        return "  \n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"control": self.control, "weight": self.weight.tolist(),
                "control_weight": None if self.control_weight is None else self.control_weight.tolist(),
                "position_weight": self.position_weight.tolist(), "correlation": self.correlation,
                "mean_abs_difference": self.mean_abs_difference, "position_share": self.position_share}


def mean_applied_weight(weight: Sequence[float] | torch.Tensor) -> float:
    """The mean w of one sequence ``[N]`` over tokens 1..N-1: w_0 = 1 under every rule (``docs/model.md`` §2), so
    it says nothing about the rule and is left out (nan for a single token)."""
    w = np.asarray(torch.as_tensor(weight).detach().cpu().double(), dtype=np.float64)
    return float(w[1:].mean()) if len(w) > 1 else float("nan")


def against_control(calibration: Calibration, control: str | None, weight: Sequence[float],
                    exact: Sequence[float]) -> ControlComparison:
    """The filter's w ``[N]`` of one sequence (tokens 0..N-1, exact causal scores ``exact``) beside ``control``'s.

    Raises:
        ExperimentError: an unknown control, or w and s of different lengths.
    """
    if control is not None and control not in CONTROLS:
        raise ExperimentError(f"control must be one of {list(CONTROLS)} or None, got {control!r}")
    w = np.asarray(weight, dtype=np.float64)
    if w.shape != np.shape(exact):
        raise ExperimentError(f"{len(w)} weights for {len(exact)} scores")
    by_position = calibration.weights("position", exact)
    ctl = None if control is None else calibration.weights(control, exact)
    r = mad = None
    if ctl is not None and len(w) > 1:
        r = _correlation(w[1:], ctl[1:])
        mad = float(np.abs(w[1:] - ctl[1:]).mean())
    return ControlComparison(control=control, weight=w, control_weight=ctl, position_weight=by_position,
                             correlation=r, mean_abs_difference=mad, position_share=_explained(w[1:], by_position[1:]))


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _explained(w: np.ndarray, predicted: np.ndarray) -> float | None:
    """The share of w's variance a prediction made without these tokens explains (out of sample: may be < 0)."""
    spread = float(((w - w.mean()) ** 2).sum()) if len(w) else 0.0
    if len(w) < 2 or spread == 0.0:
        return None
    return 1.0 - float(((w - predicted) ** 2).sum()) / spread
