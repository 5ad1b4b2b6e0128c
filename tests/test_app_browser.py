"""The app in a real headless browser (Playwright driving Debian's Chromium) against ``python -m app``
started as a user starts it: the first page, each tab's main action, plots that fit their panels with
their legends in view, tables that neither clip nor break words, Stop (and Stop after a run, which leaves
it), control ranges that follow the loaded model and the prompt, exported files' links that name no server
path, no console errors, and a server log of one line per refusal.

Chromium: ``make browser`` (or ``apt-get install chromium``). With ``CI=true`` these tests must run and
fail when Chromium is missing; elsewhere they skip with that instruction. Screenshots go to a temporary
folder, or to ``$QTG_SCREENSHOTS`` (the README's come from ``QTG_SCREENSHOTS=docs/screenshots``).
"""

from __future__ import annotations

import re
import time

import pytest

from tests.browser import STARTUP, fits, plot_rendered, set_number, start_then_stop, tab

pytestmark = pytest.mark.slow


def test_first_page_is_served_soon_after_the_command(app_url):
    """13.5-14.7 s on this 2-core machine while two training runs held both cores (benchmarks/bench_app.py);
    the assertion allows 45 s so that a loaded CI machine does not fail it, and the figure is printed."""
    print(f"\nfirst page served {STARTUP['seconds']:.1f} s after `python -m app`")
    assert STARTUP["seconds"] < 45


def test_first_page_shows_the_loaded_model_and_the_tier_table(page):
    assert "nano (shipped, trained)" in page.inner_text("#status")
    tab(page, "Tiers")  # filled on load: no button pressed
    page.wait_for_function("document.querySelector('#tiers-table')?.innerText.includes('5.5q')", timeout=120_000)
    tab(page, "Generate")


def test_generate_streams_into_the_page(page, shots):
    page.fill("#prompt textarea", "JULIET:")
    page.click("#generate-btn")
    page.wait_for_function("document.querySelectorAll('#generated-html .qtg-tok').length > 20", timeout=60_000)
    page.wait_for_function("document.querySelector('#generate-stats')?.innerText.includes('done')", timeout=60_000)
    plot_rendered(page, "live-diagram")
    assert page.input_value("#continuation textarea").startswith("JULIET:")  # no blank lines before the text
    title = page.get_attribute("#generated-html .qtg-tok >> nth=3", "title")
    assert title.startswith("s~ = ") and ", w = " in title
    fits(page, "live-diagram")
    plot_rendered(page, "prompt-distance-strip")  # one line per head, drawn from the streamed attention rows
    assert page.locator("#prompt-distance-strip .scatterlayer .trace").count() == 4  # nano's heads
    fits(page, "prompt-distance-strip")
    page.screenshot(path=str(shots / "generate.png"), full_page=True)


def test_stop_after_a_run_has_finished_leaves_its_status(page):
    """The run above is done: Stop has nothing to stop, and its status stays (the Stop event's answer is awaited,
    then the page's next frame)."""
    done = page.inner_text("#generate-stats")
    assert done.startswith("done: ")
    with page.expect_response(lambda r: r.url.endswith("/gradio_api/run/predict")):
        page.click("#stop-btn")
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    assert page.inner_text("#generate-stats") == done


def _token_count(text: str) -> int:
    from qtg.data.tokenizer import encode, load_tokenizer
    from qtg.model.checkpoint import SHIPPED_DIR

    return len(encode(load_tokenizer(SHIPPED_DIR / "nano" / "tokenizer.json"), text))


def test_max_new_tokens_follows_the_prompt(page):
    """The slider offers nano's context less the prompt's tokens, as the prompt is typed; a value beyond that
    comes down to it."""
    tab(page, "Generate")
    page.fill("#prompt textarea", "ROMEO: " * 40)
    room = 256 - _token_count("ROMEO: " * 40)
    page.wait_for_function(f"document.querySelector('#max-new input[type=range]')?.max === '{room}'", timeout=30_000)
    assert int(page.input_value("#max-new input[type=number]")) <= room
    page.fill("#prompt textarea", "JULIET:")
    room = 256 - _token_count("JULIET:")
    page.wait_for_function(f"document.querySelector('#max-new input[type=range]')?.max === '{room}'", timeout=30_000)


