"""The app over HTTP through ``gradio_client`` and plain requests, against a server launched in this process
(so the test can read the server's own counters): every endpoint answers, its parameters named as their labels
say, /generate streams and equals the library, bad input is refused in one line naming the field while the
server keeps serving, two clients keep their own models, Stop halts the work on the server, nothing is
uploaded, no cross-origin write is taken, no request for a foreign Host (DNS rebinding) is answered, and every
file served is a download from this launch's private export folder, named without its path. Last, SIGTERM and
SIGINT end the server as Ctrl-C does, and ``qtg app`` in a subprocess removes its folders on SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")
from gradio_client import Client  # noqa: E402

from app.config import AppConfig  # noqa: E402
from app.server import Hosts, end_on_signals, launch  # noqa: E402
from app.tabs import tiers, training  # noqa: E402
from qtg.data.tokenizer import encode  # noqa: E402
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
                "/export_sweep", "/heads", "/export_heads"}
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


def shown_w(html: str) -> list[float]:
    """The w each token of Generate's text is coloured by."""
    return [float(v) for v in re.findall(r'data-w="([^"]+)"', html)]


def test_the_w_from_toggle_over_http(server):
    """Generate's last input picks the w its colouring shows, ``/generate_w_from`` colours the client's last
    generation again, ``/topology_w_from`` draws the filter's w beside a control's: each shows the control's w
    (calibrated on the validation works), not the filter's."""
    ex, url = server
    c = client(url)
    plain = c.predict(PROMPT, 6, 0, 0, 1, -1, -1, "the filter (s̃)", api_name="/generate")[0]
    gated = c.predict(PROMPT, 6, 0, 0, 1, -1, -1, "one-bit gate", api_name="/generate")[0]
    cal = ex.calibrations.get(ex.current(None))
    assert len(shown_w(plain)) == len(shown_w(gated)) > 6
    assert {round(w, 5) for w in shown_w(gated)} <= {1.0, round(cal.gate, 5)}  # one bit: 1 or the constant
    assert {round(w, 5) for w in shown_w(plain)} - {1.0, round(cal.gate, 5)}  # the filter's w is graded
    # the toggle recolours the last generation of this client's session (its payload is session state)
    recoloured = c.predict("position only", api_name="/generate_w_from")  # the html (the payload is state)
    n = len(shown_w(plain))
    assert shown_w(recoloured) == pytest.approx(list(cal.profile[:n]), abs=1e-5)  # w by position, whatever the token
    assert "Position alone explains" in recoloured
    c.predict(TEXT, 1, "ripser", 64, 0, api_name="/topology")
    fig, note = c.predict("one-bit gate", api_name="/topology_w_from")
    traces = {t["name"]: t["y"] for t in json.loads(fig["plot"])["data"]}
    assert set(traces) == {"position alone", "the filter's w (s̃)", "one-bit gate control's w"}
    assert set(np.round(traces["one-bit gate control's w"], 5)) <= {1.0, round(cal.gate, 5)}
    assert traces["position alone"] == pytest.approx(list(cal.profile[:len(traces["position alone"])]), abs=1e-6)
    assert "one-bit gate control's w against the filter's: correlation" in note


