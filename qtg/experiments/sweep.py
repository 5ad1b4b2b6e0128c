"""Corpus sweeps: a model under several interventions, each against the unmodified model, with CIs.

    result = sweep(model, "texts/", [Intervention(topo="exact"), Intervention(gamma=1.0)])
    result.conditions[1].delta_bits_per_byte      # Interval: estimate, low, high (95 %, paired bootstrap)
    json.dumps(result.to_dict())

The corpus is cut as ``qtg eval`` cuts it (:mod:`qtg.experiments.corpus`), and
every window is scored once per condition, the unmodified model first. Per
window: the summed loss (nats) and, for a QTG model, the mean TopoFilter
weight over its tokens. On a seeded sample of windows (``sample``) the pass also
keeps every block's attention maps, for per-head entropy and mean attended
distance (:func:`qtg.metrics.attention_stats`), and measures the TopoFilter's
soft-min H0 diagram against the exact H0 diagram of the same QEmbed cloud
(the bottleneck distance of :func:`qtg.topology.compare`); that cloud precedes every intervention, so its
exact diagram is computed once per window and reused by every condition.

A condition's change against the unmodified model is a ratio of sums over the
same windows, with a seeded paired percentile bootstrap (:mod:`qtg.experiments.bootstrap`):

    delta bits/byte = sum_w (nll_w - nll0_w) / (ln 2 sum_w bytes_w)
    delta loss      = sum_w (nll_w - nll0_w) / sum_w tokens_w

With every window kept, the unmodified model's bits per byte is exactly ``qtg eval``'s.
Windows of one work are not independent, so each change also has its value per
work and an interval across works (:mod:`qtg.experiments.works`); the windows
interval is the one for "these texts", the works interval the one a verdict reads.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qtg.data.documents import Document
from qtg.experiments.bootstrap import DEFAULT_RESAMPLES, Interval, bootstrap_ratio, paired_bootstrap
from qtg.experiments.corpus import Corpus, cut_corpus, read_documents, seeded_choice
from qtg.experiments.errors import ExperimentCancelled, ExperimentError
from qtg.experiments.works import AcrossWorks, across_works
from qtg.metrics import attention_stats, bits_per_byte
from qtg.model.intervention import Intervention
from qtg.model.protocol import LanguageModel
from qtg.topology import approx_view, bottleneck, exact_diagrams

LEVEL = 0.95
BITS_PER_NAT = 1.0 / math.log(2)
DEFAULT_SAMPLE = 8  # windows whose attention maps and exact H0 diagrams are computed
# The Intervention fields each TopoFilter figure reads. The filter precedes every block, so no attention knob
# (gamma, gamma_scale, ablate_heads, positions) reaches it, and its soft-min diagram (the H0 bottleneck against
# the exact one of the same cloud) reads only T: under any other field these figures equal the unmodified model's.
FIGURE_FIELDS = {"mean_topo_weight": {"topo", "theta", "tau", "temperature", "topo_weight"},
                 "bottleneck_h0_mean": {"temperature"}}


def unchanged_figures(intervene: Intervention) -> list[str]:
    """The figures (``Condition.to_dict`` keys) that ``intervene`` cannot move from the unmodified model's."""
    changed = set(intervene.changed())
    return [] if not changed else [name for name, reads in FIGURE_FIELDS.items() if not changed & reads]


@dataclass
class WindowScores:
    """One condition on every window, and on the sampled windows."""

    nll: np.ndarray  # [W] float64, summed loss of the window's predicted tokens, nats
    mean_weight: np.ndarray | None  # [W] mean TopoFilter weight over the window's input tokens (QTG only)
    bottleneck_h0: np.ndarray | None  # [S] exact vs soft-min H0 bottleneck at the TopoFilter (QTG only)
    attention_entropy: np.ndarray  # [S, L, H] nats, per sampled window, block and head
    attended_distance: np.ndarray  # [S, L, H] tokens

    def to_dict(self) -> dict[str, Any]:
        return {k: None if v is None else v.tolist() for k, v in self.__dict__.items()}


