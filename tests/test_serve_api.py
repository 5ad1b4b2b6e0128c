"""The OpenAI-compatible API (qtg.serve.api) over the batching engine, served by uvicorn in this process.

With the official ``openai`` client: models, plain and streamed completions, chat, a 400 naming the
parameter. With plain HTTP: 413, server-sent events ending with ``[DONE]``, streamed text equal to the
plain completion and to the library's tokens, the TopoFilter extension equal to the model's own
scores, a disconnect cancelling its row, the server serving on after every error, 127.0.0.1 by default.
Bounded work (issue 23): stop strings bounded, their hold-back linear and off the event loop; client
errors (lone surrogates, overflowing interventions, a deeply nested body) 400s naming the field with no
traceback logged; the request bodies documented field by field in /openapi.json (the fuzz from that
schema is tests/test_serve_fuzz.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="the app extra is not installed: pip install -e '.[app]'")
openai = pytest.importorskip("openai", reason="the test extra is not installed: pip install -e '.[test]'")

from qtg.cli import build_parser  # noqa: E402
from qtg.data.tokenizer import EOS_TOKEN, decode, encode  # noqa: E402
from qtg.generate import generate  # noqa: E402
from qtg.serve.api import MAX_BODY  # noqa: E402
from qtg.serve.schemas import MAX_STOP_CHARS, MAX_STOPS, ChatRequest, CompletionRequest  # noqa: E402
from qtg.serve.text import TextStream, chat_prompt  # noqa: E402
from tests.serve_fixtures import model_fixture, server_fixture  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "First Citizen: Before we"


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


# --- bounded work (issue 23) ---------------------------------------------------------------------------


def raw(body: dict) -> bytes:
    """JSON as a client may send it: ``\\ud800`` escapes included (httpx's ``json=`` cannot encode them)."""
    return json.dumps(body).encode()


@pytest.mark.parametrize("stop", ["x" * (MAX_STOP_CHARS + 1), ["x" * 250_000 + str(i) for i in range(4)]],
                         ids=["one-too-long", "four-of-250000"])
def test_stop_strings_are_bounded(server, stop):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "stop": stop, "stream": True},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert r.json()["error"]["message"].startswith("stop") and str(MAX_STOP_CHARS) in r.json()["error"]["message"]


@pytest.mark.timeout(60)  # a hang guard: trying each prefix of the stop string (the old way) takes minutes
def test_the_hold_back_is_linear_in_the_stop_string(model):
    tok = model.tokenizer
    stop = "me " + "q" * 1_000_000
    ts, shown, held = TextStream(tok, stop=[stop]), "", []
    for i in encode(tok, "hear me speak"):
        shown += ts.add(i)
        text = decode(tok, ts.ids)
        held.append(max((k for k in range(1, len(text) + 1) if text.endswith(stop[:k])), default=0))
        assert shown == text[:len(text) - held[-1]]  # all but the tail that may still become the stop string
    assert max(held) == len("me ") - 1 and shown + ts.flush() == "hear me speak" and not ts.stopped


def test_the_hold_back_runs_off_the_event_loop(server, monkeypatch):
    """While one request's streamed text is held back, the server answers others: the hold-back, which
    grows with the stop strings, runs in a worker thread (it kept every client waiting on the event loop)."""
    url, _ = server
    entered, release = threading.Event(), threading.Event()
    add = TextStream.add

    def stuck_add(self, token):
        entered.set()
        release.wait(60)
        return add(self, token)

    monkeypatch.setattr(TextStream, "add", stuck_add)
    answers = []
    slow = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": "zz"}, timeout=120)))
    slow.start()
    try:
        assert entered.wait(30), "the request never reached its hold-back"
        assert httpx.get(f"{url}/v1/models", timeout=20).status_code == 200  # the old loop: stuck until release
    finally:
        release.set()
        slow.join(120)
    assert answers and answers[0].status_code == 200


