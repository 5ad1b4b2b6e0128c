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
from qtg.cli import info
from qtg.errors import QTGError

COMMANDS = [info]

EPILOG = """examples:
  qtg info                      every tier: counted vs claimed parameters, memory, fits here?
  qtg info --tier 7b --json     one tier, machine-readable

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
