"""Checkpoints (qtg.model.checkpoint): exact round trips, no pickles, every bad file named,
crash-safe writes (SIGKILL mid-save) and qtg.load's resolution of tiers and directories."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

import qtg
from qtg.atomic import atomic_path, atomic_safetensors, atomic_text
from qtg.errors import CheckpointError
from qtg.model import builder, checkpoint, loading, tiers
from qtg.model.checkpoint import read_state, save_checkpoint
from qtg.model.loading import load_checkpoint
from tests.conftest import word_tokenizer


@pytest.fixture(scope="module")
def model() -> qtg.QTG:
    return qtg.build("micro", seed=7).eval()


@pytest.fixture
def saved(model, tmp_path) -> Path:
    return save_checkpoint(model, tmp_path / "ckpt", extra_state={"step": 12, "loss": 3.5})


def _logits(m: qtg.QTG, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(ids).logits


# --- round trip ----------------------------------------------------------------------


def test_round_trip_gives_identical_logits_state_and_tokenizer(model, ids, tmp_path):
    model.tokenizer = word_tokenizer()
    try:
        save_checkpoint(model, tmp_path / "ckpt", extra_state={"step": 12, "lr": [1e-3, 5e-4]})
    finally:
        model.tokenizer = None
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert loaded.cfg == model.cfg and not loaded.training and loaded.random_weights is False
    assert read_state(tmp_path / "ckpt") == {"step": 12, "lr": [1e-3, 5e-4]}
    assert loaded.tokenizer.encode("<5> <17>").ids == [5, 17]
    assert qtg.load(tmp_path / "ckpt").cfg == model.cfg  # qtg.load takes the same directory


def test_dtype_is_kept_or_converted(model, ids, tmp_path):
    bf16 = qtg.build("micro", seed=7, dtype="bf16")
    save_checkpoint(bf16, tmp_path / "bf16")
    assert load_checkpoint(tmp_path / "bf16", dtype="bf16").embed.table.weight.dtype == torch.bfloat16
    # 16-bit storage computes in float32 on a CPU unless asked otherwise, with the stored values exactly
    as_stored = load_checkpoint(tmp_path / "bf16")
    assert {p.dtype for p in as_stored.parameters()} == {torch.float32}
    assert all(torch.equal(a.float(), b) for a, b in zip(bf16.state_dict().values(), as_stored.state_dict().values()))
    save_checkpoint(model, tmp_path / "fp32")
    as_bf16 = load_checkpoint(tmp_path / "fp32", dtype="bf16")
    assert {p.dtype for p in as_bf16.parameters()} == {torch.bfloat16}


class _FloatAllocations(TorchFunctionMode):
    """Records the dtype of every floating-point CPU tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_floating_point():
                self.dtypes.add(t.dtype)
        return out


def test_a_bf16_load_never_materialises_float32_weights(tmp_path):
    """Loading is checked against 16-bit bytes, so it must allocate 16-bit weights only (cast on ``meta`` first)."""
    save_checkpoint(qtg.build("micro", seed=7, dtype="bf16"), tmp_path / "bf16")
    with _FloatAllocations() as seen:
        loaded = load_checkpoint(tmp_path / "bf16", dtype="bf16")
    assert loaded.embed.table.weight.dtype == torch.bfloat16
    assert seen.dtypes == {torch.bfloat16}, seen.dtypes


