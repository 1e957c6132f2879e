"""``python -m harness.cli`` = ``harness``."""
import sys

from . import main

sys.exit(main())
