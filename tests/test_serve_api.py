"""The OpenAI-compatible API (qtg.serve.api) over the batching engine, served by uvicorn in this process.

With the official ``openai`` client: models, plain and streamed completions, chat, a 400 naming the
parameter. With plain HTTP: 413, server-sent events ending with ``[DONE]``, streamed text equal to the
plain completion and to the library's tokens, the TopoFilter extension equal to the model's own
scores, a disconnect cancelling its row, the server serving on after every error, 127.0.0.1 by default.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="the app extra is not installed: pip install -e '.[app]'")
openai = pytest.importorskip("openai", reason="the test extra is not installed: pip install -e '.[test]'")

import uvicorn  # noqa: E402

import qtg  # noqa: E402
from qtg.cli import build_parser  # noqa: E402
from qtg.generate import generate  # noqa: E402
from qtg.serve.api import MAX_BODY, create_api  # noqa: E402
from qtg.serve.engine import Engine  # noqa: E402
from qtg.serve.params import Served  # noqa: E402
from qtg.serve.text import TextStream, chat_prompt  # noqa: E402
from qtg.tokenizer import EOS_TOKEN, decode, encode  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "First Citizen: Before we"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """micro with a BPE tokenizer; init_std 0.3 weights so that sampled and greedy text varies."""
    m = qtg.load(tiny_checkpoint).eval()
    lively = qtg.build(m.cfg.replace(init_std=0.3), seed=0).eval()
    lively.tokenizer = m.tokenizer
    return lively


@pytest.fixture(scope="module")
def server(model):
    engine = Engine(model)
    app = create_api({"micro": Served("micro", engine, model.tokenizer)})
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def library_text(model, prompt: str, n: int, **kw) -> str:
    """The library's continuation alone, stopping at EOS and without it, as the API shows it."""
    tok = model.tokenizer
    eos = tok.token_to_id(EOS_TOKEN)
    out = generate(model, torch.tensor([encode(tok, prompt)]), n, eos_id=eos, **kw)[0, len(encode(tok, prompt)):]
    return decode(tok, [t for t in out.tolist() if t != eos])


def sse(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


# --- the openai client ----------------------------------------------------------------------------


def test_models_are_listed(client):
    assert [m.id for m in client.models.list()] == ["micro"]


def test_plain_and_streamed_completions_equal_the_library(client, model):
    want = library_text(model, PROMPT, 24, temperature=1.0, seed=3)
    plain = client.completions.create(model="micro", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=3)
    assert plain.choices[0].text == want and len(set(want)) > 5  # varied text: the test has teeth
    assert plain.usage.prompt_tokens == len(encode(model.tokenizer, PROMPT))
    chunks = list(client.completions.create(model="micro", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=3,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_chat_plain_and_streamed(client, model):
    messages = [{"role": "system", "content": "Speak."}, {"role": "user", "content": "Who is there?"}]
    want = library_text(model, chat_prompt([("system", "Speak."), ("user", "Who is there?")]), 16, temperature=0,
                        stop=["\nUser:", "\nSystem:"])
    want = want.split("\nUser:")[0].split("\nSystem:")[0]
    r = client.chat.completions.create(model="micro", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    streamed = client.chat.completions.create(model="micro", messages=messages, max_tokens=16, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=5), "temperature"), (dict(n=2), "n"), (dict(top_p=1.5), "top_p"), (dict(top_p=0), "top_p"),
    (dict(max_tokens=10_000), "max_tokens"), (dict(logprobs=9), "logprobs"), (dict(stop=["a"] * 5), "stop"),
    (dict(extra_body={"bogus": 1}), "bogus"), (dict(extra_body={"intervene": "topo=sideways"}), "intervene"),
])
def test_a_bad_parameter_is_a_400_naming_it(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="micro", prompt=PROMPT, **{"max_tokens": 4, **kwargs})
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert e.value.body["message"].startswith(f"{param}:")
    assert client.completions.create(model="micro", prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_logprobs_are_the_models(client, model):
    r = client.completions.create(model="micro", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    ids = encode(model.tokenizer, PROMPT)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert abs(lp.token_logprobs[0] - float(torch.log_softmax(logits, -1).max())) < 1e-4
    assert len(lp.top_logprobs[0]) == 2 and lp.tokens[0] in lp.top_logprobs[0]


# --- plain HTTP -------------------------------------------------------------------------------------


def test_sse_ends_with_done_and_carries_the_topofilter_scores(server, model):
    url, _ = server
    lines = sse(url, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True, "topo": True})
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    scored = [c["choices"][0]["topo"] for c in chunks if "topo" in c["choices"][0]]
    assert len(scored) == 8
    ids = encode(model.tokenizer, PROMPT) + [s["token_id"] for s in scored]
    with torch.inference_mode():
        out = model(torch.tensor([ids]), return_internals=True)
    n = len(ids) - 8
    for k, s in enumerate(scored):
        assert abs(s["s_soft"] - float(out.topo_scores[0, n + k])) < 1e-5
        assert abs(s["s"] - float(out.topo_exact_scores[0, n + k])) < 1e-5
        assert abs(s["w"] - float(out.topo_weights[0, n + k])) < 1e-5


def test_oversize_body_is_413_and_the_server_keeps_serving(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=b"{" + b" " * (MAX_BODY + 10) + b"}",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    r = httpx.post(f"{url}/v1/completions", content=b"not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body:")
    r = httpx.post(f"{url}/v1/completions", json={"model": "gpt-4", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and "micro" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_disconnect_cancels_its_row(server):
    url, engine = server
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 100, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    deadline = time.time() + 10
    while not engine.idle and time.time() < deadline:
        time.sleep(0.05)
    assert engine.idle, "the disconnected request is still decoding"


def test_stop_strings_cut_the_text_also_when_streamed(server, model):
    url, _ = server
    free = library_text(model, PROMPT, 30, temperature=0)
    stop = free[10:13]
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": stop}
    plain = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert plain["text"] == free[:free.index(stop)] and plain["finish_reason"] == "stop"
    lines = sse(url, {**body, "stream": True})
    assert "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]) == plain["text"]


def test_text_stream_holds_back_a_partial_stop_string(model):
    tok = model.tokenizer
    ids = encode(tok, "hear me speak")
    ts = TextStream(tok, stop=["me sp"])
    shown = "".join(ts.add(i) for i in ids)
    assert "me" not in shown and ts.stopped and ts.text() == "hear "


def test_serve_binds_to_localhost_by_default():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.func.__module__ == "qtg.cli.serve"