def test_topology_tab(page, shots):
    tab(page, "Topology")
    page.click("#topology-btn")
    plot_rendered(page, "topology-diagram")
    page.wait_for_function("document.querySelector('#topology-bounds')?.innerText.includes('Bounds applied')")
    plot_rendered(page, "topology-approx")
    plot_rendered(page, "topology-w", timeout=120_000)  # the filter's w by position (the controls calibrate once)
    for elem_id in ("topology-diagram", "topology-barcode", "topology-approx", "topology-w"):
        fits(page, elem_id)
    page.screenshot(path=str(shots / "topology.png"), full_page=True)


def test_export_in_the_page_names_no_server_path(page):
    page.get_by_text("Export: standalone HTML, PNG, JSON").nth(1).click()  # the Topology tab's
    page.click("#export-topology")
    page.get_by_text("Wrote ").first.wait_for(timeout=90_000)
    assert "/tmp" not in page.inner_text("body") and "qtg-explorer-" not in page.inner_text("body")
    links = page.eval_on_selector_all("a[href*='/gradio_api/file=']", "as => as.map(a => a.href)")
    assert links and all("/gradio_api/file=exports/topology-" in h and "qtg-explorer-" not in h for h in links), links


def test_attention_tab(page, shots):
    tab(page, "Attention")
    page.click("#attention-btn")
    plot_rendered(page, "attention-map")
    plot_rendered(page, "attention-gamma")
    fits(page, "attention-gamma")
    page.screenshot(path=str(shots / "attention.png"), full_page=True)


def test_attention_topology_panel(page, shots):
    """The attention-graph diagrams (QTG and baseline, one row per head) draw and fit their panel; the
    features table fills, fits its panel (nothing in it scrolls sideways) and breaks no header inside a word."""
    tab(page, "Attention")
    page.click("#attention-topology-btn")
    plot_rendered(page, "attention-topology")
    page.wait_for_function("document.querySelector('#attention-topology-features')?.innerText.includes('b1@0.1')",
                           timeout=90_000)
    assert page.locator("#attention-topology .subplot").count() >= 2  # QTG and baseline side by side
    fits(page, "attention-topology")
    assert page.evaluate(SPLIT_WORDS_JS, "#attention-topology-features th") == []  # no header broken in a word
    wide = page.evaluate("[...document.querySelectorAll('#attention-topology-features *')]"
                         ".filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.className)")
    assert wide == []  # nothing in the table scrolls sideways: it fits its panel
    page.locator("#attention-topology").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "attention_topology.png"), full_page=True)

def test_compare_tab_table_is_whole(page, shots):
    tab(page, "Compare")
    page.click("#compare-btn")
    plot_rendered(page, "compare-diagrams")
    fits(page, "compare-diagrams")
    right = page.evaluate("Math.max(...[...document.querySelectorAll('#compare-table th, #compare-table td')]"
                          ".map(e => e.getBoundingClientRect().right))")
    panel = page.evaluate("document.querySelector('#compare-table').getBoundingClientRect().right")
    assert right <= panel + 1 <= 1400 + 1
    page.screenshot(path=str(shots / "compare.png"), full_page=True)


SPLIT_WORDS_JS = """sel => {
  const split = [];
  for (const th of document.querySelectorAll(sel)) {
    const walk = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
    for (let node = walk.nextNode(); node; node = walk.nextNode()) {
      for (const m of node.data.matchAll(/\\S+/g)) {
        const r = document.createRange();
        r.setStart(node, m.index);
        r.setEnd(node, m.index + m[0].length);
        const tops = new Set([...r.getClientRects()].filter(x => x.width > 0).map(x => Math.round(x.top)));
        if (tops.size > 1) split.push(m[0]);
      }
    }
  }
  return split;
}"""


