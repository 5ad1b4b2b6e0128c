"""An OpenAI-compatible HTTP API over the continuous-batching :class:`~qtg.serve.engine.Engine`.

Routes (docs/serve.md has the whole contract): ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions``. Requests are checked field by field before
anything is queued; a bad one is HTTP 400 with a message naming the parameter (the OpenAI error
body: ``{"error": {"message", "type", "param", "code"}}``, as vLLM answers), an unknown model 404,
a body over ``max_body`` bytes 413. Streaming is server-sent events, one chunk per token, ending
with ``data: [DONE]``; a client that disconnects cancels its row of the batch.

Extensions beyond the OpenAI fields: ``top_k``; ``intervene`` (a :meth:`qtg.Intervention.parse`
spec, e.g. ``"topo=exact"``); ``topo: true``, which adds to each streamed chunk's choice (and as a
list to a whole response's choice) the token's TopoFilter numbers
``{"token_id", "token", "s_soft", "s", "w"}`` (s~, s and w as the app colours them).

Built with FastAPI (the ``app`` extra); :func:`create_api` returns an ASGI app that ``qtg serve``
runs with uvicorn and ``qtg app`` mounts beside the Gradio page.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from qtg.errors import GenerationError, QTGError
from qtg.intervention import Intervention
from qtg.serve.engine import Engine, Event
from qtg.serve.text import CHAT_ROLES, CHAT_STOPS, TextStream, chat_prompt
from qtg.tokenizer import EOS_TOKEN, encode

MAX_BODY = 1 << 20  # bytes: a request body above this is refused with 413
MAX_STOPS = 4  # as OpenAI
MAX_LOGPROBS = 5  # completions' logprobs, as OpenAI
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI
DISCONNECT_POLL_S = 0.25

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "stream_options",
          "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user", "intervene", "topo"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "top_logprobs", "max_completion_tokens"}


@dataclass
class Served:
    """One model the API serves: its name (the ``model`` field), its engine and tokenizer."""

    name: str
    engine: Engine
    tokenizer: Any

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.token_to_id(EOS_TOKEN)


class EngineFailure(Exception):
    """The engine could not finish a request it had accepted (HTTP 500)."""


class BadRequest(Exception):
    """A request the API refuses: HTTP ``status`` with a message naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large"}.get(status, "error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


# --- request checks ------------------------------------------------------------------------


@dataclass
class Params:
    """A checked request."""

    served: Served
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    stop: tuple[str, ...]  # the client's stop strings (chat adds the template's)
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; k: the chosen token's and the top k
    intervene: Intervention | None
    topo: bool


def _number(body: Mapping, name: str, default: float | None, lo: float, hi: float) -> float | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name}: expected a number, got {value!r}", name)
    if not lo <= value <= hi:
        raise BadRequest(f"{name}: {value!r} is outside [{lo:g}, {hi:g}]", name)
    return float(value)


def _integer(body: Mapping, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name}: expected an integer, got {value!r}", name)
    if not lo <= value <= hi:
        raise BadRequest(f"{name}: {value!r} is outside [{lo}, {hi}]", name)
    return value


def _flag(body: Mapping, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name}: expected true or false, got {value!r}", name)
    return value


def _only(body: Mapping, name: str, allowed: tuple, what: str) -> None:
    """Refuse, by name, a value of an OpenAI field this server does not implement."""
    if body.get(name) not in allowed:
        raise BadRequest(f"{name}: {body.get(name)!r} is not supported here ({what})", name)


def _stop(body: Mapping) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"stop: expected a non-empty string or a list of them, got {stop!r}", "stop")
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}", "stop")
    return tuple(stops)


