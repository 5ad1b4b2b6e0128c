"""QTG Explorer: the QTG language model and the tools to look inside it.

    import qtg
    model = qtg.build("micro")                  # random weights, refused if it cannot fit
    out = model(ids, return_internals=True)     # logits, states, topology scores, attention maps
    qtg.count_params("7b"), qtg.memory_estimate("7b", "bf16", "train")
"""

from qtg.builder import build
from qtg.config import QTGConfig
from qtg.errors import ConfigError, QTGError, TierTooLargeError
from qtg.memory import count_params, memory_estimate
from qtg.model import QTG, QTGCache, QTGOutput
from qtg.tiers import TIERS, get_tier, seed_faithful

__version__ = "0.1.0"

__all__ = [
    "QTG", "QTGCache", "QTGConfig", "QTGOutput", "TIERS", "ConfigError", "QTGError", "TierTooLargeError",
    "build", "count_params", "get_tier", "memory_estimate", "seed_faithful",
]
