"""Counting parameters and estimating memory, without allocating.

* :func:`count_params` instantiates the model on the ``meta`` device (shapes
  only, no storage), so even ``5.5q`` is counted without allocating a weight.
* :func:`closed_form_params` is the same count as arithmetic; a test keeps the
  two equal for every tier.
* :func:`memory_estimate` turns counts and dtypes into bytes for weights,
  gradients, optimiser state, activations and the decoding cache.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import torch

from qtg.errors import ConfigError
from qtg.model.config import QTGConfig
from qtg.model.registry import meta_model
from qtg.model.tiers import resolve_config

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp64": 8, "float64": 8}
MODES = ("inference", "train")


def dtype_bytes(dtype: str | torch.dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype, device="meta").element_size()
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def count_params(tier: str | QTGConfig) -> int:
    """Parameters of the model, counted by building it on the meta device."""
    return _count_on_meta(resolve_config(tier))


@functools.lru_cache(maxsize=64)
def _count_on_meta(cfg: QTGConfig) -> int:
    return sum(p.numel() for p in meta_model(cfg).parameters())


def closed_form_params(tier: str | QTGConfig) -> int:
    """The same count as arithmetic (tied head, so the table is counted once)."""
    c = resolve_config(tier)
    width, qtg = c.width, c.arch == "qtg"
    embed = c.vocab_size * width + (width if qtg else 0)  # table + the seed's bias
    attn = 3 * width * c.d_model + c.d_model * width + (c.n_heads if c.learn_gamma and qtg else 0)
    ffn = 3 * width * c.ffn_hidden + (width if c.ffn_hidden else 0)  # w_in (2h), w_out, its norm
    block = width + attn + ffn  # attention norm + attention + feed-forward
    return embed + c.n_layers * block + width  # + final norm


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed by one model replica. ``total`` is what must fit on the device."""

    tier: str
    dtype: str
    mode: str
    batch_size: int
    seq_len: int
    params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def memory_estimate(
    tier: str | QTGConfig,
    dtype: str = "bf16",
    mode: str = "inference",
    batch_size: int = 1,
    seq_len: int | None = None,
    params: int | None = None,
) -> MemoryEstimate:
    """Estimated bytes for inference or training of one replica.

    Assumptions, stated so they can be checked:

    * weights: params x dtype bytes.
    * train: gradients in the parameter dtype; AdamW keeps two float32 moments,
      plus a float32 master copy when parameters are 16-bit (mixed precision).
    * activations, train: what autograd saves per block for the fused (flex)
      path, ~(14 * 2d + 3 * hidden) values per token, in the compute dtype,
      plus the logits' float32 log-softmax ``[B, N, V]`` twice.
    * activations, inference: the largest transient, one block's working set
      or the logits, whichever is larger (nothing is kept across blocks).
    * kv_cache (inference): per block float32 sqrt-simplex keys (d values per
      token) and values (d, parameter dtype), plus the TopoFilter's earlier
      states (2d, parameter dtype).
    """
    cfg = resolve_config(tier)
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    n = cfg.max_seq_len if seq_len is None else seq_len
    b = dtype_bytes(dtype)
    p = count_params(cfg) if params is None else params
    tokens = batch_size * n
    per_token_block = 14 * cfg.width + 3 * cfg.ffn_hidden
    logits = tokens * cfg.vocab_size * 4
    weights = p * b
    if mode == "train":
        gradients = p * b
        optimizer = p * 8 + (p * 4 if b < 4 else 0)
        activations = tokens * per_token_block * b * cfg.n_layers + 2 * logits
        kv_cache = 0
    else:
        gradients = optimizer = 0
        activations = max(tokens * per_token_block * b, logits)
        kv_cache = tokens * (cfg.d_model * cfg.n_layers * (4 + b) + cfg.width * b)
    return MemoryEstimate(
        tier=cfg.name, dtype=str(dtype), mode=mode, batch_size=batch_size, seq_len=n, params=p,
        weights=weights, gradients=gradients, optimizer=optimizer, activations=activations, kv_cache=kv_cache,
    )


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes the device can still give: free GPU memory, or MemAvailable on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "meta":
        return 2**127
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``976.6 KiB``, ``1.6 MiB``, ``80.0 GiB`` (1 GiB = 2**30 bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def human_count(n: float) -> str:
    for unit, scale in (("Q", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def tier_summary(tier: str | QTGConfig, device: str | torch.device = "cpu") -> dict:
    """Everything ``qtg info`` and the app's Tiers tab show for one tier.

    Counted parameters beside the seed's claim, memory per dtype and mode
    (batch 1, full context), and whether inference / training fit ``device``
    (in bf16 on a GPU, float32 on a CPU).
    """
    cfg = resolve_config(tier)
    params = count_params(cfg)
    est = {f"{mode}_{dt}": memory_estimate(cfg, dt, mode, params=params)
           for mode in MODES for dt in ("bf16", "fp32")}
    device = torch.device(device)
    native = "bf16" if device.type == "cuda" else "fp32"
    have = available_memory(device)
    return {
        "tier": cfg.name,
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads, "max_seq_len": cfg.max_seq_len, "ffn_hidden": cfg.ffn_hidden,
        "pos": cfg.pos, "learn_gamma": cfg.learn_gamma,
        "params": params,
        "claimed_params": cfg.claimed_params,
        "claimed_memory_gb": list(cfg.claimed_memory_gb) if cfg.claimed_memory_gb else None,
        "claims_note": cfg.claims_note,
        "memory_bytes": {k: e.total for k, e in est.items()},
        "memory_detail": {k: e.to_dict() for k, e in est.items()},
        "device": str(device), "device_dtype": native, "available_bytes": have,
        "fits_inference": est[f"inference_{native}"].total <= have,
        "fits_train": est[f"train_{native}"].total <= have,
    }
