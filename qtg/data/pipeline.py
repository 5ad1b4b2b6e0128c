"""Training data: documents, a token cache, whole-document splits, resumable batches.

The pipeline, each step a function of its own::

    docs = load_documents(path)                    # [Document(name, text)] from a file, folder or JSONL
    train, val, test = split_documents(docs, val_fraction=0.1, test_fraction=0.1, seed=0)   # whole documents only
    data = prepare_data(path, tokenizer)           # all of the above + the token cache -> DataSplits
    loader = data.train.loader(seq_len=256, batch_size=16, seed=0)
    x, y = loader.next_batch()                     # int64 [B, N]; y is x shifted left by one

Choices:

* **A document is a whole work** (one file, or one JSONL record). Splits move
  whole documents, never a cut text, so validation text is text the model
  never saw. The validation fraction counts UTF-8 *bytes*, not documents:
  works differ thirty-fold in length (a 2 KB poem, a 175 KB play).
* **Token stream**: each document's ids followed by one ``<|endoftext|>``;
  windows run across document boundaries, the EOS tells the model where one
  work ends (and, when sampling, acts as a start-of-text marker).
* **Cache**: the ids of *all* documents (the split is chosen afterwards, so a
  new split seed reuses it) are written once as ``tokens-<key>.npy`` and read
  back with ``numpy.load(mmap_mode="r")``. ``<key>`` hashes the documents'
  names and content and the tokenizer's JSON, so changing either makes a new
  file; a ``.json`` beside it holds names, offsets and byte counts and is
  written last, so a half-written cache is never taken for a whole one.
  Default place: ``.qtg_cache/`` next to the data, or the user cache folder
  (``$XDG_CACHE_HOME/qtg``, else ``~/.cache/qtg``) when that is read-only.
* **Windows**: ``seq_len + 1`` tokens starting every ``stride`` tokens; the
  input is the first ``seq_len``, the target the last ``seq_len``. Training
  shuffles windows with a permutation that depends only on ``(seed, epoch)``,
  so a loader's position is two integers and resuming is exact.
* **Bits per byte** need the raw byte count of each split: ``TokenSplit.n_bytes``
  (UTF-8 bytes of the documents' text; EOS tokens add no bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer

from qtg.atomic import atomic_path, atomic_text
from qtg.data.documents import Document, default_corpus_path, load_documents
from qtg.data.tokenizer import encode_batch, eos_id, tokenizer_fingerprint
from qtg.errors import ConfigError, DataError
from qtg.metrics import bits_per_byte

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the cache layout changes: old files are then ignored
CACHE_DIRNAME = ".qtg_cache"
# Documents are read by qtg.data.documents; these names stay importable from here (qtg.data.pipeline.load_documents).
__all__ = [
    "Document", "default_corpus_path", "load_documents", "WorkSplit", "split_documents", "TokenizedDocuments",
    "data_fingerprint", "cache_key", "tokenize_documents", "user_cache_dir", "resolve_cache_dir", "TokenSplit",
    "make_split", "DataSplits", "prepare_data", "WindowLoader",
]


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------
class WorkSplit(NamedTuple):
    """Documents split three ways, whole works only: fit on ``train``, choose on ``val``, report ``test``."""

    train: list[Document]
    val: list[Document]
    test: list[Document]


def split_documents(
    docs: Sequence[Document],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    val_names: Sequence[str] | None = None,
    test_names: Sequence[str] | None = None,
) -> WorkSplit:
    """Split documents into training, validation and test sets, whole documents only.

    Held-out figures must be held out from every choice: the validation set picks
    checkpoints and hyper-parameters, and the test set is only ever reported.

    Args:
        docs: the documents, e.g. from :func:`load_documents`.
        val_fraction, test_fraction: documents are drawn in one random order
            fixed by ``seed``; the test set takes documents until it holds at
            least ``test_fraction`` of all UTF-8 bytes, then the validation set
            until it holds ``val_fraction``. ``test_fraction = 0`` gives no test set.
        seed: fixes the draw; the same seed and documents give the same split,
            whatever order the documents come in.
        val_names, test_names: the documents by name (override the fractions).

    Returns:
        ``WorkSplit(train, val, test)``, each in the order of ``docs``.

    Raises:
        ConfigError: a fraction outside its range.
        DataError: an unknown name, a document named twice, or an empty training or validation split.
    """
    known = {d.name for d in docs}
    order = _seeded_order(docs, seed)
    how = f"val_fraction={val_fraction}, test_fraction={test_fraction}, seed={seed}"
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if test_names is not None:
        test_set = _named(test_names, known, "test")
    else:
        test_set = _draw_by_bytes(docs, order, test_fraction)
    if val_names is not None:
        val_set = _named(val_names, known, "validation")
        how = f"val_names={sorted(val_set)}"
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
        val_set = _draw_by_bytes(docs, [n for n in order if n not in test_set], val_fraction)
    both = sorted(val_set & test_set)
    if both:
        raise DataError(f"document(s) in both the validation and the test split: {', '.join(both)}")
    train = [d for d in docs if d.name not in val_set | test_set]
    val = [d for d in docs if d.name in val_set]
    test = [d for d in docs if d.name in test_set]
    for split_name, split in (("training", train), ("validation", val)):
        if not split:
            raise DataError(f"the {split_name} split is empty ({len(docs)} document(s), {how}); "
                            "splits take whole documents, so at least 2 are needed (3 with a test split)")
    return WorkSplit(train, val, test)


def _named(names: Sequence[str], known: set[str], what: str) -> set[str]:
    chosen = set(names)
    unknown = sorted(chosen - known)
    if unknown:
        some = ", ".join(sorted(known)[:8])
        raise DataError(f"unknown {what} document(s): {', '.join(unknown)}; documents include: {some}")
    return chosen


def _seeded_order(docs: Sequence[Document], seed: int) -> list[str]:
    """Document names in an order fixed by ``seed`` alone, whatever order ``docs`` come in."""
    order = sorted(d.name for d in docs)
    random.Random(seed).shuffle(order)
    return order


def _draw_by_bytes(docs: Sequence[Document], order: Sequence[str], fraction: float) -> set[str]:
    """Names taken in ``order`` until they hold ``fraction`` of all documents' bytes."""
    sizes = {d.name: d.n_bytes for d in docs}
    target, total, chosen = fraction * sum(sizes.values()), 0, set()
    for name in order:
        if total >= target:
            break
        chosen.add(name)
        total += sizes[name]
    return chosen


