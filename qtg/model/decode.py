"""Decoding steps compiled with ``torch.compile`` over a static cache, as gpt-fast compiles its decode step.

A step of cached decoding has the same shapes every time once the cache is *static*
(:meth:`qtg.model.cache.QTGCache.make_ragged` with ``static=True``): ids ``[B, 1]``, every layer's keys and
values ``[B, H, C, d_h]`` over the whole capacity C, each row masked and positioned by its own length
(a device tensor). Nothing the step reads on the host changes, so one graph serves every step, and
inductor fuses its few hundred small ops into a handful of C++ loops (on CPU it needs a C++ compiler:
:func:`compile_unavailable` says why it cannot run).

The prompt is run eagerly (its length varies); the steps are compiled. The compiled step computes the
same function as the eager one up to summation order (tests/test_cache.py holds the logits to float32
rounding and greedy tokens equal).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qtg.model.cache import QTGCache


@functools.cache
def compile_unavailable() -> str | None:
    """Why ``torch.compile`` (inductor) cannot run on this machine's CPU, or None when it can.

    Compiles and runs a two-op function once per process (a missing C++ compiler fails here)."""
    try:
        fn = torch.compile(lambda x: (x * 2).sin(), dynamic=False, fullgraph=True)
        fn(torch.ones(4))
    except Exception as e:  # the reason is what callers report
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


class CompiledDecoder:
    """Prefill eagerly, then decode with a compiled step over a static cache.

    Args:
        model: a QTG model or its baseline, in eval mode (weights are read at each call, not copied).
        capacity: position slots per row (None: the model's ``max_seq_len``); the prompt plus every
            fed token must fit.

    Use::

        dec = CompiledDecoder(model)
        with torch.inference_mode():
            cache, logits = dec.prefill(ids)              # [B, V]
            for _ in range(n):
                nxt = logits.argmax(-1, keepdim=True)     # [B, 1]
                logits = dec.step(nxt, cache)
    """

    def __init__(self, model: torch.nn.Module, capacity: int | None = None):
        reason = compile_unavailable()
        if reason is not None:
            raise RuntimeError(f"torch.compile cannot run here ({reason}): decode with the eager model instead")
        self.model = model
        self.capacity = capacity
        self._step = torch.compile(self._forward, dynamic=False, fullgraph=True)

    def _forward(self, ids: Tensor, cache: QTGCache) -> Tensor:
        return self.model(ids, cache=cache).logits[:, -1]

    def prefill(self, ids: Tensor) -> tuple[QTGCache, Tensor]:
        """Run the prompts ``[B, N]`` (checked here, once) into a new static cache; the logits ``[B, V]`` after them."""
        cache = QTGCache(self.capacity, checked_ids=False)
        logits = self.model(ids, cache=cache).logits[:, -1]  # eager: checks the ids' range once
        cache.checked_ids = True  # from now on the ids fed are sampled from the logits
        cache.make_ragged(static=True)
        cache.widest = ids.shape[1]
        return cache, logits

    def step(self, ids: Tensor, cache: QTGCache) -> Tensor:
        """Feed one token per row ``[B, 1]`` (from the logits: not range-checked); the next logits ``[B, V]``.

        Raises:
            ValueError: the cache is not this decoder's, or its rows are full.
        """
        if not cache.static or getattr(cache, "widest", None) is None:
            raise ValueError("step() takes a cache made by prefill() of a CompiledDecoder")
        if cache.widest >= cache.capacity:  # counted on the host: the compiled step reads no changing number
            raise ValueError(f"the static cache is full: all {cache.capacity} slots of a row are used "
                             "(ask for a larger capacity)")
        if ids.shape != (cache.rows, 1):
            raise ValueError(f"step() takes ids [{cache.rows}, 1], got {list(ids.shape)}")
        logits = self._step(ids, cache)
        cache.widest += 1
        return logits
