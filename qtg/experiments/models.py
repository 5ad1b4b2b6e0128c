"""Several models on the same windows: each one's bits per byte, and its difference from the first, paired.

    scores = compare_models({"nano": nano, "nano-notopo": notopo}, "texts/")
    scores[1].delta_bits_per_byte        # Interval: nano-notopo minus nano, paired over windows (these texts)
    scores[1].works.interval             # the interval across works, the one a verdict reads
    compare_models({"nano": {"s0": nano, "s1": nano_s1}, "nano-notopo": {"s0": notopo, "s1": notopo_s1}}, "texts/")

Models that share a tokenizer and a context cut a corpus into the same windows,
so a window's loss under one model and under another form a pair, and the
difference has a paired bootstrap interval (:func:`qtg.experiments.paired_bootstrap`)
much narrower than the two separate intervals. Models whose windows differ are
refused: their figures compare only through bits per byte, unpaired.

A model given as several seeds (runs of one recipe) is scored by the mean over
its seeds of each window's loss; its difference from the reference is then
resampled over seeds and works (:mod:`qtg.experiments.works`), so a comparison
of two recipes carries run-to-run variation, which one run per model cannot show.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qtg.data.documents import Document
from qtg.experiments.bootstrap import DEFAULT_RESAMPLES, Interval, bootstrap_ratio, paired_bootstrap
from qtg.experiments.corpus import Corpus
from qtg.experiments.errors import ExperimentError
from qtg.experiments.sweep import BITS_PER_NAT, prepare, sweep
from qtg.experiments.works import AcrossWorks, across_works
from qtg.metrics import bits_per_byte


@dataclass(frozen=True)
class ModelScore:
    """One model's figures on the shared windows (the mean over its seeds, when it has several)."""

    name: str
    loss: float  # nats per predicted token
    bits_per_byte: Interval  # with its own bootstrap CI over windows
    delta_bits_per_byte: Interval | None  # minus the first model's, paired over windows (None for the first)
    seconds: float  # wall time of its forward passes (every seed's)
    works: AcrossWorks | None = None  # the change per work and across works (and seeds); None for the first
    seeds: tuple[str, ...] = ()  # the seeds' names, in order
    seed_bits_per_byte: tuple[float, ...] = ()  # each seed's own bits per byte
    n_works: int = 0  # works with at least one scored window

    def to_dict(self) -> dict[str, Any]:
        """JSON; the change's keys (``delta_bits_per_byte``, ``ci95``, ``ci95_works``, ``per_work``, ...) are None
        for the reference."""
        d = self.delta_bits_per_byte
        works = self.works.to_dict() if self.works is not None else {
            "per_work": None, "ci95_works": None, "works_estimate": None, "works_method": None,
            "n_seeds": None, "verdict": None}
        return {"name": self.name, "seeds": list(self.seeds), "loss": self.loss,
                "bits_per_byte": self.bits_per_byte.estimate,
                "bits_per_byte_ci95": [self.bits_per_byte.low, self.bits_per_byte.high],
                "seed_bits_per_byte": list(self.seed_bits_per_byte),
                "delta_bits_per_byte": None if d is None else d.estimate,
                "ci95": None if d is None else [d.low, d.high], **works, "n_works": self.n_works,
                "seconds": self.seconds}


def seeds_of(name: str, value: Any) -> dict[str, Any]:
    """A model, a sequence of seeds, or a mapping seed name -> model, as a mapping (a lone model: ``{name: m}``)."""
    if isinstance(value, Mapping):
        out = dict(value)
    elif isinstance(value, (list, tuple)):
        out = {f"{name}[{i}]": m for i, m in enumerate(value)}
    else:
        out = {name: value}
    if not out:
        raise ExperimentError(f"{name}: no seed given")
    return out