# --------------------------------------------------------------------------------------------
# tokenizing, cached
# --------------------------------------------------------------------------------------------
@dataclass
class TokenizedDocuments:
    """Token ids of documents: ``tokens[offsets[i]:offsets[i + 1]]`` is document ``i`` (no EOS)."""

    names: list[str]
    tokens: np.ndarray  # [T] uint16/uint32, a read-only memmap when read from the cache
    offsets: np.ndarray  # [D + 1] int64
    n_bytes: list[int]
    eos_id: int
    cache_path: Path | None = None  # the .npy file, None when not cached
    from_cache: bool = False

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


def data_fingerprint(docs: Sequence[Document]) -> str:
    """sha256 of the documents' names and texts, in order."""
    h = hashlib.sha256()
    for d in docs:
        raw = d.text.encode("utf-8")
        # lengths first, so no two different lists hash the same bytes
        h.update(f"{len(d.name)}:{d.name}:{len(raw)}:".encode())
        h.update(raw)
    return h.hexdigest()


def cache_key(docs: Sequence[Document], tokenizer: Tokenizer) -> str:
    """The cache file key: data content x tokenizer JSON x cache layout version."""
    raw = f"v{CACHE_VERSION}:{data_fingerprint(docs)}:{tokenizer_fingerprint(tokenizer)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The one place text becomes ids (a separate function so tests can count calls)."""
    return encode_batch(tokenizer, texts)


def _tokenize(docs: Sequence[Document], tokenizer: Tokenizer) -> TokenizedDocuments:
    ids = _encode_texts(tokenizer, [d.text for d in docs])
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    dtype = _token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    tokens = np.concatenate([np.asarray(x, dtype=dtype) for x in ids]) if ids else np.empty(0, dtype)
    return TokenizedDocuments([d.name for d in docs], tokens, offsets, [d.n_bytes for d in docs],
                              eos_id(tokenizer))


