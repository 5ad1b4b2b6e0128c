"""Models shared by every session: each loaded once, kept while recently used.

A session names a model by a *source key*, never by a path it typed:

* ``shipped:<name>`` -- weights under ``assets/checkpoints/`` (``qtg.model.loading.shipped_models``);
* ``dir:<path>``     -- a checkpoint directory given on the command line (``--checkpoint-dir``);
* ``tier:<name>``    -- a tier preset with random weights, labelled as such;
* ``sharded:<name>`` -- under torchrun, the one model sharded across the ranks (then the only source).

Any other key is refused, so a request can never make the server open a file
of its choosing. Loading goes through ``qtg.load`` / ``qtg.build``, which refuse a
tier that does not fit the device before allocating anything.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import qtg
from qtg.data.documents import default_corpus_path, load_documents
from qtg.data.tokenizer import load_tokenizer, train_tokenizer
from qtg.errors import QTGError
from qtg.model.builder import resolve_device
from qtg.model.checkpoint import SHIPPED_DIR, read_config
from qtg.model.loading import shipped_models
from qtg.model.memory import available_memory, count_params, human_bytes, human_count, memory_estimate
from qtg.training.malloc import release_freed_memory

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
    """A model in memory and what the page says about it.

    Every request runs on ``model`` itself: an intervention (exact TopoFilter mode) is an argument of
    the call (``intervene=qtg.Intervention(topo="exact")``), so no copy of the module exists and nothing
    is ever switched on the shared weights."""

    source: Source
    device: str
    model: Any
    tokenizer: Any
    tokenizer_note: str  # where the tokenizer came from, when not from the checkpoint
    seconds: float  # time to load

    @property
    def random_weights(self) -> bool:
        return bool(self.model.random_weights)

    @property
    def has_topofilter(self) -> bool:
        return bool(self.model.has_topofilter)

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def describe(self) -> str:
        cfg = self.model.cfg
        weights = "RANDOM weights (untrained: its text is noise)" if self.random_weights else "trained weights"
        arch = "QTG" if self.has_topofilter else "dot-product baseline"
        note = f"; {self.tokenizer_note}" if self.tokenizer_note else ""
        return (f"**{self.source.label}** on {self.device}: {arch}, {human_count(count_params(cfg))} "
                f"parameters ({human_bytes(self.weight_bytes)}), d={cfg.d_model}, {cfg.n_layers} layers, "
                f"{cfg.n_heads} heads, context {cfg.max_seq_len}, {weights}{note} (loaded in {self.seconds:.2f} s)")


def _label(kind: str, name: str) -> str:
    return {SHIPPED: f"{name} (shipped, trained)", DIR: f"{name} (checkpoint dir)",
            TIER: f"{name} tier (random weights)", SHARDED: f"{name} (sharded across ranks)"}[kind]


@functools.lru_cache(maxsize=8)
def fallback_tokenizer(vocab_size: int):
    """A tokenizer for a model that carries none (random weights): the shipped nano's when its ids
    fit the vocabulary, else a byte-level BPE of exactly ``vocab_size`` trained on the bundled corpus."""
    shipped = SHIPPED_DIR / "nano"
    if (shipped / "tokenizer.json").is_file():
        tok = load_tokenizer(shipped / "tokenizer.json")
        if tok.get_vocab_size() <= vocab_size:
            return tok, "tokenizer: the shipped nano's"
    docs = load_documents(default_corpus_path())[:3]
    return train_tokenizer([d.text for d in docs], vocab_size=vocab_size), \
        f"tokenizer: a {vocab_size}-token BPE trained on 3 bundled works at load"


def exploration_tier(name: str) -> tuple[Any, Any, str]:
    """A tier as the app builds it with random weights: (config, tokenizer, note).

    Its vocabulary is its tokenizer's (:func:`fallback_tokenizer`) when the tier's own is larger: 7b's 30,000
    ids against the shipped tokenizer's 2,048 would make nearly every sampled token one that decodes to nothing
    (issue 23). The note says so, with both sizes."""
    cfg = qtg.get_tier(name)
    tokenizer, note = fallback_tokenizer(cfg.vocab_size)
    size = tokenizer.get_vocab_size()
    if size < cfg.vocab_size:
        note += (f"; vocabulary {size:,}, the tokenizer's (the tier's own {cfg.vocab_size:,} would sample ids "
                 "that decode to nothing)")
        cfg = cfg.replace(vocab_size=size)
    return cfg, tokenizer, note


def tokenizer_for(model: Any) -> tuple[Any, str]:
    """A loaded model's tokenizer and a note: its own, or :func:`fallback_tokenizer`'s; the note says when some of
    the model's ids have no token there (its weights fix its vocabulary, so it cannot be made to fit)."""
    if model.tokenizer is not None:
        return model.tokenizer, ""
    tokenizer, note = fallback_tokenizer(model.cfg.vocab_size)
    size = tokenizer.get_vocab_size()
    if size < model.cfg.vocab_size:
        note += (f"; only ids below {size:,} of its {model.cfg.vocab_size:,} decode to text (the tokenizer's "
                 "vocabulary): the others show as nothing")
    return tokenizer, note


