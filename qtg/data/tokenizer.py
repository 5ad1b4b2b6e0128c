"""Byte-level BPE tokenizer: train, save, load, encode, decode.

Choices:

* **Byte level** (the ``tokenizers`` library's ``ByteLevel`` pre-tokenizer and
  decoder, the GPT-2 scheme): every UTF-8 byte has a token of its own, so any
  text encodes without an unknown token and ``decode(encode(x)) == x`` for
  every string - emoji, CJK, combining marks, control characters, runs of
  spaces and newlines included.
* **No normaliser**: NFC/NFKC or lower-casing would break the round trip.
* **No prefix space**: ``add_prefix_space=False``, so a leading word is not
  given a space that was not in the text.
* **Special tokens** come first in the vocabulary (``<|endoftext|>`` is id 0):
  it separates documents in the training stream (see :mod:`qtg.data.pipeline`).
  ``encode`` leaves special tokens in the text unsplit, so a literal
  ``<|endoftext|>`` inside a document becomes the EOS id; ``decode`` keeps
  special tokens, so the round trip holds for such text too.
* The vocabulary is at least the 256 byte tokens plus the special tokens;
  merges fill the rest up to ``vocab_size`` (fewer when the training text has
  no more pairs that occur ``min_frequency`` times).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qtg.atomic import atomic_text
from qtg.data.documents import Document, load_documents
from qtg.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN,)
N_BYTE_TOKENS = 256

# A str is text, a Path (any os.PathLike) is a file or folder to read with
# qtg.data.documents.load_documents, a Document is its text.
TextSource = str | os.PathLike | Document


def min_vocab_size(special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> int:
    """The smallest vocabulary a byte-level BPE can have: 256 bytes + the special tokens."""
    return N_BYTE_TOKENS + len(special_tokens)


def _iter_texts(sources: TextSource | Iterable[TextSource]) -> Iterator[str]:
    """The texts of ``sources``; paths are read lazily, one document at a time."""
    if isinstance(sources, (str, os.PathLike)) or hasattr(sources, "text"):
        sources = [sources]
    for src in sources:
        if isinstance(src, str):
            yield src
        elif isinstance(src, os.PathLike):
            for doc in load_documents(Path(src)):
                yield doc.text
        elif hasattr(src, "text"):
            yield src.text
        else:
            raise DataError(f"cannot train on a {type(src).__name__}: give text (str), a Path or a Document")


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE: ByteLevel pre-tokenizer and decoder, no normaliser."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    paths_or_texts: TextSource | Iterable[TextSource],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer.

    Args:
        paths_or_texts: text (``str``), a file or folder (``pathlib.Path``; read
            with :func:`qtg.data.documents.load_documents`: ``.txt``, ``.txt.gz``, ``.jsonl``),
            a ``qtg.data.documents.Document``, or an iterable mixing them.
        vocab_size: the largest vocabulary wanted, special tokens included; at
            least ``256 + len(special_tokens)``.
        special_tokens: added first (ids 0, 1, ...); must include ``<|endoftext|>``.
        min_frequency: a pair must occur this often to be merged.
        show_progress: the library's progress bar.

    Returns:
        The trained tokenizer; ``get_vocab_size() <= vocab_size``.

    Raises:
        ConfigError: ``vocab_size`` too small, or no ``<|endoftext|>`` special token.
        DataError: no text, or only empty text, to train on.
    """
    special_tokens = list(special_tokens)
    if EOS_TOKEN not in special_tokens:
        raise ConfigError(f"special_tokens must include {EOS_TOKEN!r}, got {special_tokens}")
    smallest = min_vocab_size(special_tokens)
    if vocab_size < smallest:
        raise ConfigError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                          f"{smallest} (256 byte tokens + {len(special_tokens)} special)")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be >= 1, got {min_frequency}")

    seen = {"chars": 0}

    def counted() -> Iterator[str]:
        # The library consumes the iterator itself; count on the way to detect empty data.
        for text in _iter_texts(paths_or_texts):
            seen["chars"] += len(text)
            if text:
                yield text

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    tok.train_from_iterator(counted(), trainer=trainer)
    if seen["chars"] == 0:
        raise DataError("no text to train the tokenizer on (the data is empty)")
    return tok


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> Path:
    """Write ``tokenizer`` as one JSON file (the ``tokenizers`` format), atomically; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_text(path, tokenizer.to_str(pretty=True))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer JSON written by :func:`save_tokenizer` (or any ``tokenizers`` JSON with an EOS token).

    Raises:
        DataError: the file is missing, is not a tokenizer, or has no ``<|endoftext|>``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for bad JSON
        raise DataError(f"{path} is not a tokenizer JSON file: {e}") from None
    eos_id(tok, where=str(path))
    return tok


def eos_id(tokenizer: Tokenizer, where: str = "tokenizer") -> int:
    """The id of ``<|endoftext|>``; a DataError if the tokenizer has none."""
    i = tokenizer.token_to_id(EOS_TOKEN)
    if i is None:
        raise DataError(f"{where} has no {EOS_TOKEN!r} token; train one with `qtg tokenizer train`")
    return i


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` (no BOS/EOS added)."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, encoded in parallel by the library."""
    return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """The text of ``ids``; special tokens are kept, so ``decode(encode(x)) == x``."""
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def token_strings(tokenizer: Tokenizer, ids: Iterable[int]) -> list[str]:
    """Each id decoded on its own, for labels in figures (one string per token).

    Their concatenation is the text wherever no character is split across tokens;
    a byte-level token holding part of a multi-byte character reads as U+FFFD.
    """
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's JSON: equal fingerprints encode every text alike."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
