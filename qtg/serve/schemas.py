"""The ``/v1`` request bodies as pydantic models: what FastAPI validates and ``/openapi.json`` documents.

Every field a route reads is declared here with its type and bounds, so a request is refused field by
field before anything runs, and the OpenAPI schema lists each field and its limits (the fuzz test,
``tests/test_serve_fuzz.py``, generates requests from it). The models are strict (JSON ``true`` is not
the integer 1, ``"2"`` is not a number; 2.0 is an integer, as JSON Schema has it) and forbid unknown
fields; every string is text the tokenizer can take (no lone surrogate, which JSON's ``"\\ud800"``
decodes to). What depends on the served model (its context and vocabulary, a TopoFilter, an
intervention's blocks and heads) is checked by :mod:`qtg.serve.params`.

:func:`describe` turns pydantic's errors into OpenAI's: one message that starts with the field's path
(``"messages[1].role: ..."``) and the top-level field as ``param``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
)

from qtg.model.intervention import Intervention

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # a stop string is held back while streaming: its length bounds the work per token
MAX_LOGPROBS = 5  # completions' logprobs, as OpenAI
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI
MAX_NAME_CHARS = 256  # model names
MAX_INTERVENE_CHARS = 4096  # an intervention spec (a gamma per head of every block fits)
MAX_SEED = 2**63 - 1
DEFAULT_MAX_TOKENS = 16  # completions, as OpenAI (chat: the rest of the context)


def _not_text(text: str) -> str | None:
    """Why UTF-8 cannot encode ``text`` (the tokenizer's input): a lone surrogate, and where; None if it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start} is not text"
    return None


def _encodable(text: str) -> str:
    """``text`` unchanged, if UTF-8 can encode it (a string with bounds pydantic checks itself: ``string_unicode``)."""
    why = None if text.isascii() else _not_text(text)
    if why:
        raise ValueError(why)
    return text


def text(**constraints: Any) -> Any:
    """A string type: ``constraints`` as :class:`pydantic.StringConstraints`, and no lone surrogate."""
    return Annotated[str, StringConstraints(**constraints), AfterValidator(_encodable)]


def one_of(kind: Any, expected: str) -> Discriminator:
    """A union chosen by the JSON type of the value (``kind`` returns the member's tag, or None): only that
    member's errors are reported, and a value of no member's type is refused as ``expected <expected>``."""
    return Discriminator(kind, custom_error_type="union_type", custom_error_message=f"expected {expected}")


def _integral(value: Any) -> Any:
    """JSON Schema's integer: 2.0 is one (a client may write it so), 2.5, "2" and true are not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds: Any) -> Any:
    """An integer type: ``bounds`` as :class:`pydantic.Field` takes them (``ge=1``), 2.0 read as 2. The
    validator wraps the bounded type, so the JSON schema keeps them as ``minimum`` / ``maximum``."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Text = text()
StopString = text(min_length=1, max_length=MAX_STOP_CHARS)
ModelName = text(max_length=MAX_NAME_CHARS)
InterventionSpec = text(max_length=MAX_INTERVENE_CHARS)
TokenId = integer(ge=0)


def _one_prompt(value: Any) -> Any:
    if isinstance(value, list) and len(value) > 1:
        raise ValueError("one prompt per request (send a batch as separate requests; the server batches them)")
    return value


# A union's members are tagged by what a client sends; the tags are not identifiers, so error paths skip them
def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "a string"
    if not isinstance(value, list):
        return None
    first = value[0] if value else 0
    return "one string" if isinstance(first, str) else "one list of ids" if isinstance(first, list) else "token ids"


def _stop_kind(value: Any) -> str | None:
    return "a string" if isinstance(value, str) else "a list" if isinstance(value, list) else None


def _content_kind(value: Any) -> str | None:
    return "a string" if isinstance(value, str) else "text parts" if isinstance(value, list) else None


Prompt = Annotated[
    Annotated[text(min_length=1), Tag("a string")]
    | Annotated[list[TokenId], Field(min_length=1), Tag("token ids")]
    | Annotated[list[text(min_length=1)], Field(min_length=1, max_length=1), BeforeValidator(_one_prompt),
                Tag("one string")]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1),
                BeforeValidator(_one_prompt), Tag("one list of ids")],
    one_of(_prompt_kind, "a string or a list of token ids (or a list of one of them)")]
Stop = Annotated[
    Annotated[StopString, Tag("a string")] | Annotated[list[StopString], Field(max_length=MAX_STOPS), Tag("a list")],
    one_of(_stop_kind, f"a string or a list of up to {MAX_STOPS} strings")]


