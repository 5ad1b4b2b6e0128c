"""Scale-out (qtg.distributed): 2 CPU ranks with gloo under torchrun against one plain process.

Every run is nano on a few kilobytes of generated text (seq_len 32, batch 4,
one thread per rank). Each torchrun launch starts fresh interpreters, so
those tests are marked slow.

Run as a script under torchrun, this file is the worker of
:func:`test_sharded_build_init_plan_and_loading` (see :func:`worker`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qtg
from qtg.data.tokenizer import EOS_TOKEN, decode, encode
from qtg.distributed import split_sizes
from qtg.distributed.plan import plan, shard_numel, shard_params
from qtg.errors import ConfigError
from qtg.generate import generate
from qtg.model.intervention import Intervention
from qtg.model.loading import read_full_model
from qtg.training.evaluate import score_windows, windows
from qtg.training.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5
PARITY = 1e-5  # relative loss difference allowed between a 2-rank and a 1-process run, at every step


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(data_dir, tokenizer_file) -> tuple[Path, Path]:
    """conftest's three generated works (one goes to validation) and the 512-token BPE trained on them."""
    return data_dir, tokenizer_file


def nano_config(out: Path, data: tuple[Path, Path], steps: int = STEPS, resume: bool = False) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.tier = "nano"
    cfg.data.path, cfg.data.tokenizer, cfg.data.seq_len, cfg.data.batch_size = str(data[0]), str(data[1]), 32, 4
    t = cfg.training
    t.steps, t.lr, t.min_lr, t.warmup_steps, t.schedule_steps = steps, 3e-3, 3e-4, 2, 20
    t.device, t.resume = "cpu", resume
    cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.keep_last = str(out), 3, 2
    cfg.logging.eval_every, cfg.logging.eval_batches, cfg.logging.sample_tokens = 5, 1, 0
    cfg.logging.progress = False
    return cfg


