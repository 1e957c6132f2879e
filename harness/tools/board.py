"""``harness board``: serve the Streamlit leaderboard over a results store.

    harness board [--store results/harness.duckdb] [--port 8501] [--address 127.0.0.1]

The board binds 127.0.0.1 (this machine only) unless ``--address`` says otherwise: the
results and every run's details are not served to the network by accident. To share a
board on purpose, ``harness board --address 0.0.0.0`` (all interfaces) or one interface's IP.

Runs ``streamlit run leaderboard/app.py --server.headless true --server.port N
--browser.gatherUsageStats false -- --store PATH``. The page opens the store read-only,
so it can stay up while ``harness run`` writes to the same file.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


DEFAULT_ADDRESS = "127.0.0.1"  # private by default; --address 0.0.0.0 shares it


def app_path() -> Path:
    import leaderboard

    return Path(leaderboard.__file__).resolve().parent / "app.py"


def board_command(store: str, port: int, address: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path()),
           "--server.headless", "true", "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.address", address or DEFAULT_ADDRESS]
    return cmd + ["--", "--store", str(Path(store).expanduser().resolve())]


def cmd_board(args: argparse.Namespace) -> int:
    address = args.address or DEFAULT_ADDRESS
    cmd = board_command(args.store, args.port, address)
    host = "localhost" if address == DEFAULT_ADDRESS else address
    scope = ("this machine only; --address 0.0.0.0 shares it on the network" if address == DEFAULT_ADDRESS
             else f"bound to {address}: anyone who can reach it can read the results")
    print(f"harness board: serving {Path(args.store)} at http://{host}:{args.port}  ({scope}; Ctrl-C stops)",
          flush=True)
    if not Path(args.store).exists():
        print(f"harness board: {args.store} does not exist yet; the page shows how to fill it "
              f"(harness run --suite lm --store {args.store})", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
    except FileNotFoundError as exc:  # pragma: no cover - python itself vanished
        print(f"harness: error: cannot start streamlit: {exc}", file=sys.stderr)
        return 2


def register_cli(sub, store_arg) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("board", help="serve the Streamlit leaderboard over the results store")
    store_arg(p)
    from ..args import address, port

    p.add_argument("--port", type=port, default=8501, help="port to serve on, 1-65535 (default 8501)")
    p.add_argument("--address", type=address, default=None,
                   help=f"interface to bind (default {DEFAULT_ADDRESS}: this machine only); "
                        "--address 0.0.0.0 shares the board with the network on purpose")
    p.set_defaults(fn=cmd_board)
