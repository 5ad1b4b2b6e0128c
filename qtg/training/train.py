"""Training: ``qtg.training.train.train(cfg)`` runs, checkpoints, resumes and logs a QTG model.

    cfg = load_config("configs/nano.yaml")          # or TrainConfig() and set fields
    cfg.training.steps = 200
    summary = train(cfg)                            # a dict: steps, losses, checkpoints, tokens/s

Choices:

* **Config**: one dataclass per YAML section, in :mod:`qtg.training.train_config`
  (re-exported here). An unknown key is a ConfigError naming it; the CLI only
  overrides fields.
* **Steps**: ``training.steps`` is the step at which a run stops, a total, not
  a count to add. The learning-rate curve depends on ``warmup_steps`` and
  ``schedule_steps`` only (:func:`qtg.training.optim.lr_at`), so stopping and resuming
  changes nothing.
* **Exact resume**: a checkpoint holds the weights (model.safetensors), the
  optimizer moments and the torch RNG states (trainer.safetensors), and as
  JSON the step, the data loader's position, the optimizer hyper-parameters,
  the Python and NumPy RNG states. On CPU a resumed run is bit-identical to an
  uninterrupted one (a test holds it).
* **Crash safety**: a checkpoint is complete only once ``latest`` names it;
  ``latest`` and ``best`` are small text files replaced atomically, written
  after both safetensors files. Directories newer than ``latest`` are leftovers
  of a killed save and are removed on resume.
* **Non-finite losses** skip the update (the batch is still consumed, the step
  still counts and is logged with ``"skipped": true``); ``max_bad_steps`` in a
  row stop the run with a TrainingError. Weights are checked before every save.
* **Several ranks** (``torchrun --nproc_per_node N qtg train ...``): the
  model is sharded with FSDP2, the global batch stays ``batch_size x
  grad_accum`` windows in the same order, and checkpoints are sharded (DCP);
  either kind of checkpoint resumes at any world size. The machinery lives in
  :mod:`qtg.distributed`; a plain process gets identity collectives.
* **Snapshots** (``checkpoint.snapshot_every``, off by default): light
  weights-only safetensors files in ``snapshots/`` (:mod:`qtg.training.snapshots`),
  16-bit by default, for watching a run's topology over training.
* **Validation** runs every ``eval_every`` steps and at each checkpoint, so
  ``best`` (lowest ``val_loss``, the training objective on the validation split)
  is exact. ``val_bpb`` is the validation NLL in bits per UTF-8 byte of text,
  scaled by the split's bytes per token (exact when every window is evaluated).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from qtg import distributed
from qtg.atomic import atomic_safetensors, atomic_text
from qtg.data.pipeline import (
    TokenSplit,
    default_corpus_path,
    load_documents,
    make_split,
    resolve_cache_dir,
    split_documents,
    tokenize_documents,
)
from qtg.data.tokenizer import decode, eos_id, load_tokenizer, save_tokenizer, train_tokenizer
from qtg.errors import CheckpointError, ConfigError, DataError, TrainingError
from qtg.generate import generate
from qtg.model.checkpoint import TRAINER_FILE, is_sharded, read_train_state, save_checkpoint
from qtg.model.tiers import get_tier
from qtg.training.evaluate import score_batches
from qtg.training.malloc import keep_freed_memory
from qtg.training.optim import build_optimizer, load_optimizer_state, lr_at, optimizer_state, set_lr
from qtg.training.snapshots import remove_after, snapshot_path, snapshot_tensors, write_snapshot
from qtg.training.train_config import (  # noqa: F401  (re-exported: qtg.training.train.TrainConfig)
    CheckpointSection,
    DataSection,
    LoggingSection,
    ModelSection,
    TrainConfig,
    TrainingSection,
    load_config,
)

log = logging.getLogger("qtg")

STATE_FORMAT = "qtg-train/1"


# --- a run's state ------------------------------------------------------------------------------


@dataclass
class _Run:
    cfg: TrainConfig
    out: Path
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any  # qtg.data.pipeline.WindowLoader over the training split
    val: Any  # qtg.data.pipeline.TokenSplit
    seq_len: int
    step: int = 0
    bad_steps: int = 0
    tokens_seen: int = 0
    best_val: float | None = None
    best_name: str | None = None
    world: distributed.World = field(default_factory=distributed.World)  # ranks; by default one plain process

    def autocast(self):
        # bf16 autocast on CUDA only: CPU bf16 matmuls are slow and not what a CPU run is measured in
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


def _latest(out: Path) -> Path | None:
    """The checkpoint ``out/latest`` names, or None."""
    pointer = out / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not (out / name / TRAINER_FILE).is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete training checkpoint")
    return out / name


def _model_config(cfg: TrainConfig, base: Any = None) -> Any:
    """The QTGConfig: the tier's (or ``base``'s, from a checkpoint) with ``model.overrides``."""
    tier = get_tier(cfg.model.tier or "nano") if base is None or cfg.model.tier else base
    try:
        model_cfg = tier.replace(**cfg.model.overrides)
    except ConfigError as e:
        raise ConfigError(f"model.overrides: {e}") from None
    if base is not None and model_cfg != base:
        diff = [k for k, v in model_cfg.to_dict().items() if base.to_dict()[k] != v]
        raise ConfigError(f"the model config differs from the checkpoint's in: {', '.join(diff)}")
    return model_cfg


def _tokenizer(cfg: TrainConfig, train_docs: list, start: Any, vocab_size: int) -> Any:
    """From --tokenizer, else the checkpoint's, else trained on the training split."""
    if cfg.data.tokenizer:
        tok = load_tokenizer(cfg.data.tokenizer)
    elif start is not None and start.tokenizer is not None:
        tok = start.tokenizer
    else:
        log.info("training a %d-token BPE tokenizer on the training split", vocab_size)
        tok = train_tokenizer(train_docs, vocab_size)
    if tok.get_vocab_size() > vocab_size:
        raise DataError(f"the tokenizer has {tok.get_vocab_size()} tokens, more than the model's "
                        f"vocab_size {vocab_size}")
    return tok


