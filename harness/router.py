"""Kept importable for plugins: the names of :mod:`harness.routing.router`, re-exported.

A plain module since issue 32 (it replaced itself in ``sys.modules`` before): public names by ``import *``,
any other attribute looked up on :mod:`harness.routing.router` itself, so both spellings give the same objects.
"""
from typing import Any

from harness.routing import router as _module
from harness.routing.router import *  # noqa: F401,F403


def __getattr__(name: str) -> Any:
    return getattr(_module, name)
