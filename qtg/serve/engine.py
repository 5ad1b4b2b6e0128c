"""Continuous batching: many generation requests share one decoding loop.

One background thread runs :meth:`Engine.step` while there is work. A request
that arrives while others decode is prefilled on its own (a B = 1
:class:`~qtg.model.model.QTGCache`) and joins the running batch at the next step; a
request leaves the batch when it finishes or is cancelled. Rows already
running are never recomputed: the batch's cache is *ragged* (each row its own
length, see :class:`~qtg.model.cache.QTGCache`), so a step feeds one token per row
and the model positions and masks every row by its own length. Each group's cache
is preallocated and written in place: a joining request's rows are copied once into
free row slots, a leaving row's slot is refilled by the last row, and no step copies
the cache.

Each request keeps everything that makes it its own: sampling (temperature,
top-k, top-p and a seeded ``torch.Generator``, chosen by
:func:`qtg.generate.sample`), stop strings and EOS (:class:`qtg.generate.Stopper`),
its :class:`~qtg.model.intervention.Intervention` and its stream of events. Rows
with different interventions run as separate groups, one forward pass per
group and step (an intervention is per call). A request's tokens are those
:func:`qtg.generate.generate` gives it alone (``tests/test_engine.py`` holds
greedy and seeded requests to it); the logits agree to float32 rounding, as
in any batch (on the trained nano within 3e-7 of their scale).

Per token a request may also ask for its TopoFilter s~, s and w (computed
for the new token against the row's cached QEmbed states, as the next
forward pass will), for log-probabilities (of the model's raw
distribution, before temperature and filtering) and for its attention row
in one block (``attention_block``). A token's row exists only once the
token is fed back, so each event carries the row of the token before it
(``[H, i + 1]`` for token i: its keys 0..i, the row's padding cut off),
the first event none (the prompt's rows are not sent) and the finish
event the last token's, from one more forward pass of that row alone in
the batch (it samples nothing). A step computes maps only when one of its
rows asks (``return_internals=True, map_blocks=`` the blocks asked), and
the logits never depend on it, so every row's tokens stay the same.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qtg.errors import GenerationError
from qtg.generate import Sampling, Stopper, check_request, inference, sample_rows, stop_strings
from qtg.model.intervention import NO_INTERVENTION, Intervention
from qtg.model.model import QTGCache
from qtg.model.protocol import LanguageModel

log = logging.getLogger("qtg.serve")

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"
_ids = itertools.count(1)


@dataclass(frozen=True)
class TopoScore:
    """One token's TopoFilter numbers: s~ (soft-min), s (exact causal minimum), w (as applied)."""

    soft: float
    exact: float
    weight: float


@dataclass(frozen=True)
class Event:
    """What a request's stream carries: one new token, or (``finish`` set, ``token`` None) the end.

    ``logprob``/``top_logprobs`` are natural logs of the model's raw next-token distribution;
    ``top_logprobs`` lists (token id, log-probability), most likely first.
    """

    token: int | None = None
    topo: TopoScore | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    attention: Tensor | None = None  # [H, i + 1] float32 on the CPU: the attention row of token i, the one before
    finish: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One submitted generation: read its events (``for ev in req`` or ``async for ev in req.aevents()``),
    or :meth:`cancel` it. ``prompt_topo`` holds the prompt tokens' scores when they were asked for."""

    ids: Tensor  # [1, N] prompt
    max_new_tokens: int
    sampling: Sampling
    intervene: Intervention
    stopper: Stopper
    want_topo: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k most likely
    attention_block: int | None = None  # None: no attention rows; else the block (0-based) whose rows are sent
    id: int = field(default_factory=lambda: next(_ids))
    prompt_topo: list[TopoScore] | None = None
    generated: list[int] = field(default_factory=list)
    finish: str | None = None
    _finishing: str | None = field(default=None, repr=False)  # finished, waiting for its last token's row
    _queue: Any = field(default_factory=queue.Queue, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop this request: its row leaves the batch at the next step (the others are untouched)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, event: Event, outbox: dict | None = None) -> None:
        """Deliver ``event``; for an event-loop consumer, into ``outbox`` (sent once per step) when given."""
        if self._loop is None:
            self._queue.put(event)
        elif outbox is not None:
            outbox.setdefault(self._loop, []).append((self, event))
        else:
            _post(self._loop, [(self, event)])

    def __iter__(self) -> Iterator[Event]:
        """Block for each event until the last (the one with ``finish`` set)."""
        assert self._loop is None, "this request streams to an event loop: use aevents()"
        while True:
            event = self._queue.get()
            yield event
            if event.finish is not None:
                return

    async def aevents(self) -> AsyncIterator[Event]:
        """The events, for a request submitted with ``loop=`` (the running event loop)."""
        assert self._loop is not None, "submit with loop= to read events asynchronously"
        while True:
            event = await self._queue.get()
            yield event
            if event.finish is not None:
                return

    def tokens(self) -> list[int]:
        """Block until the end; the new token ids (raises GenerationError if the request failed)."""
        out = []
        for event in self:
            if event.error:
                raise GenerationError(event.error)
            if event.token is not None:
                out.append(event.token)
        return out


