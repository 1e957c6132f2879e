"""Kept importable for plugins: ``harness.losses`` *is* :mod:`harness.routing.losses` (same module object)."""
import sys

from harness.routing import losses as _module

sys.modules[__name__] = _module