def _starting_point(cfg: TrainConfig, world: distributed.World) -> tuple[Path | None, Any]:
    """Where the run begins: the checkpoint in ``out`` to resume (None: a fresh run, whose seeds are set here),
    and what ``distributed.load_start`` read from it or from ``--init`` (None: random weights)."""
    out, t = Path(cfg.checkpoint.dir), cfg.training
    resume_from = _latest(out)
    if resume_from is not None and not t.resume:
        raise TrainingError(f"{out} already holds a training run (latest: {resume_from.name}); pass --resume "
                            "to continue it, or choose another --out")
    if t.resume and resume_from is None:
        log.warning("nothing to resume in %s: starting at step 0", out)
    if resume_from is None:
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
    begin_with = resume_from or t.init  # a checkpoint (sharded or not), a run directory or a tier
    start = distributed.load_start(begin_with, world) if begin_with else None
    if start is not None and start.random_weights:
        raise ConfigError(f"training.init {t.init!r} has no trained weights to start from")
    return resume_from, start


def _prepare(cfg: TrainConfig, world: distributed.World) -> _Run:
    """Model, tokenizer, data, optimizer: fresh, from --init, or restored from ``out/latest``."""
    out, t, device = Path(cfg.checkpoint.dir), cfg.training, world.device
    distributed.split_sizes(cfg.data.batch_size, t.grad_accum, world.size, cfg.data.micro_batch_size)  # fail early
    resume_from, start = _starting_point(cfg, world)
    model_cfg = _model_config(cfg, start.cfg if start is not None else None)
    tok, train_split, val_split = _token_splits(cfg, world, start, model_cfg.vocab_size)

    seq_len = cfg.data.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len {seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    try:  # fail now, not at the first evaluation
        val_split.loader(seq_len, cfg.data.batch_size, shuffle=False, drop_last=False)
    except DataError as e:
        raise DataError(f"validation split ({', '.join(val_split.doc_names)}): {e}") from None
    model = distributed.make_model(model_cfg, world, start, t.seed, t.mixed_precision,
                                   t.activation_checkpointing)
    model.tokenizer = tok
    model.train()
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, device)
    loader = train_split.loader(seq_len, cfg.data.batch_size, seed=t.seed)
    run = _Run(cfg, out, device, model, optimizer, loader, val_split, seq_len, world=world)
    if resume_from is not None:
        _restore(run, resume_from)
    if world.is_main:
        _clean_up(run)
    world.barrier()
    return run


