"""``harness run``: pretrain every router x seed of a suite (in parallel workers, or under torchrun) and
record each run, then its downstream evaluation, in the store. ``--sweep KEY=V1,V2`` runs the suite at every
point of a grid of spec values (:mod:`harness.sweep`), each point an ordinary spec."""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import polars as pl

from .. import args as argtypes
from ..args import split_csv as _csv
from ..bundles import BUNDLES, BundleStore, RecordingStore
from ..errors import UsageError
from ..lmeval import check_tasks, eval_after_pretraining
from ..spec import SpecError, load_suite
from ..store import Store
from ..sweep import Point, parse_sweeps, points
from ..suites import get_adapter
from ..training import distributed
from ..training.checkpoint import default_runs_dir
from ..training.parallel import default_jobs
from ..training.runner import preflight, run_suite, summary_table


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    s = sub.add_parser("run", help="pretrain every router of a suite and record the results")
    s.add_argument("--suite", default="lm", help="lm | vision | path to a suite YAML")
    s.add_argument("--routers", help="comma-separated subset, e.g. smoe,moge")
    s.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    s.add_argument("--preset", default=None, help="preset of the suite YAML (default, paper, ...)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set train.steps=100 (repeatable)")
    s.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run the suite at every combination of the swept values, each point as --set KEY=V "
                        "(repeatable), e.g. --sweep model.num_experts=4,8,16 --sweep model.top_k=1,2 "
                        "(docs/along.md)")
    store_arg(s)
    s.add_argument("--runs-dir", default=None, help="checkpoints and models (default: beside the store, runs/)")
    s.add_argument("--store-mode", choices=("store", "bundles"), default="store",
                   help="store (default): write the DuckDB store, and each run's result bundle beside its "
                        "checkpoint; bundles: write only the bundles, never open the store (clusters, many "
                        "processes; `harness import RUNS_DIR` brings them in; docs/distributed.md)")
    s.add_argument("--resume", action="store_true", help="continue unfinished runs from their last checkpoint")
    s.add_argument("--restart", action="store_true", help="delete these runs' checkpoints and start clean")
    s.add_argument("--rerun", action="store_true",
                   help="train runs whose (spec, seed) already finished in the store again (default: skip them; "
                        "a copy is not another seed), e.g. to re-measure speed")
    s.add_argument("--no-eval", action="store_true", help="skip lm-eval tasks after pretraining")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--precision", type=float, default=None, metavar="D",
                   help="add seeds (for every router at once) until each router's difference to the baseline "
                        "has a 95%% CI half-width <= D in the primary metric's units, e.g. 0.01 bpb; "
                        "stops on the CI's width, never on significance (docs/benchmark.md)")
    s.add_argument("--max-seeds", type=int, default=20, metavar="N", help="--precision stops at N seeds (default 20)")
    s.add_argument("--baseline", dest="baseline_router", default=None,  # `baseline` is an output file elsewhere
                   help="--precision compares every router with this one (default smoe)")
    s.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="train N runs (router x seed) at once in worker processes, one store "
                        "(default: cores // train.threads, at most one per run; 1 = one after another)")
    g = s.add_argument_group("distributed (torchrun; see docs/distributed.md)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="processes per node: re-launch this command through torchrun with DDP "
                        "(train.batch_size stays the global batch)")
    g.add_argument("--nnodes", default=None, help="number of nodes (or MIN:MAX), passed to torchrun")
    g.add_argument("--node-rank", type=int, default=None, help="this node's rank (static rendezvous)")
    g.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="rendezvous endpoint, the same on every node (multi-node)")
    g.add_argument("--rdzv-id", default=None, help="rendezvous job id (c10d rendezvous)")
    s.set_defaults(fn=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume and args.restart:
        raise UsageError("--resume continues unfinished runs and --restart deletes their checkpoints; "
                         "give one of them, not both")
    multi = (args.nproc or 1) > 1 or str(args.nnodes or "1") != "1"
    sweeps = parse_sweeps(args.sweep, args.set)
    if sweeps and (args.precision is not None or multi or distributed.launched_by_torchrun()):
        raise SpecError("--sweep runs its points one after another from one process; it does not combine with "
                        f"{'--precision' if args.precision is not None else '--nproc/--nnodes'} (run each point "
                        "with --set KEY=V instead)")
    # every point is loaded (and so validated) before any of them trains
    grid = [(pt, _load_spec(args, pt)) for pt in (points(sweeps) if sweeps else [None])]
    _check_distinct(grid)
    spec = grid[0][1]
    if args.precision is not None:
        # imported only here: leaderboard.stats brings scipy.stats (~1 s), which a plain run never needs
        from ..tools.precision import check_request, default_baseline

        if multi or distributed.launched_by_torchrun():
            raise SpecError("--precision runs rounds of seeds from one process; it does not combine with "
                            "--nproc/--nnodes (run the rounds with --jobs instead)")
        if args.rerun:
            raise SpecError("--precision adds seeds and skips the finished ones; --rerun would retrain every "
                            "seed each round: give one of them")
        if args.store_mode == "bundles":
            raise SpecError("--precision reads the store between rounds of seeds; --store-mode bundles never opens "
                            "it: use --store-mode store")
        check_request(spec, args.precision, args.max_seeds, args.baseline_router or default_baseline(spec))
    ddp = multi or distributed.launched_by_torchrun()
    _resolve_jobs(args.jobs, spec, ddp)  # validated once; each point resolves its own default below
    if multi and not distributed.launched_by_torchrun() and not os.environ.get(distributed.ENV_MARKER):
        return _launch_torchrun(args, spec)
    if distributed.launched_by_torchrun():
        dctx = distributed.init_from_env(spec.train.device)
        try:
            return _cmd_run(args, grid, dctx, ddp)
        finally:
            distributed.shutdown()
    return _cmd_run(args, grid, distributed.current(), ddp)


def _load_spec(args: argparse.Namespace, point: Point | None):  # noqa: ANN202 - a SuiteSpec
    """The spec of one sweep point (``--set`` items, then the point's own), as ``harness run`` runs it."""
    try:
        spec = load_suite(args.suite, preset=args.preset, overrides=args.set + (point.overrides if point else []),
                          routers=_csv(args.routers) if args.routers else None,
                          seeds=[int(s) for s in _csv(args.seeds)] if args.seeds else None)
    except SpecError as exc:
        if point is None:
            raise
        raise SpecError(f"--sweep point {point.label}: {exc}") from None
    if args.no_eval:

        spec = replace(spec, eval=replace(spec.eval, enabled=False))
    if get_adapter(spec.suite).lm_eval and spec.eval.enabled and spec.eval.tasks:
        check_tasks(spec.eval.tasks, "eval.tasks")  # now, not after hours of pretraining
    return spec


def _check_distinct(grid: list) -> None:
    """Two points that resolve to the same runs (``4`` and ``4.0`` of a float key, a value equal to the default
    under another spelling) would train one spec twice: say so instead of skipping silently."""
    seen: dict[frozenset, str] = {}
    for pt, spec in grid:
        if pt is None:
            continue
        key = frozenset((r.spec_hash, r.seed) for r in spec.runs())
        if key in seen:
            raise SpecError(f"--sweep points {seen[key]} and {pt.label} are the same spec; drop one of the values")
        seen[key] = pt.label


def _resolve_jobs(jobs: int | None, spec, ddp: bool) -> int:  # noqa: ANN001
    """``--jobs``: validated; unset = as many runs at once as the cores allow at ``train.threads`` each."""
    if jobs is not None and jobs < 1:
        raise SpecError(f"--jobs must be a positive integer, got {jobs}")
    if ddp:
        if (jobs or 1) > 1:
            raise SpecError("--jobs runs whole runs in parallel processes and --nproc/--nnodes spreads each run "
                            "over DDP processes; they do not combine: use one or the other")
        return 1
    return jobs or default_jobs(spec.train.threads, len(spec.runs()))


def _launch_torchrun(args: argparse.Namespace, spec) -> int:  # noqa: ANN001
    """``--nproc N``: validate here (one-line errors, exit 2), then re-run this command under torchrun."""
    nproc = args.nproc or 1
    world = distributed.total_world(nproc, args.nnodes)
    if world is not None:
        distributed.check_spec(spec, world)
    preflight(spec, get_adapter(spec.suite))  # also builds the data caches once, before N processes read them
    return distributed.launch(args.argv, nproc, args.nnodes, args.rdzv_endpoint, args.node_rank, args.rdzv_id)


def _cmd_run(args: argparse.Namespace, grid: list, dctx, ddp: bool) -> int:  # noqa: ANN001
    """Every point of ``grid`` (``[(None, spec)]`` without --sweep) in turn, then one summary table."""
    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir(args.store)
    bundles_only = args.store_mode == "bundles"
    # bundles: each run's rows go to its result bundle in the runs directory and no database file is opened
    store: Store = BundleStore(runs_dir) if bundles_only else RecordingStore(args.store, runs_dir)
    if dctx.is_main:  # before anything is written: a store and a runs directory that can be written
        if not bundles_only:
            argtypes.probe_dir(Path(args.store).parent, "results store directory", "--store")
        argtypes.probe_dir(runs_dir, "runs directory", "--runs-dir")
        store.check_readable()
    if args.restart and dctx.is_main:

        for run in (r for _, spec in grid for r in spec.runs()):
            run_dir = runs_dir / run.run_key
            for p in (run_dir.iterdir() if run_dir.is_dir() else ()):  # its bundles stay: the recorded runs
                if p.name != BUNDLES:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            store.abandon(run.spec_hash, run.seed, "abandoned: restarted from scratch with --restart")
    dctx.barrier()
    tables = []
    ok = True
    for i, (point, spec) in enumerate(grid, 1):
        if point is not None:
            print(f"sweep point {i}/{len(grid)}: {point.label} ({len(spec.runs())} runs)", file=sys.stderr,
                  flush=True)
        results = _run_point(args, spec, store, runs_dir, _resolve_jobs(args.jobs, spec, ddp))
        ok = ok and all(r.status in ("finished", "skipped") for r in results)
        adapter = get_adapter(spec.suite)
        table = summary_table(results, adapter.primary_metric, adapter.unit)
        if point is not None:  # the swept values as they were typed, first: which point each row belongs to
            table = table.select(*(pl.lit(v).alias(k) for k, v in point.items), pl.all())
        tables.append(table)
    if not dctx.is_main:
        return 0  # rank 0 reports (and carries the exit status)
    with pl.Config(tbl_rows=100 * len(grid), tbl_cols=20, float_precision=4, tbl_width_chars=160):
        print(pl.concat(tables, how="diagonal_relaxed") if len(tables) > 1 else tables[0])
    if bundles_only:
        print(f"results: bundles under {runs_dir}  (harness import {runs_dir} --store {args.store})")
    else:
        print(f"results: {args.store}  (harness runs --store {args.store}; harness board --store {args.store})")
    return 0 if ok else 1


def _run_point(args: argparse.Namespace, spec, store: Store, runs_dir: Path, jobs: int) -> list:  # noqa: ANN001
    """The runs of one spec (with --precision: rounds of seeds until the CI is narrow enough)."""
    after = None
    adapter = get_adapter(spec.suite)
    if adapter.lm_eval and spec.eval.enabled and spec.eval.tasks:
        # a partial, not a closure: it can be pickled, so --jobs workers evaluate their own runs
        after = functools.partial(eval_after_pretraining, store=store, runs_dir=runs_dir)

    if args.quiet and not distributed.current().distributed:
        adapter.warm_cache(spec.runs()[0])  # the LM's token cache, without a bar under --quiet
    results = []

    def one_round(s) -> bool:  # noqa: ANN001 - a SuiteSpec
        res = run_suite(s, store, runs_dir, resume=args.resume, rerun=args.rerun, progress=not args.quiet,
                        after_run=after, jobs=jobs)
        seen = {(r.router, r.seed) for r in res}
        results[:] = [r for r in results if (r.router, r.seed) not in seen] + list(res)
        return all(r.status in ("finished", "skipped") for r in res)

    if args.precision is None:
        one_round(spec)
    else:
        from ..tools.precision import default_baseline, run_until_precise  # see cmd_run

        run_until_precise(spec, one_round, store, get_adapter(spec.suite).primary_metric, args.precision,
                          args.max_seeds, args.baseline_router or default_baseline(spec),
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    return results
