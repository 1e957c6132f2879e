"""Read the results store: read-only, short-lived connections that wait (with backoff) while a ``harness run``
holds the write lock, and loaders ``load_*(path)`` that return polars DataFrames of a fixed schema."""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import duckdb
import polars as pl

from harness.store import StoreError as HarnessStoreError
from harness.store import default_store_path, is_lock_error

FILL_COMMAND = "harness run --suite lm"


# -- connections --------------------------------------------------------------------------

class StoreError(HarnessStoreError):
    """The store cannot be read (damaged file, not a DuckDB file, ...)."""


class StoreMissing(StoreError):
    pass


class StoreBusy(StoreError):
    """A writer kept the file locked for longer than we were willing to wait."""


def resolve_store_path(argv: Sequence[str] | None = None) -> str:
    """``--store PATH`` (after streamlit's ``--``), else $HARNESS_STORE, else results/harness.duckdb."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--store", default=None)
    try:
        args, _ = p.parse_known_args(list(argv) if argv is not None else [])
    except SystemExit:  # e.g. "--store" given without a value
        args = argparse.Namespace(store=None)
    return args.store or default_store_path()


def store_stamp(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Changes whenever the store (or its write-ahead log) is written: a cache key."""
    out = []
    for p in (Path(path), Path(str(path) + ".wal")):
        try:
            out.append(p.stat().st_mtime_ns)
        except OSError:
            out.append(0)
    return out[0], out[1]