def _token_splits(cfg: TrainConfig, world: distributed.World, start: Any,
                  vocab_size: int) -> tuple[Any, TokenSplit, TokenSplit]:
    """The tokenizer and the training and validation token streams. Rank 0 trains (or takes) the tokenizer,
    writes it and the split's work names to ``out`` and fills the token cache; the other ranks read both."""
    out = Path(cfg.checkpoint.dir)
    data_path = Path(cfg.data.path) if cfg.data.path else default_corpus_path()
    docs = load_documents(data_path)
    train_docs, val_docs, test_docs = split_documents(docs, val_fraction=cfg.data.val_fraction,
                                                      test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed)
    with world.main_first():  # rank 0 trains the tokenizer and fills the token cache; the other ranks read both
        if world.is_main:
            tok = _tokenizer(cfg, train_docs, start, vocab_size)
            out.mkdir(parents=True, exist_ok=True)
            save_tokenizer(tok, out / "tokenizer.json")
            split = {"train": [d.name for d in train_docs], "val": [d.name for d in val_docs],
                     "test": [d.name for d in test_docs]}  # the test works are reported, never chosen on
            atomic_text(out / "split.json", json.dumps(split, indent=1) + "\n")
        else:
            tok = load_tokenizer(out / "tokenizer.json")
        td = tokenize_documents(docs, tok, resolve_cache_dir(data_path, cfg.data.cache_dir))
    return tok, make_split("train", td, [d.name for d in train_docs]), make_split("val", td, [d.name for d in val_docs])


# --- checkpoints --------------------------------------------------------------------------------


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}


def _set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py, npy = state["python"], state["numpy"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), *npy[2:]))


def _restore(run: _Run, ckpt: Path) -> None:
    from safetensors.torch import load_file

    state = read_train_state(ckpt)
    if not state or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{ckpt}: no training state ({STATE_FORMAT}) in state.json")
    tensors = load_file(str(ckpt / TRAINER_FILE))
    if is_sharded(ckpt):  # written by N ranks, read by this run's M (a plain process included)
        distributed.load_sharded_optimizer(run.model, run.optimizer, ckpt)  # the weights came with the start
    elif run.world.sharded:  # a single-file checkpoint: each rank keeps its slices
        distributed.load_full_optimizer(run.model, run.optimizer, tensors, state["optimizer"])
    else:
        load_optimizer_state(run.optimizer, tensors, state["optimizer"])
    _set_rng_state(tensors, state["rng"])
    run.loader.load_state_dict(state["loader"])
    run.step, run.bad_steps, run.tokens_seen = state["step"], state["bad_steps"], state["tokens_seen"]
    run.best_val, run.best_name = state["best_val"], state["best_name"]
    log.info("resumed from %s at step %d", ckpt, run.step)


def _clean_up(run: _Run) -> None:
    """Drop what a killed run left past ``latest``: half-saved step folders, metric lines."""
    for path in run.out.glob("step_*"):
        if path.is_dir() and _step_of(path) > run.step:
            shutil.rmtree(path)
    metrics = run.out / "metrics.jsonl"
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text(encoding="utf-8").splitlines() if _line_step(ln) <= run.step]
        atomic_text(metrics, "".join(ln + "\n" for ln in lines))
    remove_after(run.out, run.step)  # snapshots of steps this run is about to redo


