"""QTG Explorer: the QTG language model and the tools to look inside it.

    import qtg
    model = qtg.build("micro")                  # random weights, refused if it cannot fit
    out = model(ids, return_internals=True)     # logits, states, topology scores, attention maps
    qtg.count_params("7b"), qtg.memory_estimate("7b", "bf16", "train")
    qtg.save_checkpoint(model, "ckpt/"); model = qtg.load("ckpt/")   # safetensors + JSON, never a pickle
    qtg.generate.generate(model, ids, 50, temperature=0.8, top_p=0.9, seed=0)
    model(ids, intervene=qtg.Intervention(topo="exact", ablate_heads={0: [1]}))  # per call, weights untouched
    out, cache = model.run_with_cache(ids, ["topo.w", "blocks.0.attn.pattern"])  # named activations
    model(ids, intervene=qtg.Intervention(patch={"topo.w": cache["topo.w"]}))     # replace one, keep the rest
"""

from qtg import generate
from qtg.errors import CheckpointError, ConfigError, GenerationError, QTGError, TierTooLargeError
from qtg.model.activations import ActivationError, activation_names
from qtg.model.builder import build
from qtg.model.cache import QTGCache
from qtg.model.checkpoint import save_checkpoint
from qtg.model.config import QTGConfig
from qtg.model.decoder import QTGOutput
from qtg.model.intervention import Intervention, InterventionError, TopoWeight
from qtg.model.loading import load, load_checkpoint
from qtg.model.memory import count_params, memory_estimate
from qtg.model.model import QTG
from qtg.model.tiers import TIERS, baseline_of, get_tier, seed_faithful

__version__ = "0.1.0"

__all__ = [
    "ActivationError", "activation_names",
    "Intervention", "InterventionError", "QTG", "QTGCache", "QTGConfig", "QTGOutput", "TIERS", "ConfigError",
    "QTGError", "TierTooLargeError", "TopoWeight",
    "CheckpointError", "GenerationError", "build", "count_params", "generate", "get_tier", "load", "load_checkpoint",
    "memory_estimate", "save_checkpoint", "seed_faithful", "baseline_of",
]
