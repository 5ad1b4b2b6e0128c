"""``qtg.build``: a model for a tier or config, refused before allocation if it cannot fit."""

from __future__ import annotations

import torch

from qtg.errors import ConfigError, TierTooLargeError
from qtg.model.config import QTGConfig
from qtg.model.decoder import DecoderLM
from qtg.model.memory import available_memory, human_bytes, memory_estimate
from qtg.model.registry import meta_model
from qtg.model.tiers import resolve_config

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def check_fits(cfg: QTGConfig, device: torch.device, dtype: torch.dtype, mode: str = "inference") -> None:
    """Raise TierTooLargeError, with needed vs available bytes, if cfg cannot be held."""
    est = memory_estimate(cfg, dtype=str(dtype).removeprefix("torch."), mode=mode)
    need, have = est.weights, available_memory(device)
    if need > have:
        raise TierTooLargeError(
            f"tier {cfg.name!r} does not fit on {device}: its {mode} weights alone need "
            f"{human_bytes(need)} in {str(dtype).removeprefix('torch.')} ({est.params:,} parameters), "
            f"{human_bytes(have)} available; nothing was allocated"
        )


def build(
    tier_or_config: str | QTGConfig,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
) -> DecoderLM:
    """Build a randomly initialised QTG model (or its baseline, ``cfg.arch == "baseline"``).

    The model is created on the ``meta`` device (shapes, no storage) and cast
    to ``dtype`` there, checked against the target device's free memory, then
    materialised with ``to_empty`` and initialised from ``seed``: a tier that
    does not fit is refused before a single weight is allocated, and one that
    fits is allocated once, in ``dtype`` (never in float32 first).

    Args:
        tier_or_config: a name from ``qtg.TIERS`` or a QTGConfig.
        device: "cpu", "cuda", "cuda:1", "auto" or a torch.device.
        dtype: parameter dtype ("fp32" default, "bf16", ...).
        seed: initialisation seed (the same seed gives the same weights).
    """
    cfg = resolve_config(tier_or_config)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    check_fits(cfg, device, dtype)
    model = meta_model(cfg, dtype).to_empty(device=device)
    model.init_weights(seed=seed)
    return model
