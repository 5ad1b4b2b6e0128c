"""``python -m app`` is ``qtg app``."""

import sys

from qtg.cli import main

sys.exit(main(["app", *sys.argv[1:]]))
