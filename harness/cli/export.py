"""``harness export [RUN_ID...] --to DIR``: stored runs as result bundles (``harness.bundles``), one per run at
``DIR/<run id>/``, for ``harness import`` on another store or machine.

    harness export --to outbox                           # every run
    harness export --suite lm --preset tiny --routers smoe,moge --to outbox
    harness export lm-smoe-3f2a --to outbox              # run ids or unique prefixes
"""
from __future__ import annotations

import argparse
import sys

from tqdm.auto import tqdm

from .. import args as argtypes
from ..args import split_csv
from ..bundles.ingest import export_runs, select_runs
from ..errors import UsageError, UserError
from ..store import Store


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    p = sub.add_parser("export", help="write stored runs as result bundles to a directory")
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to export (ids or unique prefixes); "
                                                                "none: every run the filters keep")
    store_arg(p)
    p.add_argument("--to", required=True, type=argtypes.out_dir, metavar="DIR", help="directory for the bundles")
    p.add_argument("--suite", help="only this suite's runs")
    p.add_argument("--preset", help="only this preset's runs")
    p.add_argument("--routers", help="only these routers' runs (comma-separated)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if args.run_ids and (args.suite or args.preset or args.routers):
        raise UsageError("give run ids or --suite/--preset/--routers filters, not both")
    store = Store(args.store)
    if not store.path.exists():
        raise UserError(f"no results store at {store.path}; pass --store the store to export from")
    ids = select_runs(store, args.run_ids, args.suite, args.preset,
                      split_csv(args.routers) if args.routers else None)
    if not ids:
        raise UserError(f"no runs in {store.path} match the filters; `harness runs --store {store.path}` lists them")
    bar = tqdm(total=len(ids), unit="bundle", desc="export", leave=False, dynamic_ncols=True, file=sys.stderr,
               disable=args.quiet or not sys.stderr.isatty())
    try:
        export_runs(store, ids, args.to, on_done=lambda _: bar.update(1))
    finally:
        bar.close()
    print(f"export: {len(ids)} bundles -> {args.to}  (harness import {args.to} --store OTHER.duckdb)", flush=True)
    return 0
