"""A request's long work in a thread of its own, so that Stop can end it.

Gradio stops a streaming handler by closing its generator, which it can only do between two of its updates;
work that runs inside the handler's thread would go on regardless. :func:`in_worker` runs the work in a
thread of its own and hands the handler an update every ``poll_s``; closing it sets the work's cancel
event, which the library checks (``qtg.topology.budget.Budget``, the experiment sweeps' ``cancel=``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")
POLL_S = 0.25  # seconds between two progress updates
GRACE_S = 2.0  # after Stop, how long the handler waits for the work to notice (a forward pass finishes alone)


def in_worker(work: Callable[[threading.Event], T], tick: Callable[[], Any], name: str,
              poll_s: float = POLL_S, grace_s: float = GRACE_S) -> Generator[Any, None, T]:
    """Run ``work(cancel)`` in a thread named ``name``; yield ``tick()`` every ``poll_s`` while it runs.

    Returns the work's result (``result = yield from in_worker(...)``) or raises its exception. Closing the
    generator (Stop) sets ``cancel`` and waits up to ``grace_s`` for the work to end: work between two checks
    of ``cancel`` (a model's forward pass) finishes on its own, then stops at its next check.
    """
    box: dict[str, Any] = {}
    cancel = threading.Event()

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
    finally:
        cancel.set()
        worker.join(grace_s)
    if "error" in box:
        raise box["error"]
    return box["result"]
