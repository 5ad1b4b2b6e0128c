"""The incremental-decoding cache: preallocated per-row slots, written in place (as gpt-fast's ``KVCache``).

Every layer's keys and values, and the TopoFilter's points (QEmbed outputs) and their token ids, live in
tensors sized for the whole context when they are first written: ``[R, C, ...]`` with R row slots and C
position slots (``capacity``: the one asked for, else the model's ``max_seq_len``, at least the prompt).
A step writes its tokens by index, ``buf[:, :, pos] = new``; readers get views of the filled part. Nothing
is concatenated or copied per token. Past the capacity the buffers grow (doubling; the only copy); the
engine's rows take and give back row slots (:meth:`QTGCache.add_rows`, :meth:`QTGCache.keep_rows`).

The buffers are created under whatever autograd mode the first write runs in; a cache filled under
``torch.inference_mode`` (as :mod:`qtg.generate` and :mod:`qtg.serve` do) writes into them under it again
when it is called outside (the engine drops rows between steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

# position dim of each kind of buffer: points [R, C, 2d] and ids [R, C] on 1, keys/values [R, H, C, d_h] on 2
_POINTS_DIM, _KV_DIM = 1, 2


class QTGCache:
    """Incremental-decoding state: everything earlier tokens contribute.

    ``points`` are the TopoFilter inputs (QEmbed outputs) of earlier tokens, ``ids`` their token ids,
    ``keys[l]``/``values[l]`` their keys and values in block l (QTG's keys are float32 sqrt-simplex
    vectors). Each new token then costs O(N), not O(N^2). The baseline decoder uses the same class
    without ``points``. Those four are views ``[B, ..., P, ...]`` of the filled slots of preallocated
    buffers (see the module docstring).

    A *ragged* cache (``lengths`` set) holds rows of different lengths, as a batch of independent
    requests does (``qtg.serve``): row b's tokens fill slots ``0 .. lengths[b] - 1``, the slots after them
    up to ``length`` = max(lengths) are padding, and a step feeds one token per row, written at slot
    ``lengths[b]``. The model then masks and positions each row by its own length, so a row gets what it
    would get alone. A *static* ragged cache (``static=True``) shows its whole capacity instead of the
    filled part: every step then has the same shapes, which is what lets a step be compiled
    (:class:`qtg.model.decode.CompiledDecoder`).

    Args:
        capacity: position slots per row (None: the model's ``max_seq_len`` or the prompt, the larger).
        checked_ids: the caller has checked every id it will feed (a request's prompt, then sampled
            tokens): the model then skips its per-call range check, a host sync on a GPU.
    """

    def __init__(self, capacity: int | None = None, *, checked_ids: bool = False):
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive integer (or None), got {capacity!r}")
        self.capacity = capacity
        self.checked_ids = checked_ids
        self.length = 0  # P, tokens seen so far (ragged: the widest row)
        self.lengths: Tensor | None = None  # ragged only: [B] int64, each row's own token count
        self.static = False
        self.widest: int | None = None  # static: the longest row, counted on the host by its compiled decoder
        self.rows = 0  # B, the live rows (the buffers may hold more row slots)
        self._points: Tensor | None = None  # [R, C, 2d]
        self._ids: Tensor | None = None  # [R, C]
        self._keys: list[Tensor] = []  # per block [R, H, C, d_h]
        self._values: list[Tensor] = []

    # --- what readers see: views of the filled part ----------------------------------------------
    def _span(self, buf: Tensor, dim: int, start: int, n: int) -> Tensor:
        """The live rows' slots ``start .. start + n - 1`` on ``dim`` of ``buf``: a view, one op when every
        row slot is live (a decoding step is bound by per-op overhead)."""
        rows = slice(None) if buf.shape[0] == self.rows else slice(0, self.rows)
        return buf[(rows,) + (slice(None),) * (dim - 1) + (slice(start, start + n),)]

    def _view(self, buf: Tensor, dim: int) -> Tensor:
        return self._span(buf, dim, 0, buf.shape[dim] if self.static else self.length)

    @property
    def points(self) -> Tensor | None:
        """``[B, P, 2d]`` QEmbed states of the cached tokens (None for the baseline or before the first write)."""
        return None if self._points is None else self._view(self._points, _POINTS_DIM)

    @property
    def ids(self) -> Tensor | None:
        """``[B, P]`` the points' token ids (TopoFilter: exact zeros between equal ids)."""
        return None if self._ids is None else self._view(self._ids, _POINTS_DIM)

    @property
    def keys(self) -> list[Tensor]:
        """Per block ``[B, H, P, d_h]``."""
        return [self._view(k, _KV_DIM) for k in self._keys]

    @property
    def values(self) -> list[Tensor]:
        """Per block ``[B, H, P, d_h]``."""
        return [self._view(v, _KV_DIM) for v in self._values]

    @property
    def slots(self) -> int:
        """Position slots per row now allocated (0 before the first write)."""
        bufs = list(self._buffers())
        return bufs[0][2].shape[bufs[0][1]] if bufs else 0

    def storage_ptrs(self) -> list[int]:
        """The data pointers of every buffer (tests: in-place writes keep them)."""
        return [t.data_ptr() for _, _, t in self._buffers()]

    def _buffers(self) -> Iterator[tuple[str, int, Tensor]]:
        """(name, position dim, buffer) of every allocated buffer."""
        for name, dim in (("_points", _POINTS_DIM), ("_ids", _POINTS_DIM)):
            if getattr(self, name) is not None:
                yield name, dim, getattr(self, name)
        for name in ("_keys", "_values"):
            for t in getattr(self, name):
                yield name, _KV_DIM, t

    # --- the model's side -----------------------------------------------------------------------
    def reserve(self, batch: int, new: int, default_capacity: int) -> None:
        """Before a forward pass of ``batch`` rows and ``new`` tokens: check the rows, make room.

        The first call fixes the rows and the capacity; a later one that would run past the
        capacity grows every buffer to twice it (or to what is needed), copying the filled part once.
        """
        if self.static:
            self._check_static_room(batch, new)
            return
        if self.length == 0 and self.rows == 0:
            self.rows = batch
            if self.capacity is None:
                self.capacity = max(default_capacity, new)
        elif batch != self.rows:
            raise ValueError(f"the cache holds {self.rows} rows, but ids has {batch}: feed one token per cached row")
        if self.lengths is not None and new != 1:
            raise ValueError(f"a ragged cache takes one token per row and step, got {new}")
        need = self.length + new
        if need > self.capacity:
            self.grow(max(2 * self.capacity, need))

    def _check_static_room(self, batch: int, new: int) -> None:
        """A static cache's step: the same rows, one token each, a free slot in every row (checked when eager:
        the row lengths are on the device, and a compiled step's caller counts its steps instead)."""
        if batch != self.rows or new != 1:
            raise ValueError(f"a static cache of {self.rows} rows takes [{self.rows}, 1] ids per step, "
                             f"got [{batch}, {new}]")
        if not torch.compiler.is_compiling() and int(self.lengths.max()) >= self.capacity:
            raise ValueError(f"the static cache is full: all {self.capacity} slots of a row are used "
                             "(ask for a larger capacity)")

    def grow(self, capacity: int) -> None:
        """Reallocate every buffer with ``capacity`` position slots, keeping what is filled."""
        if self.static:
            raise ValueError(f"a static cache of {self.capacity} slots is full: it cannot grow under a compiled step")
        with self._editing():
            for name, dim, old in list(self._buffers()):
                shape = list(old.shape)
                shape[dim] = capacity
                new = old.new_zeros(shape)
                new.narrow(dim, 0, self.length).copy_(old.narrow(dim, 0, self.length))
                self._replace(name, old, new)
        self.capacity = capacity

    def _editing(self) -> contextlib.AbstractContextManager:
        """Inference mode for in-place edits of buffers made under it (else a no-op)."""
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or not (self._points is not None
                                                                                       or self._keys):
            return contextlib.nullcontext()
        first = self._points if self._points is not None else self._keys[0]
        return torch.inference_mode() if first.is_inference() else contextlib.nullcontext()

    def _replace(self, name: str, old: Tensor, new: Tensor) -> None:
        if name in ("_points", "_ids"):
            setattr(self, name, new)
        else:
            bufs = getattr(self, name)
            bufs[next(i for i, t in enumerate(bufs) if t is old)] = new

    def _alloc(self, like: Tensor, dim: int) -> Tensor:
        """A zeroed buffer shaped as ``like`` with ``capacity`` slots on ``dim`` (zeros: padding stays finite)."""
        shape = list(like.shape)
        shape[dim] = self.capacity
        return like.new_zeros(shape)

    def _write(self, buf: Tensor, new: Tensor, dim: int) -> None:
        """``new`` (positions on ``dim``) into ``buf`` after the filled part; ragged: row b's one token at
        slot ``lengths[b]``."""
        with self._editing():
            if self.lengths is None:
                self._span(buf, dim, self.length, new.shape[dim]).copy_(new)
                return
            rows = torch.arange(self.rows, device=buf.device)
            buf[(rows,) + (slice(None),) * (dim - 1) + (self.lengths,)] = new.select(dim, 0)

    def write_points(self, points: Tensor, ids: Tensor | None) -> None:
        """Store the new tokens' QEmbed states ``[B, N, 2d]`` and ids ``[B, N]`` (None: not known)."""
        if self._points is None:
            self._points = self._alloc(points, _POINTS_DIM)
            if ids is not None:
                self._ids = self._alloc(ids, _POINTS_DIM)
        self._write(self._points, points, _POINTS_DIM)
        if ids is None:
            self._ids = None  # ids no longer name every point: the TopoFilter measures them
        elif self._ids is not None:
            self._write(self._ids, ids, _POINTS_DIM)

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write block ``layer``'s new keys/values ``[B, H, N, d_h]``; return all ``[B, H, P+N, d_h]``
        (static: all C slots)."""
        if layer == len(self._keys):
            self._keys.append(self._alloc(k, _KV_DIM))
            self._values.append(self._alloc(v, _KV_DIM))
        kb, vb = self._keys[layer], self._values[layer]
        self._write(kb, k, _KV_DIM)
        self._write(vb, v, _KV_DIM)
        n = kb.shape[_KV_DIM] if self.static else self.length + k.shape[_KV_DIM]
        return self._span(kb, _KV_DIM, 0, n), self._span(vb, _KV_DIM, 0, n)

    def advance(self, n: int) -> None:
        """Called by the model once all blocks have read the old length."""
        if not self.static:  # a static cache's width is its capacity, whatever its rows hold
            self.length += n
        if self.lengths is not None:
            self.lengths = self.lengths + n

    # --- rows: a batch of independent requests (qtg.serve) ------------------------------------------
    def make_ragged(self, lengths: Tensor | None = None, static: bool = False) -> QTGCache:
        """Turn this cache ragged: row b holds ``lengths[b]`` tokens (default: all ``length``). Returns self.

        ``static``: views span the whole capacity (``length`` is then the capacity), so every step has the
        same shapes and reads no Python number that changes (a compiled step)."""
        self.lengths = (torch.full((self.rows,), self.length, dtype=torch.long, device=self._device())
                        if lengths is None else lengths)
        self.static = static
        if static:
            self.length = self.capacity
        return self

    def _device(self) -> torch.device:
        return next(self._buffers())[2].device

    def add_rows(self, more: QTGCache) -> None:
        """Copy the rows of the ragged cache ``more`` into free row slots after this ragged cache's rows.

        Only ``more``'s filled slots are copied; row slots are added (doubling) when none are free."""
        mine, theirs = list(self._buffers()), list(more._buffers())
        if [(n, t.shape[1:d] + t.shape[d + 1:]) for n, d, t in mine] != \
                [(n, t.shape[1:d] + t.shape[d + 1:]) for n, d, t in theirs]:
            raise ValueError("the caches hold different buffers (one has points or ids the other lacks)")
        if more.length > self.capacity:
            self.grow(more.length)
        start, total = self.rows, self.rows + more.rows
        with self._editing():
            for (name, dim, buf), (_, _, src) in zip(list(self._buffers()), theirs):
                if buf.shape[0] < total:  # no free row slot: double the rows
                    grown = buf.new_zeros((max(2 * buf.shape[0], total), *buf.shape[1:]))
                    grown.narrow(0, 0, start).copy_(buf.narrow(0, 0, start))
                    self._replace(name, buf, grown)
                    buf = grown
                buf.narrow(0, start, more.rows).narrow(dim, 0, more.length).copy_(
                    src.narrow(0, 0, more.rows).narrow(dim, 0, more.length))
        self.lengths = torch.cat([self.lengths, more.lengths])
        self.rows, self.length = total, self.capacity if self.static else max(self.length, more.length)

    def keep_rows(self, keep: list[int]) -> list[int]:
        """Keep only the rows ``keep`` (ascending), in row slots ``0 .. len(keep) - 1``; return which old row
        each slot now holds. A leaving row's slot is filled by a kept row from the end (one row copied per
        leaving row, not the batch); the width shrinks to the widest kept row."""
        n, kept = self.rows, len(keep)
        holes = [b for b in range(kept) if b not in set(keep)]
        movers = [b for b in keep if b >= kept]
        order = list(range(kept))
        if holes:
            device = self._device()
            src, dst = (torch.tensor(x, dtype=torch.long, device=device) for x in (movers, holes))
            with self._editing():
                for _, _, buf in self._buffers():
                    buf.index_copy_(0, dst, buf.index_select(0, src))
            for h, m in zip(holes, movers):
                order[h] = m
        assert len(order) == kept <= n
        self.lengths = self.lengths[torch.tensor(order, dtype=torch.long, device=self.lengths.device)]
        self.rows = kept
        self.length = self.capacity if self.static else int(self.lengths.max()) if kept else 0
        return order
