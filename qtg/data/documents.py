"""Documents: whole texts read from a file, a JSONL file or a folder of them.

The layer below :mod:`qtg.data.tokenizer` (which trains on documents) and
:mod:`qtg.data.pipeline` (which tokenizes and splits them): a document is a whole work
(one file, or one JSONL record), the unit every split moves.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qtg.errors import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class Document:
    """One whole text: a work, a file or a JSONL record."""

    name: str
    text: str

    @property
    def n_bytes(self) -> int:
        """Length of the text in UTF-8 bytes."""
        return len(self.text.encode("utf-8"))


def default_corpus_path() -> Path:
    """The bundled corpus folder, ``assets/corpus/`` (39 Shakespeare works, ``.txt.gz``; see its PROVENANCE.md)."""
    return Path(__file__).resolve().parents[2] / "assets" / "corpus"


def _kind(path: Path) -> str | None:
    """``"text"``, ``"jsonl"`` or None (not a data file) from the file name."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _strip_suffix(name: str) -> str:
    for suffix in JSONL_SUFFIXES + TEXT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_utf8(path: Path) -> str:
    """The file's text; ``.gz`` files are decompressed. Bytes are kept exactly (no newline translation)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None


def _jsonl_documents(path: Path, prefix: str) -> list[Document]:
    """One Document per non-blank line ``{"text": ..., "name": ... (optional)}``."""
    docs = []
    # split on "\n" only: str.splitlines would also split at U+2028, legal inside a JSON string
    for lineno, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{lineno}: expected an object with a string "text" field, '
                            f"got {type(record).__name__}")
        name = record.get("name")
        docs.append(Document(name if isinstance(name, str) and name else f"{prefix}:{lineno}", record["text"]))
    return docs


def _file_documents(path: Path, name: str) -> list[Document]:
    if _kind(path) == "jsonl":
        return _jsonl_documents(path, name)
    return [Document(name, _read_utf8(path))]


def _data_files(folder: Path) -> list[Path]:
    """Data files under ``folder``, recursively, sorted; hidden files and folders (the cache) skipped."""
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and _kind(p) is not None:
            files.append(p)
    return files


def load_documents(path: str | os.PathLike) -> list[Document]:
    """Read documents from a text file, a JSONL file or a folder of them.

    Args:
        path: a ``.txt``/``.txt.gz`` file (one document; any other name that is
            not ``.jsonl`` is read as text too), a ``.jsonl``/``.jsonl.gz`` file
            (one document per line, ``{"text": str, "name": str (optional)}``),
            or a folder (every ``.txt``, ``.txt.gz``, ``.jsonl``, ``.jsonl.gz``
            under it, recursively, in sorted order).

    Returns:
        Non-empty documents in file order. A file's document is named by its path
        relative to the folder without the suffix (``hamlet``); a JSONL record by
        its ``name`` field, else ``<file>:<line number>``. Empty documents are
        skipped with a warning.

    Raises:
        DataError: missing path, no data files, nothing but empty text, a
            malformed JSONL line (its line number in the message), non-UTF-8
            bytes, or two documents with the same name.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise DataError(f"no data files ({', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}) under {path}")
        docs = [d for f in files for d in _file_documents(f, _strip_suffix(f.relative_to(path).as_posix()))]
    else:
        docs = _file_documents(path, _strip_suffix(path.name))
    kept = [d for d in docs if d.text]
    for d in docs:
        if not d.text:
            log.warning("skipping empty document %r in %s", d.name, path)
    if not kept:
        raise DataError(f"no text in {path}: every document is empty")
    _check_unique([d.name for d in kept], path)
    return kept


def _check_unique(names: Sequence[str], path: Path) -> None:
    dupes = sorted(n for n, count in Counter(names).items() if count > 1)
    if dupes:
        raise DataError(f"duplicate document names in {path}: {', '.join(dupes[:5])} "
                        "(e.g. both a.txt and a.txt.gz, or repeated JSONL 'name' fields)")