def _prompt_ids(body: Mapping, served: Served) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = encode(served.tokenizer, prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        vocab = served.engine.model.cfg.vocab_size
        if not all(0 <= i < vocab for i in prompt):
            raise BadRequest(f"prompt: token ids must lie in 0..{vocab - 1}", "prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise BadRequest("prompt: one prompt per request (send a batch as separate requests; they are "
                         "batched on the server)", "prompt")
    else:
        raise BadRequest(f"prompt: expected a string or a list of token ids, got {str(prompt)[:60]!r}", "prompt")
    if not ids:
        raise BadRequest("prompt: empty", "prompt")
    return ids


def _messages(body: Mapping) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in CHAT_ROLES:
            raise BadRequest(f"messages[{i}].role: expected one of {sorted(CHAT_ROLES)}, got {role!r}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content: expected text, got {str(content)[:60]!r}", "messages")
        out.append((role, content))
    return out


def check_request(body: Any, chat: bool, models: Mapping[str, Served]) -> Params:
    """Every field of a completion (or chat) request, checked; the first problem raises, naming its field.

    Raises:
        BadRequest: 400 naming the parameter; 404 for an unknown model.
    """
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object", "body")
    unknown = sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown parameter", unknown[0])
    if not models:
        raise BadRequest("model: no model is served here now", "model", 404)
    name = body.get("model")
    if name is None:
        name = next(iter(models))
    if name not in models:
        raise BadRequest(f"model: {name!r} is not served here (served: {', '.join(models)})", "model", 404)
    served = models[name]
    _only(body, "n", (None, 1), "one choice per request")
    _only(body, "presence_penalty", (None, 0, 0.0), "no penalties")
    _only(body, "frequency_penalty", (None, 0, 0.0), "no penalties")
    _only(body, "logit_bias", (None, {}), "no logit bias")
    if not chat:
        _only(body, "echo", (None, False), "the prompt is not echoed")
        _only(body, "best_of", (None, 1), "one candidate per request")
        _only(body, "suffix", (None,), "no insertion")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise BadRequest("stream_options: only {\"include_usage\": bool}, with stream true", "stream_options")
    cfg = served.engine.model.cfg
    if chat:
        ids = encode(served.tokenizer, chat_prompt(_messages(body)))
        if body.get("max_completion_tokens") is not None and body.get("max_tokens") is not None:
            raise BadRequest("max_completion_tokens: give it or max_tokens, not both", "max_completion_tokens")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, key, max(1, cfg.max_seq_len - len(ids)), 1, cfg.max_seq_len)
    else:
        ids = _prompt_ids(body, served)
        key = "max_tokens"
        max_tokens = _integer(body, key, 16, 1, cfg.max_seq_len)
    if len(ids) + max_tokens > cfg.max_seq_len:
        raise BadRequest(f"{key}: the prompt is {len(ids)} tokens and {key} is {max_tokens}; together they exceed "
                         f"the model's context of {cfg.max_seq_len} tokens", key)
    logprobs = _logprobs(body, chat)
    intervene = None
    if body.get("intervene") not in (None, ""):
        if not isinstance(body["intervene"], str):
            raise BadRequest("intervene: expected a spec string such as \"topo=exact\"", "intervene")
        try:
            intervene = Intervention.parse(body["intervene"])
            intervene.check(served.engine.model)
        except QTGError as e:
            raise BadRequest(f"intervene: {e}", "intervene") from None
    topo = _flag(body, "topo")
    if topo and not served.engine.model.has_topofilter:
        raise BadRequest(f"topo: {served.name} has no TopoFilter", "topo")
    top_k = _integer(body, "top_k", None, -1, cfg.vocab_size)
    top_p = _number(body, "top_p", None, 0.0, 1.0)
    if top_p == 0:
        raise BadRequest("top_p: 0 keeps no token; give a value in (0, 1]", "top_p")
    return Params(served, ids, max_tokens, _number(body, "temperature", 1.0, 0.0, 2.0),
                  top_p, top_k if top_k and top_k > 0 else None,
                  _stop(body), _integer(body, "seed", None, 0, 2**63 - 1), stream,
                  bool(options and options.get("include_usage")), logprobs, intervene, topo)


def _logprobs(body: Mapping, chat: bool) -> int | None:
    if not chat:
        return _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    wanted = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise BadRequest("top_logprobs: needs logprobs true", "top_logprobs")
    return (top or 0) if wanted else None


# --- running a request -----------------------------------------------------------------------


class Completion:
    """One request's run: submit, then turn engine events into text, logprobs and scores."""

    def __init__(self, params: Params, chat: bool):
        self.p, self.chat = params, chat
        served = params.served
        stops = params.stop + (CHAT_STOPS if chat else ())
        self.text = TextStream(served.tokenizer, stops, skip=() if served.eos_id is None else (served.eos_id,))
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.n_tokens = 0
        self.finish: str | None = None
        self.req = served.engine.submit(
            torch.tensor(params.ids), params.max_tokens, temperature=params.temperature, top_k=params.top_k,
            top_p=params.top_p, seed=params.seed, eos_id=served.eos_id, stop=stops or None,
            intervene=params.intervene, topo=params.topo, logprobs=params.logprobs,
            loop=asyncio.get_running_loop())

    def take(self, event: Event) -> tuple[str, dict[str, Any]]:
        """One event -> (its new text, its extra per-token fields: logprobs, topo)."""
        if event.token is None:
            if event.error:
                raise EngineFailure(event.error)
            self.finish = "length" if event.finish == "length" else "stop"
            return self.text.flush(), {}
        self.n_tokens += 1
        piece = self.text.add(event.token)
        tok = self.p.served.tokenizer
        extra: dict[str, Any] = {}
        if self.p.logprobs is not None:
            extra["logprobs"] = (event.token, event.logprob, event.top_logprobs or ())
        if self.p.topo and event.topo is not None:
            extra["topo"] = {"token_id": event.token, "token": tok.decode([event.token], skip_special_tokens=False),
                             "s_soft": event.topo.soft, "s": event.topo.exact, "w": event.topo.weight}
        return piece, extra

    def usage(self) -> dict[str, int]:
        n = len(self.p.ids)
        return {"prompt_tokens": n, "completion_tokens": self.n_tokens, "total_tokens": n + self.n_tokens}

    def logprobs_json(self, items: list[tuple[int, float, tuple]]) -> dict[str, Any]:
        """OpenAI's logprobs object: completions' parallel lists, or chat's ``content`` list."""
        tok = self.p.served.tokenizer

        def text(i: int) -> str:
            return tok.decode([i], skip_special_tokens=False)

        if self.chat:
            return {"content": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode()),
                                 "top_logprobs": [{"token": text(i), "logprob": v, "bytes": list(text(i).encode())}
                                                  for i, v in top]} for t, lp, top in items]}
        offsets, pos = [], 0
        for t, _, _ in items:
            offsets.append(pos)
            pos += len(text(t))
        return {"tokens": [text(t) for t, _, _ in items], "token_logprobs": [lp for _, lp, _ in items],
                "top_logprobs": [{text(i): v for i, v in top} for _, _, top in items], "text_offset": offsets}

    def choice(self, text: str, finish: str | None, logprobs: Any = None, topo: Any = None) -> dict[str, Any]:
        if self.chat:
            body = {"message": {"role": "assistant", "content": text}} if finish and not self.p.stream else \
                {"delta": {"content": text} if text else {}}
        else:
            body = {"text": text}
        out = {"index": 0, **body, "logprobs": logprobs, "finish_reason": finish}
        if topo is not None:
            out["topo"] = topo
        return out

    def envelope(self, choices: list, chunk: bool, usage: dict | None = None) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.p.served.name,
               "choices": choices}
        if usage is not None or not chunk:
            out["usage"] = usage if usage is not None else self.usage()
        return out


