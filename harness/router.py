"""Kept importable for plugins: ``harness.router`` *is* :mod:`harness.routing.router` (same module object)."""
import sys

from harness.routing import router as _module

sys.modules[__name__] = _module
