"""The suites a spec can name (``suite: lm`` / ``suite: vision``): name -> adapter class.

A new suite is one module with a :class:`~harness.suites.base.SuiteAdapter` and one ``SUITES.add`` line
here. ``SUITES`` is a :class:`harness.catalog.Registry` (the one registry type: routers, suites, metrics).
"""
from __future__ import annotations

from ..catalog import Registry
from ..spec import SpecError
from .base import SuiteAdapter
from .lm import LMSuite
from .vision import VisionSuite

SUITES: Registry[type] = Registry("suite", error=SpecError)
SUITES.add("lm", LMSuite)
SUITES.add("vision", VisionSuite)

__all__ = ["SUITES", "SuiteAdapter", "get_adapter"]


def get_adapter(suite: str) -> SuiteAdapter:
    """A fresh adapter of ``suite``; an unknown name is a SpecError with a did-you-mean and the known suites."""
    return SUITES.get(suite)()
