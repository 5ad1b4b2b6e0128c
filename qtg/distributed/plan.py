"""Memory per GPU under FSDP2, the fewest GPUs that fit, and the arithmetic when none do.

    p = plan("30b", gpus=8, gpu_mem_gib=80)
    p.train["ac"].total, p.min_gpus["ac"], p.impossible

Every number comes from shapes counted on the meta device (:mod:`qtg.model.memory`):
the total parameter count is ``qtg.count_params``, and the FSDP units are the
root (embedding table = tied head, its bias, final norm) and one unit per
block, measured on a one-block model built on ``meta``.

What one rank holds while training with FSDP2 and bf16 mixed precision
(``qtg.distributed.parallelize``), for a micro-batch of ``batch`` sequences
of ``seq_len`` tokens per rank:

* weights: the float32 master shards. FSDP2 shards each tensor along dim 0,
  padding it to ``ceil(rows / N)`` rows per rank, so one rank holds
  ``shard_params = sum ceil(rows / N) x (other dims)`` values;
* gathered: the unsharded bf16 parameters in flight: the root (never
  resharded during a step) and two blocks (the one computing and the one
  prefetched);
* gradients: the float32 gradient shards, plus one block's unsharded
  gradients in the float32 reduce dtype and the root's in bf16 while they wait
  for their reduce-scatter;
* optimizer: AdamW's two float32 moments, sharded like the weights;
* activations: without activation checkpointing, what autograd keeps for
  every block (``qtg.model.memory.memory_estimate``'s formula); with it, each
  block's bf16 input plus one block's activations while it is recomputed;
  both with the float32 log-softmax of the logits twice.

Inference (generation, batch 1, full context): bf16 weight shards, the same
gathered units, the decoding cache and the largest transient.

``fits`` compares the total with ``gpu_mem_gib`` GiB (binary: 2**30 bytes,
the unit ``human_bytes`` prints); no allowance is made for the CUDA context,
the allocator's fragmentation or communication buffers, so treat a margin
under a few GiB as not fitting.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from qtg.model.config import QTGConfig
from qtg.model.memory import count_params, human_bytes, human_count, memory_estimate
from qtg.model.registry import meta_model
from qtg.model.tiers import resolve_config

GiB = 1024**3
MODES = ("no_ac", "ac")  # without / with activation checkpointing
MAX_GPUS = 10**12  # the search for the fewest GPUs stops here


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds at its peak."""

    weights: int
    gathered: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gathered + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class Plan:
    """The FSDP2 memory plan of one tier on ``gpus`` GPUs of ``gpu_mem_gib`` GiB."""

    tier: str
    gpus: int
    gpu_mem_gib: float
    batch: int
    seq_len: int
    params: int  # counted on the meta device
    root_params: int  # the root FSDP unit: embedding table (tied head), its bias, final norm
    block_params: int  # one block's FSDP unit
    n_blocks: int
    shard_params: int  # what one rank holds of the parameters: sum of ceil(rows / gpus) x other dims
    train: dict[str, RankMemory] = field(default_factory=dict)  # "no_ac", "ac"
    inference: RankMemory | None = None
    fits: dict[str, bool] = field(default_factory=dict)  # "no_ac", "ac", "inference"
    min_gpus: dict[str, int | None] = field(default_factory=dict)  # None: no number of GPUs fits
    impossible: list[str] = field(default_factory=list)  # the arithmetic, when some mode fits no number of GPUs

    @property
    def capacity(self) -> int:
        return int(self.gpu_mem_gib * GiB)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["train"] = {k: v.to_dict() for k, v in self.train.items()}
        out["inference"] = self.inference.to_dict() if self.inference else None
        out["capacity_bytes"] = self.capacity
        return out


