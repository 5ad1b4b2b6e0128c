"""The Experiment tab in headless Chromium (the session's ``python -m app`` server and page, tests/browser.py):
one text before and after an intervention, the logit lens of QTG and its baseline, the sweep over the held-out
works with its table and forest plot (both intervals, a dot per work), the heads of QTG and its baseline ranked
on one scale, retrained recipes with their seeds, and Stop on a long sweep. Screenshots: lens.png, heads.png,
then experiment.png with every panel filled (``QTG_SCREENSHOTS=docs/screenshots`` writes the README's).
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


def _run_section(page, prefix: str, timeout_ms: int) -> str:
    """Press the section's button, wait for its status to say done, check its forest plot drew; its table's text."""
    page.click(f"#{prefix}-btn")
    page.wait_for_function(f"document.querySelector('#{prefix}-status')?.innerText.startsWith('done:')",
                           timeout=timeout_ms)
    plot_rendered(page, f"{prefix}-forest")
    return _text(page, f"{prefix}-table")


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
    rows = _run_section(page, "sweep", 90_000)
    for name in ("plain", "topo=exact ablate=0:1", "topo=off", "positions=none", "gamma=1.0"):
        assert name in rows
    for header in ("Δ bits/byte, these texts", "Δ bits/byte across works", "verdict (across works)"):
        assert header in rows
    assert "= plain" in rows  # gamma cannot move the TopoFilter's figures: marked, not a repeated number
    fits(page, "sweep-forest")
    legend = page.locator("#sweep-forest .legend").text_content()
    assert "each work" in legend and "these texts (windows)" in page.locator("#sweep-forest .xtitle").text_content()
    # one dot per work and condition: 4 test works x 4 conditions (16 windows drawn may miss a work: at least 3)
    dots = page.locator("#sweep-forest .scatterlayer .trace").last.locator(".point").count()
    assert 3 * 4 <= dots <= 4 * 4, dots
    _columns_in_view(page, "sweep-table")
    page.screenshot(path=str(shots / "experiment.png"), full_page=True)


def _columns_in_view(page, elem_id: str) -> None:
    right = page.evaluate(f"Math.max(...[...document.querySelectorAll('#{elem_id} th, #{elem_id} td')]"
                          ".map(e => e.getBoundingClientRect().right))")
    panel = page.evaluate(f"document.querySelector('#{elem_id}').getBoundingClientRect().right")
    assert right <= panel + 1, (right, panel)  # every column in view, none clipped


def test_heads_of_qtg_and_its_baseline_ranked_on_one_scale(page, shots):
    tab(page, "Experiment")
    set_number(page, "sweep-windows", "4")
    page.locator("#heads-baseline input").check()
    rows = _run_section(page, "heads", 120_000)
    titles = page.inner_text("#heads-forest")
    assert "nano (qtg)" in titles and "nano-baseline (baseline)" in titles  # two panels, one figure
    assert "nano-baseline" in rows and "0:0" in rows and "verdict (across works)" in rows
    fits(page, "heads-forest")
    _columns_in_view(page, "heads-table")
    page.locator("#heads-forest").screenshot(path=str(shots / "heads.png"))
    set_number(page, "sweep-windows", "16")


def test_recipes_side_by_side_with_their_seeds(page):
    tab(page, "Experiment")
    set_number(page, "recipes-windows", "4")
    page.locator("#recipes-others label", has_text="nano-exact (").click()  # untick one of the defaults
    rows = _run_section(page, "recipes", 120_000)
    for text in ("nano-notopo", "nano-gate", "reference", "across works and seeds", "no difference detected"):
        assert text in rows, text
    assert "nano-exact" not in rows
    assert "seeds: nano 3, nano-notopo 3" in _text(page, "recipes-status")
    fits(page, "recipes-forest")
    _columns_in_view(page, "recipes-table")
    dots = page.locator("#recipes-forest .scatterlayer .trace").last.locator(".point").count()
    assert 2 <= dots <= 2 * 4, dots  # a dot per work and recipe (4 windows may miss a work)


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