def test_export_stores_a_checkpoint_in_16_bits_under_a_new_name(model, ids, tmp_path, capsys):
    """``qtg export --dtype bf16 --name``: half the bytes, the same weights to bf16 rounding, the new name."""
    from qtg.cli import main

    save_checkpoint(model, tmp_path / "fp32", extra_state={"step": 7})
    assert main(["export", str(tmp_path / "fp32"), "--out", str(tmp_path / "small"), "--dtype", "bf16",
                 "--name", "micro-small"]) == 0
    small = load_checkpoint(tmp_path / "small")
    assert small.cfg.name == "micro-small" and read_state(tmp_path / "small")["step"] == 7
    for a, b in zip(model.state_dict().values(), small.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16).float(), b)
    size = (tmp_path / "small" / "model.safetensors").stat().st_size
    assert size < 0.55 * (tmp_path / "fp32" / "model.safetensors").stat().st_size
    assert main(["export", "micro", "--out", str(tmp_path / "none")]) != 0
    assert "nothing to export" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_files_are_safetensors_and_json_with_the_tied_head_stored_once(saved, model):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors", "state.json"]
    raw = (saved / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # safetensors: u64 length, JSON header, raw bytes
    names = set(header) - {"__metadata__"}
    assert names == set(model.state_dict()) and not any("head" in n for n in names)
    stored = sum(torch.Size(header[n]["shape"]).numel() for n in names)
    assert stored == qtg.count_params("micro")  # the tied head is not a second copy of the table
    assert len(raw) == 8 + header_len + 4 * stored
    assert json.loads((saved / "config.json").read_text()) == model.cfg.to_dict()


# --- pickles are refused, never opened -------------------------------------------------


@pytest.fixture
def no_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def test_a_pickle_in_place_of_the_safetensors_file_is_refused(saved, model, no_torch_load):
    torch.save(model.state_dict(), saved / "model.safetensors")
    message = r"model\.safetensors: is a torch\.save/pickle file.*pickles are not loaded"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(saved)


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin", "weights.ckpt"])
def test_pickle_paths_are_refused(model, tmp_path, no_torch_load, name):
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    for loader in (load_checkpoint, qtg.load):
        with pytest.raises(CheckpointError, match=f"{name}: a .* file is a pickle; pickles are not loaded"):
            loader(path)
    with pytest.raises(CheckpointError, match=f"holds {name} but no model.safetensors; pickles are not loaded"):
        load_checkpoint(tmp_path)


# --- every bad file is named --------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("damage, message", [
    (lambda p: _truncate(p / "model.safetensors"), r"model\.safetensors: corrupt or truncated safetensors"),
    (lambda p: (p / "model.safetensors").write_bytes(b""), r"model\.safetensors: corrupt or truncated"),
    (lambda p: (p / "model.safetensors").unlink(), r"model\.safetensors: missing"),
    (lambda p: (p / "config.json").unlink(), r"config\.json: missing"),
    (lambda p: (p / "config.json").write_text("{not json"), r"config\.json: not valid JSON"),
    (lambda p: (p / "config.json").write_text("[1, 2]"), r"config\.json: expected a JSON object"),
    (lambda p: _edit_config(p, flux_capacitor=1), r"config\.json: unknown config field\(s\): flux_capacitor"),
    (lambda p: _edit_config(p, n_heads=3), r"config\.json: .*divisible by n_heads"),
    (lambda p: _edit_config(p, vocab_size=256),
     r"model\.safetensors: tensor 'embed\.table\.weight' has shape \(512, 128\), config\.json needs \(256, 128\)"),
    (lambda p: _edit_config(p, n_layers=3), r"model\.safetensors: missing 9 tensor\(s\) .*blocks\.2\."),
    (lambda p: (p / "tokenizer.json").write_text("{}"), r"tokenizer\.json: not a valid tokenizer"),
], ids=["truncated", "empty", "no-model", "no-config", "bad-json", "not-object", "unknown-field", "invalid-value",
        "shape", "missing-tensors", "bad-tokenizer"])
def test_damaged_checkpoints_name_the_file(saved, damage, message):
    damage(saved)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(saved)


def test_non_finite_weights_are_refused(model, tmp_path):
    bad = qtg.build("micro", seed=7)
    with torch.no_grad():
        bad.blocks[1].attn.wq.weight[3, 4] = float("nan")
    save_checkpoint(bad, tmp_path / "nan")
    message = r"model\.safetensors: tensor 'blocks\.1\.attn\.wq\.weight' holds non-finite"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "nan")


def test_missing_directory_and_bad_requests(model, tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: no such checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="state.json: cannot be written as JSON"):
        save_checkpoint(model, tmp_path / "x", extra_state={"when": object()})
    assert not (tmp_path / "x").exists()  # refused before the disk was touched
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to save a checkpoint over .*notes: it exists and is not a"):
        save_checkpoint(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


# --- crash safety -----------------------------------------------------------------------------


def test_an_interrupted_swap_falls_back_to_the_previous_checkpoint(model, ids, saved, caplog):
    # The one moment a kill leaves no `ckpt`: after `ckpt -> .ckpt.old`, before `tmp -> ckpt`.
    old = saved.with_name(".ckpt.old")
    os.rename(saved, old)
    (saved.parent / ".ckpt.tmp-dead").mkdir()  # a half-written temp dir of the killed writer
    with caplog.at_level("WARNING", logger="qtg"):
        assert torch.equal(_logits(load_checkpoint(saved), ids), _logits(model, ids))
    assert "save was interrupted" in caplog.text
    save_checkpoint(model, saved, extra_state={"step": 13})  # the next save restores, cleans and replaces
    assert read_state(saved) == {"step": 13}
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


def _save_forever(models: list[qtg.QTG], target: Path, ready: int) -> None:
    """The forked saver: alternate between two models' weights until killed."""
    try:
        for i in range(1_000_000):
            save_checkpoint(models[i % 2], target, extra_state={"i": i})
            if i == 0:
                os.write(ready, b"1")
    finally:
        os._exit(1)  # never return into pytest


def test_an_atomic_write_replaces_the_whole_file_or_nothing(tmp_path):
    target = atomic_text(tmp_path / "latest", "step_000005\n")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:  # killed halfway through a write
        tmp.write_text("step_0000")
        raise KeyboardInterrupt
    assert target.read_text() == "step_000005\n" and os.listdir(tmp_path) == ["latest"]  # no stray temp file
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # the umask's mode, as open() gives
    atomic_safetensors({"w": torch.arange(3.0)}, tmp_path / "w.safetensors")
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.arange(3.0))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_during_repeated_saves_leaves_a_loadable_checkpoint(model, tmp_path):
    # A forked child (torch already imported: no interpreter start per kill)
    # saves in a loop; SIGKILL lands at a random moment of a save cycle.
    # The child only writes files (no parallel tensor math), so fork is safe here.
    target = tmp_path / "ckpt"
    models = [model, qtg.build("micro", seed=8)]
    probe = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    delays = []
    for _ in range(8):  # a naive in-place writer tears ~1 kill in 4: caught with p ~ 0.9
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _save_forever(models, target, write_end)
        os.close(write_end)
        try:
            ready, _, _ = select.select([read_end], [], [], 30)
            assert ready and os.read(read_end, 1) == b"1", "the saver did not start"
            delays.append(round(random.uniform(0.0, 0.2), 3))
            time.sleep(delays[-1])
        finally:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            os.close(read_end)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        loaded = load_checkpoint(target)  # whatever moment the writer died at; the next round reuses it
        assert torch.isfinite(_logits(loaded, probe)).all(), f"killed after {delays} s"
        assert isinstance(read_state(target)["i"], int)


