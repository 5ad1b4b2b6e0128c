"""An OpenAI-compatible HTTP API over the continuous-batching :class:`~qtg.serve.engine.Engine`.

Routes (docs/serve.md has the whole contract): ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions``, and ``GET /openapi.json`` (the request
bodies' schema: :mod:`qtg.serve.schemas`). Requests are checked field by field before anything is
queued: their types and bounds by FastAPI against the schema, the rest against the served model by
:func:`qtg.serve.params.check_request`. A bad one is HTTP 400 with a message naming the parameter
(the OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``, as vLLM answers), an
unknown model 404, a body over ``max_body`` bytes 413; none of them logs a traceback. Streaming is
server-sent events, one chunk per token, ending with ``data: [DONE]``; a client that disconnects
cancels its row of the batch. The work that grows with a request (encoding its prompt, holding back
streamed text that could still become a stop string) runs in worker threads, never on the event
loop, so one request cannot stall the others.

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
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from qtg.errors import GenerationError
from qtg.serve.engine import Event
from qtg.serve.params import BadRequest, Params, Served, check_request
from qtg.serve.schemas import ChatRequest, CompletionRequest, ErrorBody, describe
from qtg.serve.text import CHAT_STOPS, TextStream

__all__ = ["MAX_BODY", "Served", "create_api"]

MAX_BODY = 1 << 20  # bytes: a request body above this is refused with 413
ERRORS: dict[int | str, dict[str, Any]] = {  # what the routes that take a body answer besides 200, for the schema
    400: {"model": ErrorBody, "description": "A bad parameter; param names it."},
    404: {"model": ErrorBody, "description": "The model is not served here."},
    413: {"model": ErrorBody, "description": "The body is over the size limit."},
}
DISCONNECT_POLL_S = 0.25


class EngineFailure(Exception):
    """The engine could not finish a request it had accepted (HTTP 500)."""


class ErrorJSON(JSONResponse):
    """JSON in ASCII: an error may quote what the client sent, a lone surrogate included, which UTF-8 cannot
    encode (Starlette's JSONResponse would fail with a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large"}.get(status, "error")
    return ErrorJSON({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


# --- running a request -----------------------------------------------------------------------


class Completion:
    """One request's run: submit, then turn engine events into text, logprobs and scores."""

    def __init__(self, params: Params, chat: bool):
        """Submit (on the event loop: its events are delivered there)."""
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

    async def atake(self, event: Event) -> tuple[str, dict[str, Any]]:
        """:meth:`take` in a worker thread: the hold-back of streamed text grows with the stop strings."""
        return await asyncio.to_thread(self.take, event)

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
            piece, extra = await run.atake(event)
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
            piece, extra = await run.atake(event)
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
    api = FastAPI(title="QTG OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  description="Completions and chat over a QTG model (docs/serve.md).")

    _answer_errors(api)

    def served() -> Mapping[str, Served]:
        return models() if callable(models) else models

    @api.get(f"{prefix}/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name) for name in served()]}

    @api.get(f"{prefix}/models/{{name}}")
    async def one_model(name: str) -> Any:
        if name not in served():
            return error_response(404, f"model: {name!r} is not served here", "model")
        return _model_card(name)

    async def complete(body: CompletionRequest | ChatRequest, request: Request) -> Any:
        params = await asyncio.to_thread(check_request, body, served())  # encodes the prompt: off the loop
        run = Completion(params, chat=isinstance(body, ChatRequest))
        if params.stream:
            return StreamingResponse(_events(run), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(run, request)

    @api.post(f"{prefix}/completions", responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await complete(body, request)

    @api.post(f"{prefix}/chat/completions", responses=ERRORS)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        return await complete(body, request)

    _no_422(api.openapi())
    return BodyLimit(api, max_body)


def _answer_errors(api: FastAPI) -> None:
    """Every error the API raises answered as an OpenAI-style error body with its status."""

    @api.exception_handler(BadRequest)
    async def bad_request(_: Request, e: BadRequest) -> JSONResponse:
        return error_response(e.status, e.message, e.param)

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        param, message = describe(list(e.errors()))
        return error_response(400, message, param)

    @api.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        if e.status_code == 400:  # FastAPI could not read the body (json.loads: RecursionError past ~1000 levels)
            why = "nested too deeply to read" if isinstance(e.__cause__, RecursionError) else str(e.detail)
            return error_response(400, f"body: {why}", "body")
        return error_response(e.status_code, str(e.detail))

    @api.exception_handler(GenerationError)
    async def bad_generation(_: Request, e: GenerationError) -> JSONResponse:
        return error_response(400, str(e))

    @api.exception_handler(EngineFailure)
    async def engine_failure(_: Request, e: EngineFailure) -> JSONResponse:
        return error_response(500, str(e))


def _no_422(schema: dict[str, Any]) -> None:
    """Take FastAPI's 422 out of the schema (built once, cached, edited in place): a body that fails
    validation is answered 400 in OpenAI's format (:data:`ERRORS`)."""
    for path in schema["paths"].values():
        for operation in path.values():
            operation["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "qtg"}
