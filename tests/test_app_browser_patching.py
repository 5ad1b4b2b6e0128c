"""The Patching tab in headless Chromium (the session's ``python -m app`` server and page, tests/browser.py): a
clean/corrupted pair made by replacing a word, every view drawn for nano beside nano-baseline and fitting its
panel, the screenshot ``patching.png`` (``QTG_SCREENSHOTS=docs/screenshots`` writes the README's), Stop on a
long pair, and a refusal naming its field.
"""

from __future__ import annotations

import pytest

from tests.browser import fits, plot_rendered, start_then_stop, tab
from tests.test_app_browser_experiment import SVG_FITS_JS

pytestmark = pytest.mark.slow

PLOTS = ["patching-residual-stream", "patching-heads", "patching-topo-w", "patching-logit-attribution",
         "patching-attribution-vs-real"]


def _status_starts(text: str) -> str:
    return f"document.querySelector('#patching-status')?.innerText.trim().startsWith({text!r})"


def test_patching_of_qtg_beside_its_baseline(page, shots):
    errors = len(page.console_errors)
    tab(page, "Patching")
    page.click("#patching-btn")
    page.wait_for_function(_status_starts("done:"), timeout=90_000)
    for elem_id in PLOTS:
        plot_rendered(page, elem_id)
    for elem_id in PLOTS[:2] + PLOTS[3:]:  # the loaded model beside its baseline
        titles = page.inner_text(f"#{elem_id}")
        assert "QTG: nano" in titles and "baseline: nano-baseline" in titles, (elem_id, titles)
    for elem_id in PLOTS[:4]:  # heatmaps: a colour bar, no legend
        m = page.evaluate(SVG_FITS_JS, elem_id)
        assert m["svg"] <= m["panel"] + 1 and m["over"] <= 1, (elem_id, m)
    fits(page, PLOTS[4])
    differs = page.eval_on_selector_all("#patching-tokens .qtg-differs", "es => es.map(e => e.innerText)")
    assert differs == ["␣son", "␣daughter"], differs  # the replaced word, in each prompt
    table = page.inner_text("#patching-table")
    assert "QTG: nano" in table and "baseline: nano-baseline" in table and "top-10 overlap" in table
    page.screenshot(path=str(shots / "patching.png"), full_page=True)

    page.fill("#patching-answer textarea", " Juliet")
    page.click("#patching-btn")
    page.get_by_text("answer: ' Juliet' is 2 tokens for nano (' J' | 'uliet'); give one token").first.wait_for(
        timeout=60_000)
    page.fill("#patching-answer textarea", " son")

    clean = page.input_value("#patching-clean textarea")
    page.fill("#patching-clean textarea", " ".join([clean] * 3))  # 63 tokens: several batched passes a view
    # Stop's /cancel returns once the pass under way ends, then the page sends /reset: until then the page drops
    # a click on Patch (Gradio's trigger_mode "once"), so leave the page only after it
    with page.expect_request(lambda r: r.url.endswith("/reset"), timeout=60_000):
        start_then_stop(page, "patching-btn", "patching-stop", "patching-status", "running: ", "stopped after")
    assert " of 599 patched units" in page.inner_text("#patching-status")
    page.fill("#patching-clean textarea", clean)
    assert page.console_errors[errors:] == []
