"""Run a suite: every router x seed through the one training loop, then a summary table."""
from __future__ import annotations

import functools
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Callable

import polars as pl
import torch
from tqdm.auto import tqdm

from ..routing.registry import UnknownRouterError, create_router, get_router, register_router
from ..spec import RunSpec, SpecError, SuiteSpec
from ..store import Store, StoreError
from ..suites import get_adapter
from . import distributed
from .checkpoint import CheckpointError
from .loop import RunResult, train_run
from .parallel import Failed, available_cpus, run_parallel


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


def skip_finished(
    runs: list[RunSpec],
    store: Store,
    rerun: bool = False,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    primary: str | None = None,
) -> tuple[list[RunSpec], list[RunResult]]:
    """Split ``runs`` into those to train and the results of those the store already holds finished.

    A finished (spec hash, seed) is one sample: training it again adds an identical copy that the
    statistics would count as another seed (pseudo-replication, issue 21). Each skip is one line in
    the log; ``rerun=True`` (``harness run --rerun``, e.g. to re-measure speed) trains them all.
    Skipped runs come back with status ``skipped`` and their stored metrics. Under torchrun rank 0
    reads the store and tells the other ranks.
    """
    if rerun or not runs:
        return list(runs), []
    dctx = distributed.current()
    found = [store.find_finished(r.spec_hash, r.seed) for r in runs] if dctx.is_main else None
    if dctx.distributed:
        found = dctx.broadcast(found)
    todo: list[RunSpec] = []
    skipped: list[RunResult] = []
    for run, prev in zip(runs, found):
        if prev is None:
            todo.append(run)
            continue
        v = prev["metrics"].get(primary) if primary else None
        metric = f", {primary}={v:.4f}" if isinstance(v, (int, float)) else ""
        log(f"skip {run.suite}: router={run.router} seed={run.seed} spec={run.spec_hash[:10]} already finished "
            f"({prev['run_id']}{metric}); --rerun trains it again")
        skipped.append(RunResult(prev["run_id"], run.router, run.seed, "skipped", int(prev["step"] or 0),
                                 dict(prev["metrics"])))
    return todo, skipped


def run_suite(
    spec: SuiteSpec,
    store: Store,
    runs_dir: Path,
    resume: bool = False,
    rerun: bool = False,
    progress: bool = True,
    after_run: Callable[[RunSpec, RunResult], None] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    jobs: int = 1,
) -> list[RunResult]:
    """Every run of ``spec``; ``jobs > 1`` trains up to that many runs at once in worker processes."""
    adapter = get_adapter(spec.suite)
    dctx = distributed.current()
    if jobs > 1 and dctx.distributed:
        raise SpecError("--jobs > 1 cannot be combined with --nproc (DDP): use one or the other")
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
    runs, skipped = skip_finished(runs, store, rerun, log, adapter.primary_metric)  # not twice (issue 21)
    results.extend(skipped)
    if jobs > 1 and len(runs) > 1:
        return skipped + _run_suite_parallel(spec, adapter, runs, store, runs_dir, resume, after_run, log, jobs,
                                           progress)
    for i, run in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {spec.suite}: router={run.router} seed={run.seed} spec={run.spec_hash[:10]}")
        t0 = time.monotonic()
        res = train_run(run, adapter, store, runs_dir, resume=resume, progress=progress, log=log)
        log(_finish_line(i, len(runs), res, adapter.primary_metric, time.monotonic() - t0))
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


# -- --jobs N: runs in parallel worker processes (harness.training.parallel) ---------------------------------
#
# Each worker process trains whole runs with the same train_run as the sequential loop, so resume,
# kill -9, NaN (diverged) and failure semantics are those of train_run. The after_run hook (lm-eval
# after pretraining) runs in the worker right after its run when it can be pickled (cli passes a
# functools.partial): evaluation is CPU work like training, so it stays inside the `jobs` budget and
# overlaps with the other runs; the parent only coordinates and never imports lm-eval. A hook that
# cannot be pickled (a closure from library code) runs in the parent as each run comes back.

_WORKER_ADAPTERS: dict[str, Any] = {}


