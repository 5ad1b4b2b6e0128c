"""The Experiment tab in headless Chromium (the session's ``python -m app`` server and page, tests/browser.py):
one text before and after an intervention, the logit lens of QTG and its baseline, the sweep over the held-out
works with its table and forest plot, and Stop on a long sweep. Screenshots: lens.png, then experiment.png with
every panel filled (``QTG_SCREENSHOTS=docs/screenshots`` writes the README's).
"""

from __future__ import annotations

import pytest

from tests.browser import fits, plot_rendered, set_number, start_then_stop, tab

pytestmark = pytest.mark.slow

# What overflows a plot's panel: the drawn SVG wider than the panel (a heatmap has a colour bar, no legend)
SVG_FITS_JS = """id => {
  const panel = document.getElementById(id).getBoundingClientRect();
  const svg = document.querySelector('#' + id + ' .main-svg').getBoundingClientRect();
  return {panel: panel.width, svg: svg.width, over: svg.right - panel.right};
}"""


def _text(page, elem_id: str) -> str:
    return page.inner_text(f"#{elem_id}")


def test_experiment_on_a_text(page):
    tab(page, "Experiment")
    page.locator("#experiment-topo").get_by_text("exact", exact=True).click()
    page.fill("#experiment-ablate textarea, #experiment-ablate input", "0:1")
    page.click("#experiment-btn")
    plot_rendered(page, "experiment-bars")
    page.wait_for_function("document.querySelectorAll('#experiment-delta .qtg-delta').length > 10", timeout=60_000)
    title = page.get_attribute("#experiment-delta .qtg-delta >> nth=2", "title")
    assert title.startswith("Δloss ") and "KL(before‖after)" in title
    summary = _text(page, "experiment-summary")
    assert "bits per byte" in summary and "perplexity" in summary
    legend = page.locator("#experiment-bars .legend").text_content()  # SVG: no innerText
    assert "before (unmodified)" in legend and "after (topo=exact ablate=0:1)" in legend
    fits(page, "experiment-bars")


def test_logit_lens_of_qtg_and_its_baseline(page, shots):
    tab(page, "Experiment")
    page.click("#lens-btn")
    plot_rendered(page, "lens-heatmap")
    titles = page.inner_text("#lens-heatmap")
    assert "QTG: nano" in titles and "baseline: nano-baseline" in titles
    assert page.locator("#lens-heatmap .hm, #lens-heatmap .heatmaplayer image").count() >= 2  # two heatmaps
    m = page.evaluate(SVG_FITS_JS, "lens-heatmap")
    assert m["svg"] <= m["panel"] + 1 and m["over"] <= 1, m
    page.locator("#lens-heatmap").screenshot(path=str(shots / "lens.png"))


def test_sweep_over_the_held_out_works(page, shots):
    tab(page, "Experiment")
    page.fill("#sweep-conditions textarea", "topo=off\npositions=none\ngamma=1")
    page.click("#sweep-btn")
    page.wait_for_function("document.querySelector('#sweep-status')?.innerText.startsWith('done:')",
                           timeout=90_000)
    plot_rendered(page, "sweep-forest")
    rows = _text(page, "sweep-table")
    for name in ("plain", "topo=exact ablate=0:1", "topo=off", "positions=none", "gamma=1.0"):
        assert name in rows
    fits(page, "sweep-forest")
    right = page.evaluate("Math.max(...[...document.querySelectorAll('#sweep-table th, #sweep-table td')]"
                          ".map(e => e.getBoundingClientRect().right))")
    panel = page.evaluate("document.querySelector('#sweep-table').getBoundingClientRect().right")
    assert right <= panel + 1, (right, panel)  # every column in view, none clipped
    page.screenshot(path=str(shots / "experiment.png"), full_page=True)


def test_stop_cancels_a_long_sweep(page):
    tab(page, "Experiment")
    set_number(page, "sweep-windows", "400")
    start_then_stop(page, "sweep-btn", "sweep-stop", "sweep-status", "running: ", "stopped after")
    status = _text(page, "sweep-status")
    assert "of 2000 window passes" in status, status  # 400 windows x 5 conditions, far from done
    set_number(page, "sweep-windows", "16")


def test_no_console_errors_in_the_experiment_tab(page):
    """Last: nothing above logged an error in the browser (a failed fetch, a script error, a plot that broke)."""
    assert page.console_errors == []
