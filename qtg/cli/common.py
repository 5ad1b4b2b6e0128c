"""Arguments and loading shared by the commands that run a model."""

from __future__ import annotations

import argparse
import logging

from qtg.checkpoint import load
from qtg.errors import ConfigError

log = logging.getLogger("qtg")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--tier / --checkpoint (one of them), --device, --dtype."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tier", metavar="T", help="a tier: its shipped weights if any (nano), else random ones "
                                                "(said so on stderr); default nano")
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory, or a training --out directory "
                                                        "(its latest checkpoint)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 (default auto)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, ... (default: the checkpoint's)")


def load_model(args: argparse.Namespace):
    """The model the user named, with its tokenizer; a clear error if it has none."""
    model = load(args.checkpoint or args.tier or "nano", device=args.device, dtype=args.dtype)
    if getattr(model, "random_weights", False):
        log.warning("tier %r has no trained weights: using random ones", model.cfg.name)
    check_tokenizer(model)
    return model.eval()


def check_tokenizer(model) -> None:
    """A clear error for a model without a tokenizer (random weights carry none)."""
    if model.tokenizer is None:
        raise ConfigError(f"{model.cfg.name!r} has no tokenizer (random weights carry none): "
                          "load a trained checkpoint with --checkpoint, or --tier nano")
