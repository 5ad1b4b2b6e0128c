import sys

from qtg.cli import main

sys.exit(main())
