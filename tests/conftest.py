"""Shared fixtures: tiny presets, built once per session."""

from __future__ import annotations

import pytest
import torch

import qtg

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU tests run only where a GPU is present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def micro_cfg() -> qtg.QTGConfig:
    return qtg.get_tier("micro")


@pytest.fixture(scope="session")
def micro(micro_cfg) -> qtg.QTG:
    """A randomly initialised micro model in eval mode (do not modify in tests)."""
    return qtg.build(micro_cfg, seed=0).eval()


@pytest.fixture(scope="session")
def micro_flex(micro_cfg, micro) -> qtg.QTG:
    """The same weights as ``micro``, attention through flex_attention."""
    model = qtg.build(micro_cfg.replace(attn_impl="flex"), seed=0).eval()
    model.load_state_dict(micro.state_dict())
    return model


@pytest.fixture
def ids() -> torch.Tensor:
    """A fixed batch of token ids [2, 64] with repeats (duplicates in TopoFilter)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, 512, (2, 64), generator=g)
    x[:, 10] = x[:, 3]  # a repeated token
    return x


SAMPLE_TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak.\n"
    "First Citizen: You are all resolved rather to die than to famish?\n"
    "All: Resolved. resolved.\n"
) * 8


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A micro checkpoint carrying a small BPE tokenizer (random weights), saved as a user would."""
    from qtg.checkpoint import save_checkpoint
    from qtg.tokenizer import train_tokenizer

    tok = train_tokenizer([SAMPLE_TEXT], vocab_size=400)
    model = qtg.build("micro", seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "micro", tokenizer_json=tok.to_str())
