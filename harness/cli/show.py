"""``harness show RUN_ID``: one run's spec, versions and metrics (a unique run-id prefix is enough)."""
from __future__ import annotations

import argparse
import json

from ..store import Store


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    s = sub.add_parser("show", help="print one run: spec, versions, metrics")
    s.add_argument("run_id")
    store_arg(s)
    s.set_defaults(fn=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    store = Store(args.store)
    run = store.find_run(args.run_id)
    with store.reader() as con:
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
