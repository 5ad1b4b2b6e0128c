"""AdamW parameter groups, the learning-rate schedule, and optimizer state without pickles.

Choices:

* **Decoupled weight decay** (``torch.optim.AdamW``) on the matrices of the
  attention and feed-forward layers only. Norm gains, embedding tables (also
  the tied head), biases and ``log_gamma`` are not decayed: shrinking them
  towards 0 pulls norms, embeddings or gamma away from their meaning instead
  of regularising the model. The rule goes by module type (``nn.Embedding``,
  ``nn.RMSNorm``) and parameter name, so it holds for the baseline decoder too.
* **Schedule**: linear warm-up from ``lr / warmup_steps`` to ``lr`` over
  ``warmup_steps`` updates, then a half cosine down to ``min_lr`` at
  ``schedule_steps``, then flat at ``min_lr``. Both lengths are config
  values; the step a run stops at (``--steps``) never changes the curve, so a
  run stopped early and resumed follows the same learning rates.
* **State without pickles**: ``optimizer.state_dict()`` splits into tensors
  (``exp_avg``, ``exp_avg_sq``, ``step``), written with safetensors, and the
  rest (hyper-parameters, parameter names), written as JSON.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qtg.errors import CheckpointError

# Modules whose weights are never decayed: embeddings (QTG's tied head is its embedding table) and norms.
_NO_DECAY_MODULES = (nn.Embedding, nn.RMSNorm, nn.LayerNorm)


def no_decay(module: nn.Module, name: str, param: torch.Tensor) -> bool:
    """True for norms, embeddings, biases and log_gamma: the parameters weight decay must skip.

    Args:
        module: the module that owns ``param`` directly.
        name: the parameter's name within that module ("weight", "bias", "log_gamma", ...).
        param: the parameter; every tensor of fewer than 2 dimensions is a gain, bias or scale.
    """
    return isinstance(module, _NO_DECAY_MODULES) or name in ("bias", "log_gamma") or param.ndim < 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: ``decay`` (the matrices of linear layers) and ``no_decay`` (see :func:`no_decay`).

    Args:
        model: the model; frozen parameters are left out, tied ones counted once.
        weight_decay: the decay of the first group.

    Returns:
        ``[{"name", "params", "param_names", "weight_decay"}, ...]``; the names
        travel with the optimizer state, so a resume can check them.
    """
    groups: dict[str, tuple[list, list]] = {"decay": ([], []), "no_decay": ([], [])}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            params, names = groups["no_decay" if no_decay(module, name, p) else "decay"]
            params.append(p)
            names.append(f"{module_name}.{name}" if module_name else name)
    return [{"name": key, "params": params, "param_names": names, "weight_decay": weight_decay if key == "decay"
             else 0.0} for key, (params, names) in groups.items() if params]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel on CUDA (one launch for all tensors)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, schedule_steps: int) -> float:
    """The learning rate of update number ``step`` (0 is the first update).

    Args:
        step: the number of updates done before this one.
        lr: the peak, reached at the end of warm-up.
        min_lr: the floor, reached at ``schedule_steps`` and kept after it.
        warmup_steps: linear warm-up length (0: none).
        schedule_steps: total schedule length (warm-up included).

    Returns:
        ``lr * (step + 1) / warmup_steps`` during warm-up, then
        ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with ``t`` going
        from 0 to 1 over the remaining steps.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps  # +1: the first update does not waste a step at lr 0
    t = min(1.0, (step - warmup_steps) / max(1, schedule_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- state as safetensors + JSON ---------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON.

    Returns:
        ``(tensors, meta)``: tensors named ``optim.<param index>.<key>`` (on
        CPU), and ``meta = {"param_groups": [...], "scalars": {...}}`` with
        plain values only.
    """
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`: restore moments, step counts and hyper-parameters.

    Raises:
        CheckpointError: the saved groups hold other parameters than this optimizer's.
    """
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    mine = [g.get("param_names") for g in optimizer.param_groups]
    saved = [g.get("param_names") for g in groups]
    if mine != saved:
        raise CheckpointError("the saved optimizer state is for other parameters than this model's "
                              "(parameter groups differ); was the model config changed?")
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = t
    for name, value in meta.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
