"""``harness runs``: the runs in the store, one line each, with their primary metric.

The suites it knows, and each suite's primary metric, are the suites registry's (``harness.suites.SUITES``)."""
from __future__ import annotations

import argparse

import polars as pl

from ..store import Store
from ..suites import SUITES


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    s = sub.add_parser("runs", help="list runs in the store")
    store_arg(s)
    s.add_argument("--suite", default=None, choices=SUITES.in_order())
    s.set_defaults(fn=cmd_runs)


def cmd_runs(args: argparse.Namespace) -> int:
    primary = [(name, adapter.primary_metric) for name, adapter in SUITES.items()]
    case = "CASE " + " ".join("WHEN r.suite = ? THEN ?" for _ in primary) + " END"
    params = [x for pair in primary for x in pair] + ([args.suite] if args.suite else [])
    df = Store(args.store).query(
        "SELECT r.run_id, r.suite, r.router, r.seed, r.status, r.step, r.total_steps, r.spec_hash, "
        "r.started_at, m.value AS primary_metric FROM runs r LEFT JOIN metrics m ON m.run_id = r.run_id "
        f"AND m.name = {case} "
        + ("WHERE r.suite = ? " if args.suite else "") + "ORDER BY r.started_at",
        params,
    )
    with pl.Config(tbl_rows=500, tbl_cols=20, float_precision=4, tbl_width_chars=200, fmt_str_lengths=60):
        print(df)
    return 0
