"""Which model lm-eval evaluates: a model.pt, a run directory, or a run id (or unique prefix) in the store.

Where a run's files live and how a model.pt is read is :mod:`harness.training.checkpoint`'s business;
what is added here is the store lookup and the lm-specific checks (an lm-suite model, the run id the
checkpoint itself records).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..store import Store, default_store_path
from ..suites.lm import build_lm
from ..training.checkpoint import (CheckpointError, default_runs_dir, final_model_path, load_final_model,
                                   run_key_of)
from ..training.checkpoint import MODEL_NAME as MODEL_FILE


def store_path(store: str | os.PathLike[str] | None) -> Path:
    return Path(store or default_store_path())


def lookup_run(run_id: str, store: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The store's row for a run id or a unique prefix of one (run_id, suite, router, status, config)."""
    row = Store(store_path(store)).find_run(run_id)
    return {**{k: row[k] for k in ("run_id", "suite", "router", "status")}, "config": json.loads(row["config"])}


def read_lm_model(path: Path) -> dict[str, Any]:
    """:func:`load_final_model`, refusing a model of another suite (lm-eval scores byte-level LMs only)."""
    ckpt = load_final_model(path)
    if ckpt["spec"].get("suite") != "lm":
        raise CheckpointError(f"{path} is a {ckpt['spec'].get('suite')!r} run; lm-eval needs an lm-suite model")
    return ckpt


def resolve_checkpoint(pretrained: str | os.PathLike[str], store: str | os.PathLike[str] | None = None,
                       runs_dir: str | os.PathLike[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """``(model.pt path, checkpoint)`` for a path, a run directory, or a run id in the store.

    A run id's final model is :func:`final_model_path` ``(runs_dir, run_key_of(run_id))``; the
    checkpoint's own run id must match, because a later run with the same spec and seed writes to
    the same directory.
    """
    p = Path(pretrained).expanduser()
    if p.is_dir() and (p / MODEL_FILE).is_file():
        p = p / MODEL_FILE
    if p.is_file():
        return p, read_lm_model(p)
    if p.suffix in (".pt", ".pth") or os.sep in str(pretrained):
        raise CheckpointError(f"no model checkpoint at {p}")
    run = lookup_run(str(pretrained), store)
    if run["suite"] != "lm":
        raise CheckpointError(f"run {run['run_id']} is a {run['suite']!r} run; lm-eval needs an lm-suite run")
    runs = Path(runs_dir) if runs_dir else default_runs_dir(store_path(store))
    path = final_model_path(runs, run_key_of(run["run_id"]))
    if not path.is_file():
        hint = "" if run["status"] == "finished" else f" (the run is {run['status']}; only finished runs save one)"
        raise CheckpointError(f"run {run['run_id']} has no final model: {path} not found{hint}; "
                              f"pass --runs-dir / runs_dir= if its runs directory is elsewhere")
    ckpt = read_lm_model(path)
    if ckpt.get("run_id") != run["run_id"]:
        raise CheckpointError(f"{path} holds run {ckpt.get('run_id')}, not {run['run_id']} (a later run with the "
                              f"same spec and seed replaced it); evaluate {ckpt.get('run_id')} instead")
    return path, ckpt


def build_model_from_checkpoint(ckpt: dict[str, Any]):
    """The trained MoEDecoderLM in eval mode, routers in their end-of-training schedule state."""
    model = build_lm(ckpt["spec"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    steps = int((ckpt["spec"].get("train") or {}).get("steps") or 1)
    # most router state is in buffers (StableMoE's stage); schedules kept as plain attributes
    # (MoGE's sigma, CompeteSMoE's step) are what on_step made them at the last training step
    model.on_step(max(steps - 1, 0), steps)
    return model
