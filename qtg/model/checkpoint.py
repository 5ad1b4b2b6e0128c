"""Checkpoints: save and load a QTG model as safetensors + JSON, never a pickle.

A checkpoint is a directory::

    model.safetensors   every parameter once (the head is tied to embed.table.weight)
    config.json         QTGConfig.to_dict()
    state.json          optional: JSON training state (step, losses, data position, ...)
    tokenizer.json      optional: a ``tokenizers.Tokenizer`` (``Tokenizer.to_str()``)

Design choices:

* **No pickle, ever.** Weights are safetensors (a JSON header and raw bytes),
  everything else is JSON. ``torch.load`` is never called: a ``.pt``/``.bin``
  file, or a ``model.safetensors`` that is really a ``torch.save`` archive, is
  refused with a message saying pickles are not loaded.
* **Crash-safe writes.** A checkpoint is written into a temporary sibling
  directory (each file fsynced) and renamed into place only once complete.
  POSIX cannot rename a directory over a non-empty one, so replacing an older
  checkpoint takes two renames: ``target -> .<name>.old``, then
  ``tmp -> target``, then the old copy is deleted. Whatever moment the
  process dies at, ``target`` is either absent or complete, and when it is
  absent ``.<name>.old`` holds the previous complete checkpoint: the loader
  falls back to it and the next save puts it back. One writer per directory.
* **Validated loads.** Every problem (missing file, corrupt safetensors, bad
  JSON, unknown config field, wrong shape, non-finite weight) is a
  :class:`~qtg.errors.CheckpointError` with one line naming the file. The
  model is built on the ``meta`` device in the target dtype and checked
  against free memory (:func:`qtg.model.builder.check_fits`) before any weight is
  allocated; each weight is then allocated once, in that dtype.
* Loading, which resolves what a user types (a tier name, a checkpoint directory, a training output
  directory, a sharded checkpoint) and puts these pieces together, is :mod:`qtg.model.loading`'s
  (``qtg.load``, ``qtg.load_checkpoint``); writing a sharded checkpoint is :mod:`qtg.distributed.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from torch import nn

from qtg.atomic import atomic_safetensors, atomic_text, fsync_dir
from qtg.errors import CheckpointError, ConfigError
from qtg.model.config import QTGConfig
from qtg.model.decoder import DecoderLM

log = logging.getLogger("qtg")

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
TOKENIZER_FILE = "tokenizer.json"
TRAINER_FILE = "trainer.safetensors"  # in a training checkpoint: optimizer moments and RNG states (qtg.training.train)
SHARDS_DIR = "dcp"  # in a sharded checkpoint: one safetensors file per rank (qtg.distributed.checkpoint)
LATEST = "latest"  # in a training output directory: a checkpoint subdirectory, or a file naming one
FORMAT_VERSION = "1"
# Shipped weights: assets/checkpoints/<tier>/ at the repository root.
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "assets" / "checkpoints"
# Suffixes of pickle-based formats (torch.save, pickle, PyTorch Lightning): refused, never opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTO = b"\x80"  # pickle protocol >= 2 opcode; torch.save's legacy format starts with it
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_NO_PICKLE = "pickles are not loaded (they can run code); save the weights as safetensors"


# --- saving ------------------------------------------------------------------------


def save_checkpoint(
    model: DecoderLM,
    directory: str | os.PathLike,
    *,
    extra_state: dict[str, Any] | None = None,
    tokenizer_json: str | None = None,
) -> Path:
    """Write ``model`` as a checkpoint directory, atomically.

    Args:
        model: the model; its weights are copied to CPU as they are (any dtype).
        directory: the checkpoint directory. An existing checkpoint there is
            replaced only once the new one is complete; an existing directory
            that is not a checkpoint is refused, not overwritten.
        extra_state: JSON-serialisable training state, written to ``state.json``.
        tokenizer_json: a tokenizer as JSON text (``Tokenizer.to_str()``);
            defaults to ``model.tokenizer`` when one is attached.

    Returns:
        The checkpoint directory's path.
    """
    target = Path(directory)
    # Serialise everything first: a bad state or tokenizer fails before the disk is touched.
    blobs = {CONFIG_FILE: _json_text(model.cfg.to_dict(), CONFIG_FILE)}
    if extra_state is not None:
        if not isinstance(extra_state, dict):
            raise CheckpointError(f"extra_state must be a dict, got {type(extra_state).__name__}")
        blobs[STATE_FILE] = _json_text(extra_state, STATE_FILE)
    if tokenizer_json is None and hasattr(model.tokenizer, "to_str"):
        tokenizer_json = model.tokenizer.to_str()  # keep the model's tokenizer with its weights
    if tokenizer_json is not None:
        _parse_json(tokenizer_json, TOKENIZER_FILE)
        blobs[TOKENIZER_FILE] = tokenizer_json
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}

    target.parent.mkdir(parents=True, exist_ok=True)
    _prepare_target(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        atomic_safetensors(tensors, tmp / MODEL_FILE, metadata={"format": "pt", "qtg_format": FORMAT_VERSION})
        for name, text in blobs.items():
            atomic_text(tmp / name, text)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _old_path(target: Path) -> Path:
    """Where the previous checkpoint waits while the new one is renamed into place."""
    return target.with_name(f".{target.name}.old")


def _prepare_target(target: Path) -> None:
    """Finish or clean up after an interrupted save; refuse to replace a non-checkpoint."""
    old = _old_path(target)
    if not target.exists() and (old / MODEL_FILE).is_file():
        os.rename(old, target)  # killed between the two renames: put the previous checkpoint back
    elif old.exists():
        shutil.rmtree(old)  # killed before the old copy was deleted; target is complete
    for stale in target.parent.iterdir():
        if stale.name.startswith(f".{target.name}.tmp-"):
            shutil.rmtree(stale, ignore_errors=True)  # half-written by a killed writer
    if target.is_file() or target.is_symlink():
        raise CheckpointError(f"cannot save a checkpoint to {target}: a file or symlink is in the way")
    if target.is_dir() and any(target.iterdir()) and not (target / MODEL_FILE).is_file():
        raise CheckpointError(f"refusing to save a checkpoint over {target}: it exists and is not a checkpoint "
                              f"(no {MODEL_FILE}); choose an empty or new directory")


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the complete ``tmp`` to ``target``; ``target`` is never a partial checkpoint."""
    if target.exists():
        old = _old_path(target)
        os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)
    fsync_dir(target.parent)