def _write_cache(td: TokenizedDocuments, npy: Path, meta_path: Path, key: str) -> None:
    meta = {"version": CACHE_VERSION, "key": key, "names": td.names, "offsets": td.offsets.tolist(),
            "n_bytes": td.n_bytes, "eos_id": td.eos_id, "dtype": td.tokens.dtype.name}
    with atomic_path(npy) as tmp, open(tmp, "wb") as fh:  # readers never see half a file
        np.save(fh, td.tokens)
    atomic_text(meta_path, json.dumps(meta))  # last: marks the cache complete


def _read_cache(npy: Path, meta_path: Path, docs: Sequence[Document]) -> TokenizedDocuments | None:
    """The cached ids, or None if the files are missing or do not match ``docs``."""
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tokens = np.load(npy, mmap_mode="r")
        offsets = np.asarray(meta["offsets"], dtype=np.int64)
        ok = (meta["version"] == CACHE_VERSION and meta["names"] == [d.name for d in docs]
              and len(tokens) == offsets[-1] and tokens.dtype.name == meta["dtype"])
    except (OSError, ValueError, KeyError, IndexError) as e:
        log.warning("ignoring unreadable token cache %s (%s)", npy, e)
        return None
    if not ok:
        log.warning("ignoring token cache %s: it does not match the data", npy)
        return None
    return TokenizedDocuments(meta["names"], tokens, offsets, meta["n_bytes"], meta["eos_id"], npy, True)


def tokenize_documents(
    docs: Sequence[Document], tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None
) -> TokenizedDocuments:
    """Token ids of every document, read from or written to ``cache_dir``.

    Args:
        docs: the documents.
        tokenizer: any tokenizer with ``<|endoftext|>``.
        cache_dir: where ``tokens-<key>.npy`` and ``tokens-<key>.json`` live
            (created if needed); None tokenizes in memory and writes nothing.

    Returns:
        The ids; ``from_cache`` says whether the cache was used (no tokenizing).
    """
    if cache_dir is None:
        return _tokenize(docs, tokenizer)
    cache_dir = Path(cache_dir)
    key = cache_key(docs, tokenizer)
    npy, meta_path = cache_dir / f"tokens-{key}.npy", cache_dir / f"tokens-{key}.json"
    cached = _read_cache(npy, meta_path, docs)
    if cached is not None:
        log.info("token cache hit: %s", npy)
        return cached
    td = _tokenize(docs, tokenizer)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_cache(td, npy, meta_path, key)
    except OSError as e:
        raise DataError(f"cannot write the token cache in {cache_dir}: {e}; pass another cache_dir") from None
    log.info("token cache written: %s (%d tokens)", npy, len(td.tokens))
    td.cache_path = npy
    return td


def _is_writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/qtg``, else ``~/.cache/qtg``: the cache when the data's folder is read-only."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qtg"


