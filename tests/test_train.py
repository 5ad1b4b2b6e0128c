"""Training loop: exact resume, metrics, LR schedule, weight-decay groups, non-finite steps, config errors.

Every run is the micro tier on a few kilobytes of generated text (seq_len 32,
batch 4), so that the whole file stays quick on a 2-core CPU.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qtg
from qtg.cli import main
from qtg.errors import ConfigError, TrainingError
from qtg.model.checkpoint import read_state
from qtg.model.loading import load_checkpoint
from qtg.model.model import QTG
from qtg.training.optim import build_optimizer, lr_at, param_groups
from qtg.training.train import TrainConfig, load_config, train

pytestmark = pytest.mark.usefixtures("one_thread")  # data_dir and tokenizer_file come from conftest

STEP_FIELDS = {"step", "loss", "ce", "topo", "geo", "quantum", "lr", "grad_norm", "tokens_per_s", "skipped"}
VAL_FIELDS = {"step", "val_loss", "val_ppl", "val_bpb"}


def micro_config(out: Path, data_dir: Path, tokenizer_file: Path | None, steps: int, **training) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.tier = "micro"
    cfg.data.path, cfg.data.seq_len, cfg.data.batch_size = str(data_dir), 32, 4
    cfg.data.tokenizer = str(tokenizer_file) if tokenizer_file else None
    t = cfg.training
    t.steps, t.lr, t.min_lr, t.warmup_steps, t.schedule_steps, t.device = steps, 3e-3, 3e-4, 5, 40, "cpu"
    for key, value in training.items():
        setattr(t, key, value)
    cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.keep_last = str(out), 5, 2
    cfg.logging.eval_every, cfg.logging.eval_batches, cfg.logging.sample_tokens = 5, 2, 4
    cfg.logging.progress = False
    return cfg


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def straight(data_dir, tokenizer_file, tmp_path_factory) -> tuple[Path, dict]:
    """20 uninterrupted steps with two batches per update."""
    out = tmp_path_factory.mktemp("straight")
    return out, train(micro_config(out, data_dir, tokenizer_file, 20, grad_accum=2))


# --- resume -----------------------------------------------------------------------------------


def test_stopping_and_resuming_is_bit_identical_to_an_uninterrupted_run(straight, data_dir, tokenizer_file,
                                                                        tmp_path):
    out_a, _ = straight
    out_b = tmp_path / "run"
    first = train(micro_config(out_b, data_dir, tokenizer_file, 10, grad_accum=2))
    assert first["step"] == 10 and (out_b / "latest").read_text().strip() == "step_000010"
    loader_at_10 = read_state(out_b / "step_000010")["loader"]
    # What a killed run leaves past `latest`: metric lines, and a step folder whose trainer state was never
    # written (so `latest` never moved to it). Resuming must drop both.
    with open(out_b / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 11, "loss": 99.0}) + "\n")
    shutil.copytree(out_b / "step_000010", out_b / "step_000025", ignore=shutil.ignore_patterns("trainer.*"))

    second = train(micro_config(out_b, data_dir, tokenizer_file, 20, grad_accum=2, resume=True))
    assert second["start_step"] == 10 and second["step"] == 20
    for name in ("model.safetensors", "trainer.safetensors"):  # weights, Adam moments, RNG states
        a, b = load_file(out_a / "step_000020" / name), load_file(out_b / "step_000020" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps_a, _ = read_metrics(out_a)
    steps_b, _ = read_metrics(out_b)
    assert [r["step"] for r in steps_b] == list(range(1, 21))  # the stale line 11 is gone, none is doubled
    assert sorted(p.name for p in out_b.glob("step_*")) == ["step_000015", "step_000020"]
    assert [r["loss"] for r in steps_a] == [r["loss"] for r in steps_b]
    # the loader really moved on (a loader stuck on one batch would also "resume exactly")
    assert read_state(out_b / "step_000020")["loader"] != loader_at_10
    assert len({r["loss"] for r in steps_b}) == 20


def test_a_run_killed_while_saving_keeps_its_previous_checkpoint(monkeypatch, data_dir, tokenizer_file, tmp_path):
    """Dying after the weights of step 10 but before its trainer state: `latest` still names step 5."""
    import qtg.training.train as qtrain

    write, calls = qtrain.atomic_safetensors, {"n": 0}

    def dies_on_second_save(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as good as a kill for what is on disk
        write(*args)

    monkeypatch.setattr(qtrain, "atomic_safetensors", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(micro_config(tmp_path, data_dir, tokenizer_file, 12))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # a line cut short
    assert (tmp_path / "latest").read_text().strip() == "step_000005"
    assert qtg.load(tmp_path).checkpoint_dir.name == "step_000005"
    monkeypatch.setattr(qtrain, "atomic_safetensors", write)
    summary = train(micro_config(tmp_path, data_dir, tokenizer_file, 12, resume=True))
    assert summary["start_step"] == 5 and (tmp_path / "step_000010" / qtrain.TRAINER_FILE).is_file()
    steps, _ = read_metrics(tmp_path)
    assert [r["step"] for r in steps] == list(range(1, 13))


def test_a_second_run_into_the_same_directory_needs_resume(straight, data_dir, tokenizer_file):
    out, _ = straight
    with pytest.raises(TrainingError, match="pass --resume"):
        train(micro_config(out, data_dir, tokenizer_file, 30))


# --- metrics and checkpoints ------------------------------------------------------------------


def test_metrics_lines_and_checkpoints(straight):
    out, summary = straight
    steps, vals = read_metrics(out)
    assert [r["step"] for r in steps] == list(range(1, 21))
    for r in steps:
        assert STEP_FIELDS <= r.keys() and r["skipped"] is False
        assert all(math.isfinite(r[k]) for k in STEP_FIELDS - {"step", "skipped"})
    assert [r["step"] for r in vals] == [5, 10, 15, 20]
    for r in vals:
        assert VAL_FIELDS <= r.keys() and r["val_ppl"] == pytest.approx(math.exp(r["val_ce"]))
        assert 0 < r["val_bpb"] < r["val_ce"] / math.log(2)  # more than one byte per token
    # keep_last 2, plus the best; latest and best name checkpoints; the run loads with its tokenizer
    kept = sorted(p.name for p in out.glob("step_*"))
    best = (out / "best").read_text().strip()
    assert kept == sorted({"step_000015", "step_000020", best})
    assert summary["best_val_loss"] == min(r["val_loss"] for r in vals)
    model = qtg.load(out)
    assert model.tokenizer is not None and model.checkpoint_dir.name == "step_000020"


def test_loss_decreases_over_30_steps(data_dir, tokenizer_file, tmp_path):
    summary = train(micro_config(tmp_path, data_dir, tokenizer_file, 30))
    steps, vals = read_metrics(tmp_path)
    first, last = [r["loss"] for r in steps[:5]], [r["loss"] for r in steps[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 1.5, (first, last)
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert summary["tokens_per_s"] > 0


# --- schedule and weight decay ---------------------------------------------------------------


def test_lr_schedule_is_linear_warmup_then_cosine_and_ignores_steps(straight, data_dir, tokenizer_file, tmp_path):
    lr, low, warm, total = 1e-3, 1e-4, 10, 110
    assert [lr_at(s, lr, low, warm, total) for s in range(warm)] == pytest.approx([lr * (s + 1) / warm
                                                                                   for s in range(warm)])
    assert lr_at(warm, lr, low, warm, total) == pytest.approx(lr)
    assert lr_at(warm + 50, lr, low, warm, total) == pytest.approx((lr + low) / 2)  # half-way down the cosine
    assert lr_at(warm + 25, lr, low, warm, total) == pytest.approx(low + (lr - low) * (1 + math.cos(math.pi / 4)) / 2)
    after = [lr_at(s, lr, low, warm, total) for s in range(warm, total + 20)]
    assert all(a >= b for a, b in zip(after, after[1:])) and after[-1] == pytest.approx(low)
    # in a run: step k (1-based) used lr_at(k - 1), whatever the stop step
    out, _ = straight
    steps, _ = read_metrics(out)
    assert [r["lr"] for r in steps] == pytest.approx([lr_at(k, 3e-3, 3e-4, 5, 40) for k in range(20)])
    train(micro_config(tmp_path, data_dir, tokenizer_file, 7, grad_accum=2))
    short, _ = read_metrics(tmp_path)
    assert [r["lr"] for r in short] == [r["lr"] for r in steps[:7]]


@pytest.mark.parametrize("arch", ["qtg", "baseline"])
def test_no_weight_decay_on_norms_embeddings_biases_and_gamma(arch):
    model = qtg.build(qtg.get_tier("micro").replace(arch=arch), seed=0)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    decayed, kept = groups["decay"]["param_names"], groups["no_decay"]["param_names"]
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert all(n.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w_in.weight", "w_out.weight"))
               for n in decayed)
    assert "norm.weight" in kept and any(n.endswith("attn_norm.weight") for n in kept)
    if arch == "qtg":
        assert {"embed.table.weight", "embed.bias"} <= set(kept) and any(n.endswith("log_gamma") for n in kept)
    else:
        assert "embed.weight" in kept
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    # With zero gradients AdamW's update is 0, so only decoupled decay moves a weight: exactly the decayed ones.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5, betas=(0.9, 0.95), eps=1e-8, device=torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if n in decayed else before[n]
        assert torch.allclose(p, expected), n


def test_the_baseline_decoder_trains_with_the_same_loop(data_dir, tokenizer_file, tmp_path):
    cfg = micro_config(tmp_path, data_dir, tokenizer_file, 3)
    cfg.model.overrides = {"arch": "baseline"}
    summary = train(cfg)
    steps, vals = read_metrics(tmp_path)
    assert summary["step"] == 3 and all(math.isfinite(r["loss"]) and "ce" in r for r in steps) and vals


# --- non-finite losses ------------------------------------------------------------------------


def nan_on_steps(monkeypatch, bad) -> None:
    """Make the training loss nan on the given training forward calls (1-based; one per step here)."""
    original, calls = QTG.loss, {"n": 0}

    def loss(self, *args, **kwargs):
        total, terms = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if bad(calls["n"]):
                total = total * float("nan")
        return total, terms

    monkeypatch.setattr(QTG, "loss", loss)


def test_a_nan_step_is_skipped_and_training_goes_on(monkeypatch, data_dir, tokenizer_file, tmp_path):
    nan_on_steps(monkeypatch, lambda k: k in (3, 4))
    summary = train(micro_config(tmp_path, data_dir, tokenizer_file, 8, max_bad_steps=3))
    steps, _ = read_metrics(tmp_path)
    assert summary["step"] == 8 and summary["skipped_steps"] == 2
    assert [r["step"] for r in steps if r["skipped"]] == [3, 4]
    assert all(r["loss"] is None for r in steps if r["skipped"])
    assert all(math.isfinite(r["loss"]) for r in steps if not r["skipped"])


def test_repeated_nans_stop_with_a_clear_error_and_no_checkpoint_holds_nan(monkeypatch, data_dir, tokenizer_file,
                                                                          tmp_path):
    nan_on_steps(monkeypatch, lambda k: k >= 4)  # steps 4, 5 (a checkpoint step), 6 -> stop
    with pytest.raises(TrainingError, match=r"not finite for 3 steps in a row \(steps 4-6; training.max_bad_steps"):
        train(micro_config(tmp_path, data_dir, tokenizer_file, 20, max_bad_steps=3))
    steps, _ = read_metrics(tmp_path)
    assert [r["step"] for r in steps if r["skipped"]] == [4, 5, 6] and steps[-1]["step"] == 6
    ckpts = sorted(tmp_path.glob("step_*"))
    assert [p.name for p in ckpts] == ["step_000005"]
    for ckpt in ckpts:
        for name in ("model.safetensors", "trainer.safetensors"):
            tensors = load_file(ckpt / name)
            assert all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point()), name
        load_checkpoint(ckpt)  # refuses non-finite weights itself


# --- configuration and CLI ----------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("training:\n  lerning_rate: 0.1\n", "unknown key 'training.lerning_rate'"),
    ("optimizer:\n  lr: 0.1\n", "unknown section 'optimizer'"),
    ("training:\n  lr: fast\n", "training.lr: expected float"),
])
def test_bad_yaml_keys_are_named(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_yaml_values_and_cli_flags(data_dir, tmp_path, capsys):
    """The YAML sets the data shape, flags override it; the tokenizer is trained and travels with checkpoints."""
    path = tmp_path / "run.yaml"
    path.write_text(f"""
