"""Light snapshots of a training run: weights only, 16-bit allowed, one safetensors file per step.

    qtg train --tier micro --out runs/m --steps 120 --snapshot-every 20      # writes them
    snaps = list_snapshots("runs/m")                   # [Snapshot(step=0, path=...), Snapshot(step=20, ...), ...]
    model = load_snapshot(snaps[-1].path)              # a model in eval mode, float32, with the run's tokenizer

Layout::

    <run>/snapshots/step_000020.safetensors

A snapshot is what a model needs and nothing a resume needs (no optimizer,
no RNG: the checkpoints keep those). Its safetensors metadata (strings) holds
``format`` (``qtg-snapshot/1``), ``step``, ``dtype``, ``config`` (the
QTGConfig as JSON, so the file loads as a model on its own) and
``tokenizer``: the run's ``tokenizer.json`` by name, with its SHA-256, so a
replaced tokenizer is caught rather than silently decoding wrong.

Choices:

* **Atomic**: written through :func:`qtg.atomic.atomic_safetensors` (temporary
  sibling, fsync, rename), so a reader polling the folder while the run
  writes (the app's Training tab) sees whole files or none.
* **16-bit**: bfloat16 by default; a bf16 weight is the fp32 one rounded to 8
  significant bits (relative error <= 2**-8), plenty for looking at a run,
  with float32's range (float16 overflows above 65504; the writer refuses a
  non-finite result). Loading widens back to float32 exactly.
* **Which steps**: every multiple of ``checkpoint.snapshot_every`` (step 0,
  the initial weights, included) and the last step of each invocation. A
  resumed run drops snapshots past the checkpoint it resumes from (they belong
  to steps it is about to redo) and continues the series.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from qtg.atomic import atomic_safetensors
from qtg.errors import CheckpointError, ConfigError
from qtg.model.checkpoint import TOKENIZER_FILE, read_tokenizer
from qtg.model.config import QTGConfig
from qtg.model.decoder import DecoderLM
from qtg.model.registry import meta_model
from qtg.training.train_config import SNAPSHOT_DTYPES

SNAPSHOT_DIR = "snapshots"
FORMAT = "qtg-snapshot/1"
DTYPES = {name: getattr(torch, name) for name in SNAPSHOT_DTYPES}  # checkpoint.snapshot_dtype -> torch dtype
_NAME = re.compile(r"^step_(\d{6,})\.safetensors$")


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file of a run."""

    step: int
    path: Path

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent


def snapshot_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``<run_dir>/snapshots/step_XXXXXX.safetensors``."""
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:06d}.safetensors"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter gathered whole (a collective under torchrun), a plain one as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def snapshot_tensors(model: torch.nn.Module, dtype: str = "bfloat16") -> dict[str, torch.Tensor]:
    """Every weight of ``model``, whole, on CPU, in ``dtype``. Under torchrun every rank must call it."""
    if dtype not in DTYPES:
        raise ConfigError(f"snapshot dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return {name: _whole(t).detach().to("cpu", DTYPES[dtype]).contiguous() for name, t in model.state_dict().items()}


def write_snapshot(tensors: dict[str, torch.Tensor], cfg: QTGConfig, run_dir: str | os.PathLike, step: int,
                   dtype: str) -> Path:
    """Write ``tensors`` (from :func:`snapshot_tensors`) as the run's snapshot of ``step``, atomically.

    Args:
        tensors: name -> CPU tensor, as :func:`snapshot_tensors` returns them.
        cfg: the model's config (stored in the metadata).
        run_dir: the training run's folder; its ``tokenizer.json`` is referenced (and hashed) when present.
        step: the training step the weights are at.
        dtype: the name of the tensors' dtype (``bfloat16``, ``float16``, ``float32``).

    Returns:
        The file written.
    """
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:  # a bf16 cast of a large finite weight can overflow in fp16: never write inf
        raise CheckpointError(f"refusing to write the step {step} snapshot: non-finite values in {', '.join(bad[:5])}"
                              f" (in {dtype})")
    path = snapshot_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok = Path(run_dir) / TOKENIZER_FILE
    meta = {"format": FORMAT, "step": str(step), "dtype": dtype, "config": json.dumps(cfg.to_dict(), sort_keys=True),
            "tokenizer": TOKENIZER_FILE if tok.is_file() else "",
            "tokenizer_sha256": file_sha256(tok) if tok.is_file() else ""}
    return atomic_safetensors(tensors, path, metadata=meta)


def list_snapshots(run_dir: str | os.PathLike) -> list[Snapshot]:
    """The run's snapshots, by step (an empty list when it has none). Temporary files are not listed."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [Snapshot(step, path) for step, path in sorted(found)]


def remove_after(run_dir: str | os.PathLike, step: int) -> list[int]:
    """Delete the snapshots past ``step`` (what a killed run wrote after its last checkpoint); their steps."""
    gone = [s for s in list_snapshots(run_dir) if s.step > step]
    for s in gone:
        s.path.unlink(missing_ok=True)
    return [s.step for s in gone]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A snapshot's metadata: ``step`` (int), ``dtype``, ``config`` (a QTGConfig), ``tokenizer``, ``tokenizer_sha256``.

    Raises:
        CheckpointError: not a safetensors file, or not a snapshot (one line naming the file).
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors snapshot ({str(e).splitlines()[0][:200]})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a training snapshot (metadata format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        cfg = QTGConfig.from_dict(json.loads(meta["config"]))
        step = int(meta["step"])
    except (KeyError, ValueError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: bad snapshot metadata ({e})") from None
    return {**meta, "step": step, "config": cfg}


def load_snapshot(path: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> DecoderLM:
    """A snapshot as a model in eval mode, with the run's tokenizer (None when the run kept none).

    Args:
        path: the snapshot file.
        device: where to put the weights.
        dtype: the parameter dtype (16-bit snapshots are widened exactly: every bf16/fp16 value is a float32).

    Returns:
        The model; ``model.checkpoint_dir`` is the snapshot file, ``model.random_weights`` False.

    Raises:
        CheckpointError: a bad file, missing or unexpected tensors, a changed tokenizer.
    """
    path = Path(path)
    meta = read_metadata(path)
    cfg, run_dir = meta["config"], path.parent.parent
    tokenizer = None
    if meta.get("tokenizer"):
        tok_file = run_dir / meta["tokenizer"]
        if not tok_file.is_file() or file_sha256(tok_file) != meta["tokenizer_sha256"]:
            raise CheckpointError(f"{path}: its tokenizer {tok_file} is missing or changed since the snapshot")
        tokenizer = read_tokenizer(run_dir, cfg)
    model = meta_model(cfg, dtype).to_empty(device=device)
    with safe_open(str(path), framework="pt", device="cpu") as f, torch.no_grad():
        expected, stored = set(model.state_dict()), set(f.keys())
        if expected != stored:
            diff = sorted(expected ^ stored)[:5]
            raise CheckpointError(f"{path}: its tensors do not match the config's model (differ in {diff})")
        for name, param in model.state_dict().items():
            t = f.get_tensor(name)
            if t.shape != param.shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, the config needs "
                                      f"{tuple(param.shape)}")
            param.copy_(t)
    model.tokenizer = tokenizer
    model.checkpoint_dir = path
    model.random_weights = False
    return model.eval()