@dataclass
class Condition:
    """One intervention's figures over the corpus, and its change against the unmodified model."""

    name: str
    intervention: Intervention
    scores: WindowScores
    loss: float  # nats per predicted token
    bits_per_byte: Interval  # with its own bootstrap CI
    delta_loss: Interval  # nats per token, paired against the unmodified model
    delta_bits_per_byte: Interval  # over windows: these texts
    delta_loss_works: AcrossWorks  # per work, and the interval across works
    delta_bits_per_byte_works: AcrossWorks
    seconds: float  # wall time of this condition's forward passes (and its sampled extras)
    window_tokens: np.ndarray = field(repr=False)  # [W] predicted tokens per window

    @property
    def tokens(self) -> int:
        return int(self.window_tokens.sum())

    @property
    def mean_topo_weight(self) -> float | None:
        """Token-weighted mean TopoFilter weight over the corpus (None for a model without one)."""
        w = self.scores.mean_weight
        return None if w is None else float(np.average(w, weights=self.window_tokens))

    def to_dict(self, windows: bool = False) -> dict[str, Any]:
        s = self.scores
        bottleneck = None if s.bottleneck_h0 is None or not s.bottleneck_h0.size else float(s.bottleneck_h0.mean())
        d = {"name": self.name, "loss": self.loss, "perplexity": math.exp(self.loss),
             "bits_per_byte": self.bits_per_byte.estimate, "bits_per_byte_ci95": [self.bits_per_byte.low,
                                                                                  self.bits_per_byte.high],
             "delta_bits_per_byte": self.delta_bits_per_byte.estimate,
             "ci95": [self.delta_bits_per_byte.low, self.delta_bits_per_byte.high],
             "delta_loss": self.delta_loss.estimate, "delta_loss_ci95": [self.delta_loss.low, self.delta_loss.high],
             **self.delta_bits_per_byte_works.to_dict(), **self.delta_loss_works.to_dict("delta_loss_"),
             "mean_topo_weight": self.mean_topo_weight, "bottleneck_h0_mean": bottleneck,
             "unchanged": unchanged_figures(self.intervention),
             "attention_entropy": _mean_over_sample(s.attention_entropy),
             "attended_distance": _mean_over_sample(s.attended_distance),
             "tokens": self.tokens, "seconds": self.seconds, "tokens_per_second": self.tokens / max(self.seconds, 1e-9)}
        if windows:
            d["windows"] = s.to_dict()
        return d


def _mean_over_sample(a: np.ndarray) -> list[list[float]] | None:
    """``[S, L, H]`` -> ``[L][H]`` mean over the sampled windows that have a value."""
    if not a.size or np.isnan(a).all():
        return None
    return np.nanmean(a, axis=0).tolist()


@dataclass
class SweepResult:
    """Every condition, the unmodified model first."""

    model: str
    arch: str
    corpus: Corpus
    sample: np.ndarray  # [S] indices of the sampled windows
    conditions: list[Condition]
    seed: int
    resamples: int

    def to_dict(self, windows: bool = False) -> dict[str, Any]:
        """JSON: ``{"model", "corpus", ..., "conditions": [{"name", "bits_per_byte", "delta_bits_per_byte",
        "ci95": [low, high], ...}, ...]}``; ``windows`` adds the per-window arrays."""
        return {"model": self.model, "arch": self.arch, "corpus": self.corpus.summary(),
                "window_bytes": self.corpus.n_bytes.tolist() if windows else None,
                "sample_windows": self.sample.tolist(), "seed": self.seed, "resamples": self.resamples,
                "level": LEVEL, "conditions": [c.to_dict(windows) for c in self.conditions]}


# --- scoring ---------------------------------------------------------------------------------


@dataclass
class _Run:
    """What one condition's pass over the windows needs, and where it writes."""

    model: LanguageModel
    corpus: Corpus
    intervene: Intervention
    sample_row: dict[int, int]  # window index -> row in the [S, ...] arrays
    diagrams: dict[int, tuple[np.ndarray, Any]]  # window -> (QEmbed cloud, its exact diagrams), shared
    scores: WindowScores


def _batches(corpus: Corpus, sample: np.ndarray, batch_size: int) -> list[tuple[list[int], bool]]:
    """(window indices, keep maps) per forward pass. Windows of similar length batch together,
    as ``qtg eval`` batches them; sampled windows batch apart, and only with windows of equal
    length, so their maps and clouds hold no padding."""
    sampled = set(sample.tolist())
    length = lambda i: len(corpus.windows[i])  # noqa: E731
    rest = sorted((i for i in range(len(corpus.windows)) if i not in sampled), key=length)
    out = [(rest[s:s + batch_size], False) for s in range(0, len(rest), batch_size)]
    by_length: dict[int, list[int]] = {}
    for i in sorted(sampled):
        by_length.setdefault(length(i), []).append(i)
    for group in by_length.values():
        out += [(group[s:s + batch_size], True) for s in range(0, len(group), batch_size)]
    return out