class Strict(BaseModel):
    """No unknown field, no coercion between JSON types, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool | None = Field(None, description="Send a last chunk with the usage.")


class TextPart(Strict):
    type: Literal["text"]
    text: Text


Content = Annotated[Annotated[Text, Tag("a string")] | Annotated[list[TextPart], Tag("text parts")],
                    one_of(_content_kind, "text: a string or a list of text parts")]


class Message(Strict):
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks (qtg.serve.text.CHAT_ROLES).")
    content: Content = Field(description="A string, or a list of {type: text, text} parts.")
    name: Text | None = Field(None, description="Accepted, ignored.")


class RequestBase(Strict):
    """The fields completions and chat share: OpenAI's, then this server's extensions."""

    model: ModelName | None = Field(None, description="A served model's id (default: the first served).")
    max_tokens: integer(ge=1) | None = Field(None, description="New tokens at most; with the prompt "
                                                                             "within the model's context.")
    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(1.0, description="0: greedy.")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = Field(None, description="Nucleus sampling (default off).")
    top_k: integer(ge=-1) | None = Field(None, description="Extension: the k most likely tokens only; "
                                                                         "-1 or 0 off; at most the vocabulary.")
    stop: Stop | None = Field(None, description=f"Up to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters; the "
                                                "text ends before the first.")
    seed: integer(ge=0, le=MAX_SEED) | None = Field(None, description="The same seed gives the same "
                                                                                    "tokens.")
    n: integer(ge=1, le=1) | None = Field(1, description="Only 1: one choice per request.")
    stream: bool | None = Field(False, description="Answer with server-sent events, one chunk per token.")
    stream_options: StreamOptions | None = Field(None, description="With stream only.")
    presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = Field(0.0, description="Only 0: no penalties.")
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = Field(0.0, description="Only 0: no penalties.")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(None, description="Only {}: no logit "
                                                                                                 "bias.")
    user: Text | None = Field(None, description="Accepted, ignored.")
    intervene: InterventionSpec | None = Field(
        None, description="Extension: a qtg.Intervention.parse spec such as \"topo=exact\" or \"ablate=0:1\".")
    topo: bool | None = Field(False, description="Extension: each token's TopoFilter numbers (s_soft, s, w).")

    @field_validator("intervene")
    @classmethod
    def _parses(cls, spec: str | None) -> str | None:
        """A spec that parses (its values finite, see qtg.model.intervention.VALUE_LIMIT); the model checks the rest."""
        if spec:
            Intervention.parse(spec)  # an InterventionError is a ValueError: reported under intervene
        return spec


class CompletionRequest(RequestBase):
    """``POST /v1/completions``."""

    prompt: Prompt = Field(description="A string, or a list of token ids (a list of one of them: a batch of one).")
    max_tokens: integer(ge=1) | None = Field(DEFAULT_MAX_TOKENS, description="New tokens at most; with the prompt "
                                                                           "within the model's context.")
    logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="The chosen token's log-probability and the k most likely.")
    echo: bool | None = Field(False, description="Only false: the prompt is not echoed.")
    best_of: integer(ge=1, le=1) | None = Field(1, description="Only 1: one candidate per request.")
    suffix: None = Field(None, description="Only null: no insertion.")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("only false: the prompt is not echoed")
        return echo


class ChatRequest(RequestBase):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[Message], Field(min_length=1)] = Field(description="The conversation, in order.")
    max_completion_tokens: integer(ge=1) | None = Field(None, description="max_tokens' new name (give "
                                                                                        "one of them).")
    logprobs: bool | None = Field(False, description="The chosen tokens' log-probabilities.")
    top_logprobs: integer(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(
        None, description="With logprobs: the k most likely tokens too.")


# --- errors, in OpenAI's words ----------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str = Field(description="Starts with the field's path, e.g. \"messages[1].role: ...\".")
    type: str
    param: str | None = Field(description="The top-level field at fault (\"body\" for the body as a whole).")
    code: int


class ErrorBody(BaseModel):
    """OpenAI's (and vLLM's) error body: every 4xx this API answers."""

    error: ErrorDetail



def describe(errors: list[dict[str, Any]]) -> tuple[str, str]:
    """The first of pydantic's (or FastAPI's) validation errors as (``param``, message).

    The message starts with the path of the value (``messages[1].content``); ``param`` is its
    top-level field, or ``body`` for the body as a whole. Union tags in the path are left out.
    """
    error = errors[0]
    loc = list(error.get("loc", ()))
    if loc and loc[0] == "body":  # FastAPI puts the body first
        loc = loc[1:]
    kind = error.get("type", "")
    if kind == "json_invalid":
        why = (error.get("ctx") or {}).get("error", "")
        return "body", f"body: not valid JSON{f' ({why})' if why else ''}"
    path, param = "", None
    for i, part in enumerate(loc):
        unknown = kind == "extra_forbidden" and i == len(loc) - 1  # the unknown key itself, whatever it is
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and (part.isidentifier() or unknown):  # a union's tag ("token ids") is not
            path += f".{part}" if path else part
            param = param or part
    if param is None:
        if kind in ("model_attributes_type", "model_type", "dict_type"):
            return "body", "body: expected a JSON object (sent as Content-Type: application/json)"
        param = path = "body"
    return param, f"{path}: {_message(error)}"


def _message(error: dict[str, Any]) -> str:
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown parameter"
    if kind == "missing":
        return "required"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    value = error.get("input")
    if kind == "string_unicode" and isinstance(value, str) and _not_text(value):
        return _not_text(value)
    msg = str(error.get("msg", "invalid"))
    msg = msg[:1].lower() + msg[1:].replace(" after validation", "")
    if isinstance(value, (bool, int, float)) or value is None:
        return f"{msg}, got {_json(value)}"
    if isinstance(value, str) and kind != "union_type":
        return f"{msg}, got {value[:40]!r}{'...' if len(value) > 40 else ''}"
    return msg


def _json(value: bool | int | float | None) -> str:
    """A scalar as JSON writes it (``true``, ``null``); a huge integer shortened."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    s = repr(value)
    return s if len(s) <= 40 else f"{s[:20]}...({len(s)} digits)"
