"""Named activations: what one forward pass records and replaces at each site (docs/model.md §10).

Every forward pass of QTG and of its baseline passes its intermediate tensors
through named *sites*::

    embed                      [B, N, 2d]     QEmbed's unit states (the baseline: its embedding)
    topo.scores                [B, N]         s~, the TopoFilter's soft-min score (QTG only)
    topo.w                     [B, N]         w, the weight applied to each token (QTG only)
    topo.out                   [B, N, 2d]     w * psi, the first block's input (QTG only)
    blocks.{i}.resid_pre       [B, N, 2d]     block i's input
    blocks.{i}.attn.distance   [B, H, N, K]   d_FR in [0, pi/2] (QTG only; K = keys, with a cache P + N)
    blocks.{i}.attn.pattern    [B, H, N, K]   attention probabilities
    blocks.{i}.attn.head_out   [B, N, H, d_h] each head's output before W_o sums them
    blocks.{i}.attn.out        [B, N, 2d]     the attention's output, W_o applied
    blocks.{i}.mlp.out         [B, N, 2d]     the SwiGLU's output (blocks with a feed-forward)
    blocks.{i}.resid_post      [B, N, 2d]     block i's output
    final_norm                 [B, N, 2d]     RMSNorm(x) of the last block's output, what the head reads

A :class:`Sites` value is built per call from ``Intervention.patch`` (replace)
and the names asked of :meth:`~qtg.model.model.DecoderLM.run_with_cache` (record).
It is falsy when it does nothing, so a plain forward pays one truth test per
site and builds no names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

from torch import Tensor

from qtg.errors import QTGError

Patch = Tensor | Callable[[Tensor], Tensor]
Names = Collection[str] | Callable[[str], bool] | None

_BLOCK_SITES = ("resid_pre", "attn.distance", "attn.pattern", "attn.head_out", "attn.out", "mlp.out",
                "resid_post")


class ActivationError(QTGError, ValueError):
    """A site name or a patch that does not fit the model."""


def activation_names(cfg: Any) -> list[str]:
    """Every site name of a model with config ``cfg``, in the order a forward pass reaches them."""
    qtg = cfg.arch == "qtg"
    names = ["embed", *(("topo.scores", "topo.w", "topo.out") if qtg else ())]
    for i in range(cfg.n_layers):
        for site in _BLOCK_SITES:
            if (site == "attn.distance" and not qtg) or (site == "mlp.out" and not cfg.ffn_hidden):
                continue
            names.append(f"blocks.{i}.{site}")
    return [*names, "final_norm"]


def select_names(cfg: Any, names: Names) -> list[str]:
    """The site names ``names`` asks for: None (all), a list (each checked) or a predicate of a name."""
    every = activation_names(cfg)
    if names is None:
        return every
    if callable(names):
        return [n for n in every if names(n)]
    if isinstance(names, str):
        names = [names]
    check_names(cfg, names, "names")
    return list(names)


def check_names(cfg: Any, names: Collection[str], what: str) -> None:
    """Refuse, naming it, any name that is not a site of this model."""
    every = set(activation_names(cfg))
    bad = [n for n in names if n not in every]
    if bad:
        hint = "; sites of the baseline have no topo.* or attn.distance" if cfg.arch != "qtg" else ""
        raise ActivationError(f"{what}: {bad} {'is not a site' if len(bad) == 1 else 'are not sites'} of "
                              f"{cfg.label} (sites: embed, topo.scores, topo.w, topo.out, blocks.{{i}}.("
                              f"{'|'.join(_BLOCK_SITES)}), final_norm, i in 0..{cfg.n_layers - 1}){hint}")


class Sites:
    """One call's work at the named sites: replace what ``patch`` names, then record what ``record`` names.

    ``sites(name, value)`` returns the value the pass goes on with. A patch is a
    tensor (the site's shape, or with batch 1 to broadcast) or a function of the
    clean value returning one of its shape. Recorded values are kept as the
    pass produced them (with their graph when gradients are on; ``retain_grad``
    also keeps their gradients, for attribution).
    """

    def __init__(self, patch: Mapping[str, Patch] | None = None, record: Collection[str] = (),
                 retain_grad: bool = False):
        self.patch = dict(patch or {})
        self.record = frozenset(record)
        self.retain_grad = retain_grad
        self.cache: dict[str, Tensor] = {}
        self._active = frozenset(self.patch) | self.record

    def __bool__(self) -> bool:
        return bool(self._active)

    def wants(self, name: str) -> bool:
        """Whether this call touches ``name`` (the model then materialises what a plain pass fuses away)."""
        return name in self._active

    def patches(self, name: str) -> bool:
        """Whether this call replaces ``name``."""
        return name in self.patch

    def __call__(self, name: str, value: Tensor) -> Tensor:
        if name in self.patch:
            value = _replace(name, value, self.patch[name])
        if name in self.record:
            if self.retain_grad and value.requires_grad:
                value.retain_grad()
            self.cache[name] = value
        return value


NO_SITES = Sites()


def _replace(name: str, value: Tensor, patch: Patch) -> Tensor:
    new = patch(value) if callable(patch) else patch
    if not isinstance(new, Tensor):
        raise ActivationError(f"patch[{name!r}]: expected a tensor (or a function returning one), got "
                              f"{type(new).__name__}")
    if new.shape != value.shape:
        if new.shape[1:] == value.shape[1:] and new.shape[0] == 1 and not callable(patch):
            new = new.expand_as(value)
        else:
            raise ActivationError(f"patch[{name!r}]: shape {tuple(new.shape)} does not fit the site's "
                                  f"{tuple(value.shape)}")
    return new.to(device=value.device, dtype=value.dtype)


def block_of(name: str) -> int | None:
    """The block index of a ``blocks.{i}.*`` name, else None."""
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None
