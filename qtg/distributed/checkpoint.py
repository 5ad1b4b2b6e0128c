"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), written and read as safetensors.

A sharded training checkpoint is a directory::

    dcp/                 DCP, one safetensors file per rank: this rank's slices of the weights
                         ("model.<name>") and of the AdamW moments ("optim.<name>.exp_avg", ...),
                         with their offsets in the global tensors in each file's metadata
    trainer.safetensors  rank 0's RNG states (as in a single-file checkpoint)
    config.json, tokenizer.json
    state.json           step, data position, optimizer hyper-parameters (JSON), written last

Choices:

* **N ranks -> M ranks.** DCP records where each slice sits in the global
  tensor, so a checkpoint written by N ranks loads on M ranks, or into a
  plain single-process model (no process group): the loader asks for the
  slices it needs and DCP reads them.
* **No pickle.** DCP's default file format pickles its metadata; the
  safetensors storage (``HuggingFaceStorageWriter``/``Reader``) keeps the
  offsets as JSON in the safetensors header instead, and only tensors go into
  DCP (optimizer hyper-parameters are JSON in ``state.json``). A sharded
  checkpoint is read without ever unpickling anything, like the rest of qtg.
* **Complete once ``latest`` names it**, as for single-file checkpoints: rank
  0 writes ``state.json`` after every rank's shard is on disk, then
  ``latest``. ``qtg export`` turns one into a single-file checkpoint for
  ``qtg.load``, the app and the notebooks.
* **Reading lives a layer down**: finding a sharded checkpoint, its state and
  its weights (:func:`qtg.model.checkpoint.load_sharded`, :func:`qtg.model.loading.read_full_model`)
  needs no process group, so :mod:`qtg.model.checkpoint` does it and ``qtg.load``
  reads sharded checkpoints without importing this package. They are
  re-exported here. This module writes shards and restores optimizer state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from qtg.atomic import atomic_safetensors, atomic_text
from qtg.distributed.world import World
from qtg.errors import CheckpointError, TrainingError
from qtg.model.checkpoint import (
    CONFIG_FILE,
    SHARDS_DIR,
    STATE_FILE,
    TOKENIZER_FILE,
    TRAINER_FILE,
    dcp_load,
    is_sharded,
    load_sharded,
    read_config,
    read_tokenizer,
    read_train_state,
    sharded_checkpoint,
)
from qtg.model.loading import load, read_full_model
from qtg.model.registry import meta_model

# The readers come from qtg.model.checkpoint and qtg.model.loading; qtg.distributed re-exports them with the writers.
__all__ = [
    "is_sharded", "sharded_checkpoint", "read_train_state", "load_sharded", "read_full_model", "save_sharded",
    "load_sharded_optimizer", "load_full_optimizer", "meta_start", "load_start",
]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _group_meta(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's hyper-parameters and parameter names as JSON (what ``optim.optimizer_state`` keeps)."""
    groups = optimizer.state_dict()["param_groups"]
    return {"param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups],
            "scalars": {}}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, state: dict[str, Any],
                 rng_tensors: dict[str, torch.Tensor], world: World) -> Path:
    """Write a sharded training checkpoint (collective: every rank calls it).

    Args:
        model, optimizer: the FSDP model and its AdamW.
        path: the checkpoint directory (``run/step_XXXXXX``).
        state: the JSON training state; its ``optimizer`` entry is filled in here.
        rng_tensors: RNG states, written by rank 0 to ``trainer.safetensors``.

    Raises:
        TrainingError: a weight or moment is not finite on some rank (nothing is written).
    """
    msd, osd = get_state_dict(model, optimizer)
    tensors = [*msd.values(), *(v for s in osd["state"].values() for v in s.values() if torch.is_tensor(v))]
    if not world.all_true(all(bool(torch.isfinite(_local(t)).all()) for t in tensors)):
        raise TrainingError(f"refusing to save {path.name}: non-finite values in the weights or optimizer state")
    if world.is_main and path.exists():  # left by a killed save: its shard files must not mix with these
        shutil.rmtree(path)
    world.barrier()
    dcp.save({"model": msd, "optim": osd["state"]},
             storage_writer=HuggingFaceStorageWriter(str(path / SHARDS_DIR), save_distributed=True))
    if world.is_main:  # dcp.save returns once every rank's file is written
        atomic_safetensors(rng_tensors, path / TRAINER_FILE)
        atomic_text(path / CONFIG_FILE, json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        if model.tokenizer is not None:
            atomic_text(path / TOKENIZER_FILE, model.tokenizer.to_str())
        atomic_text(path / STATE_FILE, json.dumps({**state, "optimizer": _group_meta(optimizer),
                                                     "sharded": {"ranks": world.size}}, indent=2) + "\n")
    world.barrier()
    return path


def _check_groups(live: list[dict], saved: list[dict]) -> None:
    if [g.get("param_names") for g in live] != [g.get("param_names") for g in saved]:
        raise CheckpointError("the saved optimizer state is for other parameters than this model's "
                              "(parameter groups differ); was the model config changed?")


def _groups(live: list[dict], saved: list[dict]) -> list[dict]:
    """The saved hyper-parameters with the live groups' parameter keys (names here, indices in the JSON)."""
    _check_groups(live, saved)
    return [{**s, "params": lg["params"], **({"betas": tuple(s["betas"])} if "betas" in s else {})}
            for s, lg in zip(saved, live)]


def load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load a sharded checkpoint's AdamW state (moments, steps, hyper-parameters) at any world size."""
    state = read_train_state(path) or {}
    osd = get_optimizer_state_dict(model, optimizer)  # initialises the moments, so DCP has tensors to read into
    dcp_load({"optim": osd["state"]}, path)
    osd["param_groups"] = _groups(osd["param_groups"], state["optimizer"]["param_groups"])
    set_optimizer_state_dict(model, optimizer, osd)


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any]) -> None:
    """A single-file checkpoint's optimizer state (``optim.<index>.<key>``, full tensors) into a sharded AdamW."""
    saved = meta["param_groups"]
    names = [n for g in saved for n in g["param_names"]]  # index -> parameter name, in state_dict order
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(names[int(index)], {})[name] = t
    live = [{**g, "params": list(g["param_names"])} for g in optimizer.param_groups]
    full = {"state": state, "param_groups": _groups(live, saved)}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def meta_start(path: Path) -> nn.Module:
    """The model a sharded checkpoint describes, on ``meta`` with its tokenizer: config now, weights later."""
    cfg = read_config(path)
    model = meta_model(cfg)
    model.tokenizer = read_tokenizer(path, cfg)
    model.checkpoint_dir, model.random_weights = path, False
    return model


def load_start(name_or_dir: str | os.PathLike, world: World) -> nn.Module:
    """What a run starts from (resume or ``--init``): a sharded checkpoint on ``meta``, else ``qtg.load``'s model.

    A single-file checkpoint is read onto the CPU when the run is sharded (its
    weights are then sliced into the shards), onto the run's device otherwise.
    """
    sharded = sharded_checkpoint(name_or_dir)
    if sharded is not None:
        return meta_start(sharded)
    return load(name_or_dir, "cpu" if world.sharded else world.device)
