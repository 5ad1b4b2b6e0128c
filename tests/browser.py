"""The browser-test harness shared by every ``tests/test_app_browser*.py`` module.

One ``python -m app`` server and one headless Chromium page per test session (fixtures ``app_url``,
``page``, ``shots``, registered in ``tests/conftest.py``), and helpers to drive the page: ``tab``,
``plot_rendered``, ``fits``, ``set_number``, ``start_then_stop``. See ``tests/test_app_browser.py`` for what is tested.
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

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
STARTUP = {}  # seconds from the command to the first page, and the app's log file


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


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """``python -m app`` in a subprocess, as a user runs it; yields its URL once the first page answers."""
    _need_browser()
    port = free_port()
    log = tmp_path_factory.mktemp("applog") / "app.log"
    STARTUP["log"] = log
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


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("QTG_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def tab(page, name: str) -> None:
    # while the page's on-load events run, a loading overlay covers the tabs: wait it out (slow when loaded)
    page.get_by_role("tab", name=name).click(timeout=120_000)


def plot_rendered(page, elem_id: str, timeout: float = 90_000) -> None:
    """A plotly figure drew its SVG inside the component."""
    page.wait_for_selector(f"#{elem_id} .js-plotly-plot .main-svg", timeout=timeout)


# What overflows a plot's panel: the drawn SVG wider than the panel, or the legend's right edge past it.
FIT_JS = """id => {
  const panel = document.getElementById(id).getBoundingClientRect();
  const svg = document.querySelector('#' + id + ' .main-svg').getBoundingClientRect();
  const legend = document.querySelector('#' + id + ' .legend');
  const box = legend ? legend.getBoundingClientRect() : null;
  return {panel: panel.width, svg: svg.width, over: svg.right - panel.right,
          legend: box ? box.right - panel.right : null, legendWidth: box ? box.width : null};
}"""


def fits(page, elem_id: str) -> None:
    m = page.evaluate(FIT_JS, elem_id)
    assert m["svg"] <= m["panel"] + 1 and m["over"] <= 1, (elem_id, m)
    assert m["legend"] is not None and m["legend"] <= 1 and m["legendWidth"] > 0, (elem_id, m)


def set_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


def start_then_stop(page, go: str, stop: str, status: str, running: str, stopped: str) -> None:
    """Press ``#go``; once ``#status`` starts with ``running``, press ``#stop``; wait until it starts with ``stopped``.

    The ids are elements' ids (no ``#``); ``running`` and ``stopped`` are the status texts' beginnings.
    """
    starts = "document.querySelector('#{}')?.innerText.trim().startsWith({!r})".format
    page.click(f"#{go}")
    page.wait_for_function(starts(status, running), timeout=60_000)
    page.click(f"#{stop}")
    page.wait_for_function(starts(status, stopped), timeout=30_000)
