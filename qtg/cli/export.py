"""``qtg export``: any checkpoint (sharded by torchrun, or single-file) as a single-file checkpoint, in any dtype."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qtg.errors import CheckpointError
from qtg.model.builder import resolve_dtype
from qtg.model.checkpoint import read_train_state, save_checkpoint, sharded_checkpoint
from qtg.model.loading import load, read_full_model

HELP = """Write a checkpoint as a single-file checkpoint (model.safetensors,
config.json, tokenizer.json) that qtg.load, qtg generate, the app and the
notebooks read: a sharded one - written by `torchrun ... qtg train` with
torch.distributed.checkpoint, one safetensors file per rank - or a single-file
one, e.g. to store it in 16 bits (--dtype bf16: half the size; a CPU still
computes in float32) or under another model name (--name).

SOURCE is a checkpoint directory (step_XXXXXX) or a run directory (its latest
checkpoint). Shards are read whatever the number of ranks that wrote them; the
whole model must fit in this machine's memory. The weights are written as
stored (float32 master weights) unless --dtype says otherwise. Only the
weights travel: to continue training, resume the run itself (`qtg train
--resume` reads sharded checkpoints at any world size)."""

# Training-state fields an exported checkpoint keeps (the rest - RNG, loader, optimizer - only resumes a run).
PROVENANCE = ("step", "tokens_seen", "val_loss", "best_val", "train_config")

EXAMPLES = """examples:
  qtg export runs/nano2 --out runs/nano2-single
  qtg export runs/nano2/step_000300 --out exported/nano --dtype bf16
  qtg export runs/nano-seed/step_002100 --out assets/checkpoints/nano-seed --dtype bf16 --name nano-seed
  qtg generate --checkpoint runs/nano2-single --prompt "KING:\""""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a sharded (torchrun) checkpoint -> a single-file checkpoint",
                       description=HELP, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="sharded checkpoint directory, or a run directory")
    p.add_argument("--out", required=True, metavar="DIR", help="the checkpoint directory to write")
    p.add_argument("--dtype", default=None, help="fp32, bf16, ... (default: as stored)")
    p.add_argument("--name", default=None, help="the model name written into config.json (default: as stored)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=run)


def export(source: str | Path, out: str | Path, dtype: str | None = None, name: str | None = None) -> Path:
    """Write the checkpoint ``source`` (or a run's latest) as a single-file checkpoint in ``out``.

    Args:
        source: a sharded or single-file checkpoint directory, or a run directory.
        out: the checkpoint directory to write (atomically).
        dtype: the dtype to store the weights in; None keeps them as stored.
        name: the model name for config.json; None keeps it.
    """
    ckpt = sharded_checkpoint(source)
    if ckpt is not None:
        model = read_full_model(ckpt, resolve_dtype(dtype) if dtype else None)
    else:
        model = load(source, device="cpu", dtype=dtype)  # refuses a tier name with no checkpoint behind it
        if model.random_weights:
            raise CheckpointError(f"{source}: not a checkpoint or run directory (a tier name has nothing to export)")
        ckpt = model.checkpoint_dir
    if name is not None:
        model.cfg = model.cfg.replace(name=name)
    state = read_train_state(ckpt) or {}
    kept = {k: state[k] for k in PROVENANCE if k in state}  # what the weights are; not how to resume
    return save_checkpoint(model, out, extra_state={"format": "qtg-export/1", "exported_from": str(ckpt), **kept,
                                                    "ranks": state.get("sharded"),
                                                    "dtype": str(next(model.parameters()).dtype)})


def run(args: argparse.Namespace) -> int:
    path = export(args.source, args.out, args.dtype, args.name)
    if args.json:
        print(json.dumps({"source": str(args.source), "out": str(path)}))
    else:
        print(f"exported {args.source} -> {path} (load it with qtg.load({str(path)!r}) or --checkpoint {path})")
    return 0
