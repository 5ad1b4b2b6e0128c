"""app.worker: a request's work in a thread of its own, which Stop (closing the handler) or an unread handler ends."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

import gradio as gr  # noqa: E402

from app.worker import Cancel, in_worker, passes_in_worker  # noqa: E402


def until_cancelled(cancel: threading.Event, passes: list[int]) -> str:
    """Work that runs passes until its cancel event says stop; ``passes`` counts them."""
    while not cancel.is_set():
        passes.append(1)
        cancel.wait(0.01)
    return "cancelled"


def test_the_result_comes_back_after_the_updates():
    gen = in_worker(lambda cancel: cancel.wait(0.2) or 42, lambda: "tick", "test-worker", poll_s=0.05)
    updates = []
    with pytest.raises(StopIteration) as end:
        while True:
            updates.append(next(gen))
    assert end.value.value == 42 and updates and set(updates) == {"tick"}


def test_the_works_error_is_raised_in_the_handler():
    def failing(cancel):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        list(in_worker(failing, lambda: None, "test-worker"))


def test_closing_the_handler_stops_the_work():
    passes: list[int] = []
    gen = in_worker(lambda cancel: until_cancelled(cancel, passes), lambda: "tick", "test-worker", poll_s=0.05,
                    grace_s=None)
    next(gen)
    gen.close()  # what Stop does; with grace_s None it waits for the work to end
    assert passes and not [t for t in threading.enumerate() if t.name == "test-worker"]


def test_work_nobody_reads_any_more_stops_though_its_handler_lives():
    """Gradio's cancel over HTTP drops the handler without closing it: the work sees its event set."""
    passes: list[int] = []
    gen = in_worker(lambda cancel: until_cancelled(cancel, passes), lambda: "tick", "test-worker", poll_s=0.05,
                    abandoned_s=0.3)
    next(gen)  # then no more reads; `gen` stays referenced
    for t in [t for t in threading.enumerate() if t.name == "test-worker"]:
        t.join(30)
    assert not [t for t in threading.enumerate() if t.name == "test-worker"], "the unread work kept going"
    with pytest.raises(StopIteration) as end:
        next(gen)
    assert end.value.value == "cancelled"


def test_a_handler_that_is_read_is_not_taken_for_abandoned():
    cancel = Cancel(abandoned_s=60.0)
    assert not cancel.is_set()
    cancel.read()
    assert not cancel.is_set()
    assert Cancel(abandoned_s=-1.0).is_set()  # not read within the (past) limit: abandoned
    assert not Cancel(abandoned_s=None).is_set()  # no limit: only Stop sets it


def test_passes_in_worker_counts_the_reported_passes():
    state = {"done": 0, "total": 5}
    counted: list[int] = []
    bar: list[tuple] = []

    def work(cancel, report):
        for done in range(1, 6):
            report(done)
            cancel.wait(0.2)
        return "done"

    gen = passes_in_worker(work, state, lambda p, **kw: bar.append(p), "test-passes", 1, lambda: counted.append(1),
                           what="passes", after=1)
    updates = []
    with pytest.raises(StopIteration) as end:
        while True:
            updates.append(next(gen))
    assert end.value.value == "done" and len(counted) == 5 and state["done"] == 5
    skip, status, skip_after, shown = updates[0]
    assert skip == skip_after == gr.skip() and status.startswith("running: ") and status.endswith(" of 5 passes")
    assert bar and all(total == 5 for _, total in bar)
