"""``harness board``: serve the Streamlit leaderboard over the results store, or over several sources at once.

    harness board [--store results/harness.duckdb] [--port 8501] [--address 127.0.0.1]
    harness board --store a.duckdb --store b.duckdb --import cluster/runs    # many sources, one board

Binds 127.0.0.1 (this machine only) unless ``--address`` says otherwise; to share a board on purpose,
``harness board --address 0.0.0.0`` (all interfaces) or one interface's IP. The server itself is started
by :func:`harness.tools.board.serve`. With more than one store, or ``--import`` (result bundles), the sources
are merged into a temporary store first (:func:`harness.bundles.sources.merge_sources`), each run with its
origin; the sources are only read, and the merged copy is removed when the board stops (restart it to re-read).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from .. import args as argtypes
from ..args import address, port
from ..bundles.sources import merge_sources
from ..store import DEFAULT_STORE, default_store_path
from ..tools.board import DEFAULT_ADDRESS, serve


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    p = sub.add_parser("board", help="serve the Streamlit leaderboard over the results store")
    p.add_argument("--store", action="append", default=None, type=argtypes.store_file,
                   help=f"DuckDB results file (default {DEFAULT_STORE} or $HARNESS_STORE); repeat it to show "
                        "several stores on one board")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="DIR",
                   help="also show the result bundles under DIR (a runs directory, `harness export` output, a "
                        "glob); repeatable")
    p.add_argument("--port", type=port, default=8501, help="port to serve on, 1-65535 (default 8501)")
    p.add_argument("--address", type=address, default=None,
                   help=f"interface to bind (default {DEFAULT_ADDRESS}: this machine only); "
                        "--address 0.0.0.0 shares the board with the network on purpose")
    p.set_defaults(fn=cmd_board)


def cmd_board(args: argparse.Namespace) -> int:
    stores = list(dict.fromkeys(args.store or ([] if args.imports else [default_store_path()])))
    addr = args.address or DEFAULT_ADDRESS
    host = "localhost" if addr == DEFAULT_ADDRESS else addr
    scope = ("this machine only; --address 0.0.0.0 shares it on the network" if addr == DEFAULT_ADDRESS
             else f"bound to {addr}: anyone who can reach it can read the results")
    if len(stores) == 1 and not args.imports:
        store = stores[0]
        print(f"harness board: serving {Path(store)} at http://{host}:{args.port}  ({scope}; Ctrl-C stops)",
              flush=True)
        if not Path(store).exists():
            print(f"harness board: {store} does not exist yet; the page shows how to fill it "
                  f"(harness run --suite lm --store {store})", flush=True)
        return serve(store, args.port, addr)
    tmp = Path(tempfile.mkdtemp(prefix="harness-board-"))
    try:
        merged = tmp / "board.duckdb"
        counts = merge_sources(merged, stores, args.imports, log=lambda s: print(s, file=sys.stderr, flush=True))
        names = ", ".join([*stores, *args.imports])
        print(f"harness board: serving {counts['runs']} runs from {len(stores) + len(args.imports)} sources "
              f"({names}; {counts['repeated']} found in more than one, {counts['refused']} bundles skipped) at "
              f"http://{host}:{args.port}  ({scope}; Ctrl-C stops; restart it to re-read the sources)", flush=True)
        return serve(str(merged), args.port, addr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