@dataclass
class _Group:
    """Rows decoding under one intervention: one ragged cache, one forward pass per step."""

    intervene: Intervention
    rows: list[Request]
    cache: QTGCache


@dataclass
class EngineStats:
    """Counts the tests and benchmarks read."""

    steps: int = 0  # batched decoding steps run (one per group)
    rows_decoded: int = 0  # sum over steps of the rows in them
    max_rows: int = 0  # the largest batch one step ran
    prefills: int = 0


class Engine:
    """A continuous-batching decoder for one model; thread-safe :meth:`submit`.

    Args:
        model: a QTG model or its baseline (put in eval mode for each step).
        tokenizer: for stop strings (default ``model.tokenizer``).
        max_batch: most rows decoding at once; later requests wait their turn.
        start: run the step loop in a background thread (False: call :meth:`step` yourself, as tests do).
    """

    def __init__(self, model: LanguageModel, tokenizer: Any = None, max_batch: int = 64, start: bool = True):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.max_batch = max_batch
        self.stats = EngineStats()
        self._pending: deque[Request] = deque()
        self._groups: list[_Group] = []
        self._wake = threading.Condition()
        self._closed = False
        self._retiring = False  # close once idle (close_when_idle)
        self._outbox: dict | None = None  # during a step: event loop -> [(request, event)] to deliver
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="qtg-engine", daemon=True)
            self._thread.start()

    # --- the public side -----------------------------------------------------------------
    def submit(self, ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, eos_id: int | None = None,
               stop: str | Sequence[str] | None = None, intervene: Intervention | None = None,
               topo: bool = False, logprobs: int | None = None, attention_block: int | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Request:
        """Queue one request (a single prompt); it joins the batch at the next step.

        Arguments as :func:`qtg.generate.generate` (checked by the same
        :func:`~qtg.generate.check_request`, here, before anything is queued), plus:
        ``topo`` (each token's s~, s, w, and the prompt's), ``logprobs`` (k: the
        chosen token's log-probability and the k most likely), ``attention_block``
        (each event's :attr:`Event.attention`: the previous token's attention row in
        this block; negative counts from the last) and ``loop`` (deliver events to
        this asyncio loop, read with :meth:`Request.aevents`).

        Raises:
            GenerationError: a bad request (one line naming the field).
        """
        if self._closed:
            raise GenerationError("the engine is closed")
        sampling = Sampling(float(temperature) if isinstance(temperature, (int, float)) else temperature,
                            top_k, top_p, seed)
        ids = check_request(self.model, ids, max_new_tokens, sampling=sampling, eos_id=eos_id, stop=stop,
                            tokenizer=self.tokenizer, intervene=intervene)
        if ids.shape[0] != 1:
            raise GenerationError(f"submit one prompt per request, got a batch of {ids.shape[0]}")
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= self.model.cfg.vocab_size):
            raise GenerationError(f"logprobs must be an integer in 0..{self.model.cfg.vocab_size}, got {logprobs!r}")
        attention_block = self._check_block(attention_block)
        req = Request(ids, max_new_tokens, sampling, intervene or NO_INTERVENTION,
                      Stopper(1, ids.device, eos_id, stop_strings(stop), self.tokenizer),
                      want_topo=bool(topo) and self.model.has_topofilter, logprobs=logprobs,
                      attention_block=attention_block,
                      _queue=asyncio.Queue() if loop is not None else queue.Queue(), _loop=loop,
                      _generator=sampling.generator(ids.device))
        with self._wake:
            if self._closed:  # again under the lock: the loop may have ended since the check above
                raise GenerationError("the engine is closed")
            self._pending.append(req)
            self._wake.notify()
        return req

    def _check_block(self, block: Any) -> int | None:
        """``attention_block`` as a block index 0..L-1 (None stays None)."""
        n = self.model.cfg.n_layers
        if block is None:
            return None
        if isinstance(block, bool) or not isinstance(block, int) or not -n <= block < n:
            raise GenerationError(f"attention_block must be an integer in 0..{n - 1} (negative: from the last), "
                                  f"got {block!r}")
        return block % n

    def close(self) -> None:
        """Stop the loop; running and queued requests end with finish ``"cancelled"``."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        for req in [*self._pending, *(r for g in self._groups for r in g.rows)]:
            self._finish(req, req._finishing or FINISH_CANCELLED)  # one done but for its last row keeps its reason
        self._pending.clear()
        self._groups.clear()

    def close_when_idle(self) -> None:
        """Close once no request runs or waits (at once if none does); the running ones finish first.

        For a model that is being dropped: the loop's thread holds the engine, and so the model, until it ends."""
        with self._wake:
            self._retiring = True
            self._wake.notify()
        if self._thread is None and self.idle:
            self.close()

    @property
    def active(self) -> int:
        """Rows decoding now."""
        return sum(len(g.rows) for g in self._groups)

    @property
    def idle(self) -> bool:
        return not self._pending and not self._groups

    # --- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while self.idle and not self._closed and not self._retiring:
                    self._wake.wait()
                if self._closed or (self._retiring and self.idle):
                    self._closed = True  # a late submit is refused, not queued for a loop that has ended
                    return
            try:
                self.step()
            except Exception:  # a bug: every running request hears of it, and the loop goes on
                log.exception("engine step failed")
                for group in self._groups:
                    for req in group.rows:
                        self._finish(req, FINISH_ERROR, "internal error in the decoding loop")
                self._groups.clear()

    def step(self) -> None:
        """Admit waiting requests (prefill, first token), then one decoding step of every group.

        Events for event-loop consumers go out together at the end of the step: one wake-up of
        each loop per step, not one per request (the loop and this thread share the GIL).
        """
        self._outbox = {}
        try:
            self._admit()
            for group in list(self._groups):
                self._drop_cancelled(group)
                if group.rows:
                    self._decode(group)
            self._groups = [g for g in self._groups if g.rows]
        finally:
            outbox, self._outbox = self._outbox, None
            for loop, items in outbox.items():
                _post(loop, items)

    def _admit(self) -> None:
        """Take waiting requests (up to ``max_batch`` rows in all), prefill them together, send their first tokens."""
        with self._wake:
            taken = []
            while self._pending and self.active + len(taken) < self.max_batch:
                taken.append(self._pending.popleft())
        live = []
        for req in taken:
            if req.cancelled:
                self._finish(req, FINISH_CANCELLED)
            else:
                live.append(req)
        while live:  # one prefill per intervention
            batch = [r for r in live if _same(r.intervene, live[0].intervene)]
            live = [r for r in live if not _same(r.intervene, live[0].intervene)]
            try:
                self._prefill(batch)
            except Exception as e:  # e.g. out of memory for these prompts: they fail, not the engine
                log.exception("prefill failed")
                for req in batch:
                    self._finish(req, FINISH_ERROR, f"{type(e).__name__}: {e}")

    def _prefill(self, reqs: list[Request]) -> None:
        """Prompts of one intervention in one forward pass; each request's first token; the rows join the batch.

        The prompts are right-padded to the longest: attention and the TopoFilter are causal, so a
        row's last real position never sees its padding, and the cache it leaves is a ragged one
        (row b's slots past its length hold padding, masked from then on).
        """
        lengths = torch.tensor([r.ids.shape[1] for r in reqs], device=reqs[0].ids.device)
        ids = torch.zeros(len(reqs), int(lengths.max()), dtype=torch.long, device=lengths.device)  # [B, W]
        for b, req in enumerate(reqs):
            ids[b, :req.ids.shape[1]] = req.ids[0]
        cache, intervene = QTGCache(checked_ids=True), reqs[0].intervene  # submit checked the prompts
        with inference(self.model):
            logits = self.model(ids, cache=cache, intervene=intervene).logits  # [B, W, V]
            last = logits[torch.arange(len(reqs), device=ids.device), lengths - 1]  # [B, V]: after each prompt
            cache.make_ragged(lengths)
            want_topo = any(r.want_topo for r in reqs)
            if want_topo:
                prompt = _scores(self.model.topo_scores(cache.points, None, intervene, ids=ids))
                for req, row, n in zip(reqs, prompt, lengths.tolist()):
                    req.prompt_topo = row[:n] if req.want_topo else None
            chosen = self._choose(reqs, last)
            topo = self._topo(cache, intervene, [new for new, _ in chosen]) if want_topo else None
        self.stats.prefills += 1
        for b, (req, (_, event)) in enumerate(zip(reqs, chosen)):
            self._send(req, event, topo[b] if topo is not None and req.want_topo else None)
        keep = [b for b, req in enumerate(reqs) if req.finish is None]
        if keep:
            order = cache.keep_rows(keep) if len(keep) < len(reqs) else keep
            self._join([reqs[b] for b in order], cache)

    def _decode(self, group: _Group) -> None:
        """One forward pass of the group's rows (their last tokens), then each row's choice.

        A row that finished last step but waits for its last token's attention row is fed that token
        too; it samples nothing, hears its row with its finish, and leaves.
        """
        rows = group.rows
        last = torch.tensor([[req.generated[-1]] for req in rows], device=group.cache.lengths.device)
        blocks = sorted({r.attention_block for r in rows if r.attention_block is not None})
        maps = dict(return_internals=True, map_blocks=blocks) if blocks else {}  # none asks: no maps at all
        with inference(self.model):
            out = self.model(last, cache=group.cache, intervene=group.intervene, **maps)
            logits = out.logits[:, -1]  # [B, V]
            n = len(rows)
            self.stats.steps += 1
            self.stats.rows_decoded += n
            self.stats.max_rows = max(self.stats.max_rows, n)
            attention = self._attention_rows(out, rows, group.cache.lengths) if blocks else [None] * n
            going = [b for b, req in enumerate(rows) if req._finishing is None]
            chosen = dict(zip(going, self._choose([rows[b] for b in going],
                                                  logits if len(going) == n else logits[going]))) if going else {}
            news = [chosen[b][0] if b in chosen else last[b] for b in range(n)]  # a leaving row: any token
            topo = (self._topo(group.cache, group.intervene, news)
                    if any(rows[b].want_topo for b in going) else None)
        for b, req in enumerate(rows):
            if b not in chosen:
                self._finish(req, req._finishing, attention=attention[b])
            else:
                self._send(req, chosen[b][1], topo[b] if topo is not None and req.want_topo else None, attention[b])
        keep = [b for b, req in enumerate(group.rows) if req.finish is None]
        if len(keep) < n:
            _keep_rows(group, keep)

    def _choose(self, reqs: list[Request], logits: Tensor) -> list[tuple[Tensor, Event]]:
        """Each request's next token ``[1]`` from its row of ``logits`` ``[B, V]``, as
        :func:`qtg.generate.decode_n_tokens` chooses it (its sampling, its random source, its stopper);
        with the token's event, not yet sent."""
        tokens = sample_rows(logits, [r.sampling for r in reqs], [r._generator for r in reqs])
        out = []
        for b, (req, token) in enumerate(zip(reqs, tokens)):
            new = torch.tensor([token], device=logits.device)
            req.generated.append(token)
            # the generated ids matter to stop strings only: otherwise a stand-in of the right shape
            generated = torch.tensor([req.generated], device=new.device) if req.stopper.stop else new.view(1, 1)
            req.stopper.update(new, generated)
            lp = top = None
            if req.logprobs is not None:
                logp = torch.log_softmax(logits[b].float(), dim=-1)  # [V]
                lp = float(logp[token])
                if req.logprobs:
                    values, order = torch.topk(logp, req.logprobs)
                    top = tuple(zip(order.tolist(), values.tolist()))
            out.append((new, Event(token=token, logprob=lp, top_logprobs=top)))
        return out

    def _topo(self, cache: QTGCache, intervene: Intervention, news: list[Tensor]) -> list[TopoScore]:
        """Each row's new token's s~, s, w against that row's cached QEmbed states (ragged ``cache``), batched."""
        new = torch.cat(news).view(-1, 1)  # [B, 1]
        psi = self.model.embed_points(new)  # [B, 1, 2d]
        rows = _scores(self.model.topo_scores(psi, cache.points, intervene, lengths=cache.lengths,
                                              ids=new, past_ids=cache.ids))
        return [row[0] for row in rows]

    @staticmethod
    def _attention_rows(out: Any, rows: list[Request], lengths: Tensor) -> list[Tensor | None]:
        """Each asking row's attention row ``[H, n_b]`` in its block (its n_b = ``lengths[b]`` real keys,
        the new token's last), float32 on the CPU; None for a row that does not ask."""
        res: list[Tensor | None] = []
        for b, (req, n) in enumerate(zip(rows, lengths.tolist())):
            k = req.attention_block
            res.append(None if k is None else out.attention[k][b, :, -1, :n].float().cpu().clone())
        return res

    def _send(self, req: Request, event: Event, topo: TopoScore | None, attention: Tensor | None = None) -> None:
        """Hand ``req`` its token (with its scores and the previous token's attention row); end it if that
        token finished it, or, when it asks for attention rows, after one more step brings the last one."""
        req._emit(Event(token=event.token, topo=topo, logprob=event.logprob, top_logprobs=event.top_logprobs,
                        attention=attention), self._outbox)
        reason = (FINISH_STOP if req.stopper.finished[0] else
                  FINISH_LENGTH if len(req.generated) >= req.max_new_tokens else None)
        if reason is not None and req.attention_block is not None:
            req._finishing = reason  # stays in the batch one more step, for its last token's row
        elif reason is not None:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str, error: str | None = None, attention: Tensor | None = None) -> None:
        if req.finish is None:
            req.finish = reason
            req._emit(Event(finish=reason, error=error, attention=attention), self._outbox)

    def _drop_cancelled(self, group: _Group) -> None:
        keep = [b for b, req in enumerate(group.rows) if not req.cancelled]
        for req in group.rows:
            if req.cancelled:
                self._finish(req, FINISH_CANCELLED)
        if len(keep) < len(group.rows):
            _keep_rows(group, keep)

    def _join(self, reqs: list[Request], cache: QTGCache) -> None:
        """Add ``reqs`` (their prompts in the ragged ``cache``, first tokens chosen) to their intervention's group."""
        for group in self._groups:
            if _same(group.intervene, reqs[0].intervene):
                group.rows.extend(reqs)
                group.cache.add_rows(cache)  # into the group's free row slots: only the new rows are copied
                return
        self._groups.append(_Group(reqs[0].intervene, list(reqs), cache))