@pytest.mark.parametrize("args, message", [
    (("", 10, 0.8, 0, 1, -1), "prompt: empty; type some text"),
    (("x" * 5000, 10, 0.8, 0, 1, -1), "prompt: 5,000 characters is above the maximum 4,000"),
    ((PROMPT, 10, -2, 0, 1, -1), "temperature: -2 is below the minimum 0"),
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


def test_max_new_tokens_is_bounded_by_the_room_the_prompt_leaves(server):
    """The context less the prompt's tokens, refused in the app's words beyond it (not the library's)."""
    ex, url = server
    c = client(url)
    nano = ex.current(None)
    room = nano.model.cfg.max_seq_len - len(encode(nano.tokenizer, PROMPT))
    with pytest.raises(Exception) as err:
        c.predict(PROMPT, room + 1, 0, 0, 1, -1, api_name="/generate")
    assert str(err.value) == f"max new tokens: {room + 1} is above the maximum {room}"
    assert c.predict(PROMPT, room, 0, 0, 1, -1, api_name="/generate")[1].startswith(PROMPT)


def api_name_of(label: str) -> str:
    """A parameter's name as its label says: the label's words before any '(', ':' or ',', in snake case."""
    return re.sub(r"[^a-z0-9]+", "_", re.split(r"[(:,]", label)[0].lower()).strip("_")


def test_every_endpoint_parameter_is_named_as_its_label_says(server):
    """What ``gradio_client`` shows a caller (``view_api``): every parameter of every named endpoint of every
    tab is named as its label says, so a call may name its arguments."""
    c = client(server[1])
    api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [p["parameter_name"] for p in api["/generate"]["parameters"]] == [
        "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "strip_block", "w_from"]
    wrong = {name: [(p["parameter_name"], p["label"]) for p in info["parameters"]
                    if p["parameter_name"] != api_name_of(p["label"])] for name, info in api.items()}
    assert {name: w for name, w in wrong.items() if w} == {}
    text = c.predict(prompt=PROMPT, max_new_tokens=4, temperature=0, api_name="/generate")[1]
    assert text == c.predict(PROMPT, 4, 0, api_name="/generate")[1]


def test_blocks_are_numbered_from_0_in_every_tab(server):
    """Topology and Compare name a layer's states as Attention and Experiment number blocks, from 0 (layer 2
    of a QTG model is block 0's output; nano has blocks 0..3)."""
    c = client(server[1])
    api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    label = next(p["label"] for p in api["/topology"]["parameters"] if p["parameter_name"] == "layer")
    assert "2 block 0" in label and "5 block 3" in label
    assert c.predict(TEXT, 2, "ripser", 64, 0, api_name="/topology")[3]["layer"] == "2 (block 0)"
    rows = c.predict(TEXT, "shipped:nano", "cpu", "approximate", "shipped:nano-baseline", "cpu", "approximate", -1,
                     api_name="/compare")[0]["data"]
    assert {r[0]: r[1:] for r in rows}["layer"] == ["5 (block 3)", "4 (block 3)"]  # QTG | baseline (embedding first)
    assert "gamma at block 0:" in c.predict(TEXT, 0, -1, 1, "linear", api_name="/attention")[5]


def test_attention_topology_answers_and_refuses_a_bad_head(server):
    """``/attention_topology``: QTG and baseline graphs per head, their features in the table; a head beyond
    the model's is refused in one line naming the field, and the server keeps serving."""
    c = client(server[1])
    fig, table, numbers, note = c.predict(TEXT, 1, 2, 1, api_name="/attention_topology")
    assert numbers["heads"] == [2] and set(numbers["graphs"]) == {"QTG (nano)", "baseline (nano-baseline)"}
    graph = numbers["graphs"]["QTG (nano)"][0]
    assert graph["n_tokens"] == len(numbers["tokens"]) and len(graph["betti0"]) == len(graph["thresholds"])
    assert table["headers"] == ["feature", "model", "head 2"]  # a row per feature and model, a column per head
    assert [r[:2] for r in table["data"][:2]] == [["b0@0.025", "QTG (nano)"], ["b0@0.025", "baseline (nano-baseline)"]]
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


def test_hosts_are_those_the_server_was_bound_for():
    local = Hosts("127.0.0.1")
    assert all(local.allows(h) for h in ("127.0.0.1:7860", "localhost", "LOCALHOST:80", "[::1]:7860", "127.0.0.2"))
    assert not any(local.allows(h) for h in ("rebind.example:7860", "127.0.0.1.rebind.example", "localhost.example",
                                             "10.0.0.5:7860", "[::ffff:10.0.0.5]", "", None))
    assert Hosts("127.0.0.1", ["proxy.example"]).allows("Proxy.Example:443")
    named = Hosts("box.lan")
    assert named.allows("box.lan:7860") and named.allows("localhost:7860") and not named.allows("other.lan")
    every = Hosts("0.0.0.0")  # any address (not a name a rebinding page can point), and this machine's names
    assert every.allows("192.168.1.7:7860") and every.allows("[fe80::1]:7860") and every.allows(socket.gethostname())
    assert not every.allows("rebind.example:7860")


def _raw(port: int, method: str, path: str, host: str, body: bytes | None = None, headers: dict | None = None) -> int:
    """The status of one request sent with this ``Host`` header, whatever the address connected to."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        return conn.getresponse().status
    finally:
        conn.close()


def test_a_request_for_a_foreign_host_is_refused_on_every_route(server):
    """DNS rebinding: a page on rebind.example, its name re-pointed at 127.0.0.1, sends ``Host: rebind.example:PORT``
    and a matching Origin. It is refused (403) on Gradio's routes, on /v1 and on the training-start route, which
    starts nothing; the names the server was bound for are answered."""
    ex, url = server
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    forged = f"rebind.example:{port}"
    writes = {"Origin": f"http://{forged}", "Content-Type": "application/json"}
    jobs = dict(training.runs_for(ex).jobs)
    assert _raw(port, "GET", "/", forged) == 403
    assert _raw(port, "GET", "/gradio_api/info", forged) == 403
    assert _raw(port, "POST", "/gradio_api/queue/join", forged, b'{"data": [], "fn_index": 0}', writes) == 403
    assert _raw(port, "GET", "/v1/models", forged) == 403
    completion = json.dumps({"model": "nano", "prompt": "ROMEO:", "max_tokens": 2}).encode()
    assert _raw(port, "POST", "/v1/completions", forged, completion, writes) == 403
    assert _raw(port, "POST", "/gradio_api/call/training_start", forged, b'{"data": [10, 5]}', writes) == 403
    time.sleep(0.5)
    assert training.runs_for(ex).jobs == jobs  # no training process was started
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert _raw(port, "GET", "/", host) == 200 and _raw(port, "GET", "/v1/models", host) == 200, host


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def test_exported_files_are_named_without_the_private_folder(server):
    """What a client gets for an export (``download_files=False``: as the server sent it) names each file
    ``exports/<export>/<file>``, never by the private folder's path; that URL serves the file, as a download;
    a name that would leave the folder is not served."""
    ex, url = server
    c = Client(url, verbose=False, download_files=False)
    c.predict(TEXT, 1, "ripser", 64, 0, api_name="/topology")
    files, _ = c.predict(api_name="/export_topology")
    sent = json.dumps(files)
    assert str(ex.export_dir) not in sent and "qtg-explorer-" not in sent and len(files) >= 2
    for f in files:
        assert f["path"].startswith("exports/topology-") and f["url"].endswith(f"/gradio_api/file={f['path']}")
        status, headers, body = _get(f["url"])
        assert status == 200 and headers["content-disposition"].startswith("attachment")
        assert body == (ex.export_dir / f["path"].removeprefix("exports/")).read_bytes()
    for name in ("exports/../../../../etc/passwd", "exports/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "exports//etc/passwd"):
        assert _get(f"{url}gradio_api/file={name}")[0] in (403, 404), name


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


def test_sigterm_and_sigint_interrupt_the_server_as_ctrl_c_does():
    """``launch`` (blocking) takes both signals over: each raises KeyboardInterrupt in the main thread, where the
    server's loop ends and the folders are removed (the whole path: the next test)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for sig in saved:  # a signal not taken over is then ignored here, rather than ending pytest
            signal.signal(sig, lambda *_: None)
        end_on_signals()
        for sig in saved:
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(sig)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_qtg_app_removes_its_folders_on_sigterm(tmp_path):
    """``qtg app`` on a free port, a run started in its Training tab (the training folder), then SIGTERM: the
    process ends of itself, and the export and training folders are gone from the folder they were made in."""
    port, parent = free_port(), tmp_path / "exports"
    with open(tmp_path / "app.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qtg", "app", "--port", str(port), "--device", "cpu",
                                 "--export-dir", str(parent)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while _status(url)[0] != 200:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "app.log").read_text()[-3000:]
            time.sleep(0.2)
        assert client(url).predict(10, 5, api_name="/training_start")[1].startswith("Training micro")
        made = sorted(parent.iterdir())
        assert len(made) == 2 and all(p.name.startswith("qtg-explorer-") for p in made)  # exports, training runs
        assert any((p / "micro-1" / "train.log").is_file() for p in made)
        proc.send_signal(signal.SIGTERM)
        # the exit waits for the tier table's warm-up (5.5q's meta build) if it is still counting
        assert proc.wait(90) == 0, (tmp_path / "app.log").read_text()[-3000:]
        assert list(parent.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
