"""Arguments and loading shared by the commands that run a model."""

from __future__ import annotations

import argparse
import logging

from qtg.data.pipeline import split_documents
from qtg.errors import ConfigError
from qtg.experiments.corpus import read_documents
from qtg.experiments.errors import ExperimentError
from qtg.experiments.heldout import SHIPPED_SPLIT, SPLITS
from qtg.model.loading import load, shipped_models

log = logging.getLogger("qtg")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --tier / --checkpoint (one of them), --device, --dtype."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="NAME", help="a shipped model, by name (default nano; "
                                                    f"shipped: {', '.join(shipped_models()) or 'none'})")
    src.add_argument("--tier", metavar="T", help="a tier: its shipped weights if any (nano), else random ones "
                                                "(said so on stderr)")
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory, or a training --out directory "
                                                        "(its latest checkpoint)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 (default auto)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, ... (default: the checkpoint's)")


def model_source(args: argparse.Namespace) -> str:
    """What ``qtg.load`` is given: the checkpoint, the tier, or the shipped model (default nano).

    Raises:
        ConfigError: ``--model`` names no shipped model (the message lists them).
    """
    if args.checkpoint or args.tier:
        return args.checkpoint or args.tier
    name = getattr(args, "model", None)
    if name is None:
        return "nano"
    shipped = shipped_models()
    if name not in shipped:
        raise ConfigError(f"--model {name!r} is not a shipped model (shipped: {', '.join(shipped) or 'none'}); "
                          "use --checkpoint DIR for your own weights")
    return name


def load_model(args: argparse.Namespace):
    """The model the user named, with its tokenizer; a clear error if it has none."""
    model = load(model_source(args), device=args.device, dtype=args.dtype)
    if model.random_weights:
        log.warning("tier %r has no trained weights: using random ones", model.cfg.name)
    check_tokenizer(model)
    return model.eval()


def check_tokenizer(model) -> None:
    """A clear error for a model without a tokenizer (random weights carry none)."""
    if model.tokenizer is None:
        raise ConfigError(f"{model.cfg.name!r} has no tokenizer (random weights carry none): "
                          "load a trained checkpoint with --checkpoint, or --model nano")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--data PATH (required) and --split train|val|test."""
    p.add_argument("--data", required=True, metavar="PATH", help="a .txt/.txt.gz/.jsonl file or a directory of them")
    p.add_argument("--split", choices=SPLITS,
                   help="only these works of --data, split as the shipped configs split it (whole works by bytes: "
                        "val 0.1, test 0.1, seed 0)")


def read_data(args: argparse.Namespace) -> list:
    """The documents of --data, or of its --split part (as the shipped configs split it)."""
    docs = read_documents(args.data)
    if args.split:
        docs = getattr(split_documents(docs, **SHIPPED_SPLIT), args.split)
        if not docs:
            raise ExperimentError(f"--split {args.split}: that split of {args.data} holds no work")
    return docs
