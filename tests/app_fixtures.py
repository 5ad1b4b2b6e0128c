"""Fixtures and helpers shared by the app's in-process and HTTP test modules.

A module uses a fixture by importing its function (``from tests.app_fixtures import ex_fixture``; the
fixture is named ``ex``, so a test's argument does not shadow the import): pytest then registers it for
that module, so each module keeps its own explorer (module scope).
Import this after ``pytest.importorskip("gradio")``: the app needs its extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
