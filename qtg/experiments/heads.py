"""Head importance: ablate each attention head alone and rank heads by what the loss loses.

Head (b, h) is ablated with ``Intervention(ablate_heads={b: [h]})``: its slice of
the attention output is zero before the block's output projection, for QTG and
the baseline alike. Its importance is the paired change in loss over the
corpus, with the sweep's bootstrap CI over windows (these texts) and its value
per work with the interval across works; heads are labelled ``b:h`` (0-based), as
``--intervene ablate=b:h`` spells them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qtg.data.documents import Document
from qtg.experiments.bootstrap import Interval
from qtg.experiments.corpus import Corpus
from qtg.experiments.sweep import SweepResult, sweep
from qtg.experiments.works import AcrossWorks
from qtg.model.intervention import Intervention
from qtg.model.protocol import LanguageModel


@dataclass
class HeadEffect:
    """What ablating one head does to the loss."""

    block: int  # 0-based
    head: int  # 0-based
    delta_loss: Interval  # nats per token, ablated minus unmodified, over windows (these texts)
    delta_bits_per_byte: Interval
    delta_loss_works: AcrossWorks  # per work, and the interval across works
    delta_bits_per_byte_works: AcrossWorks

    @property
    def label(self) -> str:
        return f"{self.block}:{self.head}"

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.label, "block": self.block, "index": self.head,
                "delta_loss": self.delta_loss.estimate, "delta_loss_ci95": [self.delta_loss.low, self.delta_loss.high],
                **self.delta_loss_works.to_dict("delta_loss_"),
                "delta_bits_per_byte": self.delta_bits_per_byte.estimate,
                "ci95": [self.delta_bits_per_byte.low, self.delta_bits_per_byte.high],
                **self.delta_bits_per_byte_works.to_dict()}


@dataclass
class HeadRanking:
    """One model's heads, the one whose ablation costs most first."""

    model: str
    arch: str
    loss: float  # the unmodified model's, nats per token
    bits_per_byte: float
    heads: list[HeadEffect]
    result: SweepResult = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "arch": self.arch, "loss": self.loss, "bits_per_byte": self.bits_per_byte,
                "heads": [h.to_dict() for h in self.heads]}


def head_importance(model: LanguageModel, data: str | os.PathLike | Sequence[Document] | Corpus, **sweep_kwargs: Any
                    ) -> HeadRanking:
    """Ablate every head of ``model`` alone over ``data``; rank by the change in loss.

    Args:
        model: a QTG or baseline model.
        data: as :func:`~qtg.experiments.sweep.sweep` takes it.
        sweep_kwargs: ``batch_size``, ``max_windows``, ``seed``, ``resamples``, ``progress``, ``cancel``, ...
            (no sampled extras are computed: ``sample`` is 0).

    Returns:
        :class:`HeadRanking`, largest delta loss first.
    """
    cfg = model.cfg
    pairs = [(b, h) for b in range(cfg.n_layers) for h in range(cfg.n_heads)]
    result = sweep(model, data, [Intervention(ablate_heads={b: [h]}) for b, h in pairs],
                   **{"desc": f"heads of {cfg.name}", **sweep_kwargs, "sample": 0})
    plain, ablated = result.conditions[0], result.conditions[1:]
    effects = [HeadEffect(b, h, c.delta_loss, c.delta_bits_per_byte, c.delta_loss_works, c.delta_bits_per_byte_works)
               for (b, h), c in zip(pairs, ablated)]
    effects.sort(key=lambda e: (-e.delta_loss.estimate, e.block, e.head))
    return HeadRanking(model=result.model, arch=result.arch, loss=plain.loss,
                       bits_per_byte=plain.bits_per_byte.estimate, heads=effects, result=result)


def side_by_side(rankings: Sequence[HeadRanking]) -> list[list[HeadEffect | None]]:
    """Rows by rank: row r holds each model's r-th most important head (None where a model has fewer)."""
    depth = max((len(r.heads) for r in rankings), default=0)
    return [[r.heads[i] if i < len(r.heads) else None for r in rankings] for i in range(depth)]