class _Abort:
    """A worker's run hit an error that ends the suite (corrupt checkpoint, locked store); re-raised here."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _worker_run(run: RunSpec, log: Callable[[str], None], *, store: Store, runs_dir: Path, resume: bool,
                threads: int, routers: dict[str, type], after_run: Callable | None) -> RunResult:
    """One run inside a worker process (module level: it is pickled to the workers)."""


    for name, cls in routers.items():  # routers the parent registered at run time (scripts, tests)
        try:
            get_router(name)
        except UnknownRouterError:
            register_router(name)(cls)
    if not run.train.threads:
        torch.set_num_threads(threads)  # train.threads unset: share the cores between the workers
    adapter = _WORKER_ADAPTERS.get(run.suite) or _WORKER_ADAPTERS.setdefault(run.suite, get_adapter(run.suite))
    last = [0.0]

    def on_step(done: int) -> None:  # to the parent's combined bar, at most twice a second
        now = time.monotonic()  # (the last step is counted when the run is done: after its test pass)
        if now - last[0] >= 0.5 and done < run.train.steps:
            last[0] = now
            log(("step", done))  # type: ignore[arg-type]

    try:
        res = train_run(run, adapter, store, runs_dir, resume=resume, progress=False, log=log, on_step=on_step)
    except (CheckpointError, StoreError) as exc:  # errors that stop a sequential suite stop this one too
        return _Abort(exc)  # type: ignore[return-value]
    if after_run is not None and res.status == "finished":
        try:
            after_run(run, res)
        except Exception as exc:  # noqa: BLE001 - the run itself is recorded; say what went wrong after it
            log(f"[{run.router} seed {run.seed}] after-run step failed: {type(exc).__name__}: {exc}")
    return res


def _carried_routers(spec: SuiteSpec) -> dict[str, type]:
    """The spec's routers by class: a worker registers those it cannot find itself (pickled by reference)."""

    out = {}
    for name in dict.fromkeys(spec.routers):
        cls = get_router(name)
        try:
            pickle.dumps(cls)
        except Exception as exc:  # noqa: BLE001
            raise SpecError(f"router {name!r} ({cls.__module__}.{cls.__qualname__}) cannot be sent to --jobs "
                            f"worker processes ({type(exc).__name__}); define it at module level or use --jobs 1")
        out[name] = cls
    return out


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001
        return False


def _finish_line(i: int, n: int, res: RunResult, primary: str, seconds: float) -> str:
    v = res.metrics.get(primary)
    metric = f"{primary}={v:.4f}" if isinstance(v, (int, float)) else f"step {res.step}"
    why = ""
    if res.status != "finished" and res.error:
        lines = [ln for ln in res.error.strip().splitlines() if ln.strip()]
        why = f": {lines[-1].strip()}" if lines else ""
    return f"[{i}/{n}] {res.status}: router={res.router} seed={res.seed} {metric} ({seconds:.1f}s){why}"


def _run_suite_parallel(spec: SuiteSpec, adapter, runs: list[RunSpec], store: Store, runs_dir: Path,  # noqa: ANN001
                        resume: bool, after_run, log: Callable[[str], None], jobs: int,  # noqa: ANN001
                        progress: bool = True) -> list[RunResult]:

    n, t0 = len(runs), {}
    jobs = min(jobs, n)
    in_worker = after_run is not None and _picklable(after_run)
    task = functools.partial(_worker_run, store=store, runs_dir=Path(runs_dir), resume=resume,
                             threads=max(1, available_cpus() // jobs), routers=_carried_routers(spec),
                             after_run=after_run if in_worker else None)
    results: list[RunResult | None] = [None] * n
    log(f"{spec.suite}: {n} runs in {jobs} worker processes (--jobs {jobs})")
    # one combined bar (steps of all runs) instead of a bar per worker; the lines are written around it
    bar, steps = None, [0] * n
    if progress:

        bar = tqdm(total=sum(r.train.steps for r in runs), unit="step", desc=f"{n} runs", leave=False,
                   dynamic_ncols=True, file=sys.stderr)

    def say(msg: str) -> None:
        if bar is None:
            log(msg)
        else:
            with tqdm.external_write_mode(file=sys.stderr):
                log(msg)

    def advance(i: int, done: int) -> None:
        if bar is not None and done > steps[i]:
            bar.update(done - steps[i])
        steps[i] = max(steps[i], done)

    def on_message(i: int, run: RunSpec, msg: Any) -> None:
        if isinstance(msg, tuple) and msg[:1] == ("step",):
            advance(i, int(msg[1]))

    def on_start(i: int, run: RunSpec, wid: int) -> None:
        t0[i] = time.monotonic()
        say(f"[{i + 1}/{n}] {spec.suite}: router={run.router} seed={run.seed} spec={run.spec_hash[:10]} "
            f"(worker {wid})")

    def on_done(i: int, run: RunSpec, res: Any) -> None:
        if isinstance(res, _Abort):
            raise res.exc  # as the sequential loop does: run_parallel stops the other workers first
        if isinstance(res, Failed):
            res = _record_lost(run, res, store)
        results[i] = res
        advance(i, run.train.steps)  # a run that stopped early (diverged, failed) is done all the same
        if bar is not None:
            bar.set_postfix_str(f"{sum(r is not None for r in results)}/{n} runs done")
        say(_finish_line(i + 1, n, res, adapter.primary_metric, time.monotonic() - t0[i]))
        if after_run is not None and not in_worker and res.status == "finished":
            after_run(run, res)

    try:
        run_parallel(runs, jobs, task, log=say, on_start=on_start, on_done=on_done, on_message=on_message)
    finally:
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]


def _record_lost(run: RunSpec, failed, store: Store) -> RunResult:  # noqa: ANN001
    """A worker died (or raised outside train_run's own guard): its run is marked failed, resumable."""
    error = failed.error.strip()
    store.abandon(run.spec_hash, run.seed, f"failed: {error}")
    prev = store.find_resumable(run.spec_hash, run.seed)
    run_id = prev["run_id"] if prev else ""
    step = int(prev["step"] or 0) if prev else 0
    return RunResult(run_id, run.router, run.seed, "failed", step, {}, error)


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
