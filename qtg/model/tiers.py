"""Named tier presets, all in one place.

Two kinds of tier:

* The seed's tiers (``base``, ``7b``, ``30b``, ``100b``, ``5.5q``) keep the seed's
  shapes (vocabulary, d, layers, heads, context) and its architecture as the
  seed wrote it: attention-only blocks (``ffn_mult=0``), no positions (NoPE),
  gamma = 1 fixed, theta = 0.1, tau = 1. Their parameter, memory and quality
  figures are the seed's *claims*, stored in ``claimed_*`` fields; ``qtg info``
  prints the counted numbers beside them.
* The project's own small tiers (``micro`` for tests, ``nano`` to train on a
  2-core CPU and ship) use the spec's recommended form: SwiGLU feed-forward,
  ALiBi positions and learnable per-head gamma. ``seed_faithful(cfg)`` turns
  any tier into the seed's form, so the explorer can show what changes.
"""

from __future__ import annotations

from qtg.errors import ConfigError
from qtg.model.config import QTGConfig

_SEED_FORM = dict(ffn_mult=0.0, pos="none", learn_gamma=False, gamma_init=1.0,
                  topo_threshold=0.1, topo_tau=1.0)

TIERS: dict[str, QTGConfig] = {
    # --- the project's own small tiers --------------------------------------
    "micro": QTGConfig(
        name="micro", vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=128,
        pos="alibi", learn_gamma=True, tags=("project", "tests"),
    ),
    # nano's shape is the spec's measured 2-core configuration (2d = 192, 4 blocks,
    # 4 heads, SwiGLU) with a 2048-token BPE: the tied head is then ~20% of the
    # FLOPs instead of ~45% at 4096, so more text is seen in the same CPU time.
    "nano": QTGConfig(
        name="nano", vocab_size=2048, d_model=96, n_layers=4, n_heads=4, max_seq_len=256,
        pos="alibi", learn_gamma=True, tags=("project", "shipped"),
    ),
    # --- the seed's tiers (shapes from seeds/000, claims kept as claims) ----
    "base": QTGConfig(
        name="base", vocab_size=30_000, d_model=512, n_layers=12, n_heads=8, max_seq_len=512,
        **_SEED_FORM, tags=("seed",), claims_note="the seed's 'baseline' configuration; no claims",
    ),
    "7b": QTGConfig(
        name="7b", vocab_size=30_000, d_model=3_072, n_layers=24, n_heads=24, max_seq_len=2_048,
        **_SEED_FORM, tags=("seed",), claimed_params=6.2e9, claimed_memory_gb=(12.0, 15.0),
        claims_note="ppl 8.5-10.5, 45-55 tok/s on one H200, 12-15 GB VRAM",
    ),
    "30b": QTGConfig(
        name="30b", vocab_size=30_000, d_model=5_120, n_layers=40, n_heads=40, max_seq_len=4_096,
        **_SEED_FORM, tags=("seed",), claimed_params=23.6e9, claimed_memory_gb=(45.0, 55.0),
        claims_note="ppl 6.2-7.8, 25-35 tok/s on one H200, 45-55 GB VRAM",
    ),
    "100b": QTGConfig(
        name="100b", vocab_size=30_000, d_model=8_192, n_layers=80, n_heads=64, max_seq_len=8_192,
        **_SEED_FORM, tags=("seed",), claimed_params=100e9, claimed_memory_gb=(160.0, 160.0),
        claims_note="'100B' (its config file says '88T'), 8xH200, '160GB+ VRAM (distributed)'",
    ),
    "5.5q": QTGConfig(
        name="5.5q", vocab_size=100_000, d_model=1_000_000, n_layers=10_000, n_heads=10_000,
        max_seq_len=1_000_000, **_SEED_FORM, tags=("seed",), claimed_params=5.5e15,
        claims_note="5.5e15 params, '50M x H200', 'planetary' memory",
    ),
}


def get_tier(name: str) -> QTGConfig:
    """The preset called ``name`` (case-insensitive); a ConfigError lists the valid names."""
    key = name.strip().lower()
    if key not in TIERS:
        raise ConfigError(f"unknown tier {name!r}; valid tiers: {', '.join(TIERS)}")
    return TIERS[key]


def resolve_config(tier_or_config: str | QTGConfig) -> QTGConfig:
    """A QTGConfig as given, or the preset a tier name names."""
    if isinstance(tier_or_config, QTGConfig):
        return tier_or_config
    if isinstance(tier_or_config, str):
        return get_tier(tier_or_config)
    raise ConfigError(f"expected a tier name or QTGConfig, got {type(tier_or_config).__name__}")


def seed_faithful(cfg: QTGConfig) -> QTGConfig:
    """``cfg`` in the seed's form: attention-only, NoPE, gamma = 1 fixed."""
    return cfg.replace(name=f"{cfg.name}-seed", **_SEED_FORM)


def baseline_of(cfg: QTGConfig) -> QTGConfig:
    """The same-size conventional decoder (RoPE dot-product attention) for ``cfg``."""
    return cfg.replace(name=f"{cfg.name}-baseline", arch="baseline")