# --- helpers -----------------------------------------------------------------------------------


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[Request, Event]]) -> None:
    """Hand events to requests read on ``loop``, in one call from this thread."""
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # the consumer's event loop has closed: nobody is listening
        for req, _ in items:
            req._cancelled.set()


def _deliver(items: list[tuple[Request, Event]]) -> None:
    for req, event in items:
        req._queue.put_nowait(event)


def _scores(s: Any) -> list[list[TopoScore]]:
    """TopoScores ``[B, N]`` tensors -> per row, per token."""
    soft, exact, w = s.soft.tolist(), s.exact.tolist(), s.weights.tolist()
    return [[TopoScore(a, b, c) for a, b, c in zip(ra, rb, rc)] for ra, rb, rc in zip(soft, exact, w)]


def _same(a: Intervention, b: Intervention) -> bool:
    """Whether two requests can share a forward pass (tensor-valued gammas only when the same object)."""
    if a is b:
        return True
    if a.patch or b.patch:  # patches hold tensors and functions: shared only by the same mapping
        return a.patch is b.patch and a == b
    if not isinstance(a.gamma, (int, float, type(None))) or not isinstance(b.gamma, (int, float, type(None))):
        return False
    return a == b


def _keep_rows(group: _Group, keep: list[int]) -> None:
    """Keep the rows ``keep`` of a group: their requests and their cache slots (a leaving row's slot is
    refilled from the end, so the requests follow the slots' new order)."""
    order = group.cache.keep_rows(keep)
    group.rows = [group.rows[b] for b in order]
