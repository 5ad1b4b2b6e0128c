"""Crash-safe file writes: every file qtg writes goes through :func:`atomic_path`.

A file is written to a temporary sibling (same directory, so the same file
system), flushed to disk (``fsync``), then renamed over the target with
``os.replace``, which POSIX makes atomic; the directory is fsynced so the
rename itself survives a power cut. Whenever the process dies, the target is
either its old complete self or the new complete file, never a torn one; a
killed writer leaves at most a ``.<name>.<random>.tmp`` file beside it, which
the next write does not trip over (each temporary name is unique).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside the directory ``path`` durable (POSIX only; a no-op elsewhere)."""
    if os.name == "posix":
        fsync_file(path)


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """A new empty file with a random name; unlike ``tempfile.mkstemp`` (0600), its mode follows the umask
    (0644 under the usual 022), as a file written with ``open`` would."""
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name for {prefix}*{suffix} in {folder}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write; it replaces ``path`` once the ``with`` block ends without error.

    Args:
        path: the file to (re)place. Its directory must exist.

    Yields:
        A fresh temporary path beside ``path`` (the file exists, empty). Write it by
        name (``save_file(t, str(tmp))``) or open it. If the block raises, the
        temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _new_file(path.parent, f".{path.name}.", ".tmp")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, as UTF-8 (no newline translation); returns ``path``."""
    return atomic_bytes(path, text.encode("utf-8"))


def atomic_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` (CPU, contiguous) as a safetensors file at ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)
