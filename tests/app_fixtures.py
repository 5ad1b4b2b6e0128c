"""Fixtures and helpers shared by the app's in-process and HTTP test modules.

A module uses a fixture by importing its function (``from tests.app_fixtures import ex_fixture``; the
fixture is named ``ex``, so a test's argument does not shadow the import): pytest then registers it for
that module, so each module keeps its own explorer (module scope).
Import this after ``pytest.importorskip("gradio")``: the app needs its extra.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from app.config import AppConfig
from app.core import Explorer


@pytest.fixture(scope="module", name="ex")
def ex_fixture(tmp_path_factory) -> Explorer:
    """An explorer on the CPU with the shipped nano as its default model, exports in a private folder."""
    return Explorer(AppConfig(export_dir=tmp_path_factory.mktemp("exports"), device="cpu"))


@pytest.fixture(scope="module", name="nano")
def nano_fixture(ex):
    """The explorer's default model (shipped nano), as loaded for a request without a session."""
    return ex.current(None)


def count_after_cancel(job, started: Callable[[], bool], count: Callable[[], int], what: str,
                       settle_s: float = 1.5, watch_s: float = 2.0) -> int:
    """Cancel a ``gradio_client`` job once ``started()`` holds, and assert the server's ``count()`` then stays still.

    ``settle_s`` lets the step under way when Stop arrived finish; ``count()`` must not move in the
    ``watch_s`` after it (else the assertion names ``what`` kept going). Returns the count at Stop, for
    the caller to check the work stopped midway.
    """
    deadline = time.time() + 60
    while not started() and time.time() < deadline:
        time.sleep(0.05)
    job.cancel()
    time.sleep(settle_s)
    at_stop = count()
    time.sleep(watch_s)
    assert count() == at_stop, f"{what} kept going after Stop"
    return at_stop


def close_after_first_pass(ex: Explorer, gen: Iterator[tuple], thread: str) -> int:
    """What Stop does to a run of the Experiment tab: read its progress updates until a forward pass has run, then
    close the generator. Asserts the worker thread ``thread`` is gone and the server's pass count stays still;
    returns how many passes ran, for the caller to check the run stopped far from its end."""
    start = ex.counters.forwards
    for update in gen:
        assert len(update) == 6 and update[2].startswith("running: ")
        if ex.counters.forwards > start:
            break
    gen.close()
    assert not [t for t in threading.enumerate() if t.name == thread]
    stopped_at = ex.counters.forwards
    time.sleep(0.5)
    assert ex.counters.forwards == stopped_at, f"{thread} kept running after it was closed"
    return stopped_at - start
