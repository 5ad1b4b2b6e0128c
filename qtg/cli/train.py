"""``qtg train``: train a tier on text, with checkpoints, exact resume and JSONL metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qtg.model.tiers import TIERS
from qtg.training.train import TrainConfig, load_config, train

HELP = """Train a QTG model and write a run directory (--out):

  step_XXXXXX/     checkpoints (weights, config, tokenizer, optimizer and RNG state)
  latest, best     text files naming the newest checkpoint and the one with the lowest validation loss
  metrics.jsonl    one JSON object per step (loss, its terms, lr, grad_norm, tokens_per_s)
                   and per evaluation (val_loss, val_ppl, val_bpb, a sample)
  tokenizer.json   the tokenizer (trained on the training split unless --tokenizer is given)
  snapshots/       with --snapshot-every K: step_XXXXXX.safetensors, light weights-only snapshots (16-bit by
                   default) at every K-th step and the last, for watching a run over training (qtg.training.snapshots)

--config reads a YAML file with the sections model, data, training, checkpoint
and logging (see configs/nano.yaml); flags given here override it. --steps is
the step the run stops at, not a number of steps to add: `--steps 1000
--resume` continues a run that stopped at step 400 up to step 1000. The
learning-rate schedule (warm-up, cosine) comes from the config, never from
--steps. A run killed at any moment leaves its last checkpoint loadable;
`qtg.load(OUT)` loads it.

Under torchrun (`torchrun --nproc_per_node N $(which qtg) train ...`, multi-node
with torchrun's usual flags) the model is sharded with FSDP2, one unit per
block (bf16 parameters with float32 reduction on CUDA), built on the meta
device so no rank ever holds all of it. The global batch stays batch_size x
grad_accum windows in the same order at any number of ranks, so the loss curve
is the one a single process draws. Checkpoints are then sharded
(torch.distributed.checkpoint, one safetensors file per rank); either kind
resumes at any number of ranks, and `qtg export` turns a sharded one into a
single file. Rank 0 writes metrics.jsonl and prints."""

EXAMPLES = """examples:
  qtg train --config configs/nano.yaml --out runs/nano
  qtg train --config configs/nano.yaml --out runs/nano --steps 3000 --resume
  qtg train --config configs/nano-notopo.yaml --seed 1 --out runs/nano-notopo-s1   (a second draw of the same recipe)
  qtg train --config configs/nano.yaml --arch baseline --tokenizer runs/nano/tokenizer.json --out runs/base
  qtg train --tier micro --data my_texts/ --out runs/micro --steps 200 --device cpu
  qtg train --tier micro --out runs/micro-snaps --steps 120 --seq-len 64 --snapshot-every 20
  qtg train --tier nano --init runs/nano --data poems.jsonl --out runs/poems --steps 500
  torchrun --nproc_per_node 2 $(which qtg) train --config configs/nano.yaml --out runs/nano2
  torchrun --nproc_per_node 8 $(which qtg) train --tier 7b --activation-checkpointing --out runs/7b"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model: checkpoints, exact resume, metrics.jsonl", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("--tier", metavar="T", help=f"model tier ({', '.join(TIERS)}; default nano, or the config's)")
    p.add_argument("--arch", choices=["qtg", "baseline"],
                   help="baseline: the same-size dot-product decoder (RoPE, SDPA) on the same data and schedule")
    p.add_argument("--config", type=Path, metavar="FILE.yaml", help="YAML config; flags override it")
    p.add_argument("--data", metavar="PATH", help="text file, .jsonl file or folder (default: the bundled corpus)")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer JSON (default: train one on the training split)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: the config's checkpoint.dir)")
    p.add_argument("--steps", type=int, metavar="N", help="stop at step N (a total, also with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--init", metavar="WEIGHTS_DIR", help="start from these weights (checkpoint or run directory)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the config's (auto)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="training seed: initialisation and data order (default: the config's; the split keeps "
                        "data.split_seed, so runs with different seeds see the same works)")
    p.add_argument("--seq-len", type=int, metavar="N", help="training window in tokens (default: the config's, "
                   "else the model's context)")
    p.add_argument("--snapshot-every", type=int, metavar="K",
                   help="keep a light weights-only snapshot every K steps in OUT/snapshots/ (default: the config's "
                        "checkpoint.snapshot_every, none)")
    p.add_argument("--snapshot-dtype", choices=["bfloat16", "float16", "float32"],
                   help="snapshot precision (default: the config's checkpoint.snapshot_dtype, bfloat16)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="under torchrun: recompute each block in backward instead of keeping its activations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The YAML config (or the defaults) with the flags that were given applied on top."""
    cfg = load_config(args.config) if args.config else TrainConfig()
    overrides = [(cfg.model, "tier", args.tier), (cfg.data, "path", args.data),
                 (cfg.data, "tokenizer", args.tokenizer), (cfg.checkpoint, "dir", args.out),
                 (cfg.training, "steps", args.steps), (cfg.training, "init", args.init),
                 (cfg.training, "device", args.device), (cfg.training, "seed", args.seed),
                 (cfg.data, "seq_len", args.seq_len),
                 (cfg.checkpoint, "snapshot_every", args.snapshot_every),
                 (cfg.checkpoint, "snapshot_dtype", args.snapshot_dtype)]
    for section, name, value in overrides:
        if value is not None:
            setattr(section, name, value)
    if args.arch is not None:
        cfg.model.overrides = {**cfg.model.overrides, "arch": args.arch}
    cfg.training.resume = cfg.training.resume or args.resume
    cfg.training.activation_checkpointing = cfg.training.activation_checkpointing or args.activation_checkpointing
    cfg.logging.progress = cfg.logging.progress and not args.no_progress
    return cfg


def run(args: argparse.Namespace) -> int:
    summary = train(config_from_args(args))
    if summary["rank"] != 0:  # under torchrun, rank 0 speaks for the run
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    loss = "-" if summary["loss"] is None else f"{summary['loss']:.4f}"
    val = "-" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
    tps = "-" if summary["tokens_per_s"] is None else f"{summary['tokens_per_s']:,.0f}"
    ranks = f" x {summary['ranks']} ranks" if summary["ranks"] > 1 else ""
    print(f"trained {summary['tier']} ({summary['params']:,} parameters) on {summary['device']}{ranks} from step "
          f"{summary['start_step']} to {summary['step']} in {summary['seconds']:.1f} s: loss {loss}, val_loss {val}, "
          f"{tps} tokens/s, {summary['skipped_steps']} skipped step(s)")
    print(f"latest: {summary['latest_checkpoint']}   best: {summary['best_checkpoint']}   "
          f"metrics: {Path(summary['out_dir']) / 'metrics.jsonl'}")
    return 0
