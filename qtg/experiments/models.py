"""Several models on the same windows: each one's bits per byte, and its difference from the first, paired.

    scores = compare_models({"nano": nano, "nano-notopo": notopo}, "texts/")
    scores[1].delta_bits_per_byte        # Interval: nano-notopo minus nano, paired over windows

Models that share a tokenizer and a context cut a corpus into the same windows,
so a window's loss under one model and under another form a pair, and the
difference has a paired bootstrap interval (:func:`qtg.experiments.paired_bootstrap`)
much narrower than the two separate intervals. Models whose windows differ are
refused: their figures compare only through bits per byte, unpaired.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qtg.documents import Document
from qtg.experiments.bootstrap import DEFAULT_RESAMPLES, Interval, paired_bootstrap
from qtg.experiments.corpus import Corpus
from qtg.experiments.errors import ExperimentError
from qtg.experiments.sweep import BITS_PER_NAT, prepare, sweep


@dataclass(frozen=True)
class ModelScore:
    """One model's figures on the shared windows."""

    name: str
    loss: float  # nats per predicted token
    bits_per_byte: Interval  # with its own bootstrap CI over windows
    delta_bits_per_byte: Interval | None  # minus the first model's, paired over windows (None for the first)
    seconds: float  # wall time of its forward passes

    def to_dict(self) -> dict[str, Any]:
        d = self.delta_bits_per_byte
        return {"name": self.name, "loss": self.loss, "bits_per_byte": self.bits_per_byte.estimate,
                "bits_per_byte_ci95": [self.bits_per_byte.low, self.bits_per_byte.high],
                "delta_bits_per_byte": None if d is None else d.estimate,
                "ci95": None if d is None else [d.low, d.high], "seconds": self.seconds}


def compare_models(models: Mapping[str, Any], data: str | os.PathLike | Sequence[Document] | Corpus, *,
                   max_windows: int | None = None, seed: int = 0, batch_size: int = 8,
                   resamples: int = DEFAULT_RESAMPLES, progress: bool = False) -> list[ModelScore]:
    """Score every model on the same windows of ``data``; the first is the reference.

    Args:
        models: name -> model (eval mode), the reference first; all must cut ``data`` into the same windows.
        data: a path, documents, or a :class:`Corpus` already cut (by the first model's tokenizer and context).
        max_windows: score this many windows, drawn with ``seed`` (None: all).
        seed: the window draw and the bootstrap.

    Returns:
        One :class:`ModelScore` per model, in order.

    Raises:
        ExperimentError: fewer than one model, or a model whose tokenizer or context cuts other windows.
    """
    if not models:
        raise ExperimentError("compare_models needs at least one model")
    names = list(models)
    corpus = data if isinstance(data, Corpus) else prepare(models[names[0]], data, max_windows=max_windows, seed=seed)
    for name in names[1:]:
        if not isinstance(data, Corpus) and prepare(models[name], data, max_windows=max_windows,
                                                     seed=seed).windows != corpus.windows:
            raise ExperimentError(f"{name} cuts the text into other windows than {names[0]} (another tokenizer or "
                                  "context): a paired comparison needs the same windows")
    scored = {name: sweep(m, corpus, [], batch_size=batch_size, sample=0, seed=seed, resamples=resamples,
                          progress=progress, desc=name).conditions[0] for name, m in models.items()}
    reference = scored[names[0]].scores.nll * BITS_PER_NAT
    out = []
    for name, c in scored.items():
        delta = None if name == names[0] else paired_bootstrap(
            c.scores.nll * BITS_PER_NAT, reference, corpus.n_bytes, resamples=resamples, seed=seed)
        out.append(ModelScore(name, c.loss, c.bits_per_byte, delta, c.seconds))
    return out
