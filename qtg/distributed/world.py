"""Who this process is in a torchrun job: rank, world size, device, and the few collectives training needs.

    world = init_world("auto")        # under torchrun: a process group (gloo on CPU, NCCL on CUDA)
    world.sharded, world.rank, world.size, world.device
    ...
    close_world(world)

Choices:

* **torchrun's environment decides.** ``RANK``, ``WORLD_SIZE`` and
  ``LOCAL_RANK`` (set by ``torchrun``, also multi-node) mean a sharded run,
  even with one rank; without them the process is a plain single-process run
  (``World.sharded`` False) and every helper here is the identity, so the
  training loop calls them unconditionally.
* **One device per rank**: ``cuda:LOCAL_RANK`` with NCCL when CUDA is asked
  for (or ``auto`` finds it), else the CPU with gloo.
* **Only rank 0 talks**: the ``qtg`` logger of the other ranks is raised to
  WARNING, so a run prints its progress once.
* Collectives reduce in float64, so a mean of per-rank losses is the same
  number a single process computes, to the last float32 bit that matters.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from qtg.model.builder import resolve_device

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_torchrun() -> bool:
    """True when torchrun (or another launcher with its variables) started this process."""
    return all(v in os.environ for v in TORCHRUN_VARS)


@dataclass(frozen=True)
class World:
    """This process's place in the job. The default is a plain single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sharded: bool = False  # a process group is up: the model is sharded with FSDP2 across `size` ranks
    owns_group: bool = False  # init_world created the process group, so close_world destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_true(self, flag: bool) -> bool:
        """``flag`` and-ed over every rank (one scalar all-reduce); the flag itself in a single process."""
        if not self.sharded:
            return flag
        t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)  # the number of ranks where it is False
        return int(t.item()) == 0

    def mean(self, values: list[float]) -> list[float]:
        """The element-wise mean over ranks of ``values`` (float64); the values themselves in a single process."""
        if not self.sharded or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.size).tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled by torch.distributed: small Python values only)."""
        if not self.sharded:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writing a cache), then the others, who may read what it wrote."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def init_world(device: str | torch.device | None = "auto") -> World:
    """The World of this process, starting the process group under torchrun.

    Args:
        device: "auto", "cpu" or "cuda"; under torchrun, CUDA becomes ``cuda:LOCAL_RANK``.

    Returns:
        A World; ``sharded`` is True under torchrun. A process group that is
        already up (a caller started it) is used and left to that caller.
    """
    device = resolve_device(device)
    if not under_torchrun():
        return World(device=device)
    rank, size, local_rank = (int(os.environ[v]) for v in TORCHRUN_VARS)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    if rank != 0:
        logging.getLogger("qtg").setLevel(logging.WARNING)
    return World(rank=rank, size=size, local_rank=local_rank, device=device, sharded=True, owns_group=owns)


def close_world(world: World, failed: bool = False) -> None:
    """Destroy the process group if :func:`init_world` created it.

    After a normal end the ranks first meet at a barrier: a rank tearing gloo
    down while another still finishes its last collective aborts the process.
    After an error (``failed``) there is no barrier: the other ranks may never come.
    """
    if world.owns_group and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()