# --- qtg.load: names and directories ------------------------------------------------------------


def test_load_resolves_tiers_checkpoints_and_training_directories(model, ids, tmp_path, monkeypatch, caplog):
    with caplog.at_level("WARNING", logger="qtg"):
        random_micro = qtg.load("micro")
    assert random_micro.random_weights is True and "RANDOM weights" in caplog.text

    monkeypatch.setattr(loading, "SHIPPED_DIR", tmp_path / "shipped")
    save_checkpoint(model, tmp_path / "shipped" / "micro")
    shipped = qtg.load("MICRO")
    assert shipped.random_weights is False and torch.equal(_logits(shipped, ids), _logits(model, ids))

    run = tmp_path / "run"
    save_checkpoint(qtg.build("micro", seed=1), run / "step_000010")
    save_checkpoint(model, run / "step_000020")
    (run / "latest").write_text("step_000020\n")
    assert torch.equal(_logits(qtg.load(run), ids), _logits(model, ids))
    (run / "latest").unlink()
    save_checkpoint(model, run / "latest")  # `latest` as a directory
    assert qtg.load(run).checkpoint_dir == run / "latest"

    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "latest").write_text("step_000099")
    with pytest.raises(CheckpointError, match=r"latest: names 'step_000099', but .* is not a checkpoint"):
        qtg.load(tmp_path / "run2")
    message = r"cannot load 'gpt5': .*not a checkpoint directory.*'latest'.*tier \(micro, nano"
    with pytest.raises(CheckpointError, match=message):
        qtg.load("gpt5")


def _spy(monkeypatch, module, name: str, counts: list, when=lambda *args: True) -> None:
    """Count the calls of ``module.name`` made through any qtg module that imported it (``from m import f``
    binds the function in the importer, so each binding is wrapped)."""
    import sys

    real = getattr(module, name)

    def spy(*args, **kwargs):
        if when(*args):
            counts.append(name)
        return real(*args, **kwargs)

    for mod in [m for key, m in sys.modules.items() if key == "qtg" or key.startswith("qtg.")]:
        if getattr(mod, name, None) is real:
            monkeypatch.setattr(mod, name, spy)


@pytest.mark.parametrize("name", ["nano", "micro", "a checkpoint directory"])
def test_one_load_resolves_the_name_once_and_checks_the_fit_once(model, tmp_path, monkeypatch, name):
    """qtg.load in one pass (issue 25): one name -> config (a tier's preset or a config.json), one fit check."""
    target = save_checkpoint(model, tmp_path / "ckpt") if name == "a checkpoint directory" else name
    resolutions, fits = [], []
    _spy(monkeypatch, tiers, "get_tier", resolutions)
    _spy(monkeypatch, tiers, "resolve_config", resolutions, when=lambda tier, *_: isinstance(tier, str))
    _spy(monkeypatch, checkpoint, "read_config", resolutions)
    _spy(monkeypatch, builder, "check_fits", fits)
    loaded = qtg.load(target)
    assert len(resolutions) == 1, resolutions
    assert fits == ["check_fits"]
    assert loaded.random_weights is (name == "micro")  # nano is shipped, micro is not: both paths are counted