def resolve_cache_dir(data_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``.qtg_cache/`` next to the data, else the user cache.

    Raises:
        DataError: an explicit ``cache_dir`` that cannot be written.
    """
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        if not _is_writable(cache_dir):
            raise DataError(f"cache folder is not writable: {cache_dir}")
        return cache_dir
    data_path = Path(data_path)
    beside = (data_path if data_path.is_dir() else data_path.parent) / CACHE_DIRNAME
    if _is_writable(beside):
        return beside
    fallback = user_cache_dir()
    log.info("%s is read-only; caching tokens in %s", beside.parent, fallback)
    if not _is_writable(fallback):
        raise DataError(f"neither {beside} nor {fallback} is writable; pass a cache folder")
    return fallback


# --------------------------------------------------------------------------------------------
# splits as token streams
# --------------------------------------------------------------------------------------------
@dataclass
class TokenSplit:
    """One split as a token stream: every document's ids followed by one EOS."""

    name: str  # "train", "val" or "test"
    doc_names: list[str]
    tokens: np.ndarray  # [T] uint16/uint32
    n_bytes: int  # UTF-8 bytes of the documents' text (EOS adds none)
    eos_id: int

    @property
    def n_tokens(self) -> int:
        return int(len(self.tokens))

    @property
    def bytes_per_token(self) -> float:
        """Compression of this split: text bytes per token (EOS tokens counted as tokens)."""
        return self.n_bytes / self.n_tokens

    def bits_per_byte(self, nll_per_token: float) -> float:
        """Bits per byte from a mean loss in nats per token over this split's tokens.

        Equals the summed NLL of every token (in bits) over the text bytes when
        ``nll_per_token`` is the mean over all ``n_tokens`` predictions.
        """
        return bits_per_byte(nll_per_token * self.n_tokens, self.n_bytes)

    def loader(self, seq_len: int, batch_size: int, **kwargs: Any) -> WindowLoader:
        """A :class:`WindowLoader` over this split (``stride``, ``shuffle``, ``seed``, ``drop_last``)."""
        return WindowLoader(self.tokens, seq_len, batch_size, **kwargs)


def make_split(name: str, td: TokenizedDocuments, doc_names: Sequence[str]) -> TokenSplit:
    """The stream of ``doc_names`` (in that order) from tokenized documents, EOS after each."""
    where = td.index()
    rows = [where[n] for n in doc_names]
    lengths = [int(td.offsets[i + 1] - td.offsets[i]) + 1 for i in rows]
    out = np.empty(sum(lengths), dtype=td.tokens.dtype)
    pos = 0
    for i, n in zip(rows, lengths):
        out[pos: pos + n - 1] = td.tokens[td.offsets[i]: td.offsets[i + 1]]
        out[pos + n - 1] = td.eos_id
        pos += n
    return TokenSplit(name, list(doc_names), out, sum(td.n_bytes[i] for i in rows), td.eos_id)


@dataclass
class DataSplits:
    """What :func:`prepare_data` returns: the splits and where their ids came from."""

    train: TokenSplit
    val: TokenSplit
    test: TokenSplit | None  # None when no test fraction was asked for
    cache_path: Path | None
    from_cache: bool
    data_path: Path
    seed: int

    def summary(self) -> dict[str, Any]:
        """Plain numbers for logs and reports."""
        split = {s.name: {"documents": len(s.doc_names), "tokens": s.n_tokens, "bytes": s.n_bytes,
                          "bytes_per_token": round(s.bytes_per_token, 4)}
                 for s in (self.train, self.val, self.test) if s is not None}
        cache = str(self.cache_path) if self.cache_path else None
        return {"data": str(self.data_path), "seed": self.seed, **split, "val_documents": self.val.doc_names,
                "test_documents": self.test.doc_names if self.test else [],
                "cache": cache, "from_cache": self.from_cache}


def prepare_data(
    path: str | os.PathLike | None,
    tokenizer: Tokenizer,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    val_names: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> DataSplits:
    """Load, split and tokenize (through the cache) in one call.

    Args:
        path: data file or folder (see :func:`load_documents`); None is the bundled corpus.
        tokenizer: a tokenizer with ``<|endoftext|>``.
        val_fraction, test_fraction, seed, val_names: the split (see :func:`split_documents`).
        cache_dir: the token cache folder (see :func:`resolve_cache_dir`).
        use_cache: False tokenizes in memory and writes nothing.

    Returns:
        ``DataSplits(train, val, test, cache_path, from_cache, data_path, seed)``.
    """
    path = default_corpus_path() if path is None else Path(path)
    docs = load_documents(path)
    works = split_documents(docs, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                            val_names=val_names)
    cache = resolve_cache_dir(path, cache_dir) if use_cache else None
    td = tokenize_documents(docs, tokenizer, cache)
    test = make_split("test", td, [d.name for d in works.test]) if works.test else None
    return DataSplits(make_split("train", td, [d.name for d in works.train]),
                      make_split("val", td, [d.name for d in works.val]), test, td.cache_path, td.from_cache,
                      path, seed)


# --------------------------------------------------------------------------------------------
# windows and batches
# --------------------------------------------------------------------------------------------
class WindowLoader:
    """Fixed-length windows over a token stream, in batches, resumable exactly.

    Window ``w`` covers ``tokens[w * stride : w * stride + seq_len + 1]``; its
    input is the first ``seq_len`` ids and its target the last ``seq_len``
    (the input shifted left by one). Windows that would run past the end are
    not made. With ``shuffle``, epoch ``e`` visits windows in the order of a
    permutation drawn from ``(seed, e)`` alone, so the batch at position
    ``(epoch, index)`` never depends on what came before it.

    Two ways to read it:

    * ``for x, y in loader:`` the rest of the current epoch (a new ``for``
      starts the next epoch once this one is finished);
    * ``loader.next_batch()``: endless, rolling over to the next epoch.

    ``state_dict()`` is the position of the next batch; a new loader over the
    same stream with ``load_state_dict(state)`` yields exactly the batches the
    first one would have yielded next.

    For evaluation use ``stride=seq_len, shuffle=False, drop_last=False``:
    every token after the first is then a target exactly once, except the tail
    after the last whole window (fewer than ``seq_len`` tokens).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *, stride: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True) -> None:
        """Args:
            tokens: ``[T]`` token ids (any integer dtype; a memmap is fine).
            seq_len: N, the window length (input and target).
            batch_size: B, windows per batch.
            stride: tokens between window starts (default ``seq_len``: no
                window predicts a token twice; smaller strides overlap).
            shuffle: draw windows in a seeded random order each epoch.
            seed: the shuffle seed.
            drop_last: drop the last, short batch of each epoch.

        Raises:
            ConfigError: a non-positive ``seq_len``, ``batch_size`` or ``stride``.
            DataError: the stream is too short for one window (or one batch with ``drop_last``).
        """
        stride = seq_len if stride is None else stride
        for arg, value in (("seq_len", seq_len), ("batch_size", batch_size), ("stride", stride)):
            if value < 1:
                raise ConfigError(f"{arg} must be >= 1, got {value}")
        self.tokens, self.seq_len, self.batch_size, self.stride = tokens, seq_len, batch_size, stride
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        n = len(tokens)
        self.n_windows = (n - seq_len - 1) // stride + 1 if n >= seq_len + 1 else 0
        if self.n_windows == 0:
            raise DataError(f"the token stream has {n} tokens, too few for one window of seq_len + 1 = "
                            f"{seq_len + 1}; use a shorter seq_len or more data")
        if drop_last and self.n_windows < batch_size:
            raise DataError(f"only {self.n_windows} windows (seq_len {seq_len}, stride {stride}), fewer than "
                            f"batch_size {batch_size}; lower one of them or pass drop_last=False")
        self.epoch, self.index = 0, 0  # position of the next batch
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.n_windows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def order(self, epoch: int) -> np.ndarray:
        """Window numbers in the order epoch ``epoch`` visits them: ``[n_windows]`` int64."""
        if epoch != self._order_epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows, dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at a position, without moving: ``(input, target)``, int64 ``[B, N]``.

        The last batch of an epoch has fewer rows when ``drop_last`` is False.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches per epoch")
        windows = self.order(epoch)[index * self.batch_size: (index + 1) * self.batch_size]
        rows = (windows * self.stride)[:, None] + np.arange(self.seq_len + 1)  # [B, N + 1] positions
        w = torch.from_numpy(np.asarray(self.tokens[rows], dtype=np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def _roll_over(self) -> None:
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, moving on to the next epoch when this one is done."""
        self._roll_over()
        out = self.batch(self.epoch, self.index)
        self.index += 1  # before returning: a state saved now points at the following batch
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._roll_over()
        while self.index < len(self):
            yield self.next_batch()

    # --- resuming -----------------------------------------------------------------------------
    def _shape(self) -> dict[str, Any]:
        return {"n_windows": self.n_windows, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "stride": self.stride, "shuffle": self.shuffle, "seed": self.seed, "drop_last": self.drop_last}

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch and the settings it is valid for (plain ints and bools)."""
        return {"epoch": self.epoch, "index": self.index, **self._shape()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position.

        Raises:
            DataError: the state was saved by a loader with other settings or
                another stream length (its batches would differ).
        """
        diff = [f"{k}: saved {state.get(k)!r}, here {v!r}" for k, v in self._shape().items() if state.get(k) != v]
        if diff:
            raise DataError("loader state does not match this loader (" + "; ".join(diff) + ")")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self):
            raise DataError(f"loader state position out of range: epoch {epoch}, index {index}")
        self.epoch, self.index = epoch, index

    @property
    def step(self) -> int:
        """Batches served since epoch 0, index 0."""
        return self.epoch * len(self) + self.index
