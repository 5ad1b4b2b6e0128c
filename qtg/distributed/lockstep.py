"""A sharded model driven by a program that runs on rank 0 only, such as the web app.

Every forward of an FSDP2 model is a collective: each rank must run it, in the
same order. A command-line run makes the same calls on every rank; an
interactive program cannot, since only rank 0 sees the requests. So rank 0
drives and the other ranks follow:

    model = load_sharded_model("runs/big", world)     # on every rank
    if world.is_main:
        model = Lockstep(model, world)                  # use it like the model: model(ids, return_internals=True)
        ...                                             # serve requests
        model.close()                                   # releases the followers
    else:
        follow(model, world)                            # runs each forward rank 0 asks for, until close

Each call broadcasts the token ids, the flags and the call's intervention
(``intervene=``, a small frozen value) from rank 0, then every rank runs the
same forward; only rank 0 keeps the output. A lock makes each
broadcast-and-forward atomic, so concurrent requests on rank 0 queue up one
forward at a time. There is no decoding cache: a cache is state on every rank,
so generation re-runs the sequence at each step (``use_cache=False``). The
root's small QEmbed is gathered whole onto rank 0 once (``Lockstep.embed``),
so per-token TopoFilter scores need no collective.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from qtg.distributed.world import World
from qtg.intervention import Intervention
from qtg.model import QEmbed

log = logging.getLogger("qtg")

_FORWARD, _CLOSE = "forward", "close"


def gather_whole(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``module``'s state, whole (a collective: every rank calls it)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}


class Lockstep:
    """Rank 0's handle on a sharded model whose other ranks run :func:`follow`.

    Attributes other than the forward (``cfg``, ``tokenizer``, ``topo``, ``parameters()``, ...) are the
    model's; ``embed`` is a whole copy of the QEmbed (None for a baseline), ``lockstep`` is True.
    """

    lockstep = True

    def __init__(self, model: nn.Module, world: World):
        if not world.is_main:
            raise ValueError("Lockstep is rank 0's handle; the other ranks call follow(model, world)")
        self.model, self.world = model, world
        self._lock = threading.Lock()
        self._closed = False
        self.embed = _whole_embed(model, world)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, ids: torch.Tensor, targets: torch.Tensor | None = None, return_internals: bool = False,
                 cache: Any = None, *, intervene: Intervention | None = None,
                 map_blocks: Collection[int] | None = None) -> Any:
        """``model(ids, targets, return_internals, intervene=, map_blocks=)`` on every rank; rank 0's output."""
        if cache is not None:
            raise ValueError("a lockstep model has no decoding cache: generate with use_cache=False")
        with self._lock:
            if self._closed:
                raise RuntimeError("the followers were released (close() was called)")
            message = (_FORWARD, ids.tolist(), None if targets is None else targets.tolist(), bool(return_internals),
                       intervene, None if map_blocks is None else sorted(map_blocks))
            self.world.broadcast(message)
            return _forward(self.model, self.world, *message[1:])

    def close(self) -> None:
        """Release the followers (they return from :func:`follow`)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self.world.broadcast((_CLOSE,))


def follow(model: nn.Module, world: World) -> int:
    """Run every forward rank 0's :class:`Lockstep` asks for, until it closes. Returns how many ran."""
    if model.has_topofilter:
        gather_whole(model.embed)  # in step with rank 0's Lockstep(...)
    done = 0
    while True:
        message = world.broadcast(None)
        if not message or message[0] == _CLOSE:
            return done
        try:
            _forward(model, world, *message[1:])
        except Exception as e:  # rank 0 raised the same error on the same input: it reports it, we go on
            log.debug("rank %d: forward failed as on rank 0: %s", world.rank, e)
        done += 1


def _forward(model: nn.Module, world: World, ids: list, targets: list | None, return_internals: bool,
             intervene: Intervention | None, map_blocks: list[int] | None) -> Any:
    x = torch.tensor(ids, dtype=torch.long, device=world.device)
    y = None if targets is None else torch.tensor(targets, dtype=torch.long, device=world.device)
    with torch.inference_mode():
        return model(x, targets=y, return_internals=return_internals, intervene=intervene, map_blocks=map_blocks)


def _whole_embed(model: nn.Module, world: World) -> nn.Module | None:
    """A whole, unsharded copy of a QTG model's QEmbed on rank 0 (the followers gather in step, in follow)."""
    if not model.has_topofilter:
        return None
    embed = QEmbed(model.cfg).to(world.device)
    embed.load_state_dict(gather_whole(model.embed))
    return embed.eval()
