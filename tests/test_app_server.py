"""The app over HTTP through ``gradio_client``, against a server launched in this process
(so the test can read the server's own counters): every endpoint answers, /generate streams
and equals the library, bad input is refused while the server keeps serving, two clients keep
their own models, Stop halts the work on the server, and no file outside the export folder is served."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")
from gradio_client import Client  # noqa: E402

from app.config import AppConfig  # noqa: E402
from app.server import launch  # noqa: E402
from tests.test_app_handlers import PROMPT, TEXT, library_greedy  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("exports")
    demo, ex, url = launch(AppConfig(export_dir=export_dir, device="cpu"), port=free_port(), block=False)
    yield ex, url
    demo.close()


def client(url: str) -> Client:
    return Client(url, verbose=False)


def test_every_named_endpoint_answers(server):
    ex, url = server
    c = client(url)
    names = set(c.view_api(print_info=False, return_format="dict")["named_endpoints"])
    expected = {"/tiers", "/load", "/generate", "/topology", "/attention", "/compare", "/export_generate",
                "/export_topology", "/export_attention", "/export_compare"}
    assert expected <= names
    table = c.predict("cpu", api_name="/tiers")[0]
    assert [row[0] for row in table["data"]][:2] == ["micro", "nano"]
    assert "nano" in c.predict("shipped:nano", "cpu", api_name="/load")
    assert c.predict(PROMPT, 8, 0, 0, 1, -1, api_name="/generate")[1]
    topo = c.predict(TEXT, 1, "gudhi + ripser (overlaid)", 128, 0, api_name="/topology")
    assert topo[3]["gudhi_vs_ripser_bottleneck"]["H1"] < 1e-6
    attn = c.predict(TEXT, 0, -1, api_name="/attention")
    assert "gamma" in attn[4] and "baseline" in attn[4]
    cmp = c.predict(TEXT, "shipped:nano", "cpu", "approximate", "shipped:nano-baseline", "cpu", "approximate", -1,
                    api_name="/compare")
    assert len(cmp[0]["data"]) == 2
    files, message = c.predict(api_name="/export_compare")
    assert any(Path(f).name == "figures.html" for f in files) and "Wrote" in message


def test_generate_streams_and_equals_the_library(server):
    ex, url = server
    job = client(url).submit(PROMPT, 120, 0, 0, 1, -1, api_name="/generate")
    updates = [out for out in job]
    assert len(updates) >= 3, "the text should arrive in several updates"
    final = job.outputs()[-1]
    assert final[1] == library_greedy(ex.current(None).model, ex.current(None).tokenizer, PROMPT, 120)
    assert "done: " in final[3]


@pytest.mark.parametrize("args, message", [
    (("", 10, 0.8, 0, 1, -1), "prompt is empty"),
    (("x" * 5000, 10, 0.8, 0, 1, -1), "limit is 4,000"),
    ((PROMPT, 10, -2, 0, 1, -1), "temperature must be between|less than minimum value 0"),
    ((PROMPT, 10, 0.8, 0, 1, "seven"), None),  # gradio's own type check or ours: an error either way
])
def test_bad_input_is_refused_and_the_server_keeps_serving(server, args, message):
    ex, url = server
    c = client(url)
    with pytest.raises(Exception, match=message) as err:
        c.predict(*args, api_name="/generate")
    assert "Traceback" not in str(err.value)
    assert c.predict(PROMPT, 3, 0, 0, 1, -1, api_name="/generate")[1]


def test_bad_model_key_and_oversized_load_are_refused(server):
    ex, url = server
    c = client(url)
    for key in ("dir:/etc", "/etc/passwd"):
        with pytest.raises(Exception, match="not in the list of choices|unknown model"):
            c.predict(key, "cpu", api_name="/load")
    with pytest.raises(Exception, match="does not fit"):
        c.predict("tier:5.5q", "cpu", api_name="/load")
    assert "nano" in c.predict(TEXT, 0, -1, api_name="/attention")[4]["model"]  # still the default model


def test_two_clients_keep_their_own_models(server):
    ex, url = server
    a, b = client(url), client(url)
    assert "RANDOM weights" in a.predict("tier:micro", "cpu", api_name="/load")
    results = {}

    def run(name, c):
        results[name] = c.predict(PROMPT, 30, 0, 0, 1, -1, api_name="/generate")[1]

    threads = [threading.Thread(target=run, args=(n, c)) for n, c in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    micro = ex.registry.get("tier:micro", "cpu")
    assert results["a"] == library_greedy(micro.model, micro.tokenizer, PROMPT, 30)
    assert results["b"] == library_greedy(ex.current(None).model, ex.current(None).tokenizer, PROMPT, 30)
    assert results["a"] != results["b"]


def test_stop_halts_generation_on_the_server(server):
    ex, url = server
    c = client(url)
    c.predict("tier:base", "cpu", api_name="/load")  # 56M random weights: slow enough to stop midway
    before = ex.counters.tokens_generated
    finished = ex.counters.streams_finished
    job = c.submit(PROMPT, 500, 0, 0, 1, -1, api_name="/generate")
    deadline = time.time() + 60
    while len(job.outputs()) < 2 and time.time() < deadline:
        time.sleep(0.05)
    job.cancel()
    time.sleep(1.0)
    at_stop = ex.counters.tokens_generated
    time.sleep(2.0)
    assert ex.counters.tokens_generated == at_stop, "tokens were still being generated after Stop"
    assert at_stop - before < 500 and ex.counters.streams_finished == finished
    assert c.predict("shipped:nano", "cpu", api_name="/load")  # the queue slot was released


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_no_file_outside_the_export_folder_is_served(server):
    ex, url = server
    repo = Path(__file__).resolve().parent.parent
    for path in (repo / "README.md", repo / "assets" / "checkpoints" / "nano" / "config.json", Path("/etc/passwd")):
        assert _status(f"{url}gradio_api/file={path}") in (403, 404), path
    export_dir = Path(ex.cfg.export_dir)
    probe = export_dir / "probe.json"
    probe.write_text("{}")
    assert _status(f"{url}gradio_api/file={probe}") == 200
