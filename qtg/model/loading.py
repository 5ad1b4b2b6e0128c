"""``qtg.load``: a name resolved once into a config and a weights path, the fit checked once, the model built,
then its weights read.

    load(name) = load_source(locate(name))

* :func:`locate` turns what a user types (a tier name, a checkpoint directory, a training output directory
  holding ``latest``, a sharded checkpoint) into a :class:`Source`: the config (config.json's or the tier's,
  read once) and where the weights are (None: a tier without shipped weights, random weights).
* :func:`load_source` checks the fit (:func:`qtg.model.builder.check_fits`) once, builds the model on ``meta``
  in the target dtype, allocates each weight once and reads it (or draws it from seed 0).

The file format itself (what a checkpoint holds, how it is written and each piece read) is
:mod:`qtg.model.checkpoint`'s.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qtg.errors import CheckpointError, ConfigError
from qtg.model.builder import check_fits, resolve_device, resolve_dtype
from qtg.model.checkpoint import (
    CONFIG_FILE,
    LATEST,
    MODEL_FILE,
    SHARDS_DIR,
    SHIPPED_DIR,
    check_names_and_shapes,
    checkpoint_dir,
    default_dtype,
    is_checkpoint,
    is_pickle_path,
    is_sharded,
    load_sharded,
    open_safetensors,
    read_config,
    read_tokenizer,
    sharded_checkpoint,
    stored_dtype,
)
from qtg.model.config import QTGConfig
from qtg.model.decoder import DecoderLM
from qtg.model.registry import meta_model
from qtg.model.tiers import TIERS, get_tier

log = logging.getLogger("qtg")


def load_checkpoint(
    directory: str | os.PathLike,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
) -> DecoderLM:
    """Load a checkpoint directory written by :func:`save_checkpoint`.

    Args:
        directory: the checkpoint directory (or its ``model.safetensors``).
        device: "cpu", "cuda", "auto", ...
        dtype: parameter dtype; None keeps the dtype the weights were saved in,
            except that 16-bit weights on a CPU are computed in float32 (the
            shipped checkpoints are stored in bfloat16 only to be small).

    Returns:
        The model in eval mode, with ``model.tokenizer`` (a ``tokenizers.Tokenizer``
        or None), ``model.checkpoint_dir`` and ``model.random_weights = False``.

    Raises:
        CheckpointError: one line naming the file at fault.
    """
    return load_source(_checkpoint_source(Path(directory)), device, dtype)


@dataclass(frozen=True)
class Source:
    """What a name given to :func:`load` resolves to, before anything is built or read.

    Attributes:
        cfg: the model's configuration (config.json's, or the tier's).
        weights: the checkpoint directory holding its weights; None for a tier without shipped weights
            (random weights).
        sharded: the weights are a sharded (torchrun) checkpoint, ``weights/dcp/``.
    """

    cfg: QTGConfig
    weights: Path | None = None
    sharded: bool = False


def load(
    name_or_dir: str | os.PathLike,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
) -> DecoderLM:
    """A model from whatever a user names, in one pass: :func:`locate` resolves the name once into a config and
    a weights path, :func:`load_source` checks the fit once, builds the model and reads the weights.

    Tried in order:

    1. a checkpoint directory (holding ``model.safetensors``), or a ``.pt``/``.bin``
       path, which is refused as a pickle; a sharded (torchrun) checkpoint or run
       directory is read whole into this process (``qtg export`` makes it one file);
    2. a training output directory holding ``latest``: a checkpoint subdirectory,
       or a text file naming one (relative to the output directory);
    3. a tier name: its shipped weights under ``assets/checkpoints/<tier>/``;
       without them, random weights, a logged warning and
       ``model.random_weights = True``.

    Args:
        name_or_dir: tier name or path.
        device: "cpu", "cuda", "auto", ...
        dtype: parameter dtype; None keeps a checkpoint's dtype (float32 for 16-bit weights on a
            CPU, and for random weights).

    Returns:
        The model, with ``model.random_weights`` telling whether it was trained.

    Raises:
        CheckpointError: nothing matched (the message lists what was looked for),
            or the matching checkpoint is bad.
    """
    return load_source(locate(name_or_dir), device, dtype)


def locate(name_or_dir: str | os.PathLike) -> Source:
    """Resolve what a user names into a :class:`Source`, reading one config (config.json or the tier's) and no
    weights. The order is :func:`load`'s."""
    path = Path(name_or_dir)
    if is_pickle_path(path) or is_checkpoint(path):
        return _checkpoint_source(path)
    sharded = sharded_checkpoint(path) if path.is_dir() else None
    if sharded is not None:  # written by torchrun ranks: read whole into this process
        return Source(read_config(sharded), sharded, sharded=True)
    if path.is_dir() and (path / LATEST).exists():
        return _checkpoint_source(_resolve_latest(path))
    name = str(name_or_dir)
    for shipped in dict.fromkeys((name, name.strip().lower())):  # shipped weights, tiers and baselines alike
        if is_checkpoint(SHIPPED_DIR / shipped):
            return _checkpoint_source(SHIPPED_DIR / shipped)
    try:
        cfg = get_tier(name)
    except ConfigError:
        raise CheckpointError(
            f"cannot load {name!r}: it is not a checkpoint directory ({MODEL_FILE} + {CONFIG_FILE}), "
            f"not a training output directory (with '{LATEST}') and not a tier ({', '.join(TIERS)})"
        ) from None
    return Source(cfg)


def _checkpoint_source(path: Path) -> Source:
    """The single-file checkpoint ``path`` names (pickles and absent directories refused), with its config."""
    ckpt = checkpoint_dir(path)
    return Source(read_config(ckpt), ckpt)


def load_source(source: Source, device: str | torch.device | None = "cpu",
                dtype: str | torch.dtype | None = None) -> DecoderLM:
    """Build the model ``source`` describes and fill it: its fit checked once, before any weight is allocated;
    each weight then allocated once, in ``dtype``, and read (or drawn from seed 0 for random weights).

    Args: ``device`` and ``dtype`` as :func:`load`'s.
    """
    device = resolve_device(device)
    if source.weights is None:
        log.warning("tier %r has no shipped weights (looked in %s): using RANDOM weights; its output is noise",
                    source.cfg.name, SHIPPED_DIR / source.cfg.name)
        model = _allocate(source.cfg, device, resolve_dtype(dtype))
        model.init_weights(seed=0)
        tokenizer = None
    else:
        tokenizer = read_tokenizer(source.weights, source.cfg)  # cheap checks before any weight is read
        model = _read_sharded(source, device, dtype) if source.sharded else _read_single(source, device, dtype)
    model.tokenizer = tokenizer
    model.checkpoint_dir = source.weights
    model.random_weights = source.weights is None
    return model.eval()


def _allocate(cfg: QTGConfig, device: torch.device, dtype: torch.dtype,
              check: Callable[[nn.Module], None] | None = None) -> DecoderLM:
    """The model on ``device`` in ``dtype``, uninitialised: refused (TierTooLargeError) before allocation if it does
    not fit, built on ``meta``, checked there by ``check`` (names and shapes), then allocated."""
    check_fits(cfg, device, dtype)
    model = meta_model(cfg, dtype)
    if check is not None:
        check(model)
    return model.to_empty(device=device)


def _read_single(source: Source, device: torch.device, dtype: str | torch.dtype | None) -> DecoderLM:
    """A single-file checkpoint's model: header checked, then one tensor at a time (never a second full copy)."""
    path = source.weights / MODEL_FILE
    with open_safetensors(path) as f:
        dtype = resolve_dtype(dtype) if dtype is not None else default_dtype(stored_dtype(f, path), device)
        model = _allocate(source.cfg, device, dtype, check=lambda m: check_names_and_shapes(m, f, path))
        with torch.no_grad():
            for name, param in model.state_dict().items():
                t = f.get_tensor(name)
                if not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"{path}: tensor {name!r} holds non-finite values (nan or inf)")
                param.copy_(t)
    return model


