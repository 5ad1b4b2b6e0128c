"""What the app is allowed to do: limits, where it may read checkpoints, where it writes exports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """Bounds on every request. A request beyond one is refused with a message naming it."""

    max_prompt_chars: int = 4_000  # generate: the prompt, before tokenizing
    max_new_tokens: int = 512  # generate: also bounded by the model's context (the slider follows it)
    max_text_chars: int = 20_000  # topology / attention / compare: before tokenizing; the context bounds tokens
    max_topology_points: int = 1_024  # exact H0/H1: distinct points kept (farthest-point sampling above)
    topology_time_budget: float = 30.0  # seconds for all of a request's topology work (every engine, H0 included)
    max_topology_time_budget: float = 600.0  # ...the most a request may set (Topology tab's "time budget (s)")
    max_attention_tokens: int = 160  # heatmaps draw H x N x N cells; longer texts are cut, and the page says so
    heads_per_page: int = 8  # attention heatmaps: heads drawn at once (a 24-head tier shows 3 pages)
    live_points: int = 160  # the live diagram during generation: the last this-many tokens' points
    live_every_s: float = 0.75  # ...recomputed at most this often, so the stream never waits long on it
    max_lens_tokens: int = 32  # logit lens: positions drawn (states x positions cells, each with its text)
    max_patching_tokens: int = 64  # patching: each block x position is one patched row (nano + baseline: ~8 s)
    sweep_windows: int = 16  # experiment sweep: windows of the held-out works by default (nano, 2 CPU cores: ~10 s)
    max_sweep_windows: int = 2_000  # ...and at most (nano's test split is a few hundred windows)
    max_sweep_conditions: int = 8  # interventions in one sweep, the unmodified model not counted
    max_sweep_sample: int = 32  # windows with attention statistics and exact H0 diagrams
    control_windows: int = 24  # validation windows the TopoFilter's controls are calibrated on, once per model
    # Memory a request may allocate beyond the weights: None means the device's free memory at the time,
    # shared by the heavy requests that may run at once. A view that needs more is refused before it runs.
    memory_budget: int | None = None
    export_max_bytes: int = 256 * 2**20  # the export folder: oldest exports removed beyond this size...
    export_max_age_s: float = 6 * 3600.0  # ...or this age


@dataclass(frozen=True)
class AppConfig:
    """Everything ``build_app`` needs. ``checkpoint_dirs`` are the only places, beside the shipped
    assets, that a checkpoint may be loaded from.

    ``export_dir``: the folder under which each launch makes its own private export folder (mode 0700,
    a fresh name created atomically); None is the system's temporary folder.
    """

    model: str = "nano"  # loaded at start: a shipped model name or a tier
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_dirs: tuple[Path, ...] = ()
    export_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    max_cached_models: int = 4  # loaded weights shared by all sessions, least recently used evicted
    concurrency: int = 2  # heavy events (generate, topology, attention, compare) running at once
    queue_size: int = 32  # requests waiting beyond that are refused ("queue full")
