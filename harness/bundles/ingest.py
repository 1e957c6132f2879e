"""Bundles in and out of a DuckDB store: ``harness import`` (:func:`import_bundle`) and ``harness export``
(:func:`export_runs`).

Import is one transaction per bundle and idempotent: a run id the store already holds with the same rows is
"present"; an earlier version of the run (still running or interrupted there, fewer steps, fewer rows: the
bundle was rewritten after a resume or lm-eval) is replaced by the bundle's rows ("updated"); a later one is
kept ("present"). A re-run copy (another run id, same spec hash and seed) is imported as the row it is, and
the board's distinct-seed rule counts it once. Rows go in through registered Arrow tables and ``?``
parameters only: no value from a bundle is ever spliced into SQL.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import duckdb
import pyarrow as pa

from ..store import Store
from .format import RUN_ID, RUN_TABLES, Bundle, BundleError, run_tables, write_bundle

_TERMINAL = ("finished", "diverged", "failed")


def _progress(status: str | None, step: int | None, counts: Sequence[int]) -> tuple:
    """How far a version of a run got: ended before running, then steps, then rows (lm-eval adds metrics)."""
    return (status in _TERMINAL, status == "finished", step or 0, sum(counts))


def import_bundle(con: duckdb.DuckDBPyConnection, b: Bundle, extra: dict[str, Any] | None = None) -> str:
    """Insert bundle ``b`` on ``con`` (inside the caller's transaction): "imported", "updated" or "present".

    ``extra`` fills additional ``runs`` columns of a board's merged store (origin)."""
    rid = b.run_id
    run = b.run
    row = next(iter(con.execute("SELECT status, step FROM runs WHERE run_id = ?", [rid]).fetchall()), None)
    verdict = "imported"
    if row is not None:
        have = [con.execute(f"SELECT count(*) FROM {t} WHERE run_id = ?", [rid]).fetchall()[0][0] for t in RUN_TABLES]
        mine = [b.tables[t].num_rows for t in RUN_TABLES]
        if (row[0], row[1], have) == (run["status"], run["step"], mine) or \
                _progress(row[0], row[1], have) >= _progress(run["status"], run["step"], mine):
            return "present"
        for t in (*RUN_TABLES, "runs"):
            con.execute(f"DELETE FROM {t} WHERE run_id = ?", [rid])
        verdict = "updated"
    for t in ("machines", "runs", *RUN_TABLES):
        tbl = b.tables[t]
        if not tbl.num_rows:
            continue
        if t == "runs" and extra:
            for k, v in extra.items():
                tbl = tbl.append_column(k, pa.array([v] * tbl.num_rows, type=pa.string()))
        cols = ", ".join(tbl.column_names)
        con.register("_bundle_rows", tbl)
        try:
            con.execute(f"INSERT INTO {t} ({cols}) SELECT {cols} FROM _bundle_rows"
                        + (" ON CONFLICT DO NOTHING" if t == "machines" else ""))
        finally:
            con.unregister("_bundle_rows")
    return verdict


def select_runs(store: Store, run_ids: Sequence[str] = (), suite: str | None = None, preset: str | None = None,
                routers: Sequence[str] | None = None) -> list[str]:
    """Run ids of the store to export: the given ids (or unique prefixes), else every run the filters keep."""
    if run_ids:
        return list(dict.fromkeys(store.find_run(r)["run_id"] for r in run_ids))
    where, params = [], []
    for col, val in (("suite", suite), ("preset", preset)):
        if val is not None:
            where.append(f"{col} = ?")
            params.append(val)
    if routers:
        where.append(f"router IN ({', '.join('?' * len(routers))})")
        params += list(routers)
    sql = "SELECT run_id FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY started_at, run_id"
    with store.reader() as con:
        return [r[0] for r in con.execute(sql, params).fetchall()]


def export_runs(store: Store, run_ids: Sequence[str], to: str | os.PathLike[str],
                on_done=None) -> list[Path]:  # noqa: ANN001
    """A bundle per run at ``<to>/<run id>/`` (replaced if there); one read connection for all of them."""
    out = []
    with store.reader() as con:
        for rid in run_ids:
            if not RUN_ID.match(rid):
                raise BundleError(f"run id {rid[:80]!r} in {store.path} cannot name a bundle directory")
            tables = run_tables(con, rid)
            out.append(write_bundle(Path(to) / rid, tables))
            if on_done is not None:
                on_done(rid)
    return out
