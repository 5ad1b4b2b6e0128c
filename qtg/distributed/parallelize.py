"""FSDP2 for QTG: each block its own ``fully_shard`` unit, built on the meta device so no rank holds the model.

    model = build_sharded(cfg, world, seed=0, activation_checkpointing=True)

The model code knows nothing of this (torchtitan's split of ``model.py`` and
``parallelize.py``): sharding is applied afterwards, to the module tree.

Choices:

* **Units**: every ``Block`` is one FSDP unit (all-gathered before its
  forward and backward, resharded after), and the root holds the rest: the
  complex embedding table (also the tied head), its bias and the final norm.
  Parameters are sharded along dim 0 across the ranks of a 1-D mesh.
* **Mixed precision on CUDA**: bf16 parameters for compute, float32
  gradient reduction, float32 sharded master weights (``MixedPrecisionPolicy``).
  The model keeps the spec's float32 parts itself: the sqrt-simplex vectors
  and Bhattacharyya coefficient of GeoAttention and the float64 TopoFilter
  distances. On CPU everything stays float32.
* **Activation checkpointing** (optional) per block with the composable
  ``checkpoint``: only the block's input is kept, its inside is recomputed in
  backward. Parameter names do not change, so checkpoints and optimizer
  groups are the same with or without it.
* **Initialisation**: the model is created on ``meta``, sharded, then
  ``to_empty`` allocates this rank's shards only. Each parameter is then drawn
  in full, in the order and from the seeded generator of the model's own
  ``init_weights``, and this rank keeps its slice: the weights equal a
  single-process ``qtg.build(cfg, seed=seed)``, with one full parameter in
  memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from qtg.distributed.world import World
from qtg.errors import ConfigError
from qtg.model.builder import build
from qtg.model.checkpoint import load_sharded
from qtg.model.config import QTGConfig
from qtg.model.decoder import DecoderLM
from qtg.model.registry import meta_model

PRECISIONS = ("auto", "bf16", "fp32")


def mixed_precision_policy(device: torch.device, precision: str = "auto") -> MixedPrecisionPolicy:
    """bf16 parameters with float32 reduction (``auto`` on CUDA, or ``bf16``); none for ``fp32`` or CPU ``auto``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"mixed precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: DecoderLM, world: World, precision: str = "auto",
                activation_checkpointing: bool = False) -> nn.Module:
    """Apply activation checkpointing (optional) and ``fully_shard`` to each block, then to the root.

    Args:
        model: a QTG or Baseline, on ``meta`` or materialised.
        world: the process group's World (``world.sharded``).
        precision: "auto" (bf16 on CUDA), "bf16" or "fp32".
        activation_checkpointing: recompute each block in backward.

    Returns:
        The same module, now an FSDP module whose parameters are DTensors.
    """
    from torch.distributed._composable import checkpoint

    mesh = init_device_mesh(world.device.type, (world.size,), mesh_dim_names=("dp",))
    mp = mixed_precision_policy(world.device, precision)
    for block in model.layers():
        if activation_checkpointing:
            checkpoint(block)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _full_parameters(model: DecoderLM) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.named_parameters()`` as full-size tensors, for its own ``init_weights`` to fill.

    After the caller has filled one (the code after ``yield`` runs when the
    next is asked for), this rank's slice of it is copied into the shard.
    """
    for name, p in model.named_parameters():
        full = torch.empty(p.shape, dtype=p.dtype, device=p.device)  # the global shape
        yield name, full
        _copy_full_into(p, full)


@torch.no_grad()
def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's slice of the full tensor ``full`` into ``param`` (a sharded DTensor or a plain tensor)."""
    if isinstance(param, DTensor):
        mine = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)  # a local slice
        param.to_local().copy_(mine.to_local())
    else:
        param.copy_(full)


@torch.no_grad()
def init_sharded(model: DecoderLM, seed: int) -> None:
    """Initialise a sharded model exactly as ``model.init_weights(seed)`` would initialise it unsharded."""
    model.init_weights(seed=seed, parameters=_full_parameters(model))


def build_sharded(cfg: QTGConfig, world: World, seed: int = 0, precision: str = "auto",
                  activation_checkpointing: bool = False, init: bool = True) -> nn.Module:
    """A model sharded over ``world``'s ranks, created on ``meta`` and allocated shard by shard.

    Args:
        cfg: the model config.
        world: a sharded World (under torchrun).
        seed: initialisation seed; the weights equal ``qtg.build(cfg, seed=seed)``.
        precision, activation_checkpointing: see :func:`shard_model`.
        init: False leaves the shards uninitialised (they are about to be loaded).
    """
    model = meta_model(cfg)
    shard_model(model, world, precision, activation_checkpointing)
    model.to_empty(device=world.device)
    if init:
        init_sharded(model, seed)
    return model


def load_full_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors into a sharded model: each rank keeps its slices."""
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))


def make_model(cfg: QTGConfig, world: World, start: nn.Module | None, seed: int, precision: str = "auto",
               activation_checkpointing: bool = False) -> nn.Module:
    """The training model for this world: ``start``'s weights, or fresh ones from ``seed``.

    Args:
        start: None (fresh), a loaded model (its weights are used) or a model on
            ``meta`` from :func:`qtg.distributed.load_start` (a sharded checkpoint, read here).
    """
    on_meta = start is not None and next(start.parameters()).device.type == "meta"
    if not world.sharded and start is not None and not on_meta:
        return start
    if world.sharded:
        model = build_sharded(cfg, world, seed, precision, activation_checkpointing, init=start is None)
    else:
        model = build(cfg, device=world.device, seed=seed)
    if on_meta:
        load_sharded(model, start.checkpoint_dir)
    elif start is not None:
        load_full_weights(model, start.state_dict())
    return model


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for plain or sharded gradients; returns the total norm as a float."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm.item())
