"""nnsight on a QTG model: reading a module's output inside a trace, and an edit there equal to a patch."""

from __future__ import annotations

import nnsight  # the test extra installs it (pyproject.toml)
import pytest
import torch

import qtg


@pytest.fixture(scope="module")
def nano_ids():
    model = qtg.load("nano").eval()
    return model, torch.randint(0, model.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))


def test_nnsight_reads_the_same_values_as_run_with_cache(nano_ids):
    model, ids = nano_ids
    traced = nnsight.NNsight(model)
    with torch.no_grad():
        with traced.trace(ids):
            w = traced.topo.output.weights.save()  # modules in the order the pass reaches them
            mlp = traced.blocks[1].ffn.output.save()
            logits = traced.output.logits.save()
        out, cache = model.run_with_cache(ids, ["blocks.1.mlp.out", "topo.w"])
    assert torch.equal(mlp, cache["blocks.1.mlp.out"]) and torch.equal(w, cache["topo.w"])
    assert torch.equal(logits, out.logits)


def test_an_edit_in_a_trace_equals_the_same_patch(nano_ids):
    model, ids = nano_ids
    traced = nnsight.NNsight(model)
    with torch.no_grad():
        with traced.trace(ids):
            traced.blocks[2].ffn.output[:, 5:] = 0
            edited = traced.output.logits.save()
        zero_after_5 = qtg.Intervention(patch={"blocks.2.mlp.out": lambda v: torch.cat([v[:, :5], 0 * v[:, 5:]], 1)})
        patched = model(ids, intervene=zero_after_5).logits
        plain = model(ids).logits
    assert torch.equal(edited, patched)
    assert torch.equal(edited[:, :5], plain[:, :5]) and not torch.equal(edited, plain)
