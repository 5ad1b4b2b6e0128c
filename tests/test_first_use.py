"""Concurrent *first* use, in fresh processes: no native library deadlocks the process or the app.

A first-use race only shows in a process where nothing has run yet, so every check here starts one:

* each native backend (gudhi, ripser.py, giotto-ph, the ``auto`` path, the tokenizers, flex attention's
  compile) called for the first time by 8 threads at once, in several fresh interpreters;
* a freshly started ``python -m app`` served concurrent first requests to every heavy endpoint, in two
  fresh servers.

giotto-ph's first call once deadlocked the process (issue 23): one thread held a C++ static's
initialisation guard and waited for the GIL, another held the GIL and waited for the guard. A hang freezes
every thread of the process, so the child's own timeout is the check: nothing here can hang the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
THREADS = 8
FRESH_PROCESSES = 3  # giotto-ph hung 5 fresh processes of 5 before the fix; 3 of 3 passing is no luck

# First calls of each backend named on the command line, in turn: THREADS threads released together make the
# backend's first call in this process; "ok <backend>" is printed when all of them have returned.
FIRST_CALLS = r"""
import sys, threading
import numpy as np

def setup(what):
    if what == "tokenizers":
        from qtg.model.checkpoint import SHIPPED_DIR
        from qtg.data.tokenizer import decode, encode, load_tokenizer
        tok = load_tokenizer(SHIPPED_DIR / "nano" / "tokenizer.json")
        def call():
            assert decode(tok, encode(tok, "ROMEO: to be, or not to be")) == "ROMEO: to be, or not to be"
    elif what == "flex":
        import torch, qtg
        torch.set_num_threads(1)
        model = qtg.build(qtg.get_tier("micro").replace(attn_impl="flex"), seed=0).eval()
        ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
        def call():
            with torch.inference_mode():
                assert model(ids).logits.isfinite().all()
    else:
        from qtg.topology import exact_diagrams
        points = np.random.default_rng(0).standard_normal((40, 3))
        def call():  # time_budget=None: in this process, in this thread (no child process)
            assert len(exact_diagrams(points, maxdim=1, backend=what, time_budget=None).dgms[1]) > 0
    return call

for what in sys.argv[1:]:
    call = setup(what)
    print("first calls of", what, flush=True)
    barrier = threading.Barrier(THREADS)
    errors = []
    def first_call():
        barrier.wait()
        try:
            call()
        except BaseException as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=first_call) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("ok", what, errors, flush=True)
