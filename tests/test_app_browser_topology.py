"""The Topology tab's time budget in Chromium: a control of its own, whose refusal names it (never a command-line
flag), and a Stop button beside Compute.

Uses the session's one app server and page (tests/browser.py); runs after tests/test_app_browser.py, whose last
test counts that module's refusals alone.
"""

from __future__ import annotations

import pytest

from tests.browser import plot_rendered, set_number, tab

pytestmark = pytest.mark.slow
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."


def test_the_time_budget_is_set_in_the_page_and_its_refusal_names_the_control(page):
    tab(page, "Topology")
    page.fill("#topology-text textarea", TEXT)
    assert page.is_visible("#topology-stop")
    set_number(page, "topology-budget", "0.001")
    page.click("#topology-btn")
    toast = page.get_by_text("ran past the time budget of 0.001 s").first
    toast.wait_for(timeout=60_000)
    assert "raise 'time budget (s)'" in toast.inner_text() and "--" not in toast.inner_text()
    set_number(page, "topology-budget", "30")  # as the other tests expect it
    page.click("#topology-btn")
    plot_rendered(page, "topology-diagram")
    page.wait_for_function("document.querySelector('#topology-bounds')?.innerText.includes('time budget 30 s')")
