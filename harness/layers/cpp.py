"""The project's small C++ extensions, compiled on first use (or at install) and cached.

One loader for every extension under ``csrc/`` (the ``fused`` expert kernel, the permute plan and
weighted combine): ``torch.utils.cpp_extension.load`` builds the source with ``-O3`` (and
``-ffp-contract=off``: no multiply-add fusion, so the C++ arithmetic rounds where the Python composite it
replaces does) into torch's extension root (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``); ``scripts/install.sh`` builds them once. Where one cannot be built (no
compiler, no ninja) the loader logs one line and returns None, and the caller runs its Python path, which
computes the same bits. ``HARNESS_NO_CPP=1`` turns every extension off (``HARNESS_NO_FUSED_EXPERTS=1``,
the older switch, turns off the expert kernel alone). A build killed half-way can leave a ``lock`` file in
its build directory, on which the next build waits: delete ``<name>/lock`` there.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("harness")

CSRC = Path(__file__).with_name("csrc")


def load(name: str, source: str, what: str, fallback: str = "the Python path") -> Any | None:
    """The compiled module ``name`` of ``csrc/<source>``, or None, logged in one line (``what`` could not be
    built; ``fallback`` runs, the same numbers). Callers cache the result (one build, one line per process)."""
    if os.environ.get("HARNESS_NO_CPP"):
        return None
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(name=name, sources=[str(CSRC / source)],
                                  extra_cflags=["-O3", "-ffp-contract=off"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: run the Python path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("%s: the C++ kernel could not be built (%s); running %s, the same numbers",
                    what, first[:200], fallback)
        return None
