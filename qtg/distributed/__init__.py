"""Scale-out on PyTorch's own distributed engine: torchrun, FSDP2 (``fully_shard``) and DCP.

Each idea in its own module, each readable in one sitting:

* :mod:`~qtg.distributed.world`: torchrun's environment -> process group
  (gloo on CPU, NCCL on CUDA), rank, device, the few collectives training needs.
* :mod:`~qtg.distributed.parallelize`: FSDP2 per block, bf16 mixed precision
  on CUDA, optional activation checkpointing, meta-device construction.
* :mod:`~qtg.distributed.batching`: each rank's rows of a step's global batch,
  so the loss curve does not depend on the number of ranks.
* :mod:`~qtg.distributed.checkpoint`: sharded checkpoints with
  ``torch.distributed.checkpoint`` in safetensors files, N ranks -> M ranks,
  and their conversion to the single-file format (``qtg export``).
* :mod:`~qtg.distributed.inference`: a sharded model for ``qtg generate`` under torchrun.
* :mod:`~qtg.distributed.lockstep`: the same model driven from rank 0 alone (the web app), the
  other ranks joining each forward.
* :mod:`~qtg.distributed.plan`: memory per rank under FSDP2, the smallest
  number of GPUs, and why ``5.5q`` fits no number of them.

Usage::

    torchrun --nproc_per_node 2 $(which qtg) train --config configs/nano.yaml --out runs/nano2
    qtg export runs/nano2 --out runs/nano2-single
    qtg info --tier 30b --plan --gpus 8
"""

import importlib
from typing import Any

# name -> submodule. Imported on first use: torch.distributed.tensor / fsdp / checkpoint are heavy imports,
# which a plain `qtg info` or single-process `qtg generate` should not pay for.
_EXPORTS = {
    "world": ("World", "init_world", "close_world", "under_torchrun"),
    "parallelize": ("shard_model", "build_sharded", "make_model", "clip_grad_norm"),
    "batching": ("rank_batches", "split_sizes"),
    "checkpoint": ("save_sharded", "load_sharded", "load_sharded_optimizer", "load_full_optimizer", "load_start",
                   "read_full_model", "read_train_state", "is_sharded", "sharded_checkpoint"),
    "inference": ("load_sharded_model",),
    "lockstep": ("Lockstep", "follow"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'qtg.distributed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"qtg.distributed.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
