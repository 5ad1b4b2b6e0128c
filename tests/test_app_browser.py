"""The app in a real headless browser (Playwright driving Debian's Chromium) against ``python -m app``
started as a user starts it: the first page, each tab's main action, rendered plots, no console errors.

Chromium: ``make browser`` (or ``apt-get install chromium``). With ``CI=true`` these tests must run and
fail when Chromium is missing; elsewhere they skip with that instruction. Screenshots go to a temporary
folder, or to ``$QTG_SCREENSHOTS`` (the README's come from ``QTG_SCREENSHOTS=docs/screenshots``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_app_server import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
STARTUP = {}  # seconds from the command to the first page, read by the start-up test


def _need_browser():
    why = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        why = "playwright is not installed (pip install -e '.[test]')"
    if why is None and not Path(CHROMIUM).exists():
        why = "Chromium is not installed: run `make browser` (apt-get install chromium)"
    if why and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true needs the browser tests: {why}")
    if why:
        pytest.skip(f"browser tests skipped: {why}; CI=true makes them mandatory")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """``python -m app`` in a subprocess, as a user runs it; yields its URL once the first page answers."""
    _need_browser()
    port = free_port()
    log = tmp_path_factory.mktemp("applog") / "app.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--device", "cpu",
                                 "--export-dir", str(tmp_path_factory.mktemp("exports"))],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                pytest.fail(f"the app did not start; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        STARTUP["seconds"] = time.perf_counter() - t0
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.console_errors = []
        pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
        pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
        pg.goto(app_url)
        pg.wait_for_selector("#status", timeout=60_000)
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("QTG_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _plot_rendered(page, elem_id: str, timeout: float = 90_000) -> None:
    """A plotly figure drew its SVG inside the component."""
    page.wait_for_selector(f"#{elem_id} .js-plotly-plot .main-svg", timeout=timeout)


def test_first_page_is_served_soon_after_the_command(app_url):
    """The target is 10 s on this 2-core machine (6-8 s measured by benchmarks/bench_app.py); the assertion
    allows 30 s so that a loaded CI machine does not fail it, and the figure is printed."""
    print(f"\nfirst page served {STARTUP['seconds']:.1f} s after `python -m app`")
    assert STARTUP["seconds"] < 30


def test_first_page_shows_the_loaded_model(page):
    assert "nano (shipped, trained)" in page.inner_text("#status")


def test_generate_streams_into_the_page(page, shots):
    page.fill("#prompt textarea", "JULIET:")
    page.click("#generate-btn")
    page.wait_for_function("document.querySelectorAll('#generated-html .qtg-tok').length > 20", timeout=60_000)
    page.wait_for_function("document.querySelector('#generate-stats').innerText.includes('done')", timeout=60_000)
    _plot_rendered(page, "live-diagram")
    assert page.input_value("#continuation textarea").strip()
    title = page.get_attribute("#generated-html .qtg-tok >> nth=3", "title")
    assert title.startswith("s~ = ") and ", w = " in title
    page.screenshot(path=str(shots / "generate.png"), full_page=True)


def test_topology_tab(page, shots):
    _tab(page, "Topology")
    page.click("#topology-btn")
    _plot_rendered(page, "topology-diagram")
    page.wait_for_function("document.querySelector('#topology-bounds').innerText.includes('Bounds applied')")
    page.screenshot(path=str(shots / "topology.png"), full_page=True)


def test_attention_tab(page, shots):
    _tab(page, "Attention")
    page.click("#attention-btn")
    _plot_rendered(page, "attention-map")
    page.screenshot(path=str(shots / "attention.png"), full_page=True)


def test_compare_tab(page, shots):
    _tab(page, "Compare")
    page.click("#compare-btn")
    _plot_rendered(page, "compare-diagrams")
    page.screenshot(path=str(shots / "compare.png"), full_page=True)


def test_tiers_tab(page, shots):
    _tab(page, "Tiers")
    page.click("#tiers-btn")
    page.get_by_text("5.5q").first.wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "tiers.png"), full_page=True)


def test_empty_prompt_shows_an_error_not_a_traceback(page):
    _tab(page, "Generate")
    page.fill("#prompt textarea", "")
    page.click("#generate-btn")
    toast = page.get_by_text("the prompt is empty").first
    toast.wait_for(timeout=30_000)
    assert "Traceback" not in page.content()


def test_no_console_errors(page):
    """Last: nothing any tab did logged an error in the browser (no failed fetch, no script error)."""
    assert page.console_errors == []