def test_tiers_tab_headers_break_between_words(page, shots):
    tab(page, "Tiers")
    page.get_by_text("5.5q").first.wait_for(timeout=60_000)
    assert page.evaluate(SPLIT_WORDS_JS, "#tiers-table th") == []
    page.screenshot(path=str(shots / "tiers.png"), full_page=True)


def _load(page, label: str, expect: str) -> None:
    tab(page, "Tiers")
    box = page.locator("#tiers-model input")
    box.click()
    box.fill(label)
    page.get_by_role("option", name=label).click()
    page.click("#load-btn")
    page.wait_for_function(f"document.querySelector('#status')?.innerText.includes({expect!r})", timeout=120_000)


def test_control_ranges_follow_the_loaded_model(page):
    """With an empty prompt (one token's room taken), max new tokens offers the context less one."""
    tab(page, "Generate")
    page.fill("#prompt textarea", "")
    _load(page, "micro tier (random weights)", "micro tier")
    tab(page, "Generate")
    page.wait_for_function("document.querySelector('#max-new input[type=range]')?.max === '127'", timeout=30_000)
    assert page.get_attribute("#topology-layer input[type=range]", "max") == "3"
    assert page.get_attribute("#attention-block input[type=range]", "max") == "1"
    assert page.get_attribute("#strip-block input[type=range]", "max") == "1"  # micro's last block
    _load(page, "nano (shipped, trained)", "nano (shipped")
    page.wait_for_function("document.querySelector('#max-new input[type=range]')?.max === '255'", timeout=30_000)
    assert page.get_attribute("#strip-block input[type=range]", "max") == "3"


def test_stop_says_stopped_with_the_count(page):
    """On base (56M random weights, slow enough on a CPU that Stop always lands midway); then back to nano."""
    _load(page, "base tier (random weights)", "base tier")
    tab(page, "Generate")
    set_number(page, "max-new", "240")
    page.fill("#prompt textarea", "ROMEO:")
    start_then_stop(page, "generate-btn", "stop-btn", "generate-stats", "generating: ", "stopped after ")
    time.sleep(1.0)  # nothing overwrites it afterwards
    stats = page.inner_text("#generate-stats")
    n = int(re.search(r"stopped after (\d+) new tokens", stats).group(1))
    shown = page.evaluate("[...document.querySelectorAll('#generated-html .qtg-tok')]"
                          ".filter(e => e.style.fontWeight === '600').length")
    # the server's count; the page may not have received the update carrying the last token or two
    assert 0 <= n - shown <= 2 and 0 < n < 240, stats
    _load(page, "nano (shipped, trained)", "nano (shipped")


def test_empty_prompt_shows_an_error_not_a_traceback(page):
    tab(page, "Generate")
    page.fill("#prompt textarea", "")
    page.click("#generate-btn")
    toast = page.get_by_text("prompt: empty; type some text").first
    toast.wait_for(timeout=30_000)
    assert "Traceback" not in page.content()


def test_no_console_errors(page):
    """Last but one: nothing any tab did logged an error in the browser (no failed fetch, no script error)."""
    assert page.console_errors == []


def test_the_server_log_has_one_line_per_refusal(page):
    """Last: the empty prompt above is the one refusal; no traceback, no PNG exporter chatter."""
    time.sleep(0.5)
    log = STARTUP["log"].read_text()
    refusals = [line for line in log.splitlines() if " refused " in line]
    assert len(refusals) == 1 and refusals[0].endswith("refused generate: prompt: empty; type some text"), log[-2000:]
    assert "Traceback" not in log
    assert not [line for line in log.splitlines() if re.search(r"\b(INFO|DEBUG)\b.*(kaleido|choreographer|logistro)",
                                                              line, re.I)], log[-2000:]
