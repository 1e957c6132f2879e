"""``harness board``: serve the Streamlit leaderboard over the results store.

    harness board [--store results/harness.duckdb] [--port 8501] [--address 127.0.0.1]

Binds 127.0.0.1 (this machine only) unless ``--address`` says otherwise; to share a board on purpose,
``harness board --address 0.0.0.0`` (all interfaces) or one interface's IP. The server itself is started
by :func:`harness.tools.board.serve`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..args import address, port
from ..tools.board import DEFAULT_ADDRESS, serve


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    p = sub.add_parser("board", help="serve the Streamlit leaderboard over the results store")
    store_arg(p)
    p.add_argument("--port", type=port, default=8501, help="port to serve on, 1-65535 (default 8501)")
    p.add_argument("--address", type=address, default=None,
                   help=f"interface to bind (default {DEFAULT_ADDRESS}: this machine only); "
                        "--address 0.0.0.0 shares the board with the network on purpose")
    p.set_defaults(fn=cmd_board)


def cmd_board(args: argparse.Namespace) -> int:
    addr = args.address or DEFAULT_ADDRESS
    host = "localhost" if addr == DEFAULT_ADDRESS else addr
    scope = ("this machine only; --address 0.0.0.0 shares it on the network" if addr == DEFAULT_ADDRESS
             else f"bound to {addr}: anyone who can reach it can read the results")
    print(f"harness board: serving {Path(args.store)} at http://{host}:{args.port}  ({scope}; Ctrl-C stops)",
          flush=True)
    if not Path(args.store).exists():
        print(f"harness board: {args.store} does not exist yet; the page shows how to fill it "
              f"(harness run --suite lm --store {args.store})", flush=True)
    return serve(args.store, args.port, addr)
