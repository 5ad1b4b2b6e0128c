"""Shared fixtures and helpers: tiny presets built once per session, generated works, the CLI.

Helpers (not fixtures) are imported by name: ``from tests.conftest import run_qtg``.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import qtg
from qtg.data.tokenizer import save_tokenizer, train_tokenizer
from qtg.model.checkpoint import save_checkpoint

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
    tok = train_tokenizer([SAMPLE_TEXT], vocab_size=400)
    model = qtg.build("micro", seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "micro", tokenizer_json=tok.to_str())


# --- one intra-op thread ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.

    micro/nano matrices are too small to gain from a second thread, and on a shared 2-core machine
    a spinning OpenMP thread that another process has descheduled stalls every op.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- generated works and their tokenizer (training tests) --------------------------------------

WORDS = ("the king doth wake tonight and takes his rouse keeps wassail swaggering upspring reels while "
         "drains draughts of rhenish down kettle drum trumpet bray out triumph pledge").split()


def write_works(d: Path, n_lines: int = 300, n_works: int = 3) -> Path:
    """``n_works`` generated 'works' (``work0.txt`` ...) of ``n_lines`` lines (~27 bytes each) in ``d``."""
    for i in range(n_works):
        r = random.Random(i)
        lines = [" ".join(r.choice(WORDS) for _ in range(r.randint(4, 12))).capitalize() + "." for _ in range(n_lines)]
        (d / f"work{i}.txt").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Three generated 'works' of ~8 KB (``work0.txt`` ...): a whole-work split gives one to validation."""
    return write_works(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="session")
def tokenizer_file(data_dir, tmp_path_factory) -> Path:
    """A 512-token BPE trained on ``data_dir``, saved as JSON."""
    tok = train_tokenizer(sorted(data_dir.glob("*.txt")), 512)
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tok.json")


def word_tokenizer(n: int = 512) -> Tokenizer:
    """A word-level tokenizer in which token i is the word ``<i>`` (words are split on whitespace)."""
    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(n)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


# --- the command line ----------------------------------------------------------------------------

QTG_BIN = Path(sys.executable).parent / "qtg"


def run_qtg(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``qtg ARGS...`` in a subprocess (the installed script, else ``python -m qtg``), output captured as text."""
    exe = [str(QTG_BIN)] if QTG_BIN.exists() else [sys.executable, "-m", "qtg"]
    return subprocess.run(exe + list(args), capture_output=True, text=True, timeout=timeout)


# --- the browser harness (tests/browser.py): one app server and one Chromium page per session ---

from tests.browser import app_url, page, shots  # noqa: E402, F401
