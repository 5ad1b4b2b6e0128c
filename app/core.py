"""What every tab shares: the app's configuration, the model registry, per-session state, input checks.

Per-session state is a small :class:`Session` held in a ``gr.State``: which model this
browser tab (or ``gradio_client``) has loaded, on which device, and its last generation.
Loaded weights live in the :class:`~app.models.ModelRegistry`, shared by every session,
so one user's choice never changes another's view and the same weights load once.

Every request that runs a model first asks :meth:`Explorer.check_memory` what it will
allocate (``qtg.model.views.view_memory``) and is refused, with needed against available
and the longest text that would fit, before any work starts.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.config import AppConfig
from app.controls import Calibrations
from app.exports import private_dir
from app.models import AppInputError, Loaded, ModelRegistry
from app.runs import TrainingRuns
from qtg.data.tokenizer import decode, encode, token_strings
from qtg.model.builder import resolve_device
from qtg.model.memory import available_memory, human_bytes
from qtg.model.protocol import LanguageModel
from qtg.model.views import most_tokens, view_memory
from qtg.serve.api import Served
from qtg.serve.engine import Engine
from qtg.topology.budget import Budget


@dataclass
class Session:
    model: str  # a source key (see app.models)
    device: str
    last_text: str = ""  # the last generation, prompt included: the other tabs' text when theirs is empty


@dataclass
class Counters:
    """Server-side counts the tests read (e.g. that Stop halts the work, not only the display)."""

    tokens_generated: int = 0
    streams_started: int = 0
    streams_finished: int = 0
    forwards: int = 0  # model runs of the inspection views (a refused request adds none)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


class Explorer:
    """The app's state outside any session: config, shared models and their decoding engines, counters, this
    launch's export folder, the training runs. It owns all of them (nothing is kept in a module)."""

    def __init__(self, cfg: AppConfig, model: LanguageModel | None = None):
        """``model``: serve this one only (under torchrun, a sharded model's rank-0 handle)."""
        self.cfg = cfg
        self.limits = cfg.limits
        self.export_dir: Path = private_dir(cfg.export_dir)
        self.registry = ModelRegistry(cfg.checkpoint_dirs, cfg.max_cached_models, on_drop=self._drop_engine)
        self.counters = Counters()
        if model is not None:
            self.device = str(next(model.parameters()).device)
            self.registry.pin(cfg.model, model, self.device)
        else:
            self.device = str(resolve_device(cfg.device))
        self.default_key = self.registry.default_key(cfg.model)
        self._engines: dict[tuple[str, str], Engine] = {}  # (model key, device) -> its batching engine
        self._engines_lock = threading.Lock()
        self.calibrations = Calibrations(cfg.limits.control_windows)  # the TopoFilter's controls, per model
        self.training_runs = TrainingRuns(cfg.export_dir, self.registry.checkpoint_dirs)  # the Training tab's

    def new_session(self) -> Session:
        return Session(model=self.default_key, device=self.device)

    def current(self, session: Session | None) -> Loaded:
        """The session's model (a session that lost its state falls back to the default model)."""
        session = session or self.new_session()
        return self.registry.get(session.model, session.device)

    def engine(self, loaded: Loaded) -> Engine | None:
        """The continuous-batching engine decoding for ``loaded`` (shared by every session and the ``/v1`` API),
        started on first use; None for a model sharded across ranks, which keeps no decoding cache."""
        if not loaded.model.keeps_cache:  # a lockstep (sharded) model re-runs the sequence instead
            return None
        slot = (loaded.source.key, loaded.device)
        with self._engines_lock:
            engine = self._engines.get(slot)
            if engine is None or engine.model is not loaded.model:
                if engine is not None:  # the model was reloaded: the old one's engine lets it go
                    engine.close_when_idle()
                engine = self._engines[slot] = Engine(loaded.model, tokenizer=loaded.tokenizer)
            return engine

    def _drop_engine(self, key: str, device: str) -> None:
        """A model left the registry (unloaded, evicted): its controls' calibration is dropped, and its engine,
        whose thread holds the model, finishes the requests it runs and ends, so the weights
        are freed (issue 23: Unload after Generate kept them)."""
        self.calibrations.drop(key, device)
        with self._engines_lock:
            engine = self._engines.pop((key, device), None)
        if engine is not None and engine.idle:
            engine.close()  # now, so the weights are freed before Unload answers
        elif engine is not None:
            engine.close_when_idle()

    def api_models(self) -> dict[str, Any]:
        """What the ``/v1`` API serves beside the page: the default model, through its engine (none when sharded)."""
        loaded = self.current(None)
        engine = self.engine(loaded)
        name = loaded.source.name
        return {} if engine is None else {name: Served(name, engine, loaded.tokenizer)}

    def devices(self) -> list[str]:
        if self.registry.pinned is not None:
            return [self.device]
        return ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])

    # --- texts ------------------------------------------------------------------------
    @staticmethod
    def text_or_last(session: Session | None, text: Any) -> Any:
        """The text a tab runs on: the one given, or, when that is empty, the session's last generation.

        Raises:
            AppInputError: neither is there.
        """
        if isinstance(text, str) and text.strip():
            return text
        if session is not None and session.last_text:
            return session.last_text
        if text is None or isinstance(text, str):
            raise AppInputError("text: empty, and nothing was generated yet (the last generation is used "
                                "when the text is empty)")
        return text  # not a string: encode() names the type

    def encode(self, loaded: Loaded, text: Any, max_chars: int, what: str, min_tokens: int = 1,
               max_tokens: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """Checked token ids ``[1, N]`` on the model's device and the N token strings.

        Raises:
            AppInputError: not a string, empty, over ``max_chars`` characters, fewer than
                ``min_tokens`` tokens, or more than ``max_tokens`` (default: the model's context),
                the last with the real limit in tokens and in characters of this text.
        """
        if not isinstance(text, str):
            raise AppInputError(f"{what}: expected text, got {type(text).__name__}")
        if not text.strip():
            raise AppInputError(f"{what}: empty; type some text")
        if len(text) > max_chars:
            raise AppInputError(f"{what}: {len(text):,} characters is above the maximum {max_chars:,}")
        ids = encode(loaded.tokenizer, text)
        limit = loaded.model.cfg.max_seq_len if max_tokens is None else max_tokens
        if len(ids) > limit:
            fits = len(decode(loaded.tokenizer, ids[:limit]))
            raise AppInputError(f"{what}: {len(ids):,} tokens ({len(text):,} characters) is above the "
                                f"{limit:,} tokens {loaded.source.name} reads at once (its context); here that "
                                f"is the first {fits:,} characters: shorten it")
        if len(ids) < min_tokens:
            raise AppInputError(f"{what}: {len(ids)} token(s) is below the minimum {min_tokens}")
        tokens = token_strings(loaded.tokenizer, ids)
        return torch.tensor([ids], dtype=torch.long, device=loaded.device), tokens

    # --- memory -----------------------------------------------------------------------
    def memory_budget(self, device: str) -> int:
        """Bytes one request may allocate beyond the weights: the configured budget, else the device's free
        memory now shared by the heavy requests that may run at once."""
        if self.limits.memory_budget is not None:
            return int(self.limits.memory_budget)
        return available_memory(device) // max(1, self.cfg.concurrency)

    def check_memory(self, loaded: Loaded, n_tokens: int, view: str, map_blocks: int = 0,
                     kind: str = "internals", max_points: int = 1024, beside: Loaded | None = None) -> None:
        """Refuse, before any work, a request whose memory (``qtg.model.views.view_memory``) exceeds the budget.

        ``beside``: a second model whose view of the same text the request holds at the same time (the
        same-size baseline beside the model's own maps): both count.

        Raises:
            AppInputError: needed against available, and the most tokens that fit.
        """
        models = [loaded] if beside is None else [loaded, beside]

        def need(n: int) -> int:
            return sum(view_memory(m.model.cfg, n, next(m.model.parameters()).dtype, map_blocks, kind, m.device,
                                   max_points).request for m in models)

        budget = self.memory_budget(loaded.device)
        needed = need(n_tokens)
        if needed <= budget:
            return
        fits = most_tokens(lambda n: need(n) <= budget, loaded.model.cfg.max_seq_len)
        fix = (f"at most {fits:,} tokens fit: shorten the text" if fits else
               "no text fits: free memory or use a smaller model")
        both = f" and {beside.source.name}" if beside is not None else ""
        raise AppInputError(f"{view}: {n_tokens:,} tokens on {loaded.source.name}{both} need "
                            f"{human_bytes(needed)} beyond the weights, {human_bytes(budget)} is available; {fix}")

    def topology_budget(self, seconds: float | None = None, cancel: threading.Event | None = None,
                        **knobs: str | None) -> Budget:
        """One request's time budget for all its topology work (``seconds``, else the app's limit), with the
        cancel event Stop sets. Its refusals name the request's controls: ``knobs`` maps ``time_budget``,
        ``max_points``, ``max_edge``, ``maxdim`` and ``text`` to a control's label, or leaves them out
        where the tab has no such control (the command line's flags are never named)."""
        named = {name: knobs.get(name) for name in ("time_budget", "max_points", "maxdim", "max_edge", "text")}
        return Budget(self.limits.topology_time_budget if seconds is None else seconds, cancel, named)


# --- form fields --------------------------------------------------------------------------


def as_int(value: Any, name: str, lo: int, hi: int) -> int:
    """An integer field from a form or an API call, exactly (never through a float), in [lo, hi].

    Raises:
        AppInputError: one line naming the field.
    """
    if isinstance(value, bool):
        raise AppInputError(f"{name}: expected a whole number, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise AppInputError(f"{name}: expected a whole number, got {value!r}")
        n = int(value)
    elif isinstance(value, str) and value.strip():
        try:
            n = int(value.strip())
        except ValueError:
            raise AppInputError(f"{name}: expected a whole number, got {value.strip()[:50]!r}") from None
    else:
        raise AppInputError(f"{name}: expected a whole number, got {str(value)[:50]!r}")
    return _in_range(n, name, lo, hi)


def _in_range(x: int | float, name: str, lo: int | float, hi: int | float) -> int | float:
    show = (lambda v: str(v)) if isinstance(x, int) else (lambda v: f"{v:g}")  # noqa: E731 - whole numbers whole
    if x < lo:
        raise AppInputError(f"{name}: {show(x)} is below the minimum {show(lo)}")
    if x > hi:
        raise AppInputError(f"{name}: {show(x)} is above the maximum {show(hi)}")
    return x


def as_float(value: Any, name: str, lo: float, hi: float) -> float:
    """A real field in [lo, hi] (finite).

    Raises:
        AppInputError: one line naming the field.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise AppInputError(f"{name}: expected a number, got {str(value)[:50]!r}")
    try:
        f = float(value)
    except ValueError:
        raise AppInputError(f"{name}: expected a number, got {str(value)[:50]!r}") from None
    if not math.isfinite(f):
        raise AppInputError(f"{name}: expected a finite number, got {value!r}")
    return _in_range(f, name, lo, hi)
