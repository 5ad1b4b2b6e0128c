"""Loss, perplexity and bits per byte of a model on a text, file or directory.

Bits per byte divides the total negative log-likelihood (in bits) by the
number of raw UTF-8 bytes of the text, so models with different tokenizers
(QTG and its baseline, byte-level and BPE) compare on the same footing.

Every byte is paid for: each document is scored as ``[EOS] + encode(text)``,
so its first token is predicted from the EOS context too, and the stream is
cut into non-overlapping windows of ``max_seq_len`` predictions (each window
starts its context afresh: a conservative, cheap protocol; the figure a
sliding window would give is lower).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from qtg.data.pipeline import Document, load_documents
from qtg.data.tokenizer import encode, eos_id
from qtg.errors import DataError
from qtg.metrics import bits_per_byte
from qtg.model.decoder import IGNORE_INDEX
from qtg.model.intervention import Intervention


@dataclass
class EvalResult:
    loss: float  # mean nll per predicted token, nats
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    documents: int

    def to_dict(self) -> dict:
        return asdict(self)


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """Cut ``ids`` into windows of ``size + 1`` tokens overlapping by one, so
    every token after the first is predicted exactly once."""
    return [list(ids[i:i + size + 1]) for i in range(0, len(ids) - 1, size)]


@dataclass
class Scores:
    """What :func:`score_batches` sums over the predicted tokens (targets other than -100)."""

    sums: dict[str, float]  # each loss term (``loss``: the training objective, ``ce``: the nll) x its tokens, nats
    tokens: int

    def mean(self, term: str) -> float:
        """The per-token mean of ``term`` (batches weighted by their predicted tokens)."""
        return self.sums[term] / self.tokens


@torch.no_grad()
def score_batches(model, batches: Iterable[tuple[Tensor, Tensor]], intervene: Intervention | None = None,
                  autocast: AbstractContextManager | None = None, progress: bool = False,
                  total: int | None = None) -> Scores:
    """The model's loss terms summed over ``(inputs, targets)`` batches ``[b, n]``, in eval mode.

    The one scoring loop of the package: :func:`score_windows` (evaluation, the app) and training's
    validation both run it. Each batch's mean terms are weighted by its predicted tokens; ``ce`` averages over
    those only, the training objective's other terms (QTG's topo and quantum) over every position, so with
    padded batches only ``ce`` is exact.

    Args:
        intervene: score under this :class:`~qtg.model.intervention.Intervention`.
        autocast: a reusable context to run each forward pass in (training's bf16 on CUDA).
        progress, total: a progress bar counting ``total`` rows.

    The model's train/eval mode is restored afterwards, also when a pass raises (the trainer goes on training).
    """
    device = next(model.parameters()).device
    autocast = autocast or nullcontext()
    sums: dict[str, float] = {}
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=total, desc="eval", unit="window", disable=not progress) as bar:
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                with autocast:
                    out = model(x, targets=y, intervene=intervene)
                n = int((y != IGNORE_INDEX).sum())
                for term, value in {"loss": out.loss, **out.loss_terms}.items():
                    sums[term] = sums.get(term, 0.0) + float(value) * n
                tokens += n
                bar.update(len(x))
    finally:
        model.train(was_training)
    return Scores(sums, tokens)


def padded_batches(chunks: list[list[int]], batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Windows of ids as ``(inputs, targets)`` batches, shortest first so that similar lengths batch together
    with little padding: inputs padded with id 0, targets with -100 (not predicted)."""
    chunks = sorted(chunks, key=len)
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start:start + batch_size]
        width = max(len(c) for c in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width - 1), IGNORE_INDEX, dtype=torch.long)
        for row, c in enumerate(batch):
            ids[row, :len(c)] = torch.tensor(c)
            targets[row, :len(c) - 1] = ids[row, 1:len(c)]
        yield ids[:, :-1], targets


def score_windows(model, chunks: list[list[int]], batch_size: int = 8, progress: bool = False,
                  intervene: Intervention | None = None) -> tuple[float, int]:
    """Sum of nll (nats) and number of predicted tokens over windows of ids (under ``intervene``, if given)."""
    scores = score_batches(model, padded_batches(chunks, batch_size), intervene, progress=progress,
                           total=len(chunks))
    return scores.sums.get("ce", 0.0), scores.tokens


def evaluate(model, data: str | os.PathLike | Sequence[Document], tokenizer=None, batch_size: int = 8,
             progress: bool = False, intervene: Intervention | None = None) -> EvalResult:
    """Evaluate ``model`` on a text file, a directory, JSONL, or a list of Documents.

    Args:
        model: a QTG or Baseline model; its ``tokenizer`` is used unless one is given.
        data: path (see :func:`qtg.data.pipeline.load_documents`) or documents.
        batch_size: windows per forward pass.
        intervene: score the model under this :class:`~qtg.model.intervention.Intervention`.
    """
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is None:
        raise DataError("this model has no tokenizer: load a trained checkpoint (it carries one) or pass a tokenizer")
    docs = load_documents(data) if isinstance(data, (str, os.PathLike)) else list(data)
    if not docs or not any(d.text for d in docs):
        raise DataError("nothing to evaluate: the data holds no text")
    eos = eos_id(tokenizer)
    chunks = []
    for doc in docs:
        chunks += windows([eos] + encode(tokenizer, doc.text), model.cfg.max_seq_len)
    chunks = [c for c in chunks if len(c) > 1]
    nll, count = score_windows(model, chunks, batch_size=batch_size, progress=progress, intervene=intervene)
    n_bytes = sum(d.n_bytes for d in docs)
    loss = nll / count
    return EvalResult(loss=loss, perplexity=math.exp(loss), bits_per_byte=bits_per_byte(nll, n_bytes),
                      tokens=count, bytes=n_bytes, documents=len(docs))
