"""``harness board``: serve the Streamlit leaderboard over a results store.

    harness board [--store results/harness.duckdb] [--port 8501] [--address 127.0.0.1]

Runs ``streamlit run leaderboard/app.py --server.headless true --server.port N
--browser.gatherUsageStats false -- --store PATH``. The page opens the store read-only,
so it can stay up while ``harness run`` writes to the same file.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def app_path() -> Path:
    import leaderboard

    return Path(leaderboard.__file__).resolve().parent / "app.py"


def board_command(store: str, port: int, address: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path()),
           "--server.headless", "true", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    if address:
        cmd += ["--server.address", address]
    return cmd + ["--", "--store", str(Path(store).expanduser().resolve())]


def cmd_board(args: argparse.Namespace) -> int:
    cmd = board_command(args.store, args.port, args.address)
    host = args.address or "localhost"
    print(f"harness board: serving {Path(args.store)} at http://{host}:{args.port}  (Ctrl-C stops)", flush=True)
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
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--address", default=None,
                   help="interface to bind, e.g. 127.0.0.1 (default: streamlit's, all interfaces)")
    p.set_defaults(fn=cmd_board)