def write_yaml(cfg: TrainConfig, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def torchrun(nproc: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc`` on ``args`` (``-m qtg ...`` or a script), 1 thread/rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def train_ranks(nproc: int, cfg: TrainConfig, tmp: Path, *flags: str) -> subprocess.CompletedProcess:
    config = write_yaml(cfg, tmp / f"{Path(cfg.checkpoint.dir).name}.yaml")
    return torchrun(nproc, "-m", "qtg", "train", "--config", str(config), *flags)


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    return [r["loss"] for r in steps]


def max_relative_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    """The reference: 5 steps of nano in one plain process."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(nano_config(out, data))
    return out


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> Path:
    """The same run on 2 gloo ranks under torchrun (sharded checkpoints at steps 3 and 5)."""
    tmp = tmp_path_factory.mktemp("two")
    out = tmp / "run"
    r = train_ranks(2, nano_config(out, data), tmp)
    assert r.stdout.count("trained nano") == 1 and "x 2 ranks" in r.stdout  # rank 0 speaks for the run
    return out


# --- training across ranks ------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_follow_the_single_process_loss_curve(single, two_ranks):
    one, two = losses(single), losses(two_ranks)
    assert len(one) == STEPS and len(set(one)) == STEPS
    worst = max_relative_difference(two, one)
    print(f"\n2 ranks vs 1 process, {STEPS} steps: max relative loss difference {worst:.2e}")
    assert worst < PARITY, (one, two)
    val_one, val_two = ([json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                         if "val_loss" in line] for out in (single, two_ranks))
    assert len(val_one) == 2 and max_relative_difference(val_two, val_one) < PARITY  # steps 3 and 5
    # the sharded checkpoint: one safetensors file per rank, pointers and JSON state as a single-file run has
    ckpt = two_ranks / "step_000005"
    assert (two_ranks / "latest").read_text().strip() == "step_000005"
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert json.loads((ckpt / "state.json").read_text())["sharded"] == {"ranks": 2}


@pytest.mark.slow
def test_save_at_two_ranks_resume_in_one_process_and_the_reverse(single, data, tmp_path):
    reference = losses(single)
    # 2 ranks to step 3 (a sharded checkpoint), then one plain process to step 5
    a = tmp_path / "a"
    train_ranks(2, nano_config(a, data, steps=3), tmp_path)
    summary = train(nano_config(a, data, resume=True))
    assert summary["start_step"] == 3 and summary["step"] == STEPS
    assert (a / "step_000005" / "model.safetensors").is_file()  # the plain process writes single files again
    # one plain process to step 3 (a single-file checkpoint), then 2 ranks to step 5
    b = tmp_path / "b"
    train(nano_config(b, data, steps=3))
    train_ranks(2, nano_config(b, data, resume=True), tmp_path)
    assert (b / "step_000005" / "dcp").is_dir()
    for out, name in ((a, "2 ranks -> 1 process"), (b, "1 process -> 2 ranks")):
        print(f"\nresumed {name} at step 3: max relative loss difference "
              f"{max_relative_difference(losses(out), reference):.2e}")
        assert max_relative_difference(losses(out), reference) < PARITY, (out.name, losses(out), reference)


@pytest.mark.slow
def test_a_sharded_run_is_a_starting_point_for_a_plain_process(two_ranks):
    """--init (or resume) from a sharded run in one process: the weights are the shards, reassembled."""
    from qtg.distributed import World, load_start, make_model

    start = load_start(two_ranks, World())
    assert next(start.parameters()).device.type == "meta" and start.tokenizer is not None
    model = make_model(start.cfg, World(), start, seed=123)
    expected = read_full_model(two_ranks / "step_000005")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_the_global_batch_must_split_evenly():
    assert split_sizes(4, 1, 2) == (2, 1) and split_sizes(16, 3, 2) == (8, 3) and split_sizes(4, 2, 1) == (4, 2)
    with pytest.raises(ConfigError, match=r"4 x training.grad_accum 1 = 4 windows\) does not split evenly over 3"):
        split_sizes(4, 1, 3)
    with pytest.raises(ConfigError, match="micro_batch_size 3 does not divide the 8 windows"):
        split_sizes(8, 2, 2, micro_batch_size=3)


# --- export and inference -------------------------------------------------------------------------


@pytest.mark.slow
def test_export_gives_a_checkpoint_qtg_load_reads_with_the_same_weights(two_ranks, tmp_path):
    from qtg.cli import main
    from qtg.distributed import read_full_model

    out = tmp_path / "exported"
    assert main(["export", str(two_ranks), "--out", str(out)]) == 0
    model = qtg.load(out)
    shards = read_full_model(two_ranks / "step_000005")
    assert model.checkpoint_dir == out and model.tokenizer.to_str() == shards.tokenizer.to_str()
    assert model.state_dict().keys() == shards.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), shards.state_dict().values()))
    # against the shards themselves: each rank's slice sits where the file's DCP offsets say
    from safetensors import safe_open

    for path in sorted((two_ranks / "step_000005" / "dcp").iterdir()):
        with safe_open(str(path), "pt") as f:
            offsets = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            for key in (k for k in f.keys() if k.startswith("model.")):
                part = f.get_tensor(key)
                start = offsets[key]["saved_offsets"]
                full = model.state_dict()[key.removeprefix("model.")]
                index = tuple(slice(o, o + n) for o, n in zip(start, part.shape))
                assert torch.equal(full[index], part), key
    from qtg.cli.export import export

    again = qtg.load(export(out, tmp_path / "again"))  # a single-file checkpoint exports to the same weights
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    direct = qtg.load(two_ranks)  # a sharded run directory, read whole in this process
    assert direct.checkpoint_dir == two_ranks / "step_000005" and direct.random_weights is False
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), model.state_dict().values()))


@pytest.mark.slow
def test_generate_on_two_ranks_equals_single_process_greedy_output():
    prompt, n = "ROMEO:", 24
    r = torchrun(2, "-m", "qtg", "generate", "--tier", "nano", "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", str(n), "--json", "--device", "cpu")
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 prints
    model = qtg.load("nano")
    ids = torch.tensor([encode(model.tokenizer, prompt)])
    expected = decode(model.tokenizer, generate(model, ids, n, temperature=0)[0].tolist())
    assert lines[0]["text"] == expected and lines[0]["new_tokens"] == n


# --- sharded build, initialisation and the plan ---------------------------------------------------


@pytest.mark.slow
def test_sharded_build_init_plan_and_loading(two_ranks, tmp_path):
    """On 2 ranks: meta-device init equals qtg.build, shards are the plan's size, AC changes nothing, loading."""
    report = tmp_path / "report.json"
    torchrun(2, __file__, str(two_ranks), str(report))
    ranks = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["init_equals_build"], r
        assert r["grads_with_ac_equal_without"], r
        assert r["sharded_logits_max_diff"] < 1e-5, r
        assert r["single_file_logits_max_diff"] < 1e-5, r
        # a per-call intervention through the sharded forward: as in one process, and a real change
        assert r["intervened_logits_max_diff"] < 1e-5 and r["intervention_changes_logits"] > 1e-3, r
    rank0 = next(r for r in ranks if r["rank"] == 0)
    assert rank0["local_params"] == shard_params(qtg.get_tier("micro"), 2) == plan("micro", gpus=2).shard_params
    assert sum(r["local_params"] for r in ranks) == qtg.count_params("micro")  # micro's dim 0s are all even


@pytest.mark.parametrize("tier", ["micro", "nano", "base", "7b"])
@pytest.mark.parametrize("gpus", [1, 3, 8])
def test_plan_numbers_equal_a_meta_device_count(tier, gpus):
    cfg = qtg.get_tier(tier)
    with torch.device("meta"):
        model = qtg.QTG(cfg)
    shapes = [tuple(p.shape) for p in model.parameters()]
    p = plan(tier, gpus=gpus)
    assert p.params == sum(torch.Size(s).numel() for s in shapes) == qtg.count_params(tier)
    assert p.root_params + p.n_blocks * p.block_params == p.params
    assert p.shard_params == sum(shard_numel(s, gpus) for s in shapes)
    for mode in ("no_ac", "ac"):
        m = p.train[mode]
        assert (m.weights, m.optimizer) == (4 * p.shard_params, 8 * p.shard_params)
        assert m.gradients == 4 * p.shard_params + 4 * p.block_params + 2 * p.root_params
        assert m.gathered == 2 * (p.root_params + 2 * p.block_params)
    assert p.train["ac"].activations < p.train["no_ac"].activations
    assert p.inference.weights == 2 * p.shard_params


@pytest.mark.slow
def test_plan_fewest_gpus_and_why_5_5q_fits_none():
    p30 = plan("30b", gpus=8, gpu_mem_gib=80)
    n = p30.min_gpus["ac"]
    assert plan("30b", gpus=n).fits["ac"] and (n == 1 or not plan("30b", gpus=n - 1).fits["ac"])
    p = plan("5.5q", gpus=8)
    assert p.min_gpus == {"no_ac": None, "ac": None, "inference": None} and not any(p.fits.values())
    text = " ".join(p.impossible)
    assert "one block is 8.00T parameters" in text and "whatever the number of GPUs" in text
    assert f"16 bytes x {p.params:,} parameters" in text


def test_info_plan_command(capsys):
    from qtg.cli import main

    assert main(["info", "--tier", "100b", "--plan", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "43,442,536,448 parameters (meta-device count)" in out and "fewest GPUs that fit" in out
    assert main(["info", "--plan", "--gpus", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["tier"] for r in rows] == list(qtg.TIERS)
    assert all(r["params"] == qtg.count_params(r["tier"]) for r in rows if r["tier"] != "5.5q")
    assert main(["info", "--tier", "7b", "--plan", "--gpus", "0"]) == 2


# --- GPU only ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_bf16_mixed_precision_keeps_the_bhattacharyya_coefficient_in_float32_on_one_nccl_rank(data, tmp_path):
    """One CUDA rank under torchrun (NCCL): bf16 parameters for compute, float32 reduction, finite losses."""
    out = tmp_path / "gpu"
    cfg = nano_config(out, data, steps=3)
    cfg.training.device = "cuda"
    train_ranks(1, cfg, tmp_path)
    assert all(torch.isfinite(torch.tensor(losses(out))))
    report = tmp_path / "report.json"
    torchrun(1, __file__, str(out), str(report), "cuda")
    r = json.loads(report.read_text().splitlines()[0])
    assert r["compute_dtype"] == "torch.bfloat16" and r["bc_dtype"] == "torch.float32"


# --- the worker (run by torchrun, not by pytest) -----------------------------------------------------


def worker(run_dir: str, report: str, device: str = "cpu") -> None:
    """Checks that need a process group; one JSON line per rank appended to ``report``."""
    from torch.distributed.tensor import DTensor

    from qtg.distributed import build_sharded, close_world, init_world
    from qtg.distributed.inference import load_sharded_model

    torch.set_num_threads(1)
    world = init_world(device)
    result: dict = {"rank": world.rank}
    cfg = qtg.get_tier("micro")
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(world.device)
    if device == "cuda":  # bf16 mixed precision: what the blocks compute in, and the dtype of the BC's inputs
        import qtg.model.model as qm

        model, seen, original = build_sharded(cfg, world, seed=0), {}, qm.sqrt_simplex

        def spy(t: torch.Tensor) -> torch.Tensor:
            seen["bc"] = original(t).dtype
            return original(t)

        hook = model.blocks[0].attn.wq.register_forward_hook(lambda m, i, o: seen.__setitem__("compute", o.dtype))
        qm.sqrt_simplex = spy
        try:
            model(ids, targets=ids)
        finally:
            qm.sqrt_simplex = original
            hook.remove()
        result.update(compute_dtype=str(seen["compute"]), bc_dtype=str(seen["bc"]))
    else:
        reference = qtg.build(cfg, seed=0)
        model = build_sharded(cfg, world, seed=0)
        full = {n: (p.full_tensor() if isinstance(p, DTensor) else p) for n, p in model.named_parameters()}
        result["init_equals_build"] = all(torch.equal(full[n], p) for n, p in reference.named_parameters())
        result["local_params"] = sum(p.to_local().numel() for p in model.parameters())
        grads = []
        for ac in (False, True):
            m = build_sharded(cfg, world, seed=0, activation_checkpointing=ac)
            m(ids, targets=ids.roll(-1, 1)).loss.backward()
            grads.append([p.grad.full_tensor() for p in m.parameters()])
        result["grads_with_ac_equal_without"] = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7)
                                                    for a, b in zip(*grads))
        # a sharded checkpoint and a single-file one, both loaded sharded, against a plain process
        sharded = load_sharded_model(run_dir, world)
        plain = read_full_model(Path(run_dir) / "step_000005")
        nano_ids = ids % plain.cfg.vocab_size
        with torch.no_grad():
            diff = (sharded(nano_ids).logits - plain(nano_ids).logits).abs().max().item()
            result["sharded_logits_max_diff"] = diff
            iv = Intervention(topo="exact", ablate_heads={0: [1]})
            edited = plain(nano_ids, intervene=iv).logits
            result["intervened_logits_max_diff"] = (sharded(nano_ids, intervene=iv).logits - edited).abs().max().item()
            result["intervention_changes_logits"] = (edited - plain(nano_ids).logits).abs().max().item()
            shipped = load_sharded_model("nano", world)
            diff = (shipped(nano_ids).logits - qtg.load("nano")(nano_ids).logits).abs().max().item()
            result["single_file_logits_max_diff"] = diff
    for rank in range(world.size):  # one writer at a time
        if rank == world.rank:
            with open(report, "a") as f:
                f.write(json.dumps(result) + "\n")
        world.barrier()
    close_world(world)


if __name__ == "__main__":
    worker(*sys.argv[1:])


# --- the app under torchrun -----------------------------------------------------------------------


@pytest.mark.slow
def test_the_app_serves_a_model_sharded_over_two_ranks(tmp_path):
    """``torchrun -m app``: rank 0 serves, rank 1 joins every forward; greedy text equals one process."""
    pytest.importorskip("gradio", reason="the app extra is not installed")
    import time
    import urllib.request

    from gradio_client import Client

    from tests.test_app_handlers import PROMPT, library_greedy
    from tests.test_app_server import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "app",
           "--model", "nano", "--port", str(port), "--device", "cpu", "--export-dir", str(tmp_path)]
    log = tmp_path / "app.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.25)
        c = Client(url, verbose=False)
        assert "sharded across ranks" in c.predict("sharded:nano", "cpu", api_name="/load")
        text = c.predict(PROMPT, 16, 0, 0, 1, -1, api_name="/generate")[1]
        nano = qtg.load("nano")
        assert text == PROMPT + library_greedy(nano, nano.tokenizer, PROMPT, 16)  # the box starts at the prompt
        attn = c.predict("To be, or not to be", 1, -1, api_name="/attention")[4]
        with torch.inference_mode():
            ref = nano(torch.tensor([qtg.data.tokenizer.encode(nano.tokenizer, "To be, or not to be")]),
                       return_internals=True)
        assert attn["gamma"][1] == pytest.approx(ref.gamma[1].tolist(), rel=1e-6)
        # exact vs approximate TopoFilter on the one sharded model: an argument of each lockstep call
        text = "To be, or not to be, that is the question"
        headline = c.predict(text, "sharded:nano", "cpu", "exact", "sharded:nano", "cpu", "approximate", -1,
                             api_name="/compare")[2]
        seq = [nano.tokenizer.token_to_id(EOS_TOKEN), *qtg.data.tokenizer.encode(nano.tokenizer, text)]
        for side, intervene in (("A", Intervention(topo="exact")), ("B", Intervention())):
            nll, count = score_windows(nano, windows(seq, nano.cfg.max_seq_len), intervene=intervene)
            assert headline["perplexity"][side] == pytest.approx(math.exp(nll / count), rel=1e-4)
        assert headline["perplexity"]["A"] != headline["perplexity"]["B"]
    finally:
        proc.terminate()
        proc.wait(30)
