"""Checking a request against the model that serves it, before anything is queued.

FastAPI has validated each field's type and bounds already (:mod:`qtg.serve.schemas`);
:func:`check_request` adds what depends on the served model or on several fields together, and
returns a :class:`Params` or raises a :class:`BadRequest` at the first problem:

* ``model`` is served here (404 otherwise; absent means the first served model);
* the prompt (a string, or token ids within the vocabulary) or the chat ``messages`` (through the
  chat template), encoded with the model's tokenizer, leaves room in the model's context for
  ``max_tokens`` (chat also ``max_completion_tokens``; completions default to 16, chat to the rest of
  the context). A prompt that leaves too little room is refused naming ``prompt`` (or ``messages``),
  a ``max_tokens`` the client gave that does not fit naming it;
* ``top_k`` within the vocabulary, ``intervene`` fits the model (:meth:`qtg.Intervention.check`),
  ``topo`` only on a model with a TopoFilter;
* ``stream_options`` only with ``stream``, ``top_logprobs`` only with ``logprobs``, not both
  ``max_tokens`` and ``max_completion_tokens``.

Errors name the parameter the way vLLM and OpenAI do: the message starts with the field
(``"top_k: ..."``) and :attr:`BadRequest.param` holds it, for the ``param`` of OpenAI's error body.
The HTTP side (:mod:`qtg.serve.api`) turns a :class:`BadRequest` into that body with its ``status``;
this module needs no web framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qtg.data.tokenizer import EOS_TOKEN, encode
from qtg.errors import QTGError
from qtg.model.intervention import Intervention
from qtg.serve.engine import Engine
from qtg.serve.schemas import DEFAULT_MAX_TOKENS, ChatRequest, CompletionRequest, Message
from qtg.serve.text import chat_prompt


@dataclass
class Served:
    """One model the API serves: its name (the ``model`` field), its engine and tokenizer."""

    name: str
    engine: Engine
    tokenizer: Any

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.token_to_id(EOS_TOKEN)


class BadRequest(Exception):
    """A request the API refuses: HTTP ``status`` with a message naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


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


def check_request(req: CompletionRequest | ChatRequest, models: Mapping[str, Served]) -> Params:
    """A validated request, checked against the model it names (and its fields against each other).

    Raises:
        BadRequest: 400 naming the parameter; 404 for an unknown model.
    """
    served = _served(req.model, models)
    chat = isinstance(req, ChatRequest)
    if req.stream_options is not None and not req.stream:
        raise BadRequest("stream_options: only with stream true", "stream_options")
    if chat:
        if req.max_completion_tokens is not None and req.max_tokens is not None:
            raise BadRequest("max_completion_tokens: give it or max_tokens, not both", "max_completion_tokens")
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("top_logprobs: needs logprobs true", "top_logprobs")
        ids = encode(served.tokenizer, chat_prompt([(m.role, _content(m)) for m in req.messages]))
        key = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = _fit(ids, served, "messages", key, getattr(req, key), None)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        ids = _prompt_ids(req.prompt, served)
        given = req.max_tokens if "max_tokens" in req.model_fields_set else None
        max_tokens = _fit(ids, served, "prompt", "max_tokens", given, DEFAULT_MAX_TOKENS)
        logprobs = req.logprobs
    vocab = served.engine.model.cfg.vocab_size
    if req.top_k is not None and req.top_k > vocab:
        raise BadRequest(f"top_k: at most the vocabulary of {vocab} tokens, got {req.top_k}", "top_k")
    if req.topo and not served.engine.model.has_topofilter:
        raise BadRequest(f"topo: {served.name} has no TopoFilter", "topo")
    options = req.stream_options
    return Params(served, ids, max_tokens, 1.0 if req.temperature is None else req.temperature, req.top_p,
                  req.top_k if req.top_k and req.top_k > 0 else None,
                  () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(req.stop),
                  req.seed, bool(req.stream), bool(options and options.include_usage), logprobs,
                  _intervention(req.intervene, served), bool(req.topo))


def _served(name: str | None, models: Mapping[str, Served]) -> Served:
    if not models:
        raise BadRequest("model: no model is served here now", "model", 404)
    if name is None:
        return next(iter(models.values()))
    if name not in models:
        raise BadRequest(f"model: {name!r} is not served here (served: {', '.join(models)})", "model", 404)
    return models[name]


def _content(message: Message) -> str:
    content = message.content
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _prompt_ids(prompt: str | list, served: Served) -> list[int]:
    if isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = encode(served.tokenizer, prompt)
    else:
        vocab = served.engine.model.cfg.vocab_size
        if max(prompt) >= vocab:
            raise BadRequest(f"prompt: token ids must lie in 0..{vocab - 1}, got {max(prompt)}", "prompt")
        ids = list(prompt)
    if not ids:
        raise BadRequest("prompt: empty", "prompt")
    return ids


def _fit(ids: list[int], served: Served, where: str, key: str, given: int | None, default: int | None) -> int:
    """The request's max_tokens, checked to fit the model's context after the prompt's ``ids``.

    ``given``: the client's value (None: not sent); ``default``: the value otherwise (None: the room left).
    A prompt that leaves too little room is the prompt's fault, named ``where``; a value the client gave
    that does not fit is ``key``'s.
    """
    context, n = served.engine.model.cfg.max_seq_len, len(ids)
    room = context - n
    if room < 1:
        raise BadRequest(f"{where}: {n} tokens leave no room for a new token in the model's context of {context} "
                         "tokens", where)
    if given is None:
        wanted = room if default is None else default
        if wanted > room:
            raise BadRequest(f"{where}: {n} tokens leave room for {room} new tokens in the model's context of "
                             f"{context} tokens, fewer than the default {key} of {wanted}: shorten the {where} or "
                             f"give {key} <= {room}", where)
        return wanted
    if given > room:
        raise BadRequest(f"{key}: the {where} take{'' if where == 'messages' else 's'} {n} tokens, leaving room for "
                         f"{room} new tokens in the model's context of {context} tokens; got {given}", key)
    return given


def _intervention(spec: str | None, served: Served) -> Intervention | None:
    """The request's intervention (its spec parsed once already, by the schema), checked against the model."""
    if not spec:
        return None
    try:
        intervene = Intervention.parse(spec)
        intervene.check(served.engine.model)
    except QTGError as e:
        raise BadRequest(f"intervene: {e}", "intervene") from None
    return intervene
