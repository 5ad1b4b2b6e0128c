"""The "w from" toggle in Chromium: Generate's colouring, the Topology tab's w figure and the Compare table switch
to a control's w (position only, one-bit gate) when the toggle is clicked, with the figures in words.

The page states the controls' constants (calibrated on the validation works, not the text shown), and the test
reads them back from it: under the gate every token's colour is 1 or the stated constant, under position only the
token at position 1 has the stated mean w of position 1, while the filter's own w is neither. Uses the session's
one app server and page (tests/browser.py).
"""

from __future__ import annotations

import re

import pytest

from tests.browser import plot_rendered, set_number, tab

pytestmark = pytest.mark.slow
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."
SHOWN_W = "[...document.querySelectorAll('#generated-html .qtg-tok')].map(s => parseFloat(s.dataset.w))"


def choose(page, toggle: str, label: str) -> None:
    page.locator(f"#{toggle} label", has_text=label).click()


def note_says(page, elem_id: str, words: str, timeout: float = 120_000) -> str:
    page.wait_for_function(f"document.querySelector('#{elem_id}')?.innerText.includes({words!r})", timeout=timeout)
    return page.inner_text(f"#{elem_id}")


def test_generate_colours_by_the_control_when_toggled(page):
    tab(page, "Generate")
    choose(page, "generate-w-from", "the filter")
    page.fill("#prompt textarea", "ROMEO:")
    set_number(page, "max-new", "12")
    page.click("#generate-btn")
    page.wait_for_function("document.querySelector('#generate-stats')?.innerText.startsWith('done')", timeout=60_000)
    own = page.evaluate(SHOWN_W)
    choose(page, "generate-w-from", "one-bit gate")
    note = note_says(page, "generated-html", "one-bit gate control's w")
    gate = float(re.search(r"first occurrences: mean w ([0-9.]+)", note).group(1))
    gated = page.evaluate(SHOWN_W)
    assert len(gated) == len(own) > 12
    assert all(w == 1.0 or abs(w - gate) < 5e-4 for w in gated), (gate, gated)
    assert any(w != 1.0 and abs(w - gate) >= 5e-4 for w in own)  # the filter's w is graded: not what is shown now
    choose(page, "generate-w-from", "position only")
    note = note_says(page, "generated-html", "position only control's w")
    at_1 = float(re.search(r"mean w by position from ([0-9.]+) at position 1", note).group(1))
    assert abs(page.evaluate(SHOWN_W)[1] - at_1) < 5e-4 and "Position alone explains" in note
    title = page.get_attribute("#generated-html .qtg-tok >> nth=1", "title")
    assert ", w = " in title and "position only w = " in title  # the filter's w beside the control's
    choose(page, "generate-w-from", "the filter")
    page.wait_for_function("!document.querySelector('#generated-html .qtg-control-note')", timeout=60_000)
    assert page.evaluate(SHOWN_W) == own


def test_topology_draws_the_filters_w_beside_the_control(page):
    tab(page, "Topology")
    page.fill("#topology-text textarea", TEXT)
    set_number(page, "topology-budget", "30")
    page.click("#topology-btn")
    plot_rendered(page, "topology-w")
    note_says(page, "topology-w-note", "w shown: the filter's own w")
    traces = "document.querySelectorAll('#topology-w .scatterlayer .trace').length"
    assert page.evaluate(traces) == 2  # position alone, the filter's w
    choose(page, "topology-w-from", "one-bit gate")
    note = note_says(page, "topology-w-note", "one-bit gate control's w against the filter's: correlation")
    assert "validation works" in note
    page.wait_for_function(f"{traces} === 3", timeout=60_000)
    choose(page, "topology-w-from", "the filter")


def test_compare_sets_a_control_against_the_filter(page):
    tab(page, "Compare")
    choose(page, "compare-mode-a", "position only")  # A is nano (B the baseline, which has no w)
    page.click("#compare-btn")
    page.wait_for_function("document.querySelector('#compare-table')?.innerText.includes('position only')",
                           timeout=120_000)
    lines = page.inner_text("#compare-table").splitlines()  # a row's label, then its A and B cells
    table = {lines[k]: lines[k + 1:k + 3] for k in range(len(lines) - 2)}
    r, mad = table["w vs the filter's: r, mean |Δw|"][0].split(", ")
    assert -1 <= float(r) <= 1 and 0 < float(mad) < 1  # a control's w beside the filter's: they differ
    assert table["w variance position explains"][0].endswith("%")
    assert table["w vs the filter's: r, mean |Δw|"][1] == "— (no TopoFilter)"  # the baseline says so, no error
    choose(page, "compare-mode-a", "approximate")
