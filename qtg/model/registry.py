"""Architectures by name: ``cfg.arch`` -> the class that builds it.

The one place that knows every architecture, so that counting
(:mod:`qtg.model.memory`), building (:mod:`qtg.model.builder`), loading
(:mod:`qtg.model.checkpoint`) and sharding (:mod:`qtg.distributed`) construct models
the same way without importing one another.
"""

from __future__ import annotations

import torch

from qtg.model.baseline import Baseline
from qtg.model.config import QTGConfig
from qtg.model.decoder import DecoderLM
from qtg.model.model import QTG

# One entry per name in qtg.model.config.ARCHS (a test keeps the two equal).
ARCHITECTURES: dict[str, type[DecoderLM]] = {"qtg": QTG, "baseline": Baseline}


def model_class(cfg: QTGConfig) -> type[DecoderLM]:
    """QTG, or the same-size Baseline decoder for ``cfg.arch == "baseline"``."""
    return ARCHITECTURES[cfg.arch]  # QTGConfig validated arch against ARCHS


def meta_model(cfg: QTGConfig, dtype: torch.dtype | None = None) -> DecoderLM:
    """The model ``cfg`` describes on the ``meta`` device: every shape, no storage.

    Args:
        cfg: the configuration.
        dtype: the parameter dtype (None keeps float32). Cast here, on ``meta``, so
            that materialising (``to_empty``) allocates each weight once, in this dtype.
    """
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    return model if dtype is None else model.to(dtype)
