"""What a caller may use of a language model: one declared interface, :class:`LanguageModel`.

Three classes implement it explicitly: :class:`~qtg.model.model.QTG`, its
:class:`~qtg.model.baseline.Baseline`, and :class:`~qtg.distributed.lockstep.Lockstep` (rank 0's handle on a
model sharded over several processes). Code outside :mod:`qtg.model` (the engine, the experiments, the
topology views, the app) takes a ``LanguageModel`` and uses these members only: it never reaches into a
model's modules (``.embed``, ``.topo``, ``.blocks``) nor asks a model what it has with ``hasattr``. What
differs between models is declared: ``has_topofilter`` (QTG's TopoFilter scores exist) and ``keeps_cache``
(the model decodes with a :class:`~qtg.model.model.QTGCache`; a lockstep model re-runs the sequence).

Shapes: B batch, N tokens, P earlier tokens, V vocabulary, 2d the real width, H heads, d_h = d / H.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor, nn

if TYPE_CHECKING:  # annotations only: the protocol imports nothing that imports a model
    from qtg.model.activations import Names
    from qtg.model.cache import QTGCache
    from qtg.model.config import QTGConfig
    from qtg.model.decoder import QTGOutput
    from qtg.model.intervention import Intervention
    from qtg.model.topo_filter import TopoScores


@runtime_checkable
class LanguageModel(Protocol):
    """A decoder language model as its callers see it.

    Attributes:
        cfg: its configuration.
        arch: ``"qtg"`` or ``"baseline"``.
        has_topofilter: True when :meth:`embed_points` and :meth:`topo_scores` answer (QTG); they raise
            otherwise.
        keeps_cache: True when ``cache=`` (incremental decoding) is accepted; False for a lockstep model.
        state_names: the names of the states ``forward(..., return_internals=True).states`` holds, in order
            (blocks numbered from 0: ``block 0`` is the first block's output).
        tokenizer: the tokenizer the weights were trained with, or None.
        checkpoint_dir: the checkpoint the weights came from, or None.
        random_weights: True until trained weights are loaded.
        training: whether it is in training mode.
    """

    cfg: QTGConfig
    arch: str
    has_topofilter: bool
    keeps_cache: bool
    tokenizer: Any
    checkpoint_dir: Path | None
    random_weights: bool
    training: bool

    @property
    def state_names(self) -> list[str]: ...

    def __call__(self, ids: Tensor, targets: Tensor | None = None, return_internals: bool = False,
                 cache: QTGCache | None = None, *, intervene: Intervention | None = None,
                 map_blocks: Collection[int] | None = None) -> QTGOutput:
        """The forward pass (:meth:`qtg.model.model.QTG.forward`)."""
        ...

    def run_with_cache(self, ids: Tensor, names: Names = None, *, intervene: Intervention | None = None,
                       retain_grad: bool = False, **kwargs: Any) -> tuple[QTGOutput, dict[str, Tensor]]:
        """One forward that also returns its named activations (:mod:`qtg.model.activations`)."""
        ...

    def check_forward_args(self, intervene: Intervention | None,
                           map_blocks: Collection[int] | None) -> Intervention:
        """The call's intervention (default: none), checked against this model; ``map_blocks`` in range."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    # --- the TopoFilter, per token (the live view, the engine's scores) ----------------------------
    def embed_points(self, ids: Tensor) -> Tensor:
        """The QEmbed states ``[B, N, 2d]`` of ``ids`` ``[B, N]``: the points the TopoFilter measures."""
        ...

    def topo_scores(self, points: Tensor, past: Tensor | None = None, intervene: Intervention | None = None, *,
                    ids: Tensor | None = None, past_ids: Tensor | None = None,
                    lengths: Tensor | None = None) -> TopoScores:
        """s~, s and w ``[B, N]`` of the tokens whose QEmbed states are ``points`` ``[B, N, 2d]``, after the
        earlier states ``past`` ``[B, P, 2d]`` (ids, ragged ``lengths`` as :class:`~qtg.model.topo_filter.
        TopoFilter`'s forward takes them), at the call's intervention."""
        ...

    # --- the residual stream's read-out (direct logit attribution, the lens) -----------------------
    def unembedding(self) -> Tensor:
        """The tied output head ``[V, 2d]``: logits = final_norm(x) @ unembedding().T."""
        ...

    def final_norm(self, x: Tensor) -> Tensor:
        """The final RMSNorm applied to a state ``[..., 2d]``."""
        ...

    def final_scale(self, x: Tensor) -> Tensor:
        """The final RMSNorm as a per-token linear map ``[..., 2d]``: final_norm(x) = x * final_scale(x)."""
        ...

    def head_writers(self, layer: int) -> Tensor:
        """Block ``layer``'s W_o cut by head ``[H, 2d, d_h]``."""
        ...

    def attention_projection(self, layer: int, which: str, x: Tensor) -> Tensor:
        """Block ``layer``'s query (``which="queries"``) or key (``"keys"``) projection of its normed input
        ``x`` ``[B, N, 2d]``: ``[B, N, H d_h]``."""
        ...