def _json_text(obj: Any, name: str) -> str:
    try:
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: cannot be written as JSON: {e}") from None


# --- reading (qtg.model.loading puts the pieces together) --------------------------


def read_config(directory: str | os.PathLike) -> QTGConfig:
    """The QTGConfig of a checkpoint directory; CheckpointError names config.json if it is bad."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint needs {MODEL_FILE} and {CONFIG_FILE}")
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config fields, got {type(data).__name__}")
    try:
        return QTGConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The training state saved with a checkpoint (``state.json``), or None if there is none."""
    path = checkpoint_dir(Path(directory)) / STATE_FILE
    if not path.is_file():
        return None
    return read_json(path)


def checkpoint_dir(path: Path) -> Path:
    """The checkpoint directory ``path`` names, refusing pickles and absent directories."""
    if is_pickle_path(path):
        raise CheckpointError(f"{path}: a {path.suffix} file is a pickle; {_NO_PICKLE}")
    if path.is_file():
        if path.name != MODEL_FILE:
            raise CheckpointError(f"{path}: not a checkpoint; give the directory holding {MODEL_FILE} "
                                  f"and {CONFIG_FILE}")
        path = path.parent
    if not path.is_dir():
        old = _old_path(path)
        if (old / MODEL_FILE).is_file():
            log.warning("checkpoint %s is absent: a save was interrupted; loading the previous one from %s",
                        path, old)
            return old
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not (path / MODEL_FILE).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{path}: holds {', '.join(pickles)} but no {MODEL_FILE}; {_NO_PICKLE}")
        raise CheckpointError(f"{path / MODEL_FILE}: missing; a checkpoint needs {MODEL_FILE} and {CONFIG_FILE}")
    return path


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` on ``path`` (header validated, nothing read yet); pickles and corrupt files refused."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO):
        raise CheckpointError(f"{path}: is a torch.save/pickle file, not safetensors; {_NO_PICKLE}")
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_first_line(e)})") from None
    with f:
        yield f


def stored_dtype(f: Any, path: Path) -> torch.dtype:
    """The dtype the weights were saved in (read from the header)."""
    names = {f.get_slice(k).get_dtype() for k in f.keys()}
    unknown = sorted(n for n in names if n not in _SAFETENSORS_FLOATS)
    if not names or unknown:
        raise CheckpointError(f"{path}: expected floating-point weights, found dtypes {sorted(names)}")
    # save_checkpoint writes one dtype; a file with several loads at the widest.
    return max((_SAFETENSORS_FLOATS[n] for n in names), key=lambda d: torch.finfo(d).bits)


def default_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a checkpoint loads in when none is asked for: as stored, but float32 for 16-bit
    weights on a CPU, whose 16-bit matmuls are slow and whose results the explorer compares in float32."""
    if torch.device(device).type == "cpu" and torch.finfo(stored).bits == 16:
        return torch.float32
    return stored


def check_names_and_shapes(model: nn.Module, f: Any, path: Path) -> None:
    """The stored tensor names and shapes against the (meta) model that config.json describes."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = set(f.keys())
    missing = sorted(set(expected) - stored)
    unexpected = sorted(stored - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensor(s) that {CONFIG_FILE} needs: {_few(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} tensor(s) this model does not have: {_few(unexpected)}")
    for name, shape in expected.items():
        got = tuple(f.get_slice(name).get_shape())
        if got != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {got}, {CONFIG_FILE} needs {shape}")


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_tokenizer(ckpt: str | os.PathLike, cfg: QTGConfig) -> Tokenizer | None:
    """The checkpoint's ``tokenizers.Tokenizer``, or None when it has no tokenizer.json.

    Raises:
        CheckpointError: the file is not a tokenizer, or has more tokens than ``cfg.vocab_size``.
    """
    path = Path(ckpt) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
        raise CheckpointError(f"{path}: not a valid tokenizer ({_first_line(e)})") from None
    if tok.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tok.get_vocab_size()} tokens, more than the "
                              f"model's vocab_size {cfg.vocab_size}")
    return tok


def read_json(path: Path) -> Any:
    """A JSON file's content; CheckpointError names the file if it is not UTF-8 JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not valid JSON (not UTF-8 text)") from None
    return _parse_json(text, str(path))


def _parse_json(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{name}: not valid JSON ({e})") from None


def is_pickle_path(path: Path) -> bool:
    """A .pt/.bin/... path (judged by its name alone: it is never opened)."""
    return path.suffix.lower() in PICKLE_SUFFIXES and not path.is_dir()


def is_checkpoint(path: Path) -> bool:
    """A checkpoint directory, its model file, or one whose save was interrupted (``.<name>.old``)."""
    if path.is_file():
        return path.name == MODEL_FILE
    return (path / MODEL_FILE).is_file() or (not path.exists() and (_old_path(path) / MODEL_FILE).is_file())


# --- sharded checkpoints (written by torchrun ranks), read in one process ----------------------


def is_sharded(path: str | os.PathLike) -> bool:
    """A sharded (DCP) checkpoint directory: its weights are in ``dcp/``, one file per rank."""
    return (Path(path) / SHARDS_DIR).is_dir()


def sharded_checkpoint(name_or_dir: str | os.PathLike) -> Path | None:
    """The sharded checkpoint ``name_or_dir`` names (itself, or a run directory's ``latest``), or None."""
    path = Path(name_or_dir)
    if is_sharded(path):
        return path
    pointer = path / LATEST
    if pointer.is_file():
        target = path / pointer.read_text(encoding="utf-8").strip()
        if is_sharded(target):
            return target
    return None


def read_train_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON training state of a sharded or single-file checkpoint (``state.json``), or None."""
    if not is_sharded(path):
        return read_state(path)
    file = Path(path) / STATE_FILE
    return read_json(file) if file.is_file() else None


def dcp_load(state_dict: dict[str, Any], path: str | os.PathLike) -> None:
    """Read ``state_dict``'s tensors in place from the shards in ``path/dcp``, with or without a process group.

    DCP asks for the slices each tensor of ``state_dict`` covers and casts them
    to its dtype, so any number of ranks (one plain process included) reads a
    checkpoint that any number wrote.
    """
    import torch.distributed as dist  # torch.distributed.checkpoint is a heavy import: only when reading shards
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # without a process group DCP warns that it reads in one process: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state_dict, storage_reader=dcp.HuggingFaceStorageReader(str(Path(path) / SHARDS_DIR)),
                 no_dist=not dist.is_initialized())


def load_sharded(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a sharded checkpoint's weights into a sharded or plain model, in place, at any world size."""
    msd = model.state_dict()
    dcp_load({"model": msd}, path)
    model.load_state_dict(msd)
