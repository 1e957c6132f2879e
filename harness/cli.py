"""``harness`` command line.

    harness routers                       list registered routers
    harness run --suite lm [...]          pretrain every router, record in the store
    harness runs / harness show RUN_ID    read the store
    harness bench, harness eval, harness board, harness regress, harness doctor

Expected failures (bad spec, unknown router, missing data, locked store,
corrupt checkpoint) print one line ``harness: error: ...`` and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from . import args as argtypes
from .args import split_csv as _csv
from .errors import UsageError, UserError

EXIT_USAGE = 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data.text import DataError
    from .registry import PluginLoadError, UnknownRouterError
    from .spec import SpecError
    from .store import StoreError
    from .train import CheckpointError

    errs: list[type[BaseException]] = [UserError, SpecError, UnknownRouterError, PluginLoadError, DataError,
                                       StoreError, CheckpointError]
    from .data.vision import VisionDataError

    errs.append(VisionDataError)
    try:
        from .regress import GoldenError

        errs.append(GoldenError)
    except ImportError:  # pragma: no cover - regress is optional
        pass
    return tuple(errs)


class HarnessParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``harness: error: argument --x: ...; see `harness run --help```."""

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        raise UsageError(f"{message}; see `{self.prog} --help`")


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so the running run is recorded ``interrupted`` before exit."""


def _on_sigterm(signum, frame):  # noqa: ANN001
    raise Terminated()


# argparse ``type=`` checks by option name, applied to every sub-command (also those registered by other
# modules), so one bad value fails the same way everywhere, before anything runs: {dest: check}; per-command
# entries override. The checks return strings unchanged (validated), so commands parse them as before.
_ARG_TYPES = {
    "*": {"store": argtypes.store_file, "routers": argtypes.names, "seeds": argtypes.seeds,
          "tasks": argtypes.names, "jobs": argtypes.positive_int, "nproc": argtypes.positive_int,
          "node_rank": argtypes.nonneg_int, "repeats": argtypes.positive_int, "batch_size": argtypes.positive_int,
          "port": argtypes.port, "address": argtypes.address, "device": argtypes.device,
          "min_effect": argtypes.float_range(0), "baseline": argtypes.out_file, "preset": argtypes.nonempty,
          "suite": argtypes.nonempty, "run_id": argtypes.nonempty, "data_dir": argtypes.dir_or_missing,
          "limit": argtypes.float_range(0, lo_open=True)},
    "run": {"runs_dir": argtypes.out_dir},
    "eval": {"runs_dir": argtypes.in_dir},
}


def _harden(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse has no public type for it
    for name, parser in sub.choices.items():
        table = {**_ARG_TYPES["*"], **_ARG_TYPES.get(name, {})}
        for action in parser._actions:  # noqa: SLF001
            check = table.get(action.dest)
            if check is None or action.type not in (None, str, int, float) or action.nargs not in (None, "?"):
                continue
            if action.choices is not None or isinstance(action, (argparse._StoreTrueAction,  # noqa: SLF001
                                                                    argparse._StoreFalseAction)):  # noqa: SLF001
                continue
            action.type = check


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=os.environ.get("HARNESS_STORE") or "results/harness.duckdb",
                   type=argtypes.store_file, help="DuckDB results file (default results/harness.duckdb or $HARNESS_STORE)")


# -- commands -----------------------------------------------------------------------------

def cmd_routers(args: argparse.Namespace) -> int:
    from .registry import describe_routers

    rows = describe_routers()
    w = max(len(r["name"]) for r in rows)
    wo = max(len(r["origin"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{w}}  {r['origin']:<{wo}}  {r['description']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .spec import load_suite

    if args.resume and args.restart:
        raise UsageError("--resume continues unfinished runs and --restart deletes their checkpoints; "
                         "give one of them, not both")

    spec = load_suite(args.suite, preset=args.preset, overrides=args.set,
                      routers=_csv(args.routers) if args.routers else None,
                      seeds=[int(s) for s in _csv(args.seeds)] if args.seeds else None)
    if args.no_eval:
        from dataclasses import replace

        spec = replace(spec, eval=replace(spec.eval, enabled=False))
    if spec.suite == "lm" and spec.eval.enabled and spec.eval.tasks:
        from .evaluate import check_tasks

        check_tasks(spec.eval.tasks, "eval.tasks")  # now, not after hours of pretraining
    from . import distributed

    multi = (args.nproc or 1) > 1 or str(args.nnodes or "1") != "1"
    args.jobs = _resolve_jobs(args, spec, multi or distributed.launched_by_torchrun())
    if multi and not distributed.launched_by_torchrun() and not os.environ.get(distributed.ENV_MARKER):
        return _launch_torchrun(args, spec)
    if distributed.launched_by_torchrun():
        dctx = distributed.init_from_env(spec.train.device)
        try:
            return _cmd_run(args, spec, dctx)
        finally:
            distributed.shutdown()
    return _cmd_run(args, spec, distributed.current())


def _resolve_jobs(args: argparse.Namespace, spec, ddp: bool) -> int:  # noqa: ANN001
    """``--jobs``: validated; unset = as many runs at once as the cores allow at ``train.threads`` each."""
    from .parallel import default_jobs
    from .spec import SpecError

    if args.jobs is not None and args.jobs < 1:
        raise SpecError(f"--jobs must be a positive integer, got {args.jobs}")
    if ddp:
        if (args.jobs or 1) > 1:
            raise SpecError("--jobs runs whole runs in parallel processes and --nproc/--nnodes spreads each run "
                            "over DDP processes; they do not combine: use one or the other")
        return 1
    return args.jobs or default_jobs(spec.train.threads, len(spec.runs()))


def _launch_torchrun(args: argparse.Namespace, spec) -> int:  # noqa: ANN001
    """``--nproc N``: validate here (one-line errors, exit 2), then re-run this command under torchrun."""
    from . import distributed
    from .runner import get_adapter, preflight

    nproc = args.nproc or 1
    world = distributed.total_world(nproc, args.nnodes)
    if world is not None:
        distributed.check_spec(spec, world)
    preflight(spec, get_adapter(spec.suite))  # also builds the data caches once, before N processes read them
    return distributed.launch(args.argv, nproc, args.nnodes, args.rdzv_endpoint, args.node_rank, args.rdzv_id)


def _cmd_run(args: argparse.Namespace, spec, dctx) -> int:  # noqa: ANN001
    from .runner import run_suite, summary_table
    from .store import Store

    store = Store(args.store)
    runs_dir = Path(args.runs_dir or Path(args.store).parent / "runs")
    if dctx.is_main:  # before anything is written: a store and a runs directory that can be written
        argtypes.probe_dir(Path(args.store).parent, "results store directory", "--store")
        argtypes.probe_dir(runs_dir, "runs directory", "--runs-dir")
        store.check_readable()
    if args.restart and dctx.is_main:
        import shutil

        for run in spec.runs():
            shutil.rmtree(runs_dir / run.run_key, ignore_errors=True)
            store.abandon(run.spec_hash, run.seed, "abandoned: restarted from scratch with --restart")
    dctx.barrier()
    after = None
    if spec.suite == "lm" and spec.eval.enabled and spec.eval.tasks:
        import functools

        from .evaluate import eval_after_pretraining

        # a partial, not a closure: it can be pickled, so --jobs workers evaluate their own runs
        after = functools.partial(eval_after_pretraining, store=store, runs_dir=runs_dir)

    results = run_suite(spec, store, runs_dir, resume=args.resume, rerun=args.rerun,
                        progress=not args.quiet, after_run=after,
                        jobs=getattr(args, "jobs", None) or 1)
    if not dctx.is_main:
        return 0  # rank 0 reports (and carries the exit status)
    from .runner import get_adapter

    adapter = get_adapter(spec.suite)
    import polars as pl

    with pl.Config(tbl_rows=100, tbl_cols=20, float_precision=4, tbl_width_chars=160):
        print(summary_table(results, adapter.primary_metric, adapter.unit))
    print(f"results: {args.store}  (harness runs --store {args.store}; harness board --store {args.store})")
    return 0 if all(r.status in ("finished", "skipped") for r in results) else 1


def cmd_runs(args: argparse.Namespace) -> int:
    import polars as pl

    from .store import Store

    df = Store(args.store).query(
        "SELECT r.run_id, r.suite, r.router, r.seed, r.status, r.step, r.total_steps, r.spec_hash, "
        "r.started_at, m.value AS primary_metric FROM runs r LEFT JOIN metrics m ON m.run_id = r.run_id "
        "AND m.name = CASE WHEN r.suite = 'lm' THEN 'val_bpb' ELSE 'val_top1' END "
        + ("WHERE r.suite = ? " if args.suite else "") + "ORDER BY r.started_at",
        [args.suite] if args.suite else None,
    )
    with pl.Config(tbl_rows=500, tbl_cols=20, float_precision=4, tbl_width_chars=200, fmt_str_lengths=60):
        print(df)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .spec import SpecError
    from .store import Store

    store = Store(args.store)
    with store.reader() as con:
        prefix = args.run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        row = con.execute("SELECT * FROM runs WHERE run_id = ? OR run_id LIKE ? ESCAPE '\\' "
                          "ORDER BY started_at DESC LIMIT 1", [args.run_id, prefix]).fetchone()
        if row is None:
            raise SpecError(f"no run {args.run_id!r} in {args.store}; `harness runs` lists them")
        cols = [d[0] for d in con.description]
        run = dict(zip(cols, row))
        metrics = con.execute("SELECT name, value, stderr FROM metrics WHERE run_id = ? ORDER BY name",
                              [run["run_id"]]).fetchall()
    for k in ("run_id", "suite", "router", "seed", "status", "step", "total_steps", "spec_hash", "git_sha",
              "machine_id", "started_at", "finished_at"):
        print(f"{k:>12}: {run[k]}")
    print("      config:", json.dumps(json.loads(run["config"]), indent=2, sort_keys=True).replace("\n", "\n" + " " * 14))
    print("    versions:", run["versions"])
    if run["error"]:
        print("       error:", run["error"])
    print("     metrics:")
    for name, value, stderr in metrics:
        se = f" ± {stderr:.4g}" if stderr is not None else ""
        print(f"   {name:>30} = {value:.6g}{se}")
    return 0


# -- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = HarnessParser(prog="harness", description="Benchmark harness for MoE routing strategies")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("routers", help="list registered routers (built-in and plugins)")
    s.set_defaults(fn=cmd_routers)

    s = sub.add_parser("run", help="pretrain every router of a suite and record the results")
    s.add_argument("--suite", default="lm", help="lm | vision | path to a suite YAML")
    s.add_argument("--routers", help="comma-separated subset, e.g. smoe,moge")
    s.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    s.add_argument("--preset", default=None, help="preset of the suite YAML (default, paper, ...)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set train.steps=100 (repeatable)")
    _store_arg(s)
    s.add_argument("--runs-dir", default=None, help="checkpoints and models (default: beside the store, runs/)")
    s.add_argument("--resume", action="store_true", help="continue unfinished runs from their last checkpoint")
    s.add_argument("--restart", action="store_true", help="delete these runs' checkpoints and start clean")
    s.add_argument("--rerun", action="store_true",
                   help="train runs whose (spec, seed) already finished in the store again (default: skip them; "
                        "a copy is not another seed), e.g. to re-measure speed")
    s.add_argument("--no-eval", action="store_true", help="skip lm-eval tasks after pretraining")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
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

    s = sub.add_parser("runs", help="list runs in the store")
    _store_arg(s)
    s.add_argument("--suite", default=None, choices=("lm", "vision"))
    s.set_defaults(fn=cmd_runs)

    s = sub.add_parser("show", help="print one run: spec, versions, metrics")
    s.add_argument("run_id")
    _store_arg(s)
    s.set_defaults(fn=cmd_show)

    for register in _optional_commands():
        register(sub, _store_arg)
    _harden(sub)
    return p


def _optional_commands():
    """Sub-commands living in their own modules (each module exposes ``register_cli(sub, store_arg)``)."""
    import importlib

    out = []
    for mod in ("harness.profile", "harness.evaluate", "harness.board", "harness.regress", "harness.doctor",
                "harness.claims"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue
            raise
        if hasattr(m, "register_cli"):
            out.append(m.register_cli)
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    prev_term = None
    try:
        if threading.current_thread() is threading.main_thread():
            prev_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - not the main thread of the main interpreter
        prev_term = None
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # `harness run --nproc N` re-launches exactly this command line through torchrun
        return int(args.fn(args) or 0)
    except _user_errors() as exc:
        _error_line(str(exc))
        return EXIT_USAGE
    except Terminated:
        print("harness: terminated (SIGTERM); unfinished runs are recorded as interrupted: "
              "`harness run ... --resume` continues them", file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print("harness: interrupted; unfinished runs can be continued with --resume", file=sys.stderr)
        return EXIT_SIGINT
    except OSError as exc:  # the environment (disk full, read-only, permissions): say which file, not a traceback
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        _error_line(f"{exc.strerror or exc}{where}; free space or fix the permissions, then re-run "
                    f"(`harness run ... --resume` continues unfinished runs)")
        return EXIT_USAGE
    finally:
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)


def _error_line(msg: str) -> None:
    msg = " ".join(str(msg).split())  # one line, whatever the exception's message held
    print(f"harness: error: {msg}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
