"""The logit lens: what the tied head would predict from every intermediate state.

For each state h_k the model exposes (``model.state_names``: QEmbed, TopoFilter,
block 0..L-1 for QTG; embedding, block 0..L-1 for the baseline), the lens reads

    log p_k = log_softmax(E . RMSNorm_final(h_k))        E: the tied [V, 2d] table

with the model's own final norm and head. The last state is the model's
output, so log p_L is ``log_softmax`` of its logits. How far an early state is
from the answer is KL(p_L || p_k): the nats the final distribution loses when
it is coded with state k's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qtg.data.tokenizer import token_strings
from qtg.experiments.errors import ExperimentError
from qtg.model.decoder import check_ids
from qtg.model.intervention import Intervention
from qtg.model.protocol import LanguageModel


def head_table(model: LanguageModel) -> Tensor:
    """The tied output table ``[V, 2d]`` of a model: its declared ``unembedding()``."""
    return model.unembedding()


def read_out(model: LanguageModel, state: Tensor) -> Tensor:
    """log p = log_softmax(E . norm(h)): the model's final norm and tied head on any state.

    Args:
        state: ``[B, N, 2d]``. Returns: ``[B, N, V]`` float32 log-probabilities.
    """
    return F.log_softmax(F.linear(model.final_norm(state), head_table(model)).float(), dim=-1)


@dataclass
class Lens:
    """Log-probabilities of the tied head read from every state, in the model's state order."""

    state_names: list[str]
    log_probs: list[Tensor]  # per state [B, N, V] float32
    ids: Tensor  # [B, N] the input tokens

    def kl_to_final(self) -> Tensor:
        """``[S, B, N]``: KL(p_final || p_state) in nats (0 for the last state)."""
        final = self.log_probs[-1]
        p = final.exp()
        return torch.stack([(p * (final - lp)).sum(-1) for lp in self.log_probs])

    def top(self, k: int = 5) -> tuple[Tensor, Tensor]:
        """Each state's k most likely next tokens per position: probabilities and ids, ``[S, B, N, k]`` each."""
        if not 1 <= k <= self.log_probs[0].shape[-1]:
            raise ExperimentError(f"k must lie in 1..{self.log_probs[0].shape[-1]}, got {k}")
        values, indices = torch.stack(self.log_probs).topk(k, dim=-1)
        return values.exp(), indices

    def to_dict(self, tokenizer: Any = None, k: int = 5, batch: int = 0) -> dict[str, Any]:
        """One sequence of the batch as JSON: per state and position the top-k tokens, their
        probabilities and the KL to the final state; token strings when a tokenizer is given."""
        probs, ids = self.top(k)
        kl = self.kl_to_final()
        states = []
        for s, name in enumerate(self.state_names):
            top_ids = ids[s, batch].tolist()  # [N][k]
            states.append({"name": name, "top_ids": top_ids, "top_probs": probs[s, batch].tolist(),
                           "top_tokens": _labels(tokenizer, top_ids), "kl_to_final": kl[s, batch].tolist()})
        inputs = self.ids[batch].tolist()
        return {"input_ids": inputs, "input_tokens": _labels(tokenizer, [inputs])[0] if tokenizer else None,
                "states": states}


def _labels(tokenizer: Any, rows: list[list[int]]) -> list[list[str]] | None:
    """Token strings for each row of ids, or None without a tokenizer."""
    return None if tokenizer is None else [token_strings(tokenizer, row) for row in rows]


@torch.inference_mode()
def logit_lens(model: LanguageModel, ids: Tensor, *, intervene: Intervention | None = None) -> Lens:
    """The tied head's log-probabilities after the final norm, from every state of one forward pass.

    Args:
        model: a QTG or baseline model.
        ids: token ids ``[B, N]`` (``[N]`` is read as one sequence).
        intervene: run the forward pass under this intervention.

    Returns:
        :class:`Lens`: ``log_probs[k]`` is ``[B, N, V]`` for ``model.state_names[k]``; the last equals
        ``log_softmax(model(ids).logits)``.
    """
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    check_ids(ids, model.cfg.vocab_size)
    ids = ids.to(next(model.parameters()).device)
    out = model(ids, return_internals=True, map_blocks=(), intervene=intervene)
    names = list(model.state_names)
    if len(out.states) != len(names):
        raise ExperimentError(f"the model returned {len(out.states)} states but declares {len(names)} names")
    return Lens(state_names=names, log_probs=[read_out(model, h) for h in out.states], ids=ids.cpu())
