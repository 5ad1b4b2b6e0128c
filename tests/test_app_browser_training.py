"""The Training tab in Chromium: "Train micro here" starts a run whose progress bar moves and whose snapshots
are drawn as they are written; the slider scrubs back; the figures fit their panels.

Uses the session's one app server and page (tests/browser.py). ``QTG_SCREENSHOTS=docs/screenshots`` writes
docs/screenshots/training.png.
"""

from __future__ import annotations

import pytest

from tests.browser import fits, plot_rendered, set_number, tab

pytestmark = pytest.mark.slow


def test_train_micro_here_draws_its_snapshots(page, shots):
    tab(page, "Training")
    set_number(page, "training-steps", "40")
    set_number(page, "training-every", "10")
    page.click("#training-start")
    page.wait_for_selector("#training-bar", timeout=60_000)  # the progress bar, polled from the run
    plot_rendered(page, "training-curves", timeout=120_000)  # drawn when the first snapshot lands
    page.wait_for_function("document.querySelector('#training-status')?.innerText.includes('finished')",
                           timeout=120_000)
    assert page.evaluate("document.querySelector('#training-bar').value") == 40
    page.click("#training-show")
    page.wait_for_function("document.querySelector('#training-note')?.innerText.includes('Snapshot 5 of 5')",
                           timeout=60_000)
    set_number(page, "training-snapshot", "1")  # scrub back to step 10
    page.click("#training-show")
    page.wait_for_function("document.querySelector('#training-note')?.innerText.includes('(step 10)')",
                           timeout=60_000)
    plot_rendered(page, "training-views")
    for elem in ("training-curves", "training-views"):
        fits(page, elem)
    assert not [e for e in page.console_errors if "training" in e.lower()]
    page.locator("#training-curves").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "training.png"), full_page=True)
