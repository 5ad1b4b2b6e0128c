"""What every tab shares: the app's configuration, the model registry, per-session state, text checks.

Per-session state is a small :class:`Session` held in a ``gr.State``: which model this
browser tab (or ``gradio_client``) has loaded, on which device, and its last generation.
Loaded weights live in the :class:`~app.models.ModelRegistry`, shared by every session,
so one user's choice never changes another's view and the same weights load once.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from app.config import AppConfig
from app.models import AppInputError, Loaded, ModelRegistry
from qtg.builder import resolve_device
from qtg.tokenizer import encode, token_strings


@dataclass
class Session:
    model: str  # a source key (see app.models)
    device: str
    last_text: str = ""  # the last generation, prompt included: the Topology tab's default text


@dataclass
class Counters:
    """Server-side counts the tests read (e.g. that Stop halts the work, not only the display)."""

    tokens_generated: int = 0
    streams_started: int = 0
    streams_finished: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


class Explorer:
    """The app's state outside any session: config, shared models, counters."""

    def __init__(self, cfg: AppConfig, model: Any = None):
        """``model``: serve this one only (under torchrun, a sharded model's rank-0 handle)."""
        self.cfg = cfg
        self.limits = cfg.limits
        self.registry = ModelRegistry(cfg.checkpoint_dirs, cfg.max_cached_models)
        self.counters = Counters()
        if model is not None:
            self.device = str(next(model.parameters()).device)
            self.registry.pin(cfg.model, model, self.device)
        else:
            self.device = str(resolve_device(cfg.device))
        self.default_key = self.registry.default_key(cfg.model)

    def new_session(self) -> Session:
        return Session(model=self.default_key, device=self.device)

    def current(self, session: Session | None) -> Loaded:
        """The session's model (a session that lost its state falls back to the default model)."""
        session = session or self.new_session()
        return self.registry.get(session.model, session.device)

    def devices(self) -> list[str]:
        if self.registry.pinned is not None:
            return [self.device]
        return ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])

    def encode(self, loaded: Loaded, text: Any, max_chars: int, what: str, min_tokens: int = 1,
               max_tokens: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """Checked token ids ``[1, N]`` on the model's device and the N token strings.

        Raises:
            AppInputError: not a string, empty, over ``max_chars`` characters, fewer than
                ``min_tokens`` tokens, or more than ``max_tokens`` (default: the model's context).
        """
        if not isinstance(text, str):
            raise AppInputError(f"the {what} must be text, got {type(text).__name__}")
        if not text.strip():
            raise AppInputError(f"the {what} is empty: type some text")
        if len(text) > max_chars:
            raise AppInputError(f"the {what} is {len(text):,} characters; the limit is {max_chars:,} "
                                f"(max {what} characters)")
        ids = encode(loaded.tokenizer, text)
        limit = loaded.model.cfg.max_seq_len if max_tokens is None else max_tokens
        if len(ids) > limit:
            raise AppInputError(f"the {what} is {len(ids)} tokens; {loaded.source.name} reads at most {limit} "
                                f"(its context): shorten it")
        if len(ids) < min_tokens:
            raise AppInputError(f"the {what} is {len(ids)} token(s); at least {min_tokens} are needed")
        tokens = token_strings(loaded.tokenizer, ids)
        return torch.tensor([ids], dtype=torch.long, device=loaded.device), tokens


def as_int(value: Any, name: str, lo: int, hi: int) -> int:
    """An integer field from a form or an API call, in [lo, hi], or a message naming the field."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise AppInputError(f"{name} must be a number, got {str(value)[:50]!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise AppInputError(f"{name} must be a whole number, got {value!r}")
    if not lo <= f <= hi:
        raise AppInputError(f"{name} must be between {lo} and {hi}, got {int(f)}")
    return int(f)


def as_float(value: Any, name: str, lo: float, hi: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise AppInputError(f"{name} must be a number, got {str(value)[:50]!r}") from None
    if not lo <= f <= hi:  # also refuses nan
        raise AppInputError(f"{name} must be between {lo:g} and {hi:g}, got {f:g}")
    return f