model: {{tier: nano}}
data: {{path: {data_dir}, seq_len: 32, batch_size: 2}}
training: {{steps: 500, lr: 1e-3, warmup_steps: 2, schedule_steps: 10}}
checkpoint: {{dir: {tmp_path / 'unused'}, every: 100}}
logging: {{eval_every: 100, eval_batches: 1, sample_tokens: 0, progress: false}}
""")
    cfg = load_config(path)
    assert cfg.training.lr == 1e-3 and cfg.data.seq_len == 32  # "1e-3" is a string to YAML 1.1
    out = tmp_path / "run"
    argv = ["train", "--config", str(path), "--tier", "micro", "--out", str(out), "--steps", "2", "--device", "cpu"]
    assert main(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and summary["tier"] == "micro" and not (tmp_path / "unused").exists()
    assert (out / "tokenizer.json").is_file() and (out / "step_000002" / "tokenizer.json").is_file()
    assert qtg.load(out).tokenizer.get_vocab_size() <= 512


def test_arch_flag_trains_the_baseline_with_a_given_tokenizer(data_dir, tmp_path, capsys):
    first = tmp_path / "qtg"
    common = ["--tier", "micro", "--data", str(data_dir), "--steps", "1", "--device", "cpu", "--no-progress"]
    assert main(["train", *common, "--out", str(first)]) == 0
    out = tmp_path / "baseline"
    assert main(["train", *common, "--out", str(out), "--arch", "baseline",
                 "--tokenizer", str(first / "tokenizer.json")]) == 0
    model = qtg.load(out)
    assert model.cfg.arch == "baseline" and type(model).__name__ == "Baseline"
    assert model.tokenizer.to_str() == qtg.load(first).tokenizer.to_str()
