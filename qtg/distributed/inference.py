"""A sharded model for inference under torchrun: every rank runs the forward, rank 0 prints.

    world = init_world("auto")
    model = load_sharded_model("runs/nano2", world)      # sharded or single-file checkpoint, run dir, tier
    ids = qtg.generate.generate(model, prompt, 50, temperature=0)   # the same call on every rank

The same FSDP2 sharding as training: between forwards each rank holds
``1 / ranks`` of the weights, and a block is all-gathered only while it runs,
so a model whose weights do not fit one device still generates. Every rank
must make the same calls in the same order (each forward is a collective):
the prompt and the sampling seed are the same everywhere, so the ranks draw
the same tokens and stop together. Greedy decoding gives the tokens a single
process gives.
"""

from __future__ import annotations

import logging
import os
import random

from torch import nn

from qtg.distributed.parallelize import build_sharded, load_full_weights
from qtg.distributed.world import World
from qtg.model.checkpoint import load_sharded, read_tokenizer
from qtg.model.loading import load_source, locate

log = logging.getLogger("qtg")


def load_sharded_model(name_or_dir: str | os.PathLike, world: World, precision: str = "auto") -> nn.Module:
    """``qtg.load``'s model, sharded over ``world`` and in eval mode.

    Args:
        name_or_dir: a sharded checkpoint or run directory (read shard by shard,
            at any number of ranks), a single-file checkpoint or run directory
            (read whole on the CPU of each rank, then sliced), or a tier name
            (shipped weights, else the random weights ``qtg.load`` would give).
        world: a sharded World.
        precision: "auto" (bf16 parameters on CUDA), "bf16" or "fp32".

    Returns:
        The model with ``tokenizer``, ``checkpoint_dir`` and ``random_weights``, as ``qtg.load`` sets them.
    """
    source = locate(name_or_dir)  # resolved once, as qtg.load resolves it
    if source.sharded:
        model = build_sharded(source.cfg, world, precision=precision, init=False)
        load_sharded(model, source.weights)
        model.tokenizer = read_tokenizer(source.weights, source.cfg)
    elif source.weights is None:  # what qtg.load builds (seed 0), without ever holding it whole
        log.warning("tier %r has no shipped weights: using RANDOM weights; its output is noise", source.cfg.name)
        model = build_sharded(source.cfg, world, seed=0, precision=precision)
        model.tokenizer = None
    else:
        start = load_source(source, "cpu")
        model = build_sharded(start.cfg, world, precision=precision, init=False)
        load_full_weights(model, start.state_dict())
        model.tokenizer = start.tokenizer
    model.checkpoint_dir, model.random_weights = source.weights, source.weights is None
    return model.eval()


def shared_seed(world: World, seed: int | None) -> int | None:
    """``seed``, or one drawn by rank 0 and sent to all: sampling must draw the same tokens on every rank."""
    if seed is not None or not world.sharded:
        return seed
    return world.broadcast(random.SystemRandom().randrange(2**31))