async def _whole(run: Completion, request: Request) -> dict[str, Any]:
    """Run to the end (cancelled if the client goes away) and answer in one body."""
    watcher = asyncio.create_task(_watch(request, run))
    text, items, topo = [], [], []
    try:
        async for event in run.req.aevents():
            piece, extra = run.take(event)
            text.append(piece)
            if "logprobs" in extra:
                items.append(extra["logprobs"])
            if "topo" in extra:
                topo.append(extra["topo"])
    finally:
        watcher.cancel()
        run.req.cancel()
    logprobs = run.logprobs_json(items) if run.p.logprobs is not None else None
    choice = run.choice("".join(text), run.finish, logprobs, topo if run.p.topo else None)
    return run.envelope([choice], chunk=False)


async def _watch(request: Request, run: Completion) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    run.req.cancel()


async def _events(run: Completion) -> AsyncIterator[str]:
    """Server-sent events: a chunk per token, the finish chunk, (usage), ``[DONE]``. A disconnect cancels."""
    try:
        if run.chat:
            first = run.choice("", None)
            first["delta"] = {"role": "assistant", "content": ""}
            yield _sse(run.envelope([first], chunk=True))
        async for event in run.req.aevents():
            piece, extra = run.take(event)
            if event.token is None:
                if piece:
                    yield _sse(run.envelope([run.choice(piece, None)], chunk=True))
                yield _sse(run.envelope([run.choice("", run.finish)], chunk=True))
                break
            logprobs = run.logprobs_json([extra["logprobs"]]) if "logprobs" in extra else None
            yield _sse(run.envelope([run.choice(piece, None, logprobs, extra.get("topo"))], chunk=True))
        if run.p.include_usage:
            yield _sse(run.envelope([], chunk=True, usage=run.usage()))
        yield "data: [DONE]\n\n"
    except EngineFailure as e:
        yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}})
        yield "data: [DONE]\n\n"
    finally:
        run.req.cancel()  # a client gone mid-stream: its row leaves the batch


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# --- the app -------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before any route reads it."""

    def __init__(self, app: Any, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(scope, receive, send, self.limit)
            return
        chunks, size = [], 0
        while True:  # read the body, counting: a chunked body has no declared length
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await _too_large(scope, receive, send, self.limit)
                return
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect messages

        await self.app(scope, replay, send)


async def _too_large(scope: dict, receive: Any, send: Any, limit: int) -> None:
    response = error_response(413, f"body: over the limit of {limit:,} bytes", "body")
    await response(scope, receive, send)


def create_api(models: Mapping[str, Served] | Callable[[], Mapping[str, Served]], max_body: int = MAX_BODY,
               prefix: str = "/v1") -> Any:
    """The API as an ASGI app (FastAPI inside a body-size limit).

    Args:
        models: the served models by name, or a function returning them (read per request).
        max_body: the largest request body in bytes (413 above).
        prefix: where the routes live (``/v1``, or ``""`` for an app mounted at ``/v1``).
    """
    api = FastAPI(title="QTG OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    def served() -> Mapping[str, Served]:
        return models() if callable(models) else models

    @api.exception_handler(BadRequest)
    async def bad_request(_: Request, e: BadRequest) -> JSONResponse:
        return error_response(e.status, e.message, e.param)

    @api.exception_handler(GenerationError)
    async def bad_generation(_: Request, e: GenerationError) -> JSONResponse:
        return error_response(400, str(e))

    @api.exception_handler(EngineFailure)
    async def engine_failure(_: Request, e: EngineFailure) -> JSONResponse:
        return error_response(500, str(e))

    @api.get(f"{prefix}/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name) for name in served()]}

    @api.get(f"{prefix}/models/{{name}}")
    async def one_model(name: str) -> Any:
        if name not in served():
            return error_response(404, f"model: {name!r} is not served here", "model")
        return _model_card(name)

    async def complete(request: Request, chat: bool) -> Any:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("body: not valid JSON", "body") from None
        params = check_request(body, chat, served())
        run = Completion(params, chat)
        if params.stream:
            return StreamingResponse(_events(run), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(run, request)

    @api.post(f"{prefix}/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    @api.post(f"{prefix}/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    return BodyLimit(api, max_body)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "qtg"}
