"""Kept importable for plugins: ``harness.registry`` *is* :mod:`harness.routing.registry` (same module object)."""
import sys

from harness.routing import registry as _module

sys.modules[__name__] = _module
