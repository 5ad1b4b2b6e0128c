"""A request's long work in a thread of its own, so that Stop can end it.

Gradio stops a streaming handler by closing its generator, which it can only do between two of its updates;
work that runs inside the handler's thread would go on regardless. :func:`in_worker` runs the work in a
thread of its own and hands the handler an update every ``poll_s``; closing it sets the work's cancel
event, which the library checks (``qtg.topology.budget.Budget``, the experiment sweeps' ``cancel=``).
Gradio's cancel over HTTP stops iterating the handler at once but closes it only when it is collected, so
the event also trips once nobody has read an update for ``abandoned_s`` (:class:`Cancel`).
:func:`passes_in_worker` is the same for work that counts its forward passes (sweeps, heads, patching).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import gradio as gr

T = TypeVar("T")
POLL_S = 0.25  # seconds between two progress updates
GRACE_S = 2.0  # after Stop, how long the handler waits for the work to notice (a forward pass finishes alone)
# A run whose progress nobody has read for this long was cancelled (Stop over HTTP drops the generator without
# closing it until the garbage collector does): its work stops at its next check of the event.
ABANDONED_S = 3.0


class Cancel(threading.Event):
    """The work's cancel event: set by Stop, and seen set by the work once the handler has not been resumed
    for ``abandoned_s`` (None: never). The work checks it with ``is_set()`` between two passes."""

    def __init__(self, abandoned_s: float | None = ABANDONED_S):
        super().__init__()
        self.abandoned_s = abandoned_s
        self.last_read = time.monotonic()

    def read(self) -> None:
        """The handler was resumed: someone still reads its updates."""
        self.last_read = time.monotonic()

    def is_set(self) -> bool:
        if self.abandoned_s is not None and time.monotonic() - self.last_read > self.abandoned_s:
            self.set()
        return super().is_set()


def in_worker(work: Callable[[threading.Event], T], tick: Callable[[], Any], name: str,
              poll_s: float = POLL_S, grace_s: float | None = GRACE_S,
              abandoned_s: float | None = ABANDONED_S) -> Generator[Any, None, T]:
    """Run ``work(cancel)`` in a thread named ``name``; yield ``tick()`` every ``poll_s`` while it runs.

    Returns the work's result (``result = yield from in_worker(...)``) or raises its exception. Closing the
    generator (Stop) sets ``cancel`` and waits up to ``grace_s`` (None: until it ends) for the work to end:
    work between two checks of ``cancel`` (a model's forward pass) finishes on its own, then stops at its next
    check. So does the work of a generator nobody resumes for ``abandoned_s`` (see :class:`Cancel`).
    """
    box: dict[str, Any] = {}
    cancel = Cancel(abandoned_s)

    def run() -> None:
        try:
            box["result"] = work(cancel)
        except BaseException as e:  # handed to the handler's thread, which raises it
            box["error"] = e

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(poll_s)
            if worker.is_alive():
                yield tick()
                cancel.read()
    finally:
        cancel.set()
        worker.join(grace_s)
    if "error" in box:
        raise box["error"]
    return box["result"]


def passes_in_worker(work: Callable[[threading.Event, Callable[[int], None]], T], state: dict[str, int],
                     progress: Any, name: str, n_outputs: int, count: Callable[[], Any],
                     what: str = "window passes", unit: str = "windows", after: int = 0) -> Generator[tuple, None, T]:
    """:func:`in_worker` for ``work(cancel, report_done)``, which reports how many of ``state["total"]`` passes
    it has done: each report sets ``state["done"]`` and calls ``count`` (the server's forward-pass counter).

    Each update moves ``progress`` (Gradio's bar, when given) and is ``n_outputs`` skipped outputs, the status
    counting ``what``, ``after`` more skipped outputs, then a copy of ``state``. Stop waits for the pass under
    way: the handler's next run must not overlap this one.
    """
    def report(done: int) -> None:
        state["done"] = done
        count()

    def tick() -> tuple:
        if progress is not None:
            progress((state["done"], state["total"]), desc=what, unit=unit)
        status = f"running: {state['done']} of {state['total']} {what}"
        return (*[gr.skip()] * n_outputs, status, *[gr.skip()] * after, dict(state))

    return (yield from in_worker(lambda cancel: work(cancel, report), tick, name, grace_s=None))
