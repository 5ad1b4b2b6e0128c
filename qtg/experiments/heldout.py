"""The works a model never trained on, and what it predicts after a whole text, with and without an intervention.

``heldout_documents(model)`` is the test (or validation) split of the bundled
corpus as the model's own training split it: whole works by bytes, with the
fractions and seed its checkpoint recorded (``state.json``), or those of the
shipped configs (``configs/nano.yaml``: validation and test a tenth each,
seed 0) for a model that recorded none.

``next_token(model, ids, intervene)`` is the distribution of the token *after*
the last one, p before (the unmodified model) and q after (under the
intervention), compared as :mod:`qtg.experiments.compare` compares each
position: KL(p || q) and TV(p, q). (:class:`~qtg.experiments.TextComparison`
holds the distributions of the tokens *in* the text, the last one included.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qtg.data.documents import Document, default_corpus_path
from qtg.data.pipeline import split_documents
from qtg.experiments.corpus import read_documents
from qtg.experiments.errors import ExperimentError
from qtg.model.checkpoint import read_state
from qtg.model.decoder import check_ids
from qtg.model.intervention import Intervention
from qtg.model.protocol import LanguageModel

# configs/nano.yaml and configs/nano-baseline.yaml: validation and test tenths of the bytes, split seed 0
SHIPPED_SPLIT = {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 0}
SPLITS = ("train", "val", "test")


def recorded_split(model: LanguageModel) -> dict[str, float | int]:
    """The split the model's checkpoint recorded (``train_config.data``), else the shipped configs'."""
    state = read_state(model.checkpoint_dir) if model.checkpoint_dir else None
    data = ((state or {}).get("train_config") or {}).get("data") or {}
    if data.get("test_fraction"):
        return {"val_fraction": float(data.get("val_fraction", SHIPPED_SPLIT["val_fraction"])),
                "test_fraction": float(data["test_fraction"]), "seed": int(data.get("split_seed", 0))}
    return dict(SHIPPED_SPLIT)


def heldout_documents(model: LanguageModel, split: str = "test",
                      data: str | os.PathLike | None = None) -> list[Document]:
    """The ``split`` works of ``data`` (default the bundled corpus), split as the model's training split them.

    Raises:
        ExperimentError: an unknown split, or a split that holds no work.
    """
    if split not in SPLITS:
        raise ExperimentError(f"split must be one of {SPLITS}, got {split!r}")
    source = default_corpus_path() if data is None else data
    docs = getattr(split_documents(read_documents(source), **recorded_split(model)), split)
    if not docs:
        raise ExperimentError(f"split {split!r} of {source} holds no work")
    return docs


@dataclass
class NextToken:
    """The next-token distribution after the whole text, before and after an intervention."""

    intervention: str
    before: Tensor  # [V] log-probabilities, the unmodified model
    after: Tensor  # [V] log-probabilities under the intervention

    @property
    def kl(self) -> float:
        """KL(before || after) in nats."""
        return float((self.before.exp() * (self.before - self.after)).sum())

    @property
    def total_variation(self) -> float:
        return float(0.5 * (self.before.exp() - self.after.exp()).abs().sum())

    def top(self, k: int = 10) -> list[tuple[int, float, float]]:
        """(id, p before, p after) of the tokens in either side's top k, most likely before first."""
        ids = torch.cat([self.before.topk(k).indices, self.after.topk(k).indices]).unique()
        ids = ids[self.before[ids].argsort(descending=True)]
        return [(int(i), float(self.before[i].exp()), float(self.after[i].exp())) for i in ids]


@torch.inference_mode()
def next_token(model: LanguageModel, ids: Tensor | list[int], intervene: Intervention) -> NextToken:
    """The distribution of the token after ``ids``, with and without ``intervene``.

    Args:
        ids: ``[N]`` or ``[1, N]`` token ids, at most the model's context.
        intervene: checked against the model before any work.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ExperimentError(f"ids must be one sequence of at least 1 token, got shape {tuple(ids.shape)}")
    if ids.shape[1] > model.cfg.max_seq_len:
        raise ExperimentError(f"ids: {ids.shape[1]} tokens is above the model's context {model.cfg.max_seq_len}")
    check_ids(ids, model.cfg.vocab_size)
    intervene.check(model)
    ids = ids.to(next(model.parameters()).device)
    before, after = (F.log_softmax(model(ids, intervene=iv).logits[0, -1].float(), dim=-1).cpu()
                     for iv in (None, intervene))
    return NextToken(intervention=intervene.name, before=before, after=after)