def compare_models(models: Mapping[str, Any], data: str | os.PathLike | Sequence[Document] | Corpus, *,
                   max_windows: int | None = None, seed: int = 0, batch_size: int = 8,
                   resamples: int = DEFAULT_RESAMPLES, progress: bool = False,
                   cancel: threading.Event | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> list[ModelScore]:
    """Score every model on the same windows of ``data``; the first is the reference.

    Args:
        models: name -> model (eval mode), or name -> its seeds (a mapping seed name -> model, or a sequence);
            the reference first; all must cut ``data`` into the same windows.
        data: a path, documents, or a :class:`Corpus` already cut (by the first model's tokenizer and context).
        max_windows: score this many windows, drawn with ``seed`` (None: all).
        seed: the window draw and the bootstraps.
        cancel: set it (from another thread) to stop; raises :class:`ExperimentCancelled` at the next pass.
        on_progress: called with (window passes done, window passes in all: windows x seeds) after each pass.

    Returns:
        One :class:`ModelScore` per model, in order.

    Raises:
        ExperimentError: fewer than one model, or a model whose tokenizer or context cuts other windows.
    """
    if not models:
        raise ExperimentError("compare_models needs at least one model")
    runs = {name: seeds_of(name, value) for name, value in models.items()}
    names = list(runs)
    first = next(iter(runs[names[0]].values()))
    corpus = data if isinstance(data, Corpus) else prepare(first, data, max_windows=max_windows, seed=seed)
    for seeds in runs.values():
        for label, m in seeds.items():
            if m is not first and not _cuts_alike(m, first, data, corpus, max_windows, seed):
                raise ExperimentError(f"{label} cuts the text into other windows than {names[0]} (another tokenizer "
                                      "or context): a paired comparison needs the same windows")
    kw = {"resamples": resamples, "seed": seed}
    passes = _Passes(len(corpus.windows) * sum(map(len, runs.values())), on_progress)
    scored = {name: _score(seeds, corpus, passes, {**kw, "batch_size": batch_size, "progress": progress,
                                                    "cancel": cancel}) for name, seeds in runs.items()}
    reference = scored[names[0]][0]
    n_works = int(np.count_nonzero(np.bincount(corpus.document, weights=corpus.n_bytes,
                                               minlength=len(corpus.documents))))
    out = []
    for name, (bits, seconds) in scored.items():
        mean_bits = bits.mean(axis=0)
        bpb = bootstrap_ratio(mean_bits, corpus.n_bytes, **kw)
        seed_bpb = tuple(bits_per_byte(float(row.sum()) / BITS_PER_NAT, int(corpus.n_bytes.sum())) for row in bits)
        delta = works = None
        if name != names[0]:
            delta = paired_bootstrap(mean_bits, reference.mean(axis=0), corpus.n_bytes, **kw)
            works = across_works(bits, reference, corpus.n_bytes, corpus.document, corpus.documents, **kw)
        loss = float(mean_bits.sum() / BITS_PER_NAT / corpus.tokens.sum())
        out.append(ModelScore(name, loss, replace(bpb, estimate=float(np.mean(seed_bpb))), delta, seconds, works,
                              tuple(runs[name]), seed_bpb, n_works))
    return out


def _cuts_alike(m: Any, first: Any, data: Any, corpus: Corpus, max_windows: int | None, seed: int) -> bool:
    """Whether ``m`` cuts ``data`` into ``corpus``'s windows: cut again from the texts when given, else (a corpus
    already cut, by the first model's tokenizer and context) the same tokenizer and context as ``first``."""
    if not isinstance(data, Corpus):
        return prepare(m, data, max_windows=max_windows, seed=seed).windows == corpus.windows
    same_tokenizer = m.tokenizer is first.tokenizer or (
        hasattr(m.tokenizer, "to_str") and hasattr(first.tokenizer, "to_str")
        and m.tokenizer.to_str() == first.tokenizer.to_str())
    return same_tokenizer and m.cfg.max_seq_len == first.cfg.max_seq_len


@dataclass
class _Passes:
    """Window passes done over every seed of every model, reported as one count."""

    total: int
    report: Callable[[int, int], None] | None
    done: int = 0

    def within_seed(self, done: int, _: int) -> None:
        if self.report is not None:
            self.report(self.done + done, self.total)


def _score(seeds: Mapping[str, Any], corpus: Corpus, passes: _Passes, kw: dict[str, Any]) -> tuple[np.ndarray, float]:
    """``[S, W]`` each seed's loss per window in bits, and the seconds its forward passes took."""
    rows, seconds = [], 0.0
    for label, m in seeds.items():
        c = sweep(m, corpus, [], sample=0, desc=label, on_progress=passes.within_seed, **kw).conditions[0]
        passes.done += len(corpus.windows)
        rows.append(c.scores.nll * BITS_PER_NAT)
        seconds += c.seconds
    return np.stack(rows), seconds
