"""Checking an OpenAI-style completion or chat request, field by field, before anything is queued.

:func:`check_request` reads the JSON body of ``POST /v1/completions`` (``chat=False``) or
``POST /v1/chat/completions`` (``chat=True``) and returns a :class:`Params` or raises a
:class:`BadRequest` at the first problem. What is checked:

* the body is a JSON object and names no field outside the route's (OpenAI's, plus the
  extensions ``top_k``, ``intervene``, ``topo``);
* ``model`` is served here (404 otherwise; absent means the first served model);
* fields this server does not implement (``n``, ``best_of``, ``echo``, ``suffix``, the penalties,
  ``logit_bias``) carry only their neutral values;
* each value's type and range: ``max_tokens`` (chat also ``max_completion_tokens``) fits the
  context with the prompt, ``temperature`` in [0, 2], ``top_p`` in (0, 1], ``top_k``, ``seed``,
  ``stop`` (at most :data:`MAX_STOPS`), ``logprobs`` / ``top_logprobs``, ``stream`` /
  ``stream_options``;
* the prompt (a string, a list of one string, or in-vocabulary token ids) or the chat
  ``messages`` (known roles, text content), encoded with the served model's tokenizer;
* ``intervene`` parses (:meth:`qtg.Intervention.parse`) and fits the model; ``topo`` only on a
  model with a TopoFilter.

Errors name the parameter the way vLLM and OpenAI do: the message starts with the field
(``"temperature: 5 is outside [0, 2]"``, ``"messages[1].role: ..."``) and :attr:`BadRequest.param`
holds it, for the ``param`` of OpenAI's error body. The HTTP side (:mod:`qtg.serve.api`) turns a
:class:`BadRequest` into that body with its ``status``; this module needs no web framework.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qtg.errors import QTGError
from qtg.intervention import Intervention
from qtg.serve.engine import Engine
from qtg.serve.text import CHAT_ROLES, chat_prompt
from qtg.tokenizer import EOS_TOKEN, encode

MAX_STOPS = 4  # as OpenAI
MAX_LOGPROBS = 5  # completions' logprobs, as OpenAI
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI

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
