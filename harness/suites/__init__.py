"""The suites a spec can name (``suite: lm`` / ``suite: vision``): name -> adapter class.

A new suite is one module with a :class:`~harness.suites.base.SuiteAdapter` and one line here.
"""
from __future__ import annotations

from ..spec import SpecError
from .base import SuiteAdapter
from .lm import LMSuite
from .vision import VisionSuite

SUITES: dict[str, type] = {"lm": LMSuite, "vision": VisionSuite}

__all__ = ["SUITES", "SuiteAdapter", "get_adapter"]


def get_adapter(suite: str) -> SuiteAdapter:
    try:
        return SUITES[suite]()
    except KeyError:
        raise SpecError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}") from None
