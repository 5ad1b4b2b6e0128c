"""The ``qtg`` command line. Each sub-command lives in its own module with a
``register(subparsers)`` function; the library does the work, the CLI only
parses, prints and turns user errors into one clear line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from qtg import __version__
from qtg.cli import app as app_cmd
from qtg.cli import compare, experiment, export, generate, info, serve, tokenizer, topo, train
from qtg.cli import eval as eval_cmd
from qtg.distributed.world import under_torchrun
from qtg.errors import QTGError

COMMANDS = [info, train, generate, eval_cmd, experiment, compare, tokenizer, topo, export, app_cmd, serve]

EPILOG = """examples:
  qtg info                      every tier: counted vs claimed parameters, memory, fits here?
  qtg info --tier 7b --json     one tier, machine-readable
  qtg train --config configs/nano.yaml --out runs/nano --steps 3000   train nano; add --resume to continue
  qtg generate --prompt "ROMEO:" --max-new-tokens 80        the shipped nano continues a prompt
  qtg eval --data assets/corpus/hamlet.txt.gz               loss, perplexity, bits per byte
  qtg eval --model nano-baseline --data assets/corpus/hamlet.txt.gz --intervene ablate=0:1   one head off
  qtg experiment --data assets/corpus --split test --intervene topo=off   change in bits/byte with a 95% CI
  qtg compare --model nano --model nano-baseline --data assets/corpus --split test   models side by side
  qtg tokenizer train --vocab-size 2048 --out runs/tok.json   a BPE tokenizer on the bundled corpus
  qtg topo --text "To be, or not to be" --layer all --html topo.html   exact persistence vs the TopoFilter
  torchrun --nproc_per_node 2 $(which qtg) train --config configs/nano.yaml --out runs/nano2   sharded (FSDP2)
  qtg export runs/nano2 --out runs/nano2-single   a sharded checkpoint as one file for qtg.load
  qtg info --tier 30b --plan --gpus 8   memory per GPU under FSDP2 and the fewest GPUs that fit
  qtg app                       the web app on the shipped nano, http://127.0.0.1:7860
  qtg serve                     an OpenAI-compatible API (batched), http://127.0.0.1:8000/v1

Set QTG_DEBUG=1 to see full tracebacks."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qtg",
        description="QTG Explorer: build, inspect and measure QTG language models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qtg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    if under_torchrun():
        _leave(code)
    return code


def _leave(code: int) -> None:
    """End a torchrun rank without interpreter finalization.

    The command is done and its process group destroyed, but a rank that goes on through Python's
    shutdown can still abort there ("terminate called without an active exception": a C++ worker
    thread still joinable when its owner is destroyed; seen once in about 65 2-rank gloo runs
    here, the teardown race of pytorch/pytorch#179291). Nothing is left to run, so flush and exit.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _run(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QTGError as e:
        print(f"qtg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qtg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: still one line unless debugging
        if os.environ.get("QTG_DEBUG"):
            raise
        print(f"qtg {args.command}: internal error: {type(e).__name__}: {e} (QTG_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
