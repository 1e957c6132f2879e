"""Kept importable for plugins: ``harness.moe`` *is* :mod:`harness.layers.moe` (same module object)."""
import sys

from harness.layers import moe as _module

sys.modules[__name__] = _module