@contextlib.contextmanager
def connect(
    path: str | os.PathLike[str],
    timeout: float = 60.0,
    on_wait: Callable[[int, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection, closed on exit. While a writer holds the file lock, retry with
    exponential backoff (calling ``on_wait(attempt, waited_s)`` before each sleep) for up to
    ``timeout`` seconds, then raise :class:`StoreBusy`."""
    path = Path(path)
    if not path.exists():
        raise StoreMissing(f"no results store at {path}; `{FILL_COMMAND} --store {path}` creates one")
    t0 = time.monotonic()
    delay, attempt = 0.05, 0
    while True:
        try:
            con = duckdb.connect(str(path), read_only=True)
            break
        except duckdb.Error as exc:
            if not is_lock_error(exc):
                raise StoreError(f"cannot read results store {path}: {exc}") from exc
            waited = time.monotonic() - t0
            if waited > timeout:
                raise StoreBusy(
                    f"results store {path} stayed locked by a writer for {waited:.0f}s; "
                    f"a `harness run` is probably writing - try again in a moment"
                ) from exc
            attempt += 1
            if on_wait is not None:
                on_wait(attempt, waited)
            sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)
    try:
        yield con
    finally:
        con.close()


def _q(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> pl.DataFrame:
    return con.sql(sql, params=list(params) if params else None).pl()


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
    """All rows of a query, fully fetched (DuckDB 2 refuses new work while a result is half-read)."""
    return con.sql(sql, params=list(params) if params else None).fetchall()


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in _rows(con, "SELECT table_name FROM information_schema.tables")}


def _in(col: str, values: Sequence[Any]) -> str:
    """``col IN (?, ?, ...)``, one placeholder per value."""
    return f"{col} IN ({', '.join('?' * len(values))})"


# -- loaders (store path -> polars) ---------------------------------------------------------

RUN_COLUMNS = {
    "run_id": pl.Utf8, "suite": pl.Utf8, "router": pl.Utf8, "spec_hash": pl.Utf8, "seed": pl.Int64,
    "preset": pl.Utf8, "status": pl.Utf8, "step": pl.Int64, "total_steps": pl.Int64, "git_sha": pl.Utf8,
    "machine_id": pl.Utf8, "started_at": pl.Datetime("us"), "finished_at": pl.Datetime("us"),
    "config": pl.Utf8, "versions": pl.Utf8, "error": pl.Utf8,
    "hostname": pl.Utf8, "cpu": pl.Utf8, "threads": pl.Int64, "gpu": pl.Utf8,
    # a board over several sources (harness board --store A --import DIR: harness.bundles.sources): where each run
    # came from, the other sources that hold the same run id, and whether its spec hash + seed is in another source
    "origin": pl.Utf8, "also_in": pl.Utf8, "machine": pl.Utf8, "cross_origin": pl.Boolean,
}
METRIC_COLUMNS = {"run_id": pl.Utf8, "name": pl.Utf8, "value": pl.Float64, "stderr": pl.Float64,
                  "split": pl.Utf8, "step": pl.Int64}
CURVE_COLUMNS = {"run_id": pl.Utf8, "step": pl.Int64, "name": pl.Utf8, "value": pl.Float64}
ROUTING_COLUMNS = {"run_id": pl.Utf8, "step": pl.Int64, "layer": pl.Int64, "expert": pl.Int64, "load": pl.Float64}
HEALTH_COLUMNS = {"run_id": pl.Utf8, "step": pl.Int64, "layer": pl.Int64, "name": pl.Utf8, "value": pl.Float64}
PERF_COLUMNS = {"bench_id": pl.Utf8, "created_at": pl.Datetime("us"), "machine_id": pl.Utf8, "git_sha": pl.Utf8,
                "router": pl.Utf8, "config": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64, "spread": pl.Float64}


def empty(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def conform(df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    cols = []
    for name, dtype in schema.items():
        cols.append(pl.col(name).cast(dtype) if name in df.columns else pl.lit(None, dtype=dtype).alias(name))
    return df.select(cols) if df.height or df.columns else empty(schema)


def store_state(path: str | os.PathLike[str], **kw: Any) -> str:
    """'missing' (no file), 'empty' (no runs and no bench rows yet) or 'ready'."""
    if not Path(path).exists():
        return "missing"
    with connect(path, **kw) as con:
        tables = _tables(con)
        n = 0
        if "runs" in tables:
            n += _rows(con, "SELECT count(*) FROM runs")[0][0]
        if "perf" in tables:
            n += _rows(con, "SELECT count(*) FROM perf")[0][0]
    return "ready" if n else "empty"


def load_runs(path: str | os.PathLike[str], **kw: Any) -> pl.DataFrame:
    """Every run with its machine; ``machine`` is a short human label."""
    with connect(path, **kw) as con:
        tables = _tables(con)
        if "runs" not in tables:
            return empty(RUN_COLUMNS)
        if "machines" in tables:
            df = _q(con, "SELECT r.*, m.hostname, m.cpu, m.threads, m.gpu FROM runs r "
                         "LEFT JOIN machines m USING (machine_id) ORDER BY r.started_at, r.run_id")
        else:
            df = _q(con, "SELECT * FROM runs ORDER BY started_at, run_id")
    df = conform(df, {k: v for k, v in RUN_COLUMNS.items() if k not in ("machine", "cross_origin")})
    return df.with_columns(machine_label_expr().alias("machine"), cross_origin_expr().alias("cross_origin"))


def cross_origin_expr() -> pl.Expr:
    """A run whose id, or whose spec hash and seed, another source holds too: flagged on the board, and counted
    once by the distinct-seed rule (leaderboard.stats.distinct_seeds)."""
    origin = pl.coalesce(pl.col("origin"), pl.lit(""))
    return pl.col("also_in").is_not_null() | (origin.n_unique().over("spec_hash", "seed") > 1)


def machine_label_expr() -> pl.Expr:
    host = pl.coalesce(pl.col("hostname"), pl.col("machine_id"), pl.lit("unknown"))
    hw = pl.coalesce(pl.col("gpu"), pl.col("cpu"), pl.lit("?"))
    return pl.concat_str([host, pl.lit(" · "), hw, pl.lit(" · "),
                          pl.coalesce(pl.col("machine_id").str.slice(0, 6), pl.lit("?"))])


def load_metrics(path: str | os.PathLike[str], run_ids: Sequence[str] | None = None, **kw: Any) -> pl.DataFrame:
    return _load_table(path, "metrics", METRIC_COLUMNS, run_ids, **kw)


def load_health(path: str | os.PathLike[str], run_ids: Sequence[str] | None = None, **kw: Any) -> pl.DataFrame:
    """routing_health rows (load_entropy, max_over_mean_load, dead_experts, fluctuation, ...), one per
    (run, step, layer, name). Stores written before the training loop stopped evaluating the final
    step twice hold duplicates there: identical rows except 'fluctuation', which the repeated
    evaluation records as 0 (it compares the model with itself); keeping the max drops that artefact."""
    where, params = "", []
    if run_ids is not None:
        if not run_ids:
            return empty(HEALTH_COLUMNS)
        where, params = " WHERE " + _in("run_id", run_ids), list(run_ids)
    with connect(path, **kw) as con:
        if "routing_health" not in _tables(con):
            return empty(HEALTH_COLUMNS)
        df = _q(con, "SELECT run_id, step, layer, name, max(value) AS value FROM routing_health" + where +
                " GROUP BY run_id, step, layer, name ORDER BY run_id, step, layer, name", params)
    return conform(df, HEALTH_COLUMNS)


def load_curves(path: str | os.PathLike[str], run_ids: Sequence[str] | None = None,
                names: Sequence[str] | None = None, **kw: Any) -> pl.DataFrame:
    where, params = [], []
    if run_ids is not None:
        if not run_ids:
            return empty(CURVE_COLUMNS)
        where.append(_in("run_id", run_ids))
        params += list(run_ids)
    if names is not None:
        if not names:
            return empty(CURVE_COLUMNS)
        where.append(_in("name", names))
        params += list(names)
    with connect(path, **kw) as con:
        if "curves" not in _tables(con):
            return empty(CURVE_COLUMNS)
        sql = "SELECT run_id, step, name, value FROM curves"
        if where:
            sql += " WHERE " + " AND ".join(where)
        df = _q(con, sql + " ORDER BY run_id, name, step", params)
    return conform(df, CURVE_COLUMNS)


def curve_names(path: str | os.PathLike[str], run_ids: Sequence[str] | None = None, **kw: Any) -> list[str]:
    with connect(path, **kw) as con:
        if "curves" not in _tables(con):
            return []
        if run_ids is not None:
            if not run_ids:
                return []
            rows = _rows(con, "SELECT DISTINCT name FROM curves WHERE " + _in("run_id", run_ids), list(run_ids))
        else:
            rows = _rows(con, "SELECT DISTINCT name FROM curves")
    return sorted(r[0] for r in rows)


def load_routing(path: str | os.PathLike[str], run_id: str, step: int | None = None, **kw: Any) -> pl.DataFrame:
    """Expert load fractions of one run at one evaluation step (default: its last)."""
    with connect(path, **kw) as con:
        if "routing" not in _tables(con):
            return empty(ROUTING_COLUMNS)
        if step is None:
            rows = _rows(con, "SELECT max(step) FROM routing WHERE run_id = ?", [run_id])
            step = rows[0][0] if rows else None
            if step is None:
                return empty(ROUTING_COLUMNS)
        df = _q(con, "SELECT run_id, step, layer, expert, avg(load) AS load FROM routing "
                     "WHERE run_id = ? AND step = ? GROUP BY ALL ORDER BY layer, expert", [run_id, step])
    return conform(df, ROUTING_COLUMNS)


def routing_steps(path: str | os.PathLike[str], run_id: str, **kw: Any) -> list[int]:
    with connect(path, **kw) as con:
        if "routing" not in _tables(con):
            return []
        rows = _rows(con, "SELECT DISTINCT step FROM routing WHERE run_id = ? ORDER BY step", [run_id])
    return [int(r[0]) for r in rows]


def runs_with_routing(path: str | os.PathLike[str], **kw: Any) -> list[str]:
    with connect(path, **kw) as con:
        if "routing" not in _tables(con):
            return []
        return [r[0] for r in _rows(con, "SELECT DISTINCT run_id FROM routing")]


def load_perf(path: str | os.PathLike[str], **kw: Any) -> pl.DataFrame:
    """``harness bench`` rows, with the machine label."""
    with connect(path, **kw) as con:
        tables = _tables(con)
        if "perf" not in tables:
            return empty({**PERF_COLUMNS, "machine": pl.Utf8})
        if "machines" in tables:
            df = _q(con, "SELECT p.*, m.hostname, m.cpu, m.gpu FROM perf p LEFT JOIN machines m USING (machine_id) "
                         "ORDER BY p.created_at, p.bench_id")
        else:
            df = _q(con, "SELECT * FROM perf ORDER BY created_at, bench_id")
    for c in ("hostname", "cpu", "gpu"):
        if c not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.Utf8).alias(c))
    base = conform(df, PERF_COLUMNS)
    extra = df.select(pl.col("hostname").cast(pl.Utf8), pl.col("cpu").cast(pl.Utf8), pl.col("gpu").cast(pl.Utf8)) \
        if df.height else pl.DataFrame(schema={"hostname": pl.Utf8, "cpu": pl.Utf8, "gpu": pl.Utf8})
    out = pl.concat([base, extra], how="horizontal")
    return out.with_columns(machine_label_expr().alias("machine")).drop("hostname", "cpu", "gpu")


def load_machines(path: str | os.PathLike[str], **kw: Any) -> pl.DataFrame:
    with connect(path, **kw) as con:
        if "machines" not in _tables(con):
            return pl.DataFrame()
        return _q(con, "SELECT * FROM machines ORDER BY first_seen")


def _load_table(path, table: str, schema: dict[str, pl.DataType], run_ids: Sequence[str] | None, **kw: Any):
    with connect(path, **kw) as con:
        if table not in _tables(con):
            return empty(schema)
        cols = ", ".join(schema)
        if run_ids is None:
            df = _q(con, f"SELECT {cols} FROM {table}")
        elif not run_ids:
            return empty(schema)
        else:
            df = _q(con, f"SELECT {cols} FROM {table} WHERE " + _in("run_id", run_ids), list(run_ids))
    return conform(df, schema)
