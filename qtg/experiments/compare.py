"""One text, with and without an intervention: what changes, token by token.

The text is scored as ``qtg.training.evaluate`` scores a document, ``[EOS] + encode(text)``,
so every byte is paid for and the bits per byte are those ``qtg eval`` gives on
that text alone. At each position i the model's next-token distribution before
(p, the unmodified model) and after (q, under the intervention) are compared by

    KL(p || q) = sum_v p_v (log p_v - log q_v)      TV(p, q) = 1/2 sum_v |p_v - q_v|

and each predicted token's loss changes by  -log q(y) - (-log p(y)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qtg.data.tokenizer import encode, eos_id, token_strings
from qtg.experiments.errors import ExperimentError
from qtg.metrics import bits_per_byte
from qtg.model.decoder import check_ids
from qtg.model.intervention import Intervention
from qtg.model.protocol import LanguageModel


@dataclass
class Side:
    """One condition's view of the text."""

    log_probs: Tensor  # [N, V] next-token log-probabilities at each input position
    nll: Tensor  # [N] loss of each predicted token, nats

    @property
    def loss(self) -> float:
        return float(self.nll.double().mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@dataclass
class TextComparison:
    """The unmodified model (``before``) against one intervention (``after``) on one text."""

    intervention: str  # the intervention's name
    ids: list[int]  # the N + 1 tokens: inputs are ids[:-1], targets ids[1:]
    before: Side
    after: Side
    n_bytes: int | None  # UTF-8 bytes of the text, when it was given as text

    @property
    def kl(self) -> Tensor:
        """``[N]`` KL(before || after) of the next-token distributions, nats."""
        p = self.before.log_probs
        return (p.exp() * (p - self.after.log_probs)).sum(-1)

    @property
    def total_variation(self) -> Tensor:
        """``[N]`` total variation distance, in [0, 1]."""
        return 0.5 * (self.before.log_probs.exp() - self.after.log_probs.exp()).abs().sum(-1)

    @property
    def delta_loss(self) -> Tensor:
        """``[N]`` per predicted token: loss after minus loss before (positive: the intervention hurts)."""
        return self.after.nll - self.before.nll

    def bits_per_byte(self, side: Side) -> float | None:
        return None if self.n_bytes is None else bits_per_byte(float(side.nll.double().sum()), self.n_bytes)

    def top(self, k: int = 5, position: int = -1) -> dict[str, list[tuple[int, float]]]:
        """The k most likely next tokens at ``position`` (default: after the last token), before and after."""
        out = {}
        for name, side in (("before", self.before), ("after", self.after)):
            values, indices = side.log_probs[position].topk(k)
            out[name] = list(zip(indices.tolist(), values.exp().tolist()))
        return out

    def to_dict(self, tokenizer: Any = None, k: int = 5) -> dict[str, Any]:
        """JSON: the summary figures, the per-position curves and the top-k at the end of the text."""
        summary = {name: {"loss": side.loss, "perplexity": side.perplexity, "bits_per_byte": self.bits_per_byte(side)}
                   for name, side in (("before", self.before), ("after", self.after))}
        top = self.top(k)
        if tokenizer is not None:
            top = {name: [{"id": i, "token": token_strings(tokenizer, [i])[0], "prob": p} for i, p in rows]
                   for name, rows in top.items()}
        return {"intervention": self.intervention, "ids": self.ids,
                "tokens": token_strings(tokenizer, self.ids) if tokenizer is not None else None,
                **summary, "kl": self.kl.tolist(), "total_variation": self.total_variation.tolist(),
                "delta_loss": self.delta_loss.tolist(), "top": top, "n_bytes": self.n_bytes}


def _side(model: LanguageModel, ids: Tensor, intervene: Intervention | None) -> Side:
    logits = model(ids[:, :-1], intervene=intervene).logits[0].float()  # [N, V]
    return Side(log_probs=F.log_softmax(logits, dim=-1), nll=F.cross_entropy(logits, ids[0, 1:], reduction="none"))


@torch.inference_mode()
def compare_ids(model: LanguageModel, ids: Tensor | list[int], intervene: Intervention, n_bytes: int | None = None
                ) -> TextComparison:
    """Score one token sequence with and without ``intervene``.

    Args:
        ids: ``[N + 1]`` token ids (or ``[1, N + 1]``); the first is context only.
        intervene: the intervention; it is checked against the model before any work.
        n_bytes: the bytes the predicted tokens spell, for bits per byte.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ExperimentError(f"ids must be one sequence of at least 2 tokens, got shape {tuple(ids.shape)}")
    if ids.shape[1] - 1 > model.cfg.max_seq_len:
        raise ExperimentError(f"the text is {ids.shape[1] - 1} tokens after the EOS; the model's context is "
                              f"{model.cfg.max_seq_len}: shorten it")
    check_ids(ids, model.cfg.vocab_size)
    intervene.check(model)
    ids = ids.to(next(model.parameters()).device)
    return TextComparison(intervention=intervene.name, ids=ids[0].tolist(), before=_side(model, ids, None),
                          after=_side(model, ids, intervene), n_bytes=n_bytes)


def compare_text(model: LanguageModel, text: str, intervene: Intervention, *, tokenizer: Any = None) -> TextComparison:
    """Score ``text`` (as ``[EOS] + encode(text)``) with and without ``intervene``; see :func:`compare_ids`."""
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is None:
        raise ExperimentError("this model has no tokenizer: pass tokenizer= or load a trained checkpoint")
    if not text:
        raise ExperimentError("text is empty: give at least one character")
    ids = [eos_id(tokenizer)] + encode(tokenizer, text)
    return compare_ids(model, ids, intervene, n_bytes=len(text.encode("utf-8")))