def _read_sharded(source: Source, device: torch.device, dtype: str | torch.dtype | None) -> DecoderLM:
    """A sharded checkpoint's model, whole in this process (float32 unless ``dtype`` says otherwise)."""
    model = _allocate(source.cfg, device, resolve_dtype(dtype))
    load_sharded(model, source.weights)
    return model


def shipped_models() -> list[str]:
    """Names ``qtg.load`` finds under ``assets/checkpoints/`` (e.g. ``nano``, ``nano-baseline``)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if is_checkpoint(p))


SEED_SUFFIX = re.compile(r"^(?P<recipe>.+)-s(?P<seed>[1-9]\d*)$")


def seed_groups(names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Checkpoints grouped by recipe: ``<recipe>`` (seed 0) first, then ``<recipe>-s1``, ``<recipe>-s2``, ...

    A name ``X-sK`` is a seed of ``X`` only when ``X`` itself is among ``names``; anything else is its own
    recipe of one seed. ``names``: default :func:`shipped_models`. Recipes in sorted order.
    """
    present = set(shipped_models() if names is None else names)
    seeds: dict[str, dict[int, str]] = {}  # recipe -> {seed: name}
    for name in sorted(present):
        m = SEED_SUFFIX.match(name)
        recipe, seed = (m["recipe"], int(m["seed"])) if m and m["recipe"] in present else (name, 0)
        seeds.setdefault(recipe, {})[seed] = name
    return {recipe: [by_seed[k] for k in sorted(by_seed)] for recipe, by_seed in sorted(seeds.items())}


def _resolve_latest(out_dir: Path) -> Path:
    """The checkpoint ``out_dir/latest`` points to: the directory itself, or the one the file names."""
    latest = out_dir / LATEST
    if latest.is_dir():
        return latest
    name = latest.read_text(encoding="utf-8").strip()
    if not name:
        raise CheckpointError(f"{latest}: empty; it should name a checkpoint directory in {out_dir}")
    target = Path(name) if Path(name).is_absolute() else out_dir / name
    if not is_checkpoint(target):
        raise CheckpointError(f"{latest}: names {name!r}, but {target} is not a checkpoint directory")
    return target


def read_full_model(path: str | os.PathLike, dtype: torch.dtype | None = None) -> DecoderLM:
    """A sharded checkpoint as a plain CPU model, whole (for export: it must fit in host memory).

    Args:
        path: the sharded checkpoint directory.
        dtype: the parameter dtype (None: float32); each weight is allocated once, in it.
    """
    path = Path(path)
    if not is_sharded(path):
        raise CheckpointError(f"{path}: not a sharded checkpoint (no {SHARDS_DIR}/ directory)")
    return load_source(Source(read_config(path), path, sharded=True), "cpu", dtype)