@contextmanager
def tracebacks():
    """The log records carrying a traceback, from every logger a server writes to (uvicorn's do not propagate)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "qtg")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    records[:] = [r for r in records if r.exc_info]


CLIENT_ERRORS = [  # (route, body, the field its 400 names): each was a 500, or a 200 streaming an error event
    ("completions", raw({"prompt": "\ud800", "max_tokens": 2}), "prompt"),
    ("chat/completions", raw({"messages": [{"role": "user", "content": "Speak \ud800"}], "max_tokens": 2}),
     "messages"),
    ("completions", b"[" * 100_000, "body"),
    ("completions", raw({"prompt": PROMPT, "max_tokens": 2, "n": True}), "n"),
    *[("completions", raw({"prompt": PROMPT, "max_tokens": 2, "intervene": spec, "stream": stream}), "intervene")
      for spec in ("gamma=1e300", "gamma=3e38", "gamma_scale=1e300", "tau=1e-300", "temperature=1e-300")
      for stream in (False, True)],
]


@pytest.mark.parametrize("route, body, param", CLIENT_ERRORS,
                         ids=["surrogate-prompt", "surrogate-content", "nested-100000", "n-true",
                              *[f"{spec}{'-streamed' if stream else ''}" for spec in
                                ("gamma=1e300", "gamma=3e38", "gamma_scale=1e300", "tau=1e-300", "temperature=1e-300")
                                for stream in (False, True)]])
def test_a_client_error_is_a_400_naming_its_field_and_logs_no_traceback(server, route, body, param):
    url, _ = server
    with tracebacks() as logged, httpx.Client(timeout=60) as http:
        r = http.post(f"{url}/v1/{route}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (param, 400, "invalid_request_error")
        assert error["message"].startswith(param)
        assert b"\\ud800" not in body or "lone surrogate (U+D800)" in error["message"], error["message"]
        assert r.headers.get("connection") != "close" and http.get(f"{url}/v1/models").status_code == 200
    assert not logged, [r.getMessage() for r in logged]


def test_a_prompt_over_the_context_is_named_as_the_prompt(server, model):
    url, _ = server
    context = model.cfg.max_seq_len
    too_long = " ".join(["speak"] * context)

    def error(route: str, body: dict) -> dict:
        r = httpx.post(f"{url}/v1/{route}", json=body, timeout=60)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert error("completions", {"prompt": too_long})["param"] == "prompt"
    assert error("chat/completions", {"messages": [{"role": "user", "content": too_long}]})["param"] == "messages"
    nearly = [5] * (context - 8)  # leaves room for 8 new tokens: fewer than the default max_tokens of 16
    assert error("completions", {"prompt": nearly})["param"] == "prompt"
    assert error("completions", {"prompt": nearly, "max_tokens": 9})["param"] == "max_tokens"  # the client's own
    r = httpx.post(f"{url}/v1/completions", json={"prompt": nearly, "max_tokens": 8, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= context


def schema_values(schema: object, key: str) -> set:
    """Every value of ``key`` anywhere inside a JSON schema (through anyOf, oneOf, items)."""
    if isinstance(schema, dict):
        return {v for k, v in schema.items() if k == key} | {x for v in schema.values() for x in schema_values(v, key)}
    if isinstance(schema, list):
        return {x for v in schema for x in schema_values(v, key)}
    return set()


def test_openapi_documents_every_field_and_its_limits(server):
    url, _ = server
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    models = schema["components"]["schemas"]
    for route, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatRequest)):
        operation = schema["paths"][route]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(model.__name__)
        assert "422" not in operation["responses"] and "400" in operation["responses"]  # answered in OpenAI's form
        doc = models[model.__name__]
        assert set(doc["properties"]) == set(model.model_fields) and doc["additionalProperties"] is False
        assert all(field.get("description") for field in doc["properties"].values())
    fields = models["CompletionRequest"]["properties"]
    assert schema_values(fields["temperature"], "maximum") == {2} and schema_values(fields["top_p"], "maximum") == {1}
    assert schema_values(fields["stop"], "maxItems") == {MAX_STOPS}
    assert schema_values(fields["stop"], "maxLength") == {MAX_STOP_CHARS}
    assert schema_values(fields["n"], "maximum") == {1} and schema_values(fields["logprobs"], "maximum") == {5}
    assert models["ChatRequest"]["properties"]["top_logprobs"]["anyOf"][0]["maximum"] == 20
