"""QTGConfig: every hyper-parameter of a QTG model in one frozen dataclass.

Named presets live in :mod:`qtg.model.tiers`; variants are ``dataclasses.replace``
copies of a preset (``cfg.replace(n_layers=2)``). Claims copied from the seed
documents are kept in ``claimed_*`` fields and never used for computation:
everything the project reports is counted or measured.

Notation follows ``docs/model.md``: complex width ``d`` (the real view of a
state is ``2d`` wide: real half, then imaginary half), ``H`` heads, head width
``d_h = d / H``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from qtg.errors import ConfigError

ATTN_IMPLS = ("auto", "reference", "flex")
POSITIONS = ("alibi", "none")
TOPO_FILTERS = ("approx", "exact", "gate", "off")
BASELINE_POSITIONS = ("rope", "alibi")
ARCHS = ("qtg", "baseline")


@dataclass(frozen=True)
class QTGConfig:
    # --- identity -------------------------------------------------------
    name: str = "custom"
    arch: str = "qtg"  # "qtg", or "baseline": a same-size conventional decoder (qtg.model.baseline)

    # --- shape (docs/model.md §5) -----------------------------------------
    vocab_size: int = 512
    d_model: int = 64  # complex width d; the real residual stream is 2d wide
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 128
    # SwiGLU hidden width = ffn_mult * 2d rounded up to ffn_multiple_of.
    # 0 gives the seed's attention-only stack.
    ffn_mult: float = 8 / 3
    ffn_multiple_of: int = 64

    # --- TopoFilter (docs/model.md §2) ------------------------------------
    topo_threshold: float = 0.1  # theta
    topo_tau: float = 1.0  # tau
    # T of the soft-min s~_i = -T log sum_j exp(-delta_ij / T). The seed names
    # T without a value; 0.1 keeps s~ within T*log(N) of the exact minimum
    # while leaving gradients to more than the single nearest neighbour
    # (docs/model.md §8).
    topo_temperature: float = 0.1
    # The model's own weight (docs/model.md §2): "approx" (w from the soft-min
    # s~), "exact" (w from the exact causal distance s, gradient through the
    # min: nano-exact), "gate" (w = 1 for a token seen earlier in the context, a
    # learnt constant otherwise: nano-gate) or "off" (w = 1 for every token:
    # nano-notopo). s~ is still computed in every mode, so the explorer can show
    # what the filter would have done.
    topo_filter: str = "approx"

    # --- GeoAttention (docs/model.md §3) ----------------------------------
    gamma_init: float = 1.0
    learn_gamma: bool = False  # per-head gamma, log-parameterised
    pos: str = "none"  # "none" (NoPE, the seed) | "alibi"
    attn_impl: str = "auto"  # "auto" | "reference" | "flex"
    # Positions of the baseline decoder (arch="baseline" only): "rope", or "alibi"
    # with GeoAttention's slopes, so attention form and positions can be compared apart.
    baseline_pos: str = "rope"

    # --- loss (docs/model.md §4) ------------------------------------------
    lambda_topo: float = 0.01
    lambda_geo: float = 0.01
    lambda_quantum: float = 0.01

    # --- numerics / init --------------------------------------------------
    norm_eps: float = 1e-5
    init_std: float = 0.02

    # --- the seed's claims, kept as claims (never used to compute) --------
    claimed_params: float | None = None
    claimed_memory_gb: tuple[float, float] | None = None
    claims_note: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        checks = [
            (self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}"),
            (self.d_model >= 1, f"d_model must be >= 1, got {self.d_model}"),
            (self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}"),
            (self.n_heads >= 1, f"n_heads must be >= 1, got {self.n_heads}"),
            (
                self.d_model % self.n_heads == 0,
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})",
            ),
            (self.max_seq_len >= 1, f"max_seq_len must be >= 1, got {self.max_seq_len}"),
            (self.ffn_mult >= 0, f"ffn_mult must be >= 0, got {self.ffn_mult}"),
            (self.topo_tau > 0, f"topo_tau must be > 0, got {self.topo_tau}"),
            (self.topo_temperature > 0, f"topo_temperature must be > 0, got {self.topo_temperature}"),
            (self.gamma_init > 0, f"gamma_init must be > 0, got {self.gamma_init}"),
            (self.topo_filter in TOPO_FILTERS, f"topo_filter must be one of {TOPO_FILTERS}, got {self.topo_filter!r}"),
            (self.baseline_pos in BASELINE_POSITIONS,
             f"baseline_pos must be one of {BASELINE_POSITIONS}, got {self.baseline_pos!r}"),
            (self.pos in POSITIONS, f"pos must be one of {POSITIONS}, got {self.pos!r}"),
            (self.arch in ARCHS, f"arch must be one of {ARCHS}, got {self.arch!r}"),
            (self.attn_impl in ATTN_IMPLS, f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{self.name}: {message}")

    # --- derived sizes ------------------------------------------------------
    @property
    def width(self) -> int:
        """Width of the real residual stream, 2d."""
        return 2 * self.d_model

    @property
    def label(self) -> str:
        """The name to show: ``nano``, or ``nano-baseline`` for its baseline decoder."""
        if self.arch == "baseline" and "baseline" not in self.name:
            return f"{self.name}-baseline"
        return self.name

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden width (0 when the block is attention-only)."""
        if self.ffn_mult == 0:
            return 0
        raw = int(math.ceil(self.ffn_mult * self.width))
        m = self.ffn_multiple_of
        return m * ((raw + m - 1) // m)

    # --- conversions ----------------------------------------------------------
    def replace(self, **changes: Any) -> QTGConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["claimed_memory_gb"] = list(self.claimed_memory_gb) if self.claimed_memory_gb else None
        out["tags"] = list(self.tags)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QTGConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        data = dict(data)
        if data.get("claimed_memory_gb") is not None:
            data["claimed_memory_gb"] = tuple(data["claimed_memory_gb"])
        if "tags" in data:
            data["tags"] = tuple(data["tags"])
        return cls(**data)
