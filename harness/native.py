"""The project's small C++ extensions, compiled on first use (or at install) and cached.

One loader for every extension, at the bottom of the layering so that both packages with C++ use it:
``harness/layers/csrc/`` (the ``fused`` expert kernel, the permute plan and weighted combine; ``combine.h``
holds the combine arithmetic both include) and ``harness/routing/csrc/`` (the fused router tail).
``torch.utils.cpp_extension.load`` builds the source with ``-O3`` (and ``-ffp-contract=off``: no multiply-add
fusion, so the C++ arithmetic rounds where the Python composite it replaces does) into a directory of torch's
extension root (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions/py311_cu130/``) named
``<name>-<key>``, one per checkout (:func:`build_dir`); ``scripts/install.sh`` builds them once. Where one
cannot be built (no compiler, no ninja) the loader logs one line and returns None, and the caller runs its
Python path: the same bits for the layer kernels, values within a few ulp for the router tail.
``HARNESS_NO_CPP=1`` turns every extension off (``HARNESS_NO_FUSED_EXPERTS=1`` the expert kernel alone,
``HARNESS_NO_FUSED_ROUTER=1`` the router tail alone).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("harness")


def build_dir(name: str, csrc: Path) -> Path:
    """Where ``name`` is built: torch's extension root, one directory per checkout (keyed by this ``csrc/``'s
    path). One shared directory would make two checkouts -- a worktree of another revision that ``harness
    regress`` times, a second clone -- rebuild each other's kernel on every load (ninja sees another source
    path), and a run would wait on that compile. ``csrc``: the folder the source is in."""
    from torch.utils import cpp_extension

    root = Path(cpp_extension._get_build_directory(name, False)).parent  # $TORCH_EXTENSIONS_DIR or the default
    key = hashlib.sha1(str(csrc.resolve()).encode()).hexdigest()[:10]
    path = root / f"{name}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def headers_key(csrc: Path) -> str:
    """A hash of ``csrc/*.h``. torch rebuilds an extension when its listed sources or flags change, not when a
    header they include does; this key rides in the flags, so editing ``combine.h`` rebuilds both kernels."""
    h = hashlib.sha1()
    for path in sorted(csrc.glob("*.h")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def load(name: str, source: Path, what: str, fallback: str = "the Python path, the same numbers",
         extra_cflags: tuple[str, ...] = ()) -> Any | None:
    """The compiled module ``name`` of the C++ file ``source``, or None, logged in one line (``what`` could not
    be built; ``fallback`` runs). Callers cache the result (one build, one line per process)."""
    if os.environ.get("HARNESS_NO_CPP"):
        return None
    try:
        from torch.utils import cpp_extension

        csrc = source.parent
        return cpp_extension.load(name=name, sources=[str(source)], build_directory=str(build_dir(name, csrc)),
                                  extra_cflags=["-O3", "-ffp-contract=off", f"-DHARNESS_HEADERS={headers_key(csrc)}",
                                                *extra_cflags], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: run the Python path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("%s: the C++ kernel could not be built (%s); running %s",
                    what, first[:200], fallback)
        return None