""".replace("THREADS", str(THREADS))


def fresh_first_calls(backends: list[str], timeout: float) -> list[str]:
    """The script above in a fresh interpreter; the lines it printed, or a failure naming the backend that hung."""
    try:
        r = subprocess.run([sys.executable, "-c", FIRST_CALLS, *backends], capture_output=True, text=True,
                           timeout=timeout, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{THREADS} concurrent first calls in a fresh process did not return in {timeout:g} s "
                    f"(a first-use deadlock); the last line is the backend that hung:\n{out}")
    assert r.returncode == 0, r.stderr[-2000:]
    return [line for line in r.stdout.splitlines() if line.startswith("ok ")]


NATIVE = ["giotto-ph", "gudhi", "ripser", "tokenizers"]


@pytest.mark.slow
def test_concurrent_first_calls_to_each_native_backend_return():
    for _ in range(FRESH_PROCESSES):
        assert fresh_first_calls(NATIVE, timeout=120) == [f"ok {what} []" for what in NATIVE]


@pytest.mark.slow
def test_concurrent_first_calls_of_flex_attention_compile_and_return():
    """The first forward of a flex model compiles its kernel (10-25 s here): one fresh process."""
    assert fresh_first_calls(["flex"], timeout=240) == ["ok flex []"]


# --- a fresh server -----------------------------------------------------------------------------------

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."
# Every endpoint of the app's "heavy" queue (a model or a topology engine runs), with the arguments that differ
# from the page's defaults, by parameter name or position: the text (first), small sizes where the default is a
# long run. /training's run is the server's own copy, given per server.
# /generate colours by a control, so the concurrent first generations also calibrate it (app/controls.py's lock)
HEAVY = {"/generate": {0: "ROMEO:", "max_new_tokens": 24, "w_from": "one-bit gate"},
         "/topology": {0: TEXT}, "/attention": {0: TEXT},
         "/attention_topology": {0: TEXT}, "/compare": {0: TEXT}, "/experiment": {0: TEXT, 1: "exact"},
         "/lens": {0: TEXT}, "/sweep": {"windows": 2, "sample": 1}, "/heads": {"windows": 2},
         "/recipes": {"recipes": ["nano-gate"], "windows": 2},
         "/patching": {"corrupted_prompt": ""}, "/training": {},
         # the "w from" toggles: on a fresh session there is no result to recolour yet, so they return at once
         "/generate_w_from": {"w_from": "one-bit gate"}, "/topology_w_from": {"w_from": "position only"}}
GENERATE_AT_ONCE = 3  # the live diagram's in-process giotto-ph call was the one that hung the app
SERVERS = 2
START_S, REQUESTS_S = 180, 240


@contextmanager
def fresh_app(tmp: Path, run_dir: Path):
    """``python -m app`` in a new process, heavy requests all at once (``--concurrency 8``); yields its URL."""
    from tests.test_app_server import free_port

    port = free_port()
    log = tmp / "app.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--device", "cpu",
                                 "--concurrency", "8", "--export-dir", str(tmp), "--checkpoint-dir", str(run_dir)],
                                cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=fh,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        t0 = time.monotonic()
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() - t0 > START_S:
                pytest.fail(f"the app did not start; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url, log
    finally:
        proc.kill()  # a hung server does not answer SIGTERM's shutdown either
        proc.wait(30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "config", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _arguments(api: dict, name: str, given: dict) -> list:
    """The endpoint's parameters in order: the page's defaults, with ``given`` (by name or position) over them."""
    params = api[name]["parameters"]
    names = [p["parameter_name"] for p in params]
    unknown = {k for k in given if not isinstance(k, int)} - set(names)
    assert not unknown, f"{name} has no parameter {sorted(unknown)} (it takes {names})"
    out = []
    for i, p in enumerate(params):
        key = i if i in given else p["parameter_name"]
        assert key in given or p["parameter_has_default"], f"{name}: {key} has no default; give it in HEAVY"
        out.append(given.get(key, p.get("parameter_default")))
    return out


@pytest.fixture(scope="module")
def run_dir(data_dir, tokenizer_file, tmp_path_factory) -> Path:
    """A micro run with three snapshots, for ``/training``."""
    from qtg.training.train import train
    from tests.test_snapshots import snap_config

    out = tmp_path_factory.mktemp("first_use_run")
    train(snap_config(out, data_dir, tokenizer_file, 8, every=4))
    return out.resolve()


def heavy_endpoints(tmp: Path) -> set[str]:
    """The public endpoints the app puts in its heavy queue (built here, not served)."""
    from app.config import AppConfig
    from app.server import build_app

    demo, _ = build_app(AppConfig(export_dir=tmp, device="cpu"))
    return {f"/{fn.api_name}" for fn in demo.fns.values()
            if fn.concurrency_id == "heavy" and fn.api_name and fn.api_visibility == "public"}


@pytest.mark.slow
def test_concurrent_first_requests_to_every_heavy_endpoint_of_a_fresh_server(run_dir, tmp_path):
    pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")
    from gradio_client import Client

    missing = heavy_endpoints(tmp_path) - set(HEAVY)
    assert not missing, f"heavy endpoints this test does not call yet: {sorted(missing)}; add them to HEAVY"
    for n in range(SERVERS):
        run = shutil.copytree(run_dir, tmp_path / f"run{n}")  # no analysis cached by the server before
        folder = tmp_path / f"server{n}"
        folder.mkdir()
        with fresh_app(folder, run) as (url, log):
            c = Client(url, verbose=False)
            api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
            given = {**HEAVY, "/training": {"run": f"dir:{run}"}}
            jobs = [(name, c.submit(*_arguments(api, name, args), api_name=name))
                    for name, args in given.items() for _ in range(GENERATE_AT_ONCE if name == "/generate" else 1)]
            deadline = time.monotonic() + REQUESTS_S
            for name, job in jobs:
                try:
                    job.result(timeout=max(1.0, deadline - time.monotonic()))
                except TimeoutError:
                    pytest.fail(f"server {n + 1}: {name} did not answer in {REQUESTS_S} s (first requests at once); "
                                f"/config answers: {_answers(url)}; its log:\n{log.read_text()[-2000:]}")
            assert _answers(url)
