"""The app over HTTP through ``gradio_client`` and plain requests, against a server launched in this process
(so the test can read the server's own counters): every endpoint answers, /generate streams and equals the
library, bad input is refused in one line naming the field while the server keeps serving, two clients keep
their own models, Stop halts the work on the server, nothing is uploaded, no cross-origin write is taken,
and every file served is a download from this launch's private export folder."""

from __future__ import annotations

import os
import socket
import stat
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
from app.tabs import tiers  # noqa: E402
from tests.app_fixtures import count_after_cancel  # noqa: E402
from tests.test_app_handlers import PROMPT, TEXT, library_greedy  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
STARTED: dict[str, int | None] = {}  # what the first page answered when the tier-table warm-up began


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)
    except OSError:
        return 0, {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    real = tiers.summaries

    def warm(device):  # the tier-table warm-up: is the page already served when it begins?
        STARTED.setdefault("status", _status(f"http://127.0.0.1:{port}/")[0])
        return real(device)

    tiers.summaries = warm
    try:
        demo, ex, url = launch(AppConfig(export_dir=tmp_path_factory.mktemp("exports"), device="cpu"), port=port,
                               block=False)
    finally:
        tiers.summaries = real
    yield ex, url
    demo.close()


def client(url: str) -> Client:
    return Client(url, verbose=False)


def test_the_page_is_served_before_the_tier_table_warm_up_begins(server):
    deadline = time.time() + 60
    while "status" not in STARTED and time.time() < deadline:
        time.sleep(0.05)
    assert STARTED.get("status") == 200


def test_every_named_endpoint_answers(server):
    ex, url = server
    c = client(url)
    names = set(c.view_api(print_info=False, return_format="dict")["named_endpoints"])
    expected = {"/tiers", "/load", "/unload", "/generate", "/topology", "/attention", "/compare", "/export_generate",
                "/export_topology", "/export_attention", "/export_compare", "/export_tiers",
                "/attention_topology", "/experiment", "/lens", "/sweep", "/export_experiment", "/export_lens",
                "/export_sweep"}
    assert expected <= names
    table = c.predict("cpu", api_name="/tiers")[0]
    assert [row[0] for row in table["data"]][:2] == ["micro", "nano"]
    assert "nano" in c.predict("shipped:nano", "cpu", api_name="/load")
    assert c.predict(PROMPT, 8, 0, 0, 1, -1, api_name="/generate")[1].startswith(PROMPT)
    topo = c.predict(TEXT, 1, "gudhi + ripser (overlaid)", 128, 0, api_name="/topology")
    assert topo[3]["gudhi_vs_ripser_bottleneck"]["H1"] < 1e-6
    attn = c.predict(TEXT, 0, -1, 1, "linear", api_name="/attention")
    assert "gamma" in attn[4] and "baseline" in attn[4]
    cmp = c.predict(TEXT, "shipped:nano", "cpu", "exact", "shipped:nano-baseline", "cpu", "approximate", -1,
                    api_name="/compare")
    assert [r[0] for r in cmp[0]["data"]][:3] == ["model", "device", "TopoFilter"]
    files, message = c.predict(api_name="/export_compare")
    assert any(Path(f).name == "figures.html" for f in files) and message.startswith("Wrote")
    assert str(ex.export_dir) not in message  # the page never learns a server path


def test_generate_streams_and_equals_the_library(server):
    ex, url = server
    job = client(url).submit(PROMPT, 120, 0, 0, 1, -1, api_name="/generate")
    updates = [out for out in job]
    assert len(updates) >= 3, "the text should arrive in several updates"
    final = job.outputs()[-1]
    assert final[1] == PROMPT + library_greedy(ex.current(None).model, ex.current(None).tokenizer, PROMPT, 120)
    assert "done: " in final[3]
    assert final[4] is not None  # the prompt-distance strip (the states are not sent: html, text, live, stats, strip)


def test_generate_takes_the_strip_block(server):
    """The strip's block is the last input (default -1 = the last block); it never changes the text."""
    c = client(server[1])
    default, first = [c.predict(PROMPT, 12, 0, 0, 1, -1, *block, api_name="/generate") for block in ((), (0,))]
    assert default[1] == first[1]  # out: html, text, live diagram, stats, strip (the states are not sent)
    assert "block 3" in str(default[4]) and "block 0" in str(first[4])  # nano's last block is 3


@pytest.mark.parametrize("args, message", [
    (("", 10, 0.8, 0, 1, -1), "prompt: empty; type some text"),
    (("x" * 5000, 10, 0.8, 0, 1, -1), "prompt: 5,000 characters is above the maximum 4,000"),
    ((PROMPT, 10, -2, 0, 1, -1), "temperature: -2 is below the minimum 0"),
    ((PROMPT, 1_000_000_000, 0.8, 0, 1, -1), "max new tokens: 1000000000 is above the maximum 255"),
    ((PROMPT, 10, 0.8, "seven", 1, -1), "top-k: expected a whole number, got 'seven'"),
    ((PROMPT, 10, 0.8, 0, 1, "seven"), "seed: expected a whole number, got 'seven'"),
    ((PROMPT, 10, 0.8, 0, 1, -1, 9), "strip block: 9 is above the maximum 3"),
])
def test_bad_input_is_one_line_naming_the_field_and_the_server_keeps_serving(server, args, message):
    """The app's own words, never Gradio's ("Value ... is greater than maximum value 512." or a multi-line
    dump naming components and object addresses)."""
    ex, url = server
    c = client(url)
    with pytest.raises(Exception) as err:
        c.predict(*args, api_name="/generate")
    assert str(err.value) == message
    assert c.predict(PROMPT, 3, 0, 0, 1, -1, api_name="/generate")[1]


def test_attention_topology_answers_and_refuses_a_bad_head(server):
    """``/attention_topology``: QTG and baseline graphs per head, their features in the table; a head beyond
    the model's is refused in one line naming the field, and the server keeps serving."""
    c = client(server[1])
    fig, table, numbers, note = c.predict(TEXT, 1, 2, 1, api_name="/attention_topology")
    assert numbers["heads"] == [2] and set(numbers["graphs"]) == {"QTG (nano)", "baseline (nano-baseline)"}
    graph = numbers["graphs"]["QTG (nano)"][0]
    assert graph["n_tokens"] == len(numbers["tokens"]) and len(graph["betti0"]) == len(graph["thresholds"])
    assert [r[:2] for r in table["data"]] == [["QTG (nano)", 2], ["baseline (nano-baseline)", 2]]
    assert fig is not None
    with pytest.raises(Exception) as err:
        c.predict(TEXT, 1, 9, 1, api_name="/attention_topology")
    assert str(err.value) == "head: 9 is above the maximum 3"
    assert c.predict(TEXT, 0, 0, 1, api_name="/attention_topology")[2]["heads"] == [0]

def test_the_largest_advertised_seed_is_taken(server):
    ex, url = server
    c = client(url)
    a = c.predict(PROMPT, 6, 1.0, 0, 1, 2**63 - 1, api_name="/generate")[1]
    assert a == c.predict(PROMPT, 6, 1.0, 0, 1, str(2**63 - 1), api_name="/generate")[1]


def test_bad_model_key_and_oversized_load_are_refused(server):
    ex, url = server
    c = client(url)
    for key in ("dir:/etc", "/etc/passwd"):
        with pytest.raises(Exception, match="^model: unknown"):
            c.predict(key, "cpu", api_name="/load")
    with pytest.raises(Exception, match="does not fit"):
        c.predict("tier:5.5q", "cpu", api_name="/load")
    assert "nano" in c.predict(TEXT, 0, -1, 1, "linear", api_name="/attention")[4]["model"]  # still the default


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
    assert results["a"] == PROMPT + library_greedy(micro.model, micro.tokenizer, PROMPT, 30)
    assert results["b"] == PROMPT + library_greedy(ex.current(None).model, ex.current(None).tokenizer, PROMPT, 30)
    assert results["a"] != results["b"]


def test_stop_halts_generation_on_the_server(server):
    ex, url = server
    c = client(url)
    c.predict("tier:base", "cpu", api_name="/load")  # 56M random weights: slow enough to stop midway
    before = ex.counters.tokens_generated
    finished = ex.counters.streams_finished
    job = c.submit(PROMPT, 500, 0, 0, 1, -1, api_name="/generate")
    at_stop = count_after_cancel(job, lambda: len(job.outputs()) >= 2, lambda: ex.counters.tokens_generated,
                                 "generation")
    assert at_stop - before < 500 and ex.counters.streams_finished == finished
    assert c.predict("shipped:nano", "cpu", api_name="/load")  # the queue slot was released


# --- what is served, and from where ------------------------------------------------------------------


def _multipart(name: str, body: bytes) -> tuple[bytes, dict]:
    data = (b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"" + name.encode() + b"\"\r\n"
            b"Content-Type: text/html\r\n\r\n" + body + b"\r\n--x--\r\n")
    return data, {"Content-Type": "multipart/form-data; boundary=x"}


def test_uploads_and_cross_origin_writes_are_refused(server):
    ex, url = server
    data, headers = _multipart("page.html", b"<script>alert(document.domain)</script>" + b" " * 2**20)
    assert _status(f"{url}gradio_api/upload", data, headers)[0] == 413
    assert _status(f"{url}gradio_api/upload", data, {**headers, "Origin": "http://evil.example"})[0] == 403
    body, json_headers = b'{"data": [], "fn_index": 0, "session_hash": "x"}', {"Content-Type": "application/json"}
    assert _status(f"{url}gradio_api/queue/join", body, {**json_headers, "Origin": "http://evil.example"})[0] == 403
    assert not list(ex.export_dir.rglob("page.html"))


def test_served_files_are_sandboxed_downloads_from_the_private_folder(server):
    ex, url = server
    assert stat.S_IMODE(os.stat(ex.export_dir).st_mode) == 0o700
    c = client(url)
    c.predict(TEXT, 1, "ripser", 64, 0, api_name="/topology")
    c.predict(api_name="/export_topology")
    page = next(ex.export_dir.rglob("figures.html"))
    status, headers = _status(f"{url}gradio_api/file={page}")
    assert status == 200
    assert headers["content-disposition"].startswith("attachment")
    assert "sandbox" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    planted = ex.export_dir / "planted.html"  # what an upload would have left: still only a download
    planted.write_text("<script>alert(1)</script>")
    status, headers = _status(f"{url}gradio_api/file={planted}")
    assert status == 200 and headers["content-disposition"].startswith("attachment")
    link = ex.export_dir / "link.txt"  # a link planted in the folder is not followed out of it
    link.symlink_to("/etc/passwd")
    assert _status(f"{url}gradio_api/file={link}")[0] in (403, 404)


def test_no_file_outside_the_export_folder_is_served(server):
    ex, url = server
    repo = Path(__file__).resolve().parent.parent
    for path in (repo / "README.md", repo / "assets" / "checkpoints" / "nano" / "config.json", Path("/etc/passwd"),
                 ex.export_dir.parent / "elsewhere.json"):
        assert _status(f"{url}gradio_api/file={path}")[0] in (403, 404), path