def _line_step(line: str) -> float:
    """The step of a metrics line; inf for a line cut short by a kill (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return -1


def _save(run: _Run, val_loss: float | None) -> Path:
    """Write ``step_XXXXXX`` (weights, then optimizer + RNG), then move ``latest`` and ``best`` to it.

    Under torchrun every rank writes its shards (:func:`qtg.distributed.save_sharded`, which checks them).
    """
    sharded = run.world.sharded
    tensors, optim_meta = ({}, None) if sharded else optimizer_state(run.optimizer)
    rng_tensors, rng_meta = _rng_state()
    weights = {} if sharded else run.model.state_dict()
    bad = [n for n, t in [*weights.items(), *tensors.items()] if not torch.isfinite(t).all()]
    if bad:  # cannot happen after a skipped step; a guard so no checkpoint ever holds nan
        raise TrainingError(f"refusing to save step {run.step}: non-finite values in {', '.join(bad[:5])}")
    name = f"step_{run.step:06d}"
    is_best = val_loss is not None and (run.best_val is None or val_loss < run.best_val)
    if is_best:
        run.best_val, run.best_name = val_loss, name
    state = {"format": STATE_FORMAT, "step": run.step, "bad_steps": run.bad_steps, "tokens_seen": run.tokens_seen,
             "val_loss": val_loss, "best_val": run.best_val, "best_name": run.best_name,
             "loader": run.loader.state_dict(), "optimizer": optim_meta, "rng": rng_meta,
             "train_config": run.cfg.to_dict()}
    if sharded:
        path = distributed.save_sharded(run.model, run.optimizer, run.out / name, state, rng_tensors,
                                        run.world)
    else:
        path = save_checkpoint(run.model, run.out / name, extra_state=state)
        atomic_safetensors({**tensors, **rng_tensors}, path / TRAINER_FILE)
    if run.world.is_main:
        atomic_text(run.out / "latest", name + "\n")  # only now is the checkpoint part of the run
        if is_best:
            atomic_text(run.out / "best", name + "\n")
        steps = sorted((p for p in run.out.glob("step_*") if p.is_dir()), key=_step_of)
        for old in steps[: -run.cfg.checkpoint.keep_last]:
            if old.name != run.best_name:
                shutil.rmtree(old)
    run.world.barrier()
    return path


def _snapshot(run: _Run, at_start: bool = False) -> None:
    """Write ``snapshots/step_XXXXXX.safetensors`` when ``checkpoint.snapshot_every`` asks for this step.

    Steps: multiples of ``snapshot_every`` (0 included) and the run's last step; at the start of an
    invocation only a missing multiple (a fresh run's step 0, or snapshots switched on at a resume).
    Under torchrun every rank gathers the weights (a collective); rank 0 writes.
    """
    c = run.cfg.checkpoint
    if c.snapshot_every is None:
        return
    due = run.step % c.snapshot_every == 0
    if at_start:
        due = due and not snapshot_path(run.out, run.step).is_file()
    elif run.step == run.cfg.training.steps:
        due = True
    if not due:
        return
    tensors = snapshot_tensors(run.model, c.snapshot_dtype)
    if run.world.is_main:
        write_snapshot(tensors, run.model.cfg, run.out, run.step, c.snapshot_dtype)
    run.world.barrier()


# --- steps and evaluation -----------------------------------------------------------------------


def _train_step(run: _Run, lr: float) -> dict[str, Any]:
    """One optimizer update over ``grad_accum`` batches; skipped if a loss or the gradient is not finite.

    Under torchrun each rank runs its share of the global batch (:func:`qtg.distributed.rank_batches`);
    the finiteness checks are agreed by all ranks and the logged losses are means over ranks.
    """
    t, model, world = run.cfg.training, run.model, run.world
    set_lr(run.optimizer, lr)
    begin = time.perf_counter()
    losses, terms, finite = [], {}, True
    batches = distributed.rank_batches(run.loader, run.cfg.data.batch_size, t.grad_accum, world.rank, world.size,
                           run.cfg.data.micro_batch_size)  # the data moves on even if the step is skipped
    for x, y in batches:
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with run.autocast():
            out = model(x, targets=y)
        if not world.all_true(bool(torch.isfinite(out.loss))):
            finite = False
            break
        (out.loss / len(batches)).backward()
        losses.append(out.loss.item())
        for k, v in out.loss_terms.items():
            terms[k] = terms.get(k, 0.0) + v.item() / len(batches)
    grad_norm = None
    if finite:
        grad_norm = distributed.clip_grad_norm(model.parameters(), t.grad_clip)
        finite = math.isfinite(grad_norm)
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    tokens = t.grad_accum * run.cfg.data.batch_size * run.seq_len
    seconds = time.perf_counter() - begin
    run.tokens_seen += tokens
    if not finite:
        return {"loss": None, "lr": lr, "grad_norm": None, "tokens_per_s": tokens / seconds, "skipped": True,
                "seconds": seconds}
    loss, *means = world.mean([sum(losses) / len(losses), *terms.values()])
    return {"loss": loss, **dict(zip(terms, means)), "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens / seconds, "skipped": False, "seconds": seconds}


def _validate(run: _Run) -> dict[str, float]:
    """Validation loss over the first ``eval_batches`` consecutive windows of the val split.

    Returns:
        ``val_loss`` (the training objective), ``val_ce``, ``val_ppl = exp(val_ce)``,
        ``val_bpb`` (bits per UTF-8 byte), the other loss terms and ``val_tokens``.
    """
    loader = run.val.loader(run.seq_len, run.cfg.data.batch_size, shuffle=False, drop_last=False)
    n_batches = len(loader) if run.cfg.logging.eval_batches is None else min(run.cfg.logging.eval_batches, len(loader))
    # batch(0, i): fixed windows, the loader never moves
    scores = score_batches(run.model, (loader.batch(0, i) for i in range(n_batches)), autocast=run.autocast())
    mean = {k: scores.mean(k) for k in scores.sums}
    return {"val_loss": mean["loss"], "val_ce": mean["ce"], "val_ppl": math.exp(min(mean["ce"], 700.0)),
            "val_bpb": run.val.bits_per_byte(mean["ce"]),
            **{f"val_{k}": v for k, v in mean.items() if k not in ("loss", "ce")}, "val_tokens": scores.tokens}


def _sample(run: _Run) -> str | None:
    """A short seeded continuation of ``<|endoftext|>`` (None when ``logging.sample_tokens`` is 0)."""
    n = min(run.cfg.logging.sample_tokens, run.model.cfg.max_seq_len - 1)
    if n < 1:
        return None
    eos = eos_id(run.model.tokenizer)
    prompt = torch.tensor([[eos]], device=run.device)
    try:  # seeded with its own generator: the global RNG, hence an exact resume, is untouched
        ids = generate(run.model, prompt, n, temperature=0.8, top_k=40, seed=0, eos_id=eos)
    except Exception as e:  # a sample is a courtesy; it must not end a long run
        log.warning("no sample at step %d: %s: %s", run.step, type(e).__name__, e)
        return None
    return decode(run.model.tokenizer, ids[0, 1:].tolist())


def _write(fh: Any, record: dict[str, Any]) -> None:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    fh.write(json.dumps(clean, allow_nan=False) + "\n")
    fh.flush()


# --- the loop -----------------------------------------------------------------------------------


def _evaluate_and_save(run: _Run, summary: dict[str, Any], bar: Any, metrics: Any) -> None:
    """Evaluate every ``eval_every`` steps and at each checkpoint; save every ``every`` steps and at the end."""
    cfg, lg = run.cfg, run.cfg.logging
    save_now = run.step % cfg.checkpoint.every == 0 or run.step == cfg.training.steps
    if not (save_now or run.step % lg.eval_every == 0):
        return
    val = _validate(run)
    val["sample"] = _sample(run)
    _write(metrics, {"step": run.step, **val})
    summary["val_loss"] = val["val_loss"]
    line = (f"step {run.step}: val_loss {val['val_loss']:.4f}  val_ppl {val['val_ppl']:.2f}  "
            f"val_bpb {val['val_bpb']:.4f}  sample: {val['sample']!r}")[:300]
    if lg.progress:
        bar.write(line, file=sys.stderr)  # stderr like the bar: stdout stays for the CLI's summary
    else:
        log.info(line)
    if save_now:
        _save(run, val["val_loss"])


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train until ``cfg.training.steps``, checkpointing and logging into ``cfg.checkpoint.dir``.

    Args:
        cfg: the run's configuration (see :class:`TrainConfig`).

    Returns:
        A summary: ``out_dir``, ``start_step``, ``step``, ``skipped_steps``, ``loss``,
        ``val_loss``, ``best_val_loss``, ``best_checkpoint``, ``latest_checkpoint``,
        ``tokens_per_s`` (training tokens over time in training steps), ``seconds``.

    Raises:
        TrainingError: ``max_bad_steps`` non-finite steps in a row, or an
            existing run in ``checkpoint.dir`` without ``resume``.
        ConfigError, DataError, CheckpointError: bad settings, data or checkpoints.

    Under torchrun every rank calls it (the CLI does); rank 0 writes the
    metrics and the files of the run, every rank its checkpoint shards.
    """
    cfg.validate()
    keep_freed_memory()  # step temporaries stay in the heap: no page faults per step (qtg/training/malloc.py)
    world = distributed.init_world(cfg.training.device)
    try:
        summary = _train(cfg, world)
    except BaseException:
        distributed.close_world(world, failed=True)
        raise
    distributed.close_world(world)
    return summary


def _train(cfg: TrainConfig, world: distributed.World) -> dict[str, Any]:
    begin = time.perf_counter()
    run = _prepare(cfg, world)
    t, lg = cfg.training, cfg.logging
    lg.progress = lg.progress and world.is_main
    start, summary = run.step, {"loss": None, "val_loss": None}
    if world.is_main:
        atomic_text(run.out / "train_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    step_seconds, step_tokens, skipped = 0.0, 0, 0
    bar = tqdm(total=t.steps, initial=start, unit="step", disable=not lg.progress, dynamic_ncols=True)
    metrics_path = run.out / "metrics.jsonl" if world.is_main else os.devnull
    _snapshot(run, at_start=True)
    with open(metrics_path, "a", encoding="utf-8") as metrics, bar:
        while run.step < t.steps:
            lr = lr_at(run.step, t.lr, t.min_lr, t.warmup_steps, t.schedule_steps)
            record = _train_step(run, lr)
            run.step += 1
            step_seconds += record.pop("seconds")
            step_tokens += t.grad_accum * cfg.data.batch_size * run.seq_len
            _write(metrics, {"step": run.step, **record})
            bar.update(1)
            if record["skipped"]:
                skipped, run.bad_steps = skipped + 1, run.bad_steps + 1
                if run.bad_steps >= t.max_bad_steps:
                    raise TrainingError(
                        f"the loss or gradient was not finite for {run.bad_steps} steps in a row (steps "
                        f"{run.step - run.bad_steps + 1}-{run.step}; training.max_bad_steps = {t.max_bad_steps}), so "
                        f"training stopped; those steps did not change the weights. The last checkpoint is "
                        f"{_latest(run.out) or 'none'}. Try a lower training.lr or check the data.")
            else:
                run.bad_steps, summary["loss"] = 0, record["loss"]
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            _snapshot(run)
            _evaluate_and_save(run, summary, bar, metrics)
    latest = _latest(run.out)
    return {"out_dir": str(run.out), "start_step": start, "step": run.step, "skipped_steps": skipped,
            **summary, "best_val_loss": run.best_val,
            "best_checkpoint": str(run.out / run.best_name) if run.best_name else None,
            "latest_checkpoint": str(latest) if latest else None,
            "tokens_per_s": step_tokens / step_seconds if step_seconds else None,
            "seconds": time.perf_counter() - begin, "device": str(run.device), "tier": run.model.cfg.name,
            "params": sum(p.numel() for p in run.model.parameters()), "rank": world.rank, "ranks": world.size}
