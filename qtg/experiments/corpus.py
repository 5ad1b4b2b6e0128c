"""A corpus cut into the windows ``qtg eval`` scores, each with the bytes it pays for.

Each document is ``[EOS] + encode(text)`` cut by :func:`qtg.training.evaluate.windows`
into non-overlapping windows of the model's context. A window pays for the
bytes of the tokens it *predicts* (its first token is context): with a
byte-level BPE each token spells a fixed byte string, so these counts add up
to the document's UTF-8 bytes exactly, and the per-window figures sum to the
same bits per byte ``qtg eval`` reports. For any other tokenizer the
document's remainder is put on its last window, so the totals still agree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import pre_tokenizers

from qtg.data.documents import Document, load_documents
from qtg.data.tokenizer import encode_batch, eos_id
from qtg.errors import DataError
from qtg.experiments.errors import ExperimentError
from qtg.training.evaluate import windows


@dataclass
class Corpus:
    """Windows of token ids and what each pays for."""

    windows: list[list[int]]  # each up to max_seq_len + 1 ids
    n_bytes: np.ndarray  # [W] int64, bytes of the tokens each window predicts
    document: np.ndarray  # [W] int64, index into ``documents``
    documents: list[str]  # names
    total_bytes: int  # every document's bytes (== n_bytes.sum() unless windows were left out)

    @property
    def tokens(self) -> np.ndarray:
        """``[W]`` predicted tokens per window."""
        return np.array([len(w) - 1 for w in self.windows], dtype=np.int64)

    def subset(self, keep: np.ndarray) -> Corpus:
        """The windows at indices ``keep`` (sorted), same documents."""
        return Corpus(windows=[self.windows[i] for i in keep], n_bytes=self.n_bytes[keep],
                      document=self.document[keep], documents=self.documents, total_bytes=int(self.n_bytes[keep].sum()))

    def summary(self) -> dict[str, Any]:
        return {"documents": self.documents, "windows": len(self.windows), "tokens": int(self.tokens.sum()),
                "bytes": int(self.n_bytes.sum())}


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """``[V]`` int64: the UTF-8 bytes each token id spells.

    Byte-level BPE tokens are strings over the 256-character byte alphabet, one
    character per byte; special and added tokens are stored as plain text.
    """
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for token, i in vocab.items():
        lengths[i] = len(token) if set(token) <= alphabet else len(token.encode("utf-8"))
    return lengths


def read_documents(data: str | os.PathLike | Sequence[Document]) -> list[Document]:
    """Documents from a path (file, folder, JSONL) or a list; a DataError when they hold no text."""
    docs = load_documents(data) if isinstance(data, (str, os.PathLike)) else list(data)
    if not docs or not any(d.text for d in docs):
        raise DataError("the data holds no text: give documents with text")
    return docs


def cut_corpus(docs: Sequence[Document], tokenizer: Any, max_seq_len: int) -> Corpus:
    """Cut documents into the windows ``qtg eval`` scores, with their byte counts."""
    lengths = token_byte_lengths(tokenizer)
    eos = eos_id(tokenizer)
    chunks, n_bytes, owner = [], [], []
    for d, (doc, ids) in enumerate(zip(docs, encode_batch(tokenizer, [doc.text for doc in docs]))):
        cut = [c for c in windows([eos] + ids, max_seq_len) if len(c) > 1]
        counts = [int(lengths[c[1:]].sum()) for c in cut]
        if counts:
            counts[-1] += doc.n_bytes - sum(counts)  # 0 for a byte-level BPE; keeps totals exact otherwise
        chunks += cut
        n_bytes += counts
        owner += [d] * len(cut)
    return Corpus(windows=chunks, n_bytes=np.array(n_bytes, dtype=np.int64), document=np.array(owner, dtype=np.int64),
                  documents=[doc.name for doc in docs], total_bytes=sum(doc.n_bytes for doc in docs))


def seeded_choice(n: int, k: int | None, seed: int, stream: int = 0) -> np.ndarray:
    """``min(k, n)`` sorted indices of ``range(n)`` drawn without replacement (all of them when k is None);
    ``stream`` keeps draws made for different purposes from one seed independent."""
    if k is None or k >= n:
        return np.arange(n)
    if k < 0:
        raise ExperimentError(f"a sample size must be >= 0, got {k}")
    return np.sort(np.random.default_rng([seed, stream]).choice(n, size=k, replace=False))
