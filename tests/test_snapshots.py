"""Training snapshots (qtg.training.snapshots) and the topology-over-training analysis (qtg.topology.training).

Snapshots are written atomically at the steps asked for, 16-bit ones load and equal the float32 weights
rounded to bf16, a resumed run continues the series bit for bit, and the analysis equals the library's own
calls and is read back from its cache instead of being recomputed. Runs are the micro tier on generated
text (see tests/test_train.py), a few steps each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import qtg.atomic
import qtg.topology.training as tt
import qtg.training.snapshots
from qtg.cli.train import config_from_args
from qtg.errors import CheckpointError, ConfigError
from qtg.metrics import attention_stats
from qtg.model.loading import load_checkpoint
from qtg.topology import approx_view, attention_graph, compare, exact_diagrams
from qtg.training.snapshots import list_snapshots, load_snapshot, read_metadata, snapshot_path
from qtg.training.train import TrainConfig, train
from tests.test_train import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")  # data_dir and tokenizer_file come from conftest
PROBE = "The king doth wake tonight and takes his rouse. Keeps wassail and the swaggering upspring reels."


def snap_config(out: Path, data_dir: Path, tokenizer_file: Path, steps: int, every: int | None = 4,
                dtype: str = "bfloat16", **training) -> TrainConfig:
    cfg = micro_config(out, data_dir, tokenizer_file, steps, **training)
    cfg.checkpoint.snapshot_every, cfg.checkpoint.snapshot_dtype = every, dtype
    cfg.logging.sample_tokens = 0
    return cfg


@pytest.fixture(scope="module")
def run_a(data_dir, tokenizer_file, tmp_path_factory) -> Path:
    """12 uninterrupted steps, a bf16 snapshot every 4."""
    out = tmp_path_factory.mktemp("run_a")
    train(snap_config(out, data_dir, tokenizer_file, 12))
    return out


# --- writing ----------------------------------------------------------------------------------------


def test_snapshots_are_written_atomically_at_every_kth_step_and_the_last(data_dir, tokenizer_file, tmp_path,
                                                                         monkeypatch):
    written = []
    real = qtg.training.snapshots.atomic_safetensors
    monkeypatch.setattr(qtg.training.snapshots, "atomic_safetensors",
                        lambda t, p, metadata=None: written.append(Path(p).name) or real(t, p, metadata))
    train(snap_config(tmp_path, data_dir, tokenizer_file, 10, every=4))
    assert [s.step for s in list_snapshots(tmp_path)] == [0, 4, 8, 10]  # every 4th, step 0, and the last
    assert written == [f"step_{s:06d}.safetensors" for s in (0, 4, 8, 10)]  # each through the atomic writer
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == written  # no temporary file left
    meta = read_metadata(snapshot_path(tmp_path, 8))
    assert meta["step"] == 8 and meta["dtype"] == "bfloat16" and meta["config"].name == "micro"
    assert meta["tokenizer"] == "tokenizer.json"


def test_a_write_that_fails_leaves_no_snapshot_and_no_temporary_file(micro, tmp_path, monkeypatch):
    def torn(tensors, path, metadata=None):  # the process dies halfway through the file
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(qtg.atomic, "save_file", torn)
    with pytest.raises(OSError, match="disk full"):
        snapshots = qtg.training.snapshots
        snapshots.write_snapshot(snapshots.snapshot_tensors(micro), micro.cfg, tmp_path, 5, "bfloat16")
    assert list((tmp_path / "snapshots").iterdir()) == []


def test_no_snapshots_unless_asked(data_dir, tokenizer_file, tmp_path):
    assert TrainConfig().checkpoint.snapshot_every is None
    train(snap_config(tmp_path, data_dir, tokenizer_file, 2, every=None))
    assert not (tmp_path / "snapshots").exists() and (tmp_path / "step_000002").is_dir()


@pytest.mark.parametrize("field, value, message", [("snapshot_every", 0, "checkpoint.snapshot_every"),
                                                   ("snapshot_dtype", "int8", "checkpoint.snapshot_dtype")])
def test_bad_snapshot_settings_name_the_field(field, value, message):
    cfg = TrainConfig()
    setattr(cfg.checkpoint, field, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_cli_flags_set_the_snapshot_fields():
    from qtg.cli import build_parser

    args = build_parser().parse_args(["train", "--tier", "micro", "--snapshot-every", "20", "--snapshot-dtype",
                                      "float16", "--seq-len", "64"])
    cfg = config_from_args(args)
    assert (cfg.checkpoint.snapshot_every, cfg.checkpoint.snapshot_dtype, cfg.data.seq_len) == (20, "float16", 64)


# --- reading ----------------------------------------------------------------------------------------


def test_a_bf16_snapshot_loads_as_the_fp32_weights_rounded_to_bf16(run_a):
    snap = load_snapshot(snapshot_path(run_a, 12))
    ckpt = load_checkpoint(run_a / "step_000012")  # the float32 weights at the same step
    assert snap.tokenizer is not None and snap.tokenizer.to_str() == ckpt.tokenizer.to_str()
    for (name, a), (_, b) in zip(snap.state_dict().items(), ckpt.state_dict().items()):
        assert a.dtype == torch.float32
        assert torch.equal(a, b.to(torch.bfloat16).float()), name  # exactly bf16's rounding of the weight
        assert torch.allclose(a, b, rtol=2**-8, atol=0), name
    first = load_snapshot(snapshot_path(run_a, 0))
    assert not torch.equal(first.embed.table.weight, snap.embed.table.weight)  # training moved the weights


def test_a_float32_snapshot_is_the_checkpoint_exactly(data_dir, tokenizer_file, tmp_path):
    train(snap_config(tmp_path, data_dir, tokenizer_file, 3, every=3, dtype="float32"))
    snap, ckpt = load_snapshot(snapshot_path(tmp_path, 3)), load_checkpoint(tmp_path / "step_000003")
    assert all(torch.equal(a, b) for a, b in zip(snap.state_dict().values(), ckpt.state_dict().values()))


def test_a_changed_tokenizer_is_refused(run_a, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_a, copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["added_tokens"] = tok["added_tokens"][:0]
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_snapshot(snapshot_path(copy, 4))


def test_a_resumed_run_continues_the_snapshots_bit_for_bit(run_a, data_dir, tokenizer_file, tmp_path):
    train(snap_config(tmp_path, data_dir, tokenizer_file, 8))
    assert [s.step for s in list_snapshots(tmp_path)] == [0, 4, 8]
    # a killed run can leave a snapshot past its last checkpoint: the resume redoes that step
    shutil.copy(snapshot_path(tmp_path, 8), snapshot_path(tmp_path, 10))
    train(snap_config(tmp_path, data_dir, tokenizer_file, 12, resume=True))
    assert [s.step for s in list_snapshots(tmp_path)] == [0, 4, 8, 12]
    for step in (0, 4, 8, 12):
        a, b = load_file(snapshot_path(run_a, step)), load_file(snapshot_path(tmp_path, step))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


# --- the analysis -----------------------------------------------------------------------------------


def test_the_analysis_equals_the_library_calls(run_a):
    snap = list_snapshots(run_a)[-1]
    got = tt.analyse_snapshot(snap, PROBE, use_cache=False)
    model = load_snapshot(snap.path)
    ids = tt.probe_ids(model, PROBE, 128)
    with torch.no_grad():
        out = model(ids[:, :-1], targets=ids[:, 1:], return_internals=True)
    view = approx_view(out, layer=1, model=model)
    exact = exact_diagrams(view.points, maxdim=1)
    cmp = compare(exact, view)
    assert got.step == 12 and got.n_tokens == ids.shape[1] - 1
    assert got.ce == pytest.approx(float(out.loss_terms["ce"]), rel=1e-6)
    assert got.loss == pytest.approx(float(out.loss), rel=1e-6)
    assert got.bottleneck_h0 == pytest.approx(cmp.bottleneck_h0, rel=1e-9)
    assert got.wasserstein1_h0 == pytest.approx(cmp.wasserstein1_h0, rel=1e-9)
    np.testing.assert_allclose(got.exact_h1, exact.dgms[1])
    np.testing.assert_allclose(got.approx_h0, view.diagram)
    assert got.w_hist == np.histogram(view.weights, bins=tt.W_BINS, range=(0, 1))[0].tolist()
    assert sum(got.w_hist) == got.n_tokens
    for b in range(model.cfg.n_layers):
        np.testing.assert_allclose(got.entropy[b], attention_stats(out.attention[b][0]).entropy.numpy())
        np.testing.assert_allclose(got.gamma[b], out.gamma[b].numpy())
        feats = attention_graph(out.attention[b][0, 1]).features()
        assert got.attention_features[b][1] == {k: pytest.approx(feats[k]) for k in tt.GRAPH_FEATURES}


def test_the_cache_is_read_instead_of_recomputing(run_a, tmp_path, monkeypatch):
    calls = []
    real = tt.compute_analysis
    monkeypatch.setattr(tt, "compute_analysis", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    snaps = list_snapshots(run_a)
    cold = [tt.analyse_snapshot(s, PROBE, cache_dir=tmp_path) for s in snaps]
    assert calls == [0, 4, 8, 12] and not any(a.from_cache for a in cold)
    assert len(list(tmp_path.glob("*.json"))) == 4
    warm = [tt.analyse_snapshot(s, PROBE, cache_dir=tmp_path) for s in snaps]
    assert calls == [0, 4, 8, 12] and all(a.from_cache for a in warm)  # no computation: the files were read
    assert [a.to_dict() for a in warm] == [a.to_dict() for a in cold]
    tt.analyse_snapshot(snaps[1], PROBE + " Again.", cache_dir=tmp_path)  # another probe is another key
    assert calls == [0, 4, 8, 12, 4]


def test_the_default_cache_lives_beside_the_snapshots(run_a):
    runs = tt.analyse_run(run_a, PROBE)
    assert [a.step for a in runs] == [0, 4, 8, 12]
    assert len(list((run_a / "snapshots" / tt.CACHE_SUBDIR).glob("step_*.json"))) == 4
    assert [s.step for s in list_snapshots(run_a)] == [0, 4, 8, 12]  # the cache folder is no snapshot


def test_a_baseline_run_has_no_topology_fields(data_dir, tokenizer_file, tmp_path):
    cfg = snap_config(tmp_path, data_dir, tokenizer_file, 2, every=2)
    cfg.model.overrides = {"arch": "baseline"}
    train(cfg)
    a = tt.analyse_run(tmp_path, PROBE, use_cache=False)[-1]
    assert a.arch == "baseline" and not a.has_topology
    assert a.gamma is None and a.w_hist is None and a.exact_h0 is None and a.bottleneck_h0 is None
    assert len(a.entropy) == 2 and len(a.entropy[0]) == 4 and np.isfinite(a.ce)
