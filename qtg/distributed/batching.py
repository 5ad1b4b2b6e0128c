"""Each rank's share of a step's global batch: the same batch, in the same order, whatever the world size.

The config fixes the global batch of one optimizer step: ``grad_accum``
loader batches of ``batch_size`` windows, ``G = batch_size x grad_accum``
rows, drawn in the order of the one seeded loader. Every rank draws all of
them (the loader is cheap and its position is then the same everywhere, so
any rank's ``loader.state_dict()`` resumes any world size). Rank ``r`` keeps
rows ``[r R, (r + 1) R)`` with ``R = G / ranks`` and runs them as ``R / m``
micro-batches of ``m`` rows: per-rank micro-batch x accumulation x ranks =
G. The loss of a micro-batch is its mean over tokens; scaling each by
``1 / (R / m)`` and averaging over ranks (FSDP's reduce-scatter) gives the
gradient of the mean over all ``G`` windows, the same gradient a single
process computes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qtg.errors import ConfigError


def split_sizes(batch_size: int, grad_accum: int, ranks: int, micro_batch_size: int | None = None) -> tuple[int, int]:
    """``(m, k)``: rows per micro-batch on each rank and micro-batches per rank and step.

    Args:
        batch_size, grad_accum: the global batch is their product (config).
        ranks: the world size.
        micro_batch_size: rows per forward on one rank; None: the largest that
            divides both ``batch_size`` and the rank's rows (``batch_size`` in a single process).

    Raises:
        ConfigError: the global batch does not split evenly over the ranks or into micro-batches.
    """
    rows = batch_size * grad_accum
    if rows % ranks:
        raise ConfigError(f"the global batch (data.batch_size {batch_size} x training.grad_accum {grad_accum} = "
                          f"{rows} windows) does not split evenly over {ranks} ranks")
    per_rank = rows // ranks
    m = micro_batch_size or math.gcd(batch_size, per_rank)
    if m < 1 or per_rank % m:
        raise ConfigError(f"data.micro_batch_size {m} does not divide the {per_rank} windows each of {ranks} "
                          f"rank(s) gets per step")
    return m, per_rank // m


def rank_batches(loader: Any, batch_size: int, grad_accum: int, rank: int, ranks: int,
                 micro_batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches ``[(x, y), ...]``, each ``[m, N]`` int64, for the next optimizer step.

    Args:
        loader: a ``qtg.data.pipeline.WindowLoader`` of ``batch_size`` rows a batch, moved on ``grad_accum`` batches.
    """
    m, _ = split_sizes(batch_size, grad_accum, ranks, micro_batch_size)
    xs, ys = zip(*(loader.next_batch() for _ in range(grad_accum)))
    x, y = torch.cat(xs), torch.cat(ys)  # [G, N] each, in loader order
    per_rank = x.shape[0] // ranks
    x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]  # [R, N]
    return list(zip(x.split(m), y.split(m)))  # R / m pairs of [m, N]