def _score_batch(run: _Run, idx: list[int], with_maps: bool) -> None:
    model, windows = run.model, run.corpus.windows
    device = next(model.parameters()).device
    width = max(len(windows[i]) for i in idx)
    ids = torch.zeros(len(idx), width, dtype=torch.long)
    mask = torch.zeros(len(idx), width - 1, dtype=torch.bool)
    for row, i in enumerate(idx):
        ids[row, :len(windows[i])] = torch.tensor(windows[i])
        mask[row, :len(windows[i]) - 1] = True
    ids, mask = ids.to(device), mask.to(device)
    out = model(ids[:, :-1], return_internals=with_maps, intervene=run.intervene)  # w comes with every pass
    nll = F.cross_entropy(out.logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # [b, w-1]
    run.scores.nll[idx] = (nll * mask).double().sum(1).cpu().numpy()
    if run.scores.mean_weight is not None:
        w = (out.topo_weights.double() * mask).sum(1) / mask.sum(1)
        run.scores.mean_weight[idx] = w.cpu().numpy()
    if with_maps:
        for row, i in enumerate(idx):
            _sample_stats(run, out, row, i, len(windows[i]) - 1)


def _sample_stats(run: _Run, out: Any, row: int, window: int, n: int) -> None:
    """Attention statistics and the H0 bottleneck of one sampled window (``n`` input tokens, no padding)."""
    s = run.sample_row[window]
    if n >= 2:
        for block, maps in enumerate(out.attention):
            stats = attention_stats(maps[row])  # [H] each
            run.scores.attention_entropy[s, block] = stats.entropy.cpu().numpy()
            run.scores.attended_distance[s, block] = stats.attended_distance.cpu().numpy()
    if run.scores.bottleneck_h0 is not None:
        view = approx_view(out, layer=1, batch=row, model=run.model)
        cached = run.diagrams.get(window)
        if cached is None or not np.array_equal(cached[0], view.points):
            cached = run.diagrams[window] = (view.points, exact_diagrams(view.points, maxdim=0, metric_input="points"))
        # compare(exact, view).bottleneck_h0 without the rest of compare's report (elder rule, W1, ranks)
        run.scores.bottleneck_h0[s] = bottleneck(cached[1].dgms[0], view.diagram)


def _empty_scores(model: LanguageModel, n_windows: int, n_sample: int) -> WindowScores:
    L, H = model.cfg.n_layers, model.cfg.n_heads
    topo = model.has_topofilter
    return WindowScores(nll=np.full(n_windows, np.nan), mean_weight=np.full(n_windows, np.nan) if topo else None,
                        bottleneck_h0=np.full(n_sample, np.nan) if topo else None,
                        attention_entropy=np.full((n_sample, L, H), np.nan),
                        attended_distance=np.full((n_sample, L, H), np.nan))


# --- the sweep ---------------------------------------------------------------------------------


def _conditions(model: LanguageModel, interventions: Sequence[Intervention]) -> list[Intervention]:
    """The unmodified model, then each intervention once; each checked against the model before any work."""
    out = [Intervention()]
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise ExperimentError(f"interventions must be qtg.Intervention values, got {type(iv).__name__}")
        iv.check(model)
        if any(_same(iv, seen) for seen in out):
            raise ExperimentError(f"intervention {iv.name!r} is given twice (the unmodified model always runs first)")
        out.append(iv)
    return out


def _same(a: Intervention, b: Intervention) -> bool:
    try:
        return bool(a == b)
    except RuntimeError:  # per-block gamma tensors of several values compare elementwise: not the same value
        return False


def _check_args(batch_size: int, sample: int, max_windows: int | None, resamples: int) -> None:
    if batch_size < 1:
        raise ExperimentError(f"batch_size must be >= 1, got {batch_size}")
    if sample < 0:
        raise ExperimentError(f"sample must be >= 0 windows, got {sample}")
    if max_windows is not None and max_windows < 1:
        raise ExperimentError(f"max_windows must be >= 1, got {max_windows}")
    if resamples < 1:
        raise ExperimentError(f"resamples must be >= 1, got {resamples}")


def prepare(model: LanguageModel, data: str | os.PathLike | Sequence[Document], *, tokenizer: Any = None,
            max_windows: int | None = None, seed: int = 0) -> Corpus:
    """The windows a sweep scores: the whole corpus, or ``max_windows`` of them drawn with ``seed``."""
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is None:
        raise ExperimentError("this model has no tokenizer: pass tokenizer= or load a trained checkpoint")
    corpus = cut_corpus(read_documents(data), tokenizer, model.cfg.max_seq_len)
    if max_windows is not None and max_windows < len(corpus.windows):
        corpus = corpus.subset(seeded_choice(len(corpus.windows), max_windows, seed, stream=0))
    return corpus


@torch.inference_mode()
def sweep(model: LanguageModel, data: str | os.PathLike | Sequence[Document] | Corpus,
          interventions: Sequence[Intervention], *, tokenizer: Any = None, batch_size: int = 8,
          sample: int = DEFAULT_SAMPLE, max_windows: int | None = None, seed: int = 0,
          resamples: int = DEFAULT_RESAMPLES, progress: bool = False, cancel: threading.Event | None = None,
          on_progress: Callable[[int, int], None] | None = None, desc: str = "sweep") -> SweepResult:
    """Score a corpus under the unmodified model and each intervention; paired CIs against the former.

    Args:
        model: a QTG or baseline model (eval mode).
        data: a path (file, folder, JSONL), documents, or a :class:`Corpus` from :func:`prepare`.
        interventions: the conditions, each a :class:`~qtg.Intervention` (the unmodified model is added first).
        tokenizer: default ``model.tokenizer``.
        batch_size: windows per forward pass.
        sample: windows (drawn with ``seed``) whose attention maps and exact H0 diagrams are computed.
        max_windows: score only this many windows, drawn with ``seed`` (None: all; then the unmodified
            model's bits per byte equals ``qtg eval``'s).
        seed: fixes the window draws and the bootstrap: the same call gives the same numbers.
        resamples: bootstrap resamples.
        progress: a tqdm bar over windows x conditions, labelled ``desc``.
        cancel: set it (from another thread) to stop; the sweep raises :class:`ExperimentCancelled`.
        on_progress: called with (windows done, windows in all) after each forward pass.

    Returns:
        :class:`SweepResult`.
    """
    _check_args(batch_size, sample, max_windows, resamples)
    conditions = _conditions(model, interventions)
    corpus = data if isinstance(data, Corpus) else prepare(model, data, tokenizer=tokenizer,
                                                           max_windows=max_windows, seed=seed)
    picked = seeded_choice(len(corpus.windows), sample, seed, stream=1)
    batches = _batches(corpus, picked, batch_size)
    diagrams: dict[int, tuple[np.ndarray, Any]] = {}
    total, done = len(corpus.windows) * len(conditions), 0
    bar = tqdm(total=total, desc=desc, unit="window", disable=not progress)
    runs: list[tuple[Intervention, WindowScores, float]] = []
    try:
        for iv in conditions:
            bar.set_postfix_str(iv.name)
            run = _Run(model, corpus, iv, {int(w): s for s, w in enumerate(picked)}, diagrams,
                       _empty_scores(model, len(corpus.windows), len(picked)))
            start = time.perf_counter()
            for idx, with_maps in batches:
                if cancel is not None and cancel.is_set():
                    raise ExperimentCancelled(f"sweep cancelled after {done} of {total} window passes")
                _score_batch(run, idx, with_maps)
                done += len(idx)
                bar.update(len(idx))
                if on_progress is not None:
                    on_progress(done, total)
            runs.append((iv, run.scores, time.perf_counter() - start))
    finally:
        bar.close()
    return SweepResult(model=model.cfg.label, arch=model.arch, corpus=corpus, sample=picked,
                       conditions=_summarise(runs, corpus, seed, resamples), seed=seed, resamples=resamples)


def _summarise(runs: list[tuple[Intervention, WindowScores, float]], corpus: Corpus, seed: int,
               resamples: int) -> list[Condition]:
    """Totals and seeded bootstrap intervals; every condition resamples the same windows (same seed)."""
    tokens, n_bytes = corpus.tokens, corpus.n_bytes
    base = runs[0][1].nll
    out = []
    kw = {"resamples": resamples, "level": LEVEL, "seed": seed}
    for iv, scores, seconds in runs:
        nll = scores.nll
        bpb = bootstrap_ratio(nll * BITS_PER_NAT, n_bytes, **kw)
        exact_bpb = bits_per_byte(float(nll.sum()), int(n_bytes.sum()))  # the library's one definition
        bits, base_bits = nll * BITS_PER_NAT, base * BITS_PER_NAT
        out.append(Condition(
            name=iv.name, intervention=iv, scores=scores, loss=float(nll.sum() / tokens.sum()),
            bits_per_byte=replace(bpb, estimate=exact_bpb),
            delta_loss=paired_bootstrap(nll, base, tokens, **kw),
            delta_bits_per_byte=paired_bootstrap(bits, base_bits, n_bytes, **kw),
            delta_loss_works=across_works(nll, base, tokens, corpus.document, corpus.documents, **kw),
            delta_bits_per_byte_works=across_works(bits, base_bits, n_bytes, corpus.document, corpus.documents, **kw),
            seconds=seconds, window_tokens=tokens))
    return out