def allocated_bytes(device: str) -> int:
    """What this process holds on ``device`` now: CUDA memory allocated by torch, or resident memory on CPU."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return int(torch.cuda.memory_allocated(dev))
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class ModelRegistry:
    """Loaded models keyed by (source key, device), shared by all sessions, LRU-evicted or unloaded."""

    def __init__(self, checkpoint_dirs: tuple[Path, ...] = (), max_models: int = 4,
                 on_drop: Callable[[str, str], None] | None = None):
        """``on_drop(key, device)``: called once a model leaves the cache (unloaded or evicted), so what holds
        it beside the cache (a decoding engine) lets it go too."""
        self.checkpoint_dirs = tuple(Path(p).resolve() for p in checkpoint_dirs)
        self.max_models = max_models
        self.on_drop = on_drop
        self._models: OrderedDict[tuple[str, str], Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self.loads = 0  # how many times weights were actually read (tests hold the sharing to this)
        self.pinned: Loaded | None = None  # under torchrun: the one sharded model, and nothing else

    def pin(self, name: str, model: Any, device: str) -> Loaded:
        """Serve ``model`` (already loaded, e.g. sharded across ranks) as the only model."""
        tokenizer, note = tokenizer_for(model)
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
        raise AppInputError(f"model: unknown {str(key)[:200]!r}; choose one of {offered}")

    def default_key(self, name: str) -> str:
        for kind in (SHARDED, SHIPPED, DIR, TIER):
            for s in self.sources():
                if s.kind == kind and (s.name == name or s.key == name):
                    return s.key
        raise AppInputError(f"no shipped model, checkpoint dir or tier called {name!r}")

    def config_of(self, src: Source) -> Any:
        """The config a source would load, read without loading any weight."""
        if src.kind == SHARDED and self.pinned is not None:
            return self.pinned.model.cfg
        if src.kind == TIER:
            return exploration_tier(src.name)[0]
        return read_config(SHIPPED_DIR / src.name if src.kind == SHIPPED else Path(src.key.split(":", 1)[1]))

    def weights_needed(self, key: str, device: str) -> tuple[int, int]:
        """(bytes the weights of ``key`` take, bytes free on ``device`` now), before loading."""
        src = self.source(key)
        try:
            cfg = self.config_of(src)
        except (QTGError, OSError):  # a training run's folder holds its config one level down
            return 0, available_memory(resolve_device(device))
        # fp32: what qtg.build allocates and what the shipped checkpoints hold
        return memory_estimate(cfg, "fp32", "inference").weights, available_memory(resolve_device(device))

    # --- loading ---------------------------------------------------------------------
    def is_loaded(self, key: str, device: str) -> bool:
        with self._lock:
            return (key, str(resolve_device(device))) in self._models or self.pinned is not None

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
            evicted = []
            with self._lock:
                self._models[slot] = loaded
                while len(self._models) > self.max_models:
                    old, _ = self._models.popitem(last=False)
                    evicted.append(old)
                    log.info("evicted %s on %s (more than %d models loaded)", *old, self.max_models)
                self._loading.pop(slot, None)
        for old in evicted:
            self._dropped(*old)
        return loaded

    def unload(self, key: str, device: str) -> bool:
        """Drop ``key``'s weights on ``device`` from the shared cache (a session that asks again reloads them).
        Returns whether they were loaded."""
        self.source(key)
        dev = str(resolve_device(device))
        with self._lock:
            gone = self._models.pop((key, dev), None)
        if gone is not None:
            log.info("unloaded %s on %s", key, device)
            self._dropped(key, dev)
        return gone is not None

    def _dropped(self, key: str, device: str) -> None:
        """After a model left the cache: its other holders let go (``on_drop``), then its memory goes back to the
        system (a heap keeps freed blocks otherwise: the process would stay at its size with the model)."""
        if self.on_drop is not None:
            self.on_drop(key, device)
        gc.collect()
        release_freed_memory()

    def _load(self, src: Source, device: str) -> Loaded:
        t0 = time.perf_counter()
        if src.kind == SHIPPED:
            model = qtg.load(src.name, device=device)
        elif src.kind == DIR:  # a checkpoint, a training run's latest, or a sharded run read whole
            model = qtg.load(src.key.split(":", 1)[1], device=device)
        else:  # random weights (model.random_weights); qtg.build refuses a tier that does not fit first
            cfg, tokenizer, note = exploration_tier(src.name)
            model = qtg.build(cfg, device=device, seed=0)
        model.eval()
        self.loads += 1
        if src.kind != TIER:
            tokenizer, note = tokenizer_for(model)
        log.info("loaded %s on %s in %.2f s", src.key, device, time.perf_counter() - t0)
        return Loaded(src, device, model, tokenizer, note, time.perf_counter() - t0)

    def loaded(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._models)

    def baseline_for(self, loaded: Loaded) -> Loaded | None:
        """The same-size dot-product baseline shipped beside a QTG model (``<name>-baseline``), if any."""
        name = f"{loaded.source.name}-baseline"
        if not loaded.has_topofilter or loaded.source.kind != SHIPPED or name not in shipped_models():
            return None
        return self.get(f"{SHIPPED}:{name}", loaded.device)