@functools.lru_cache(maxsize=64)
def unit_shapes(cfg: QTGConfig) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """Parameter shapes of the root unit and of one block, from a one-block model on the meta device."""
    model = meta_model(cfg.replace(n_layers=1))
    block = tuple(tuple(p.shape) for p in model.layers()[0].parameters())
    root = tuple(tuple(p.shape) for n, p in model.named_parameters() if not n.startswith("blocks."))
    return root, block


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def shard_numel(shape: tuple[int, ...], gpus: int) -> int:
    """Values one rank holds of a tensor FSDP2 shards along dim 0 over ``gpus`` ranks (padded: ceil rows)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / gpus) * _numel(shape[1:])


def shard_params(cfg: QTGConfig, gpus: int) -> int:
    """Parameters one rank holds under FSDP2 on ``gpus`` ranks (the largest shard, rank 0's)."""
    root, block = unit_shapes(cfg)
    counts = Counter(root) + Counter({s: c * cfg.n_layers for s, c in Counter(block).items()})
    return sum(c * shard_numel(s, gpus) for s, c in counts.items())


def _train_memory(cfg: QTGConfig, gpus: int, root: int, block: int, act: dict[str, int]) -> dict[str, RankMemory]:
    shard = shard_params(cfg, gpus)
    fixed = dict(weights=4 * shard, gathered=2 * (root + 2 * block), gradients=4 * shard + 4 * block + 2 * root,
                 optimizer=8 * shard)
    return {mode: RankMemory(**fixed, activations=act[mode]) for mode in MODES}


def _inference_memory(cfg: QTGConfig, gpus: int, root: int, block: int, est) -> RankMemory:
    return RankMemory(weights=2 * shard_params(cfg, gpus), gathered=2 * (root + 2 * block), gradients=0,
                      optimizer=0, activations=est.activations + est.kv_cache)


def _activations(cfg: QTGConfig, batch: int, seq_len: int) -> dict[str, int]:
    """Per-rank training activations in bf16, without and with per-block activation checkpointing."""
    est = memory_estimate(cfg, "bf16", "train", batch_size=batch, seq_len=seq_len, params=0)
    tokens = batch * seq_len
    logits = 2 * tokens * cfg.vocab_size * 4  # the float32 log-softmax, twice (memory_estimate's term)
    per_block = (est.activations - logits) // cfg.n_layers
    inputs = tokens * cfg.width * 2 * cfg.n_layers  # each block's bf16 input, kept for the recompute
    return {"no_ac": est.activations, "ac": inputs + per_block + logits}


def _fewest(need: callable, cap: int, sharded_bytes_per_param: int, params: int, fixed: int) -> int | None:
    """The smallest N with need(N) <= cap, or None when the N-independent part alone exceeds cap."""
    if fixed >= cap:
        return None
    n = max(1, math.ceil(sharded_bytes_per_param * params / (cap - fixed)))  # shards are at least params / N
    while n < MAX_GPUS and need(n) > cap:  # padding to whole rows can cost a few more
        n += 1
    return n if n < MAX_GPUS else None


def plan(tier: str | QTGConfig, gpus: int = 8, gpu_mem_gib: float = 80.0, batch: int = 1,
         seq_len: int | None = None) -> Plan:
    """Memory per rank for training (with and without activation checkpointing) and inference under FSDP2.

    Args:
        tier: a tier name or config.
        gpus: N, the number of ranks (one GPU each).
        gpu_mem_gib: memory of one GPU in GiB.
        batch: sequences per rank and micro-batch.
        seq_len: tokens per sequence (default: the tier's context).
    """
    cfg = resolve_config(tier)
    seq_len = seq_len or cfg.max_seq_len
    params = count_params(cfg)
    root_shapes, block_shapes = unit_shapes(cfg)
    root, block = sum(map(_numel, root_shapes)), sum(map(_numel, block_shapes))
    assert root + cfg.n_layers * block == params, "FSDP units do not add up to the meta-device count"
    act = _activations(cfg, batch, seq_len)
    infer_est = memory_estimate(cfg, "bf16", "inference", batch_size=1, seq_len=seq_len, params=params)
    train = _train_memory(cfg, gpus, root, block, act)
    inference = _inference_memory(cfg, gpus, root, block, infer_est)
    cap = int(gpu_mem_gib * GiB)
    fits = {**{m: train[m].total <= cap for m in MODES}, "inference": inference.total <= cap}
    fixed = {m: train[m].total - 16 * shard_params(cfg, gpus) for m in MODES}  # what sharding cannot shrink
    fixed["inference"] = inference.total - inference.weights
    min_gpus = {m: _fewest(lambda n, m=m: _train_memory(cfg, n, root, block, act)[m].total, cap, 16, params,
                           fixed[m]) for m in MODES}
    min_gpus["inference"] = _fewest(lambda n: _inference_memory(cfg, n, root, block, infer_est).total, cap, 2,
                                    params, fixed["inference"])
    out = Plan(cfg.name, gpus, gpu_mem_gib, batch, seq_len, params, root, block, cfg.n_layers,
               shard_params(cfg, gpus), train, inference, fits, min_gpus)
    out.impossible.extend(_why_not(out, cfg, fixed, act))
    return out


def _why_not(p: Plan, cfg: QTGConfig, fixed: dict[str, int], act: dict[str, int]) -> list[str]:
    """The arithmetic behind every mode that fits no number of GPUs."""
    cap, hb = p.capacity, human_bytes
    lines = []
    for mode, name in (("no_ac", "training without activation checkpointing"),
                       ("ac", "training with activation checkpointing"), ("inference", "inference")):
        if p.min_gpus[mode] is not None:
            continue
        t = p.train.get(mode) or p.inference
        grads = f" + unsharded gradients {hb(t.gradients - 4 * p.shard_params)}" if t.gradients else ""
        lines.append(f"{name}: what sharding cannot shrink is {hb(fixed[mode])} per GPU, more than its "
                     f"{hb(cap)}: gathered units {hb(t.gathered)} (one block is {human_count(p.block_params)} "
                     f"parameters, {hb(2 * p.block_params)} in bf16, and FSDP2 needs it whole while it runs){grads}"
                     f" + activations{' and decoding cache' if mode == 'inference' else ''} {hb(t.activations)}, "
                     "whatever the number of GPUs")
    if p.min_gpus["ac"] is None:  # not even with activation checkpointing: the scale of the problem
        state = 16 * p.params
        lines.append(f"even sharded perfectly (every tensor and activation split across GPUs, which FSDP2 does not "
                     f"do), the training state alone - float32 weights, gradients and two AdamW moments, 16 bytes "
                     f"x {p.params:,} parameters = {hb(state)} - needs at least {math.ceil(state / cap):,} GPUs of "
                     f"{hb(cap)}, and the activations of one {p.seq_len:,}-token sequence with activation "
                     f"checkpointing {hb(act['ac'])} need {math.ceil(act['ac'] / cap):,} more")
    return lines
