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
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qtg.data import Document, load_documents
from qtg.errors import DataError
from qtg.intervention import Intervention
from qtg.metrics import bits_per_byte
from qtg.tokenizer import encode, eos_id


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


@torch.inference_mode()
def score_windows(model, chunks: list[list[int]], batch_size: int = 8, progress: bool = False,
                  intervene: Intervention | None = None) -> tuple[float, int]:
    """Sum of nll (nats) and number of predicted tokens over windows of ids (under ``intervene``, if given)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    chunks = sorted(chunks, key=len)  # similar lengths batch together with little padding
    bar = tqdm(total=len(chunks), desc="eval", unit="window", disable=not progress)
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start:start + batch_size]
        width = max(len(c) for c in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width - 1, dtype=torch.bool)
        for row, c in enumerate(batch):
            ids[row, :len(c)] = torch.tensor(c)
            mask[row, :len(c) - 1] = True
        ids, mask = ids.to(device), mask.to(device)
        logits = model(ids[:, :-1], intervene=intervene).logits.float()  # [b, w-1, V]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [b, w-1]
        total += float(nll[mask].sum())
        count += int(mask.sum())
        bar.update(len(batch))
    bar.close()
    return total, count


def evaluate(model, data: str | os.PathLike | Sequence[Document], tokenizer=None, batch_size: int = 8,
             progress: bool = False, intervene: Intervention | None = None) -> EvalResult:
    """Evaluate ``model`` on a text file, a directory, JSONL, or a list of Documents.

    Args:
        model: a QTG or Baseline model; its ``tokenizer`` is used unless one is given.
        data: path (see :func:`qtg.data.load_documents`) or documents.
        batch_size: windows per forward pass.
        intervene: score the model under this :class:`~qtg.intervention.Intervention`.
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
