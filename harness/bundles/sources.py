"""Many sources as one store for the board: DuckDB stores and bundle directories merged into one new DuckDB
file, every run with its ``origin`` (the store file or the bundle directory it came from).

The merged file is the board's own (a temporary file ``harness board`` removes on exit); the sources are only
read (stores through read-only connections, bundles validated as ``harness import`` does). A run id found in
more than one source is kept once (the first source's row, or the bundle's when it got further, as an import
would) and names the other sources in ``also_in``; runs with the same spec hash and seed under different run ids
stay separate rows, and the board's distinct-seed rule counts them once and flags them (leaderboard.store).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

from ..store import Store
from .format import RUN_TABLES, TABLES, BundleError, find_bundles, read_bundle
from .ingest import import_bundle

ORIGIN_COLUMNS = ("origin", "also_in")
_PERF = ("bench_id", "created_at", "machine_id", "git_sha", "router", "config", "metric", "value", "spread")


def _note_also(con, run_id: str, label: str) -> None:  # noqa: ANN001
    con.execute("UPDATE runs SET also_in = CASE WHEN also_in IS NULL THEN ? ELSE also_in || '; ' || ? END "
                "WHERE run_id = ? AND origin <> ? AND (also_in IS NULL OR position(? IN also_in) = 0)",
                [label, label, run_id, label, label])


def merge_sources(dest: str | os.PathLike[str], stores: Sequence[str] = (), bundle_paths: Sequence[str] = (),
                  log: Callable[[str], None] = print) -> dict[str, int]:
    """Fill the new store ``dest`` from ``stores`` then the bundles under ``bundle_paths``; returns counts."""
    out = Store(dest)
    with out.writer() as con:
        for col in ORIGIN_COLUMNS:
            con.execute(f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS {col} VARCHAR")
    counts = {"runs": 0, "repeated": 0, "refused": 0}
    for s in stores:
        label = str(s)
        src = Store(s)
        with src.reader() as rcon:
            have = {t: {r[0] for r in rcon.execute("SELECT column_name FROM information_schema.columns "
                                                    "WHERE table_name = ?", [t]).fetchall()} for t in (*TABLES, "perf")}
            data = {}
            for t, cols in TABLES.items():
                if have[t]:
                    names = ", ".join(c if c in have[t] else f"NULL AS {c}" for c, _ in cols)
                    data[t] = rcon.sql(f"SELECT {names} FROM {t}").to_arrow_table()
            if have["perf"]:
                data["perf"] = rcon.sql(f"SELECT {', '.join(_PERF)} FROM perf").to_arrow_table()
        with out.writer() as con:
            if "runs" not in data:
                continue
            con.register("_src_runs", data["runs"])
            con.execute("CREATE TEMP TABLE _new AS SELECT run_id FROM _src_runs "
                        "WHERE run_id NOT IN (SELECT run_id FROM runs)")
            cols = ", ".join(c for c, _ in TABLES["runs"])
            con.execute(f"INSERT INTO runs ({cols}, origin) SELECT {cols}, ? FROM _src_runs "
                        f"WHERE run_id IN (SELECT run_id FROM _new)", [label])
            seen = [r[0] for r in con.execute("SELECT run_id FROM _src_runs WHERE run_id NOT IN "
                                              "(SELECT run_id FROM _new)").fetchall()]
            for rid in seen:
                _note_also(con, rid, label)
            counts["runs"] += con.execute("SELECT count(*) FROM _new").fetchall()[0][0]
            counts["repeated"] += len(seen)
            for t in RUN_TABLES:
                if t in data:
                    con.register("_src", data[t])
                    con.execute(f"INSERT INTO {t} SELECT * FROM _src WHERE run_id IN (SELECT run_id FROM _new)")
                    con.unregister("_src")
            if "machines" in data:
                con.register("_src", data["machines"])
                con.execute("INSERT INTO machines SELECT * FROM _src ON CONFLICT DO NOTHING")
                con.unregister("_src")
            if "perf" in data:
                con.register("_src", data["perf"])
                con.execute(f"INSERT INTO perf ({', '.join(_PERF)}) SELECT * FROM _src EXCEPT SELECT * FROM perf")
                con.unregister("_src")
            con.execute("DROP TABLE _new")
            con.unregister("_src_runs")
    for p in bundle_paths:
        label = str(p)
        dirs, _ = find_bundles([p])
        if not dirs:
            log(f"harness board: no result bundles under {p}")
        for d in dirs:
            try:
                b = read_bundle(d)
            except BundleError as exc:
                counts["refused"] += 1
                log(f"harness board: skipped {' '.join(str(exc).split())}")
                continue
            with out.writer() as con:
                prev = next(iter(con.execute("SELECT origin, also_in FROM runs WHERE run_id = ?",
                                             [b.run_id]).fetchall()), None)
                verdict = import_bundle(con, b, extra={"origin": label})
                if verdict == "imported":
                    counts["runs"] += 1
                elif verdict == "present":
                    counts["repeated"] += 1
                    _note_also(con, b.run_id, label)
                else:  # the bundle got further than the row of an earlier source: its row, the other one noted
                    counts["repeated"] += 1
                    also = "; ".join(x for x in (prev[0], prev[1]) if x)
                    con.execute("UPDATE runs SET also_in = ? WHERE run_id = ?", [also or None, b.run_id])
    return counts

