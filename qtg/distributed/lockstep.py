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
so generation re-runs the sequence at each step (``use_cache=False``).

The handle implements :class:`qtg.model.protocol.LanguageModel` member by member (no attribute forwarding).
What reads weights outside a forward (the TopoFilter's per-token scores, the tied head, a block's W_o for
direct logit attribution) reads them from a whole, unsharded copy of just that part, kept on rank 0: the
part's shards are gathered once, the first time it is asked for, with the followers joining the gather.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from qtg.distributed.world import World
from qtg.model.activations import Names, select_names
from qtg.model.config import QTGConfig
from qtg.model.decoder import DecoderLM, QTGOutput
from qtg.model.intervention import Intervention
from qtg.model.registry import meta_model
from qtg.model.topo_filter import TopoScores

log = logging.getLogger("qtg")

_FORWARD, _GATHER, _CLOSE = "forward", "gather", "close"


def gather_whole(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``module``'s state, whole (a collective: every rank calls it)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}


class Lockstep:
    """Rank 0's handle on a sharded model whose other ranks run :func:`follow`: a
    :class:`~qtg.model.protocol.LanguageModel` whose forward runs on every rank.

    ``keeps_cache`` is False (no decoding cache). The read-out methods (:meth:`embed_points`,
    :meth:`topo_scores`, :meth:`unembedding`, :meth:`final_norm`, :meth:`final_scale`, :meth:`head_writers`,
    :meth:`attention_projection`) run on rank 0 alone, on whole copies of the parts they read.
    """

    keeps_cache = False

    def __init__(self, model: DecoderLM, world: World):
        if not world.is_main:
            raise ValueError("Lockstep is rank 0's handle; the other ranks call follow(model, world)")
        self.model, self.world = model, world
        self._lock = threading.Lock()
        self._closed = False
        self._whole = meta_model(model.cfg)  # rank 0's unsharded replica, filled part by part (see _with)
        self._gathered: set[str] = set()

    # --- what the model declares ----------------------------------------------------------------
    @property
    def cfg(self) -> QTGConfig:
        return self.model.cfg

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def has_topofilter(self) -> bool:
        return self.model.has_topofilter

    @property
    def state_names(self) -> list[str]:
        return self.model.state_names

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.model.checkpoint_dir

    @property
    def random_weights(self) -> bool:
        return self.model.random_weights

    @property
    def training(self) -> bool:
        return self.model.training

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Rank 0's shards of the parameters (DTensors: their shape and dtype are the whole tensor's)."""
        return self.model.parameters(recurse)

    def train(self, mode: bool = True) -> Lockstep:
        self.model.train(mode)
        return self

    def eval(self) -> Lockstep:
        return self.train(False)

    def check_forward_args(self, intervene: Intervention | None,
                           map_blocks: Collection[int] | None) -> Intervention:
        return self.model.check_forward_args(intervene, map_blocks)

    # --- forwards, on every rank ------------------------------------------------------------------
    def __call__(self, ids: torch.Tensor, targets: torch.Tensor | None = None, return_internals: bool = False,
                 cache: Any = None, *, intervene: Intervention | None = None,
                 map_blocks: Collection[int] | None = None) -> QTGOutput:
        """``model(ids, targets, return_internals, intervene=, map_blocks=)`` on every rank; rank 0's output."""
        if cache is not None:
            raise ValueError("a lockstep model has no decoding cache: generate with use_cache=False")
        return self._run(ids, targets, return_internals, intervene, map_blocks, None)

    def run_with_cache(self, ids: torch.Tensor, names: Names = None, *, intervene: Intervention | None = None,
                       retain_grad: bool = False, **kwargs: Any) -> tuple[QTGOutput, dict[str, torch.Tensor]]:
        """:meth:`~qtg.model.model.DecoderLM.run_with_cache` on every rank (inference only: no ``retain_grad``,
        no ``cache``); rank 0's output and activations."""
        if retain_grad or kwargs.get("cache") is not None:
            raise ValueError("a lockstep model records activations for inference only: no retain_grad, no cache")
        names = select_names(self.cfg, names)  # a predicate becomes a list: what the followers are sent
        return self._run(ids, kwargs.get("targets"), bool(kwargs.get("return_internals", False)), intervene,
                         kwargs.get("map_blocks"), names)

    def _run(self, ids: torch.Tensor, targets: torch.Tensor | None, return_internals: bool,
             intervene: Intervention | None, map_blocks: Collection[int] | None, names: list[str] | None) -> Any:
        with self._lock:
            self._check_open()
            message = (_FORWARD, ids.tolist(), None if targets is None else targets.tolist(), bool(return_internals),
                       intervene, None if map_blocks is None else sorted(map_blocks), names)
            self.world.broadcast(message)
            return _forward(self.model, self.world, *message[1:])

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the followers were released (close() was called)")

    # --- read-outs, on rank 0 from whole copies ---------------------------------------------------
    def _with(self, *parts: str) -> DecoderLM:
        """The replica, with the named parts (``embed``, ``blocks.2``, ...) whole: each gathered once, in step with
        the followers. Outside inference mode, which callers are often in: a DTensor cannot be gathered there."""
        with self._lock, torch.inference_mode(False), torch.no_grad():
            for part in parts:
                if part in self._gathered:
                    continue
                self._check_open()
                self.world.broadcast((_GATHER, part))
                state = gather_whole(self.model.get_submodule(part))
                whole = self._whole.get_submodule(part).to_empty(device=self.world.device)
                whole.load_state_dict(state)
                self._gathered.add(part)
        return self._whole

    def embed_points(self, ids: torch.Tensor) -> torch.Tensor:
        self._require_topofilter()
        with torch.no_grad():
            return self._with("embed").embed_points(ids)

    def topo_scores(self, points: torch.Tensor, past: torch.Tensor | None = None,
                    intervene: Intervention | None = None, *, ids: torch.Tensor | None = None,
                    past_ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> TopoScores:
        self._require_topofilter()
        with torch.no_grad():
            return self._with("topo").topo_scores(points, past, intervene, ids=ids, past_ids=past_ids,
                                                  lengths=lengths)

    def _require_topofilter(self) -> None:
        if not self.has_topofilter:
            raise TypeError(f"the {self.arch} model {self.cfg.name!r} has no TopoFilter (has_topofilter is False)")

    def unembedding(self) -> torch.Tensor:
        return self._with("embed").unembedding()

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self._with("norm").final_norm(x)

    def final_scale(self, x: torch.Tensor) -> torch.Tensor:
        return self._with("norm").final_scale(x)

    def head_writers(self, layer: int) -> torch.Tensor:
        return self._with(f"blocks.{layer}").head_writers(layer)

    def attention_projection(self, layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
        return self._with(f"blocks.{layer}").attention_projection(layer, which, x)

    def close(self) -> None:
        """Release the followers (they return from :func:`follow`)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self.world.broadcast((_CLOSE,))


def follow(model: DecoderLM, world: World) -> int:
    """Run every forward rank 0's :class:`Lockstep` asks for (and join each gather of a part), until it closes.
    Returns how many forwards ran."""
    done = 0
    while True:
        message = world.broadcast(None)
        if not message or message[0] == _CLOSE:
            return done
        if message[0] == _GATHER:
            gather_whole(model.get_submodule(message[1]))
            continue
        try:
            _forward(model, world, *message[1:])
        except Exception as e:  # rank 0 raised the same error on the same input: it reports it, we go on
            log.debug("rank %d: forward failed as on rank 0: %s", world.rank, e)
        done += 1


def _forward(model: DecoderLM, world: World, ids: list, targets: list | None, return_internals: bool,
             intervene: Intervention | None, map_blocks: list[int] | None, names: list[str] | None) -> Any:
    x = torch.tensor(ids, dtype=torch.long, device=world.device)
    y = None if targets is None else torch.tensor(targets, dtype=torch.long, device=world.device)
    with torch.inference_mode():
        if names is not None:
            return model.run_with_cache(x, names, intervene=intervene, targets=y, return_internals=return_internals,
                                        map_blocks=map_blocks)
        return model(x, targets=y, return_internals=return_internals, intervene=intervene, map_blocks=map_blocks)
