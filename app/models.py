"""Models shared by every session: each loaded once, kept while recently used.

A session names a model by a *source key*, never by a path it typed:

* ``shipped:<name>`` -- weights under ``assets/checkpoints/`` (``qtg.checkpoint.shipped_models``);
* ``dir:<path>``     -- a checkpoint directory given on the command line (``--checkpoint-dir``);
* ``tier:<name>``    -- a tier preset with random weights, labelled as such;
* ``sharded:<name>`` -- under torchrun, the one model sharded across the ranks (then the only source).

Any other key is refused, so a request can never make the server open a file
of its choosing. Loading goes through ``qtg.load`` / ``qtg.build``, which refuse a
tier that does not fit the device before allocating anything.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import qtg
from qtg.builder import resolve_device
from qtg.checkpoint import shipped_models
from qtg.errors import QTGError

log = logging.getLogger(__name__)

SHIPPED, DIR, TIER, SHARDED = "shipped", "dir", "tier", "sharded"


class AppInputError(QTGError, ValueError):
    """A request the app refuses (bad source key, text over a limit, ...): shown as one line."""


@dataclass(frozen=True)
class Source:
    key: str  # "shipped:nano", "dir:/abs/path", "tier:micro"
    kind: str
    name: str
    label: str  # what the dropdown shows


@dataclass
class Loaded:
    """A model in memory and what the page says about it."""

    source: Source
    device: str
    model: Any
    tokenizer: Any
    tokenizer_note: str  # where the tokenizer came from, when not from the checkpoint
    seconds: float  # time to load
    _exact: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def exact_model(self) -> Any:
        """The same model with its TopoFilter in exact mode (s in place of s~), sharing every weight.

        A separate module object, so exact mode for one request never changes what a concurrent
        request on the shared model computes (``qtg.topology.exact_topofilter`` flips the flag in
        place: right in a script, wrong in a server)."""
        if not self.is_qtg:
            raise AppInputError("exact TopoFilter mode needs a QTG model; this one is a dot-product baseline")
        if getattr(self.model, "lockstep", False):
            raise AppInputError("exact TopoFilter mode needs a second copy of the module, which a model sharded "
                                "across ranks does not have: run the app without torchrun for it")
        with self._lock:
            if self._exact is None:
                m = self.model
                shared = {id(t): t for t in [*m.parameters(), *m.buffers(), m.tokenizer] if t is not None}
                twin = copy.deepcopy(m, memo=shared)
                twin.topo.exact_mode = True
                self._exact = twin
            return self._exact

    @property
    def random_weights(self) -> bool:
        return bool(getattr(self.model, "random_weights", False))

    @property
    def is_qtg(self) -> bool:
        return hasattr(self.model, "topo")

    def describe(self) -> str:
        cfg = self.model.cfg
        weights = "RANDOM weights (untrained: its text is noise)" if self.random_weights else "trained weights"
        arch = "QTG" if self.is_qtg else "dot-product baseline"
        note = f"; {self.tokenizer_note}" if self.tokenizer_note else ""
        return (f"**{self.source.label}** on {self.device}: {arch}, {qtg.memory.human_count(qtg.count_params(cfg))} "
                f"parameters, d={cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, context "
                f"{cfg.max_seq_len}, {weights}{note} (loaded in {self.seconds:.2f} s)")


def _label(kind: str, name: str) -> str:
    return {SHIPPED: f"{name} (shipped, trained)", DIR: f"{name} (checkpoint dir)",
            TIER: f"{name} tier (random weights)", SHARDED: f"{name} (sharded across ranks)"}[kind]


@functools.lru_cache(maxsize=8)
def fallback_tokenizer(vocab_size: int):
    """A tokenizer for a model that carries none (random weights): the shipped nano's when its ids
    fit the vocabulary, else a byte-level BPE of exactly ``vocab_size`` trained on the bundled corpus."""
    from qtg.data import default_corpus_path, load_documents
    from qtg.tokenizer import train_tokenizer

    shipped = qtg.checkpoint.SHIPPED_DIR / "nano"
    if (shipped / "tokenizer.json").is_file():
        from qtg.tokenizer import load_tokenizer

        tok = load_tokenizer(shipped / "tokenizer.json")
        if tok.get_vocab_size() <= vocab_size:
            return tok, "tokenizer: the shipped nano's"
    docs = load_documents(default_corpus_path())[:3]
    return train_tokenizer([d.text for d in docs], vocab_size=vocab_size), \
        f"tokenizer: a {vocab_size}-token BPE trained on 3 bundled works at load"


class ModelRegistry:
    """Loaded models keyed by (source key, device), shared by all sessions, LRU-evicted."""

    def __init__(self, checkpoint_dirs: tuple[Path, ...] = (), max_models: int = 4):
        self.checkpoint_dirs = tuple(Path(p).resolve() for p in checkpoint_dirs)
        self.max_models = max_models
        self._models: OrderedDict[tuple[str, str], Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self.loads = 0  # how many times weights were actually read (tests hold the sharing to this)
        self.pinned: Loaded | None = None  # under torchrun: the one sharded model, and nothing else

    def pin(self, name: str, model: Any, device: str) -> Loaded:
        """Serve ``model`` (already loaded, e.g. sharded across ranks) as the only model."""
        tokenizer, note = model.tokenizer, ""
        if tokenizer is None:
            tokenizer, note = fallback_tokenizer(model.cfg.vocab_size)
        src = Source(f"{SHARDED}:{name}", SHARDED, name, _label(SHARDED, name))
        self.pinned = Loaded(src, device, model, tokenizer, note, 0.0)
        return self.pinned

    # --- what can be loaded ---------------------------------------------------------
    def sources(self) -> list[Source]:
        if self.pinned is not None:
            return [self.pinned.source]
        out = [Source(f"{SHIPPED}:{n}", SHIPPED, n, _label(SHIPPED, n)) for n in shipped_models()]
        out += [Source(f"{DIR}:{p}", DIR, p.name, _label(DIR, p.name)) for p in self.checkpoint_dirs]
        out += [Source(f"{TIER}:{t}", TIER, t, _label(TIER, t)) for t in qtg.TIERS]
        return out

    def source(self, key: Any) -> Source:
        """The source a key names; anything not offered is refused (no path is ever taken from a request)."""
        for s in self.sources():
            if s.key == key:
                return s
        offered = ", ".join(s.key for s in self.sources())
        raise AppInputError(f"unknown model {str(key)[:200]!r}: choose one of {offered}")

    def default_key(self, name: str) -> str:
        for kind in (SHARDED, SHIPPED, DIR, TIER):
            for s in self.sources():
                if s.kind == kind and (s.name == name or s.key == name):
                    return s.key
        raise AppInputError(f"no shipped model, checkpoint dir or tier called {name!r}")

    # --- loading ---------------------------------------------------------------------
    def get(self, key: str, device: str = "auto") -> Loaded:
        """The model for ``key`` on ``device``, loading it at most once however many sessions ask."""
        src = self.source(key)
        if self.pinned is not None:
            return self.pinned
        dev = str(resolve_device(device))
        slot = (src.key, dev)
        with self._lock:
            if slot in self._models:
                self._models.move_to_end(slot)
                return self._models[slot]
            slot_lock = self._loading.setdefault(slot, threading.Lock())
        with slot_lock:  # a second session asking meanwhile waits for this load, then shares it
            with self._lock:
                if slot in self._models:
                    return self._models[slot]
            loaded = self._load(src, dev)
            with self._lock:
                self._models[slot] = loaded
                while len(self._models) > self.max_models:
                    old, _ = self._models.popitem(last=False)
                    log.info("evicted %s on %s (more than %d models loaded)", *old, self.max_models)
                self._loading.pop(slot, None)
        return loaded

    def _load(self, src: Source, device: str) -> Loaded:
        t0 = time.perf_counter()
        if src.kind == SHIPPED:
            model = qtg.load(src.name, device=device)
        elif src.kind == DIR:  # a checkpoint, a training run's latest, or a sharded run read whole
            model = qtg.load(src.key.split(":", 1)[1], device=device)
        else:  # random weights; qtg.build refuses a tier that does not fit before allocating
            model = qtg.build(src.name, device=device, seed=0)
            model.random_weights = True
        model.eval()
        self.loads += 1
        tokenizer, note = model.tokenizer, ""
        if tokenizer is None:
            tokenizer, note = fallback_tokenizer(model.cfg.vocab_size)
        log.info("loaded %s on %s in %.2f s", src.key, device, time.perf_counter() - t0)
        return Loaded(src, device, model, tokenizer, note, time.perf_counter() - t0)

    def loaded(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._models)

    def baseline_for(self, loaded: Loaded) -> Loaded | None:
        """The same-size dot-product baseline shipped beside a QTG model (``<name>-baseline``), if any."""
        name = f"{loaded.source.name}-baseline"
        if not loaded.is_qtg or loaded.source.kind != SHIPPED or name not in shipped_models():
            return None
        return self.get(f"{SHIPPED}:{name}", loaded.device)
