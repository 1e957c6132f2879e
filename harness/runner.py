"""Run a suite: every router x seed through the one training loop, then a summary table."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import polars as pl

from . import distributed
from .registry import create_router
from .spec import RunSpec, SpecError, SuiteSpec
from .store import Store
from .train import RunResult, train_run


def get_adapter(suite: str):
    if suite == "lm":
        from .lm_suite import LMSuite

        return LMSuite()
    if suite == "vision":
        from .vision_suite import VisionSuite

        return VisionSuite()
    raise SpecError(f"unknown suite {suite!r}; known: lm, vision")


def preflight(spec: SuiteSpec, adapter) -> None:
    """Fail before anything is written: routers build with their args, data is where the spec says."""
    for run in spec.runs():
        name, m = run.router, run.model
        try:
            create_router(name, m.d_model, m.num_experts, m.top_k, **run.router_kwargs)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"router_args.{name}: {exc}") from exc
    if spec.routers:
        adapter.prepare(spec.runs()[0])


def run_suite(
    spec: SuiteSpec,
    store: Store,
    runs_dir: Path,
    resume: bool = False,
    progress: bool = True,
    after_run: Callable[[RunSpec, RunResult], None] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[RunResult]:
    adapter = get_adapter(spec.suite)
    dctx = distributed.current()
    if not dctx.distributed:
        preflight(spec, adapter)
    else:  # torchrun worker: rank 0 prepares data caches first, then the others read them; rank 0 talks
        distributed.check_spec(spec, dctx.world_size)
        if dctx.is_main:
            preflight(spec, adapter)
        dctx.barrier()
        if not dctx.is_main:
            preflight(spec, adapter)
            log, progress = (lambda s: None), False
    results = []
    deferred = []
    runs = spec.runs()
    for i, run in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {spec.suite}: router={run.router} seed={run.seed} spec={run.spec_hash[:10]}")
        res = train_run(run, adapter, store, runs_dir, resume=resume, progress=progress, log=log)
        if after_run is not None and res.status == "finished":
            if dctx.distributed:
                deferred.append((run, res))  # rank 0 after all runs: the other ranks need not wait
            else:
                after_run(run, res)
        results.append(res)
    if dctx.is_main:
        for run, res in deferred:
            after_run(run, res)
    return results


def summary_table(results: list[RunResult], primary: str, unit: str) -> pl.DataFrame:
    rows = []
    for r in results:
        rows.append({
            "router": r.router,
            "seed": r.seed,
            "status": r.status,
            primary: r.metrics.get(primary),
            primary.replace("val_", "test_"): r.metrics.get(primary.replace("val_", "test_")),
            f"{unit}/s": r.metrics.get(f"train_{unit}_per_s"),
            "peak_mem_mb": r.metrics.get("peak_mem_mb"),
            "run_id": r.run_id,
        })
    return pl.DataFrame(rows)
