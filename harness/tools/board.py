"""Start the Streamlit leaderboard (``leaderboard/app.py``) over a results store; ``harness board`` is its command.

Runs ``streamlit run leaderboard/app.py --server.headless true --server.port N
--browser.gatherUsageStats false --server.address ADDRESS -- --store PATH``. The page opens the store
read-only, so it can stay up while ``harness run`` writes to the same file. The board binds 127.0.0.1
(this machine only) unless told another address: the results and every run's details are not served to
the network by accident.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import leaderboard

DEFAULT_ADDRESS = "127.0.0.1"  # private by default; --address 0.0.0.0 shares it


def app_path() -> Path:
    return Path(leaderboard.__file__).resolve().parent / "app.py"


def board_command(store: str, port: int, address: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path()),
           "--server.headless", "true", "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.address", address or DEFAULT_ADDRESS]
    return cmd + ["--", "--store", str(Path(store).expanduser().resolve())]


def serve(store: str, port: int, address: str | None = None) -> int:
    """Run the board in the foreground until Ctrl-C; its exit status (0 after Ctrl-C, 2 if it cannot start)."""
    try:
        return subprocess.call(board_command(store, port, address))
    except KeyboardInterrupt:
        return 0
    except FileNotFoundError as exc:  # pragma: no cover - python itself vanished
        print(f"harness: error: cannot start streamlit: {exc}", file=sys.stderr)
        return 2
