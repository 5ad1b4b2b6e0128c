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
rules' constants are calibrated (on other windows than those they are scored on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qtg.experiments.corpus import Corpus
from qtg.experiments.errors import ExperimentError
from qtg.intervention import REPEAT_TOLERANCE, Intervention, TopoWeight


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
def record_weights(model: Any, corpus: Corpus, batch_size: int = 8) -> WeightRecord:
    """Run ``model`` over the corpus windows and keep, for every input token, what its TopoFilter did."""
    if not getattr(model, "has_topofilter", False):
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
