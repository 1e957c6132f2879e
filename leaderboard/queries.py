"""Leaderboard data layer: read the results store, aggregate over seeds, compare routers.

Pure Python (DuckDB + polars + scipy), no Streamlit, so every number the page
shows is unit-testable. Two kinds of function live here:

* loaders ``load_*(path)`` open the store **read-only** on a short-lived
  connection (retrying with backoff while a ``harness run`` holds the write
  lock) and return polars DataFrames;
* pure transforms (``filter_runs``, ``overview``, ``curve_bands``, ...) that
  take those frames and return new ones.

Statistics: a router's score is the mean over seeds of its finished runs (one per
spec hash and seed, the latest: ``distinct_seeds``) with a 95% confidence interval
from Student's t (``mean ± t(0.975, n-1) * s / sqrt(n)``);
"differs from SMoE" is Welch's unequal-variance t-test at alpha = 0.05, only
when both sides have at least two seeds.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import duckdb
import polars as pl

from harness.store import StoreError as HarnessStoreError
from harness.store import is_lock_error

DEFAULT_STORE = "results/harness.duckdb"
FILL_COMMAND = "harness run --suite lm"
ALPHA = 0.05
CONFIDENCE = 0.95
BASELINE = "smoe"
DENSE = "dense"
LMEVAL_PREFIX = "lmeval/"


# -- suites --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SuiteMeta:
    name: str
    quality: str            # primary validation metric
    test: str               # its test-split twin
    higher_better: bool
    throughput: str         # training items per second
    unit: str               # "tok" | "img"
    label: str              # human label of the quality metric
    extra: tuple[str, ...] = ()  # further per-router metrics worth a column
    percent: bool = False   # a fraction in [0, 1], shown as a percentage
    test_label: str = ""    # human label of the test metric

    @property
    def test_name(self) -> str:
        return self.test_label or self.test.replace("_", " ")

    @property
    def bounds(self) -> tuple[float, float] | None:
        return (0.0, 1.0) if self.percent else None

    def quality_header(self) -> str:
        return f"{self.label}{' %' if self.percent else ''} {self.arrow}"

    def test_header(self) -> str:
        return f"{self.test_name}{' %' if self.percent else ''} {self.arrow}"

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_better else "↓"


SUITES: dict[str, SuiteMeta] = {
    "lm": SuiteMeta("lm", "val_bpb", "test_bpb", False, "train_tok_per_s", "tok", "val bpb", test_label="test bpb"),
    "vision": SuiteMeta("vision", "val_top1", "test_top1", True, "train_img_per_s", "img", "val top-1",
                        extra=("val_top5",), percent=True, test_label="test top-1"),
}


def suite_meta(suite: str, metric_names: Iterable[str] = ()) -> SuiteMeta:
    """Known suites by name; an unknown one is described from the metric names it wrote."""
    if suite in SUITES:
        return SUITES[suite]
    names = sorted(set(metric_names))
    tput = next((n for n in names if n.startswith("train_") and n.endswith("_per_s")), "train_tok_per_s")
    unit = tput[len("train_"):-len("_per_s")] or "item"
    val = next((n for n in names if n.startswith("val_")), "val_loss")
    lower = any(k in val for k in ("loss", "bpb", "ppl", "err", "bits"))
    return SuiteMeta(suite, val, "test_" + val[4:], not lower, tput, unit, val.replace("_", " "))


# -- connections -----------------------------------------------------------------------------

class StoreError(HarnessStoreError):
    """The store cannot be read (damaged file, not a DuckDB file, ...)."""


class StoreMissing(StoreError):
    pass


class StoreBusy(StoreError):
    """A writer kept the file locked for longer than we were willing to wait."""


def resolve_store_path(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> str:
    """``--store PATH`` (after streamlit's ``--``), else $HARNESS_STORE, else results/harness.duckdb."""
    import argparse

    env = os.environ if env is None else env
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--store", default=None)
    try:
        args, _ = p.parse_known_args(list(argv) if argv is not None else [])
    except SystemExit:  # e.g. "--store" given without a value
        args = argparse.Namespace(store=None)
    return args.store or env.get("HARNESS_STORE") or DEFAULT_STORE


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


# -- loaders (store path -> polars) ------------------------------------------------------------

RUN_COLUMNS = {
    "run_id": pl.Utf8, "suite": pl.Utf8, "router": pl.Utf8, "spec_hash": pl.Utf8, "seed": pl.Int64,
    "preset": pl.Utf8, "status": pl.Utf8, "step": pl.Int64, "total_steps": pl.Int64, "git_sha": pl.Utf8,
    "machine_id": pl.Utf8, "started_at": pl.Datetime("us"), "finished_at": pl.Datetime("us"),
    "config": pl.Utf8, "versions": pl.Utf8, "error": pl.Utf8,
    "hostname": pl.Utf8, "cpu": pl.Utf8, "threads": pl.Int64, "gpu": pl.Utf8, "machine": pl.Utf8,
}
METRIC_COLUMNS = {"run_id": pl.Utf8, "name": pl.Utf8, "value": pl.Float64, "stderr": pl.Float64,
                  "split": pl.Utf8, "step": pl.Int64}
CURVE_COLUMNS = {"run_id": pl.Utf8, "step": pl.Int64, "name": pl.Utf8, "value": pl.Float64}
ROUTING_COLUMNS = {"run_id": pl.Utf8, "step": pl.Int64, "layer": pl.Int64, "expert": pl.Int64, "load": pl.Float64}
HEALTH_COLUMNS = {"run_id": pl.Utf8, "step": pl.Int64, "layer": pl.Int64, "name": pl.Utf8, "value": pl.Float64}
PERF_COLUMNS = {"bench_id": pl.Utf8, "created_at": pl.Datetime("us"), "machine_id": pl.Utf8, "git_sha": pl.Utf8,
                "router": pl.Utf8, "config": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64, "spread": pl.Float64}


def _empty(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def _conform(df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    cols = []
    for name, dtype in schema.items():
        cols.append(pl.col(name).cast(dtype) if name in df.columns else pl.lit(None, dtype=dtype).alias(name))
    return df.select(cols) if df.height or df.columns else _empty(schema)


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
            return _empty(RUN_COLUMNS)
        if "machines" in tables:
            df = _q(con, "SELECT r.*, m.hostname, m.cpu, m.threads, m.gpu FROM runs r "
                         "LEFT JOIN machines m USING (machine_id) ORDER BY r.started_at, r.run_id")
        else:
            df = _q(con, "SELECT * FROM runs ORDER BY started_at, run_id")
    df = _conform(df, {k: v for k, v in RUN_COLUMNS.items() if k != "machine"})
    return df.with_columns(machine_label_expr().alias("machine"))


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
            return _empty(HEALTH_COLUMNS)
        where, params = f" WHERE run_id IN ({', '.join('?' * len(run_ids))})", list(run_ids)
    with connect(path, **kw) as con:
        if "routing_health" not in _tables(con):
            return _empty(HEALTH_COLUMNS)
        df = _q(con, "SELECT run_id, step, layer, name, max(value) AS value FROM routing_health" + where +
                " GROUP BY run_id, step, layer, name ORDER BY run_id, step, layer, name", params)
    return _conform(df, HEALTH_COLUMNS)


def load_curves(path: str | os.PathLike[str], run_ids: Sequence[str] | None = None,
                names: Sequence[str] | None = None, **kw: Any) -> pl.DataFrame:
    where, params = [], []
    if run_ids is not None:
        if not run_ids:
            return _empty(CURVE_COLUMNS)
        where.append(f"run_id IN ({', '.join('?' * len(run_ids))})")
        params += list(run_ids)
    if names is not None:
        if not names:
            return _empty(CURVE_COLUMNS)
        where.append(f"name IN ({', '.join('?' * len(names))})")
        params += list(names)
    with connect(path, **kw) as con:
        if "curves" not in _tables(con):
            return _empty(CURVE_COLUMNS)
        sql = "SELECT run_id, step, name, value FROM curves"
        if where:
            sql += " WHERE " + " AND ".join(where)
        df = _q(con, sql + " ORDER BY run_id, name, step", params)
    return _conform(df, CURVE_COLUMNS)


def curve_names(path: str | os.PathLike[str], run_ids: Sequence[str] | None = None, **kw: Any) -> list[str]:
    with connect(path, **kw) as con:
        if "curves" not in _tables(con):
            return []
        if run_ids is not None:
            if not run_ids:
                return []
            rows = _rows(con, f"SELECT DISTINCT name FROM curves WHERE run_id IN ({', '.join('?' * len(run_ids))})",
                         list(run_ids))
        else:
            rows = _rows(con, "SELECT DISTINCT name FROM curves")
    return sorted(r[0] for r in rows)


def load_routing(path: str | os.PathLike[str], run_id: str, step: int | None = None, **kw: Any) -> pl.DataFrame:
    """Expert load fractions of one run at one evaluation step (default: its last)."""
    with connect(path, **kw) as con:
        if "routing" not in _tables(con):
            return _empty(ROUTING_COLUMNS)
        if step is None:
            rows = _rows(con, "SELECT max(step) FROM routing WHERE run_id = ?", [run_id])
            step = rows[0][0] if rows else None
            if step is None:
                return _empty(ROUTING_COLUMNS)
        df = _q(con, "SELECT run_id, step, layer, expert, avg(load) AS load FROM routing "
                     "WHERE run_id = ? AND step = ? GROUP BY ALL ORDER BY layer, expert", [run_id, step])
    return _conform(df, ROUTING_COLUMNS)


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
            return _empty({**PERF_COLUMNS, "machine": pl.Utf8})
        if "machines" in tables:
            df = _q(con, "SELECT p.*, m.hostname, m.cpu, m.gpu FROM perf p LEFT JOIN machines m USING (machine_id) "
                         "ORDER BY p.created_at, p.bench_id")
        else:
            df = _q(con, "SELECT * FROM perf ORDER BY created_at, bench_id")
    for c in ("hostname", "cpu", "gpu"):
        if c not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.Utf8).alias(c))
    base = _conform(df, PERF_COLUMNS)
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
            return _empty(schema)
        cols = ", ".join(schema)
        if run_ids is None:
            df = _q(con, f"SELECT {cols} FROM {table}")
        elif not run_ids:
            return _empty(schema)
        else:
            df = _q(con, f"SELECT {cols} FROM {table} WHERE run_id IN ({', '.join('?' * len(run_ids))})",
                    list(run_ids))
    return _conform(df, schema)


# -- filters -------------------------------------------------------------------------------------

def filter_runs(
    runs: pl.DataFrame,
    suite: str | None = None,
    presets: Sequence[str] | None = None,
    routers: Sequence[str] | None = None,
    machines: Sequence[str] | None = None,
    git_shas: Sequence[str] | None = None,
    spec_hashes: Sequence[str] | None = None,
    date_range: tuple[date, date] | None = None,
) -> pl.DataFrame:
    """Each filter given as a collection keeps the runs whose value is in it (None = no filter)."""
    df = runs
    if suite is not None:
        df = df.filter(pl.col("suite") == suite)
    for col, allowed in (("preset", presets), ("router", routers), ("machine", machines),
                         ("git_sha", git_shas), ("spec_hash", spec_hashes)):
        if allowed is not None:
            df = df.filter(pl.col(col).is_in(list(allowed)))
    if date_range is not None and len(date_range) == 2 and date_range[0] is not None and date_range[1] is not None:
        lo, hi = date_range
        d = pl.col("started_at").dt.date()
        df = df.filter((d >= lo) & (d <= hi))
    return df


def status_counts(runs: pl.DataFrame) -> dict[str, int]:
    out = {s: 0 for s in ("finished", "diverged", "failed", "running")}
    for s, n in runs.group_by("status").len().iter_rows():
        out[s] = out.get(s, 0) + int(n)
    return out


def distinct_seeds(runs: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """One finished run per (spec hash, seed), the latest finished; and how many finished copies were set aside.

    Re-running a finished (spec, seed) (``harness run --rerun``) measures the same thing again: the
    copy has the same numbers, and counting it as another seed shrinks the CI to 0 and invents
    significance (pseudo-replication, issue 21). Every statistic on the board goes through this;
    unfinished runs are kept (they are only counted)."""
    if runs.height == 0 or not {"status", "spec_hash", "seed"} <= set(runs.columns):
        return runs, 0
    fin = runs.filter(pl.col("status") == "finished")
    order = [c for c in ("finished_at", "started_at", "run_id") if c in runs.columns]
    keep = fin.sort(order, descending=True, nulls_last=True).unique(subset=["spec_hash", "seed"], keep="first")
    dropped = fin.height - keep.height
    if dropped == 0:
        return runs, 0
    kept = keep["run_id"].to_list()
    return runs.filter((pl.col("status") != "finished") | pl.col("run_id").is_in(kept)), dropped


def duplicate_counts(runs: pl.DataFrame) -> dict[str, int]:
    """Router -> finished copies :func:`distinct_seeds` sets aside."""
    if runs.height == 0:
        return {}
    fin = runs.filter(pl.col("status") == "finished")
    kept, _ = distinct_seeds(fin)
    a = dict(fin.group_by("router").len().iter_rows())
    b = dict(kept.group_by("router").len().iter_rows())
    return {r: int(a[r] - b.get(r, 0)) for r in a if a[r] - b.get(r, 0)}


def router_order(routers: Iterable[str]) -> list[str]:
    """dense and smoe first (the references), then the rest alphabetically."""
    rs = sorted(set(r for r in routers if r is not None))
    head = [r for r in (DENSE, BASELINE) if r in rs]
    return head + [r for r in rs if r not in head]


# -- statistics ------------------------------------------------------------------------------------

def mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> tuple[float | None, float | None, int]:
    """(mean, half-width of the Student-t confidence interval, n) over the finite values.
    The half-width is None when n < 2."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return None, None, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, None, n
    from scipy import stats

    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n), n


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """Welch's t-test: (t, two-sided p) of a vs b, or None when either side has n < 2."""
    a = [float(x) for x in a if x is not None and math.isfinite(float(x))]
    b = [float(x) for x in b if x is not None and math.isfinite(float(x))]
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if max(a) == min(a) and max(b) == min(b):  # both constant: Welch is undefined
        return (0.0, 1.0) if ma == mb else (math.copysign(math.inf, ma - mb), 0.0)
    import warnings

    from scipy import stats

    with warnings.catch_warnings():  # one constant sample: scipy warns about precision, the test is fine
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def significance(a: Sequence[float], b: Sequence[float], higher_better: bool,
                 alpha: float = ALPHA) -> tuple[str, float | None]:
    """Label for router samples ``a`` against baseline samples ``b``:
    'better' / 'worse' (Welch p < alpha), 'within noise', or 'n<2'."""
    res = welch(a, b)
    if res is None:
        return "n<2", None
    t, p = res
    if p >= alpha:
        return "within noise", p
    better = (t > 0) == higher_better
    return ("better" if better else "worse"), p


def sig_text(label: str, p: float | None) -> str:
    if label == "baseline":
        return "— baseline"
    if label in ("n<2", "no SMoE"):
        return label
    pp = "p<0.001" if p is not None and p < 0.001 else f"p={p:.3f}" if p is not None and p < 0.01 else \
        f"p={p:.2f}" if p is not None else ""
    glyph = {"better": "▲ better", "worse": "▼ worse", "within noise": "≈ within noise"}.get(label, label)
    return f"{glyph} ({pp})" if pp else glyph


# -- per-run and per-router summaries --------------------------------------------------------------

def final_health(health: pl.DataFrame) -> pl.DataFrame:
    """Per run, at its last evaluation step: dead experts (summed over layers), load entropy and
    max/mean load (averaged over layers); plus StableMoE's last-change fluctuation (mean over layers)."""
    names = ["dead_experts", "load_entropy", "max_over_mean_load"]
    schema = {"run_id": pl.Utf8, "health_step": pl.Int64, "dead_experts": pl.Float64, "load_entropy": pl.Float64,
              "max_over_mean_load": pl.Float64, "fluctuation_last_change": pl.Float64}
    if health.height == 0:
        return _empty(schema)
    h = health.filter(pl.col("name").is_in(names))
    last = h.group_by("run_id").agg(pl.col("step").max().alias("health_step"))
    h = h.join(last, on="run_id").filter(pl.col("step") == pl.col("health_step"))
    agg = h.group_by("run_id", "health_step").agg(
        pl.col("value").filter(pl.col("name") == "dead_experts").sum().alias("dead_experts"),
        pl.col("value").filter(pl.col("name") == "load_entropy").mean().alias("load_entropy"),
        pl.col("value").filter(pl.col("name") == "max_over_mean_load").mean().alias("max_over_mean_load"),
    )
    fl = health.filter(pl.col("name") == "fluctuation_last_change").group_by("run_id").agg(
        pl.col("value").mean().alias("fluctuation_last_change"))
    out = agg.join(fl, on="run_id", how="full", coalesce=True)
    return _conform(out, schema)


def per_run_table(runs: pl.DataFrame, metrics: pl.DataFrame, health: pl.DataFrame, meta: SuiteMeta) -> pl.DataFrame:
    """One row per run: its identity, the suite's headline metrics, and final routing health."""
    wanted = [meta.quality, meta.test, meta.throughput, "peak_mem_mb", "params_total", *meta.extra]
    m = metrics.filter(pl.col("name").is_in(wanted) & pl.col("run_id").is_in(runs["run_id"].to_list()))
    if m.height:
        wide = m.group_by("run_id", "name").agg(pl.col("value").last()).pivot(
            on="name", index="run_id", values="value")
    else:
        wide = pl.DataFrame(schema={"run_id": pl.Utf8})
    for w in wanted:
        if w not in wide.columns:
            wide = wide.with_columns(pl.lit(None, dtype=pl.Float64).alias(w))
    base = runs.select("run_id", "router", "seed", "status", "spec_hash", "preset", "machine", "git_sha",
                       "started_at")
    return base.join(wide, on="run_id", how="left").join(final_health(health), on="run_id", how="left")


OVERVIEW_SCHEMA = {
    "rank": pl.Int64, "router": pl.Utf8, "n": pl.Int64,
    "quality_mean": pl.Float64, "quality_ci": pl.Float64, "test_mean": pl.Float64, "test_ci": pl.Float64,
    "throughput": pl.Float64, "throughput_ci": pl.Float64, "vs_dense": pl.Float64, "vs_smoe": pl.Float64,
    "peak_mem_mb": pl.Float64, "params": pl.Float64,
    "dead_experts": pl.Float64, "load_entropy": pl.Float64, "max_over_mean_load": pl.Float64,
    "fluctuation_last_change": pl.Float64,
    "sig_label": pl.Utf8, "p_value": pl.Float64, "significance": pl.Utf8,
    "diverged": pl.Int64, "failed": pl.Int64, "running": pl.Int64, "duplicates": pl.Int64, "spec_hashes": pl.Int64,
    "seeds": pl.Utf8,
}


def overview(runs: pl.DataFrame, metrics: pl.DataFrame, health: pl.DataFrame, meta: SuiteMeta,
             baseline: str = BASELINE, alpha: float = ALPHA) -> pl.DataFrame:
    """One row per router (finished runs only), ranked by mean quality, best first.

    ``runs`` is the already-filtered run table of ONE suite; diverged/failed/running runs in it are
    only counted. ``vs_dense``/``vs_smoe`` are throughput ratios (router / reference, >1 = faster)."""
    dupes = duplicate_counts(runs)
    runs, _ = distinct_seeds(runs)  # a re-run copy of a (spec, seed) is not another seed
    counts: dict[str, dict[str, int]] = {}
    for router, status, n in runs.group_by("router", "status").len().iter_rows():
        counts.setdefault(router, {})[status] = int(n)
    fin = runs.filter(pl.col("status") == "finished")
    table = per_run_table(fin, metrics, health, meta)
    by_router = {r: table.filter(pl.col("router") == r) for r in router_order(runs["router"].to_list())}

    def vals(r: str, col: str) -> list[float]:
        df = by_router.get(r)
        if df is None or col not in df.columns:
            return []
        return [v for v in df[col].to_list() if v is not None]

    def mean(xs: list[float]) -> float | None:
        xs = [x for x in xs if x is not None and math.isfinite(x)]
        return sum(xs) / len(xs) if xs else None

    dense_tp = mean(vals(DENSE, meta.throughput)) if DENSE in by_router else None
    base_tp = mean(vals(baseline, meta.throughput)) if baseline in by_router else None
    base_q = vals(baseline, meta.quality)
    have_base = bool(base_q)
    rows = []
    for r, df in by_router.items():
        q_mean, q_ci, n = mean_ci(vals(r, meta.quality))
        t_mean, t_ci, _ = mean_ci(vals(r, meta.test))
        tp_mean, tp_ci, _ = mean_ci(vals(r, meta.throughput))
        if r == baseline and have_base:
            label, p = "baseline", None
        elif not have_base:
            label, p = "no SMoE", None
        elif n == 0:
            label, p = "n<2", None
        else:
            label, p = significance(vals(r, meta.quality), base_q, meta.higher_better, alpha)
        c = counts.get(r, {})
        rows.append({
            "router": r, "n": n, "quality_mean": q_mean, "quality_ci": q_ci, "test_mean": t_mean, "test_ci": t_ci,
            "throughput": tp_mean, "throughput_ci": tp_ci,
            "vs_dense": tp_mean / dense_tp if tp_mean is not None and dense_tp else None,
            "vs_smoe": tp_mean / base_tp if tp_mean is not None and base_tp else None,
            "peak_mem_mb": mean(vals(r, "peak_mem_mb")), "params": mean(vals(r, "params_total")),
            "dead_experts": mean(vals(r, "dead_experts")), "load_entropy": mean(vals(r, "load_entropy")),
            "max_over_mean_load": mean(vals(r, "max_over_mean_load")),
            "fluctuation_last_change": mean(vals(r, "fluctuation_last_change")),
            "sig_label": label, "p_value": p, "significance": sig_text(label, p),
            "diverged": c.get("diverged", 0), "failed": c.get("failed", 0), "running": c.get("running", 0),
            "duplicates": dupes.get(r, 0), "spec_hashes": df["spec_hash"].n_unique() if df.height else 0,
            "seeds": ",".join(str(s) for s in sorted(df["seed"].to_list())) if df.height else "",
        })
    if not rows:
        return _empty(OVERVIEW_SCHEMA)
    out = pl.DataFrame(rows, schema={k: v for k, v in OVERVIEW_SCHEMA.items() if k != "rank"})
    out = out.sort("quality_mean", descending=meta.higher_better, nulls_last=True)
    out = out.with_columns(
        pl.when(pl.col("quality_mean").is_not_null())
        .then(pl.col("quality_mean").rank("min", descending=meta.higher_better))
        .otherwise(None).cast(pl.Int64).alias("rank"))
    return out.select(list(OVERVIEW_SCHEMA))


BEST_DIRECTION = {  # column -> True if higher is better
    "throughput": True, "vs_dense": True, "vs_smoe": True, "peak_mem_mb": False,
    "dead_experts": False, "load_entropy": True, "max_over_mean_load": False,
}


def best_rows(ov: pl.DataFrame, meta: SuiteMeta) -> dict[str, list[int]]:
    """Column -> row indices holding its best value (ties all count)."""
    direction = {"quality_mean": meta.higher_better, "test_mean": meta.higher_better, **BEST_DIRECTION}
    out: dict[str, list[int]] = {}
    for col, higher in direction.items():
        if col not in ov.columns:
            continue
        vs = ov[col].to_list()
        finite = [v for v in vs if v is not None and math.isfinite(v)]
        if len(finite) < 2 and col not in ("quality_mean", "test_mean"):
            continue
        if not finite:
            continue
        best = max(finite) if higher else min(finite)
        out[col] = [i for i, v in enumerate(vs) if v is not None and math.isclose(v, best, rel_tol=1e-12)]
    return out


# -- formatting ------------------------------------------------------------------------------------

def decimals_for(ci: float | None, value: float | None = None, default: int = 3) -> int:
    """Decimals that show the CI to two significant digits (within 1..5)."""
    if ci is not None and ci > 0 and math.isfinite(ci):
        return int(min(5, max(1, 1 - math.floor(math.log10(ci)))))
    if value is not None and math.isfinite(value) and abs(value) >= 100:
        return 1
    return default


def fmt_ci(mean: float | None, ci: float | None, n: int | None = None, digits: int | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    d = decimals_for(ci, mean) if digits is None else digits
    if ci is None or (isinstance(ci, float) and math.isnan(ci)):
        return f"{mean:.{d}f}" + (f" (n={n})" if n is not None and n < 2 else "")
    return f"{mean:.{d}f} ± {ci:.{d}f}"


def fmt_num(v: float | None, digits: int = 0, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:,.{digits}f}{suffix}"


def fmt_si(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    for div, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{s}"
    return f"{v:.3g}"


def display_overview(ov: pl.DataFrame, meta: SuiteMeta) -> pl.DataFrame:
    """The overview as strings, with the column headers the page shows (same row order as ``ov``)."""
    unit = meta.unit
    k = 100.0 if meta.percent else 1.0

    def sc(v: float | None) -> float | None:
        return None if v is None else v * k

    rows = []
    for r in ov.iter_rows(named=True):
        notes = []
        if r["diverged"]:
            notes.append(f"{r['diverged']} diverged")
        if r["failed"]:
            notes.append(f"{r['failed']} failed")
        if r["running"]:
            notes.append(f"{r['running']} running")
        if r.get("duplicates"):
            notes.append(f"{r['duplicates']} duplicate{'s' if r['duplicates'] != 1 else ''}")
        if r["spec_hashes"] and r["spec_hashes"] > 1:
            notes.append(f"{r['spec_hashes']} specs!")
        rows.append({
            "#": str(r["rank"]) if r["rank"] is not None else "—",
            "router": r["router"],
            "n": r["n"],
            meta.quality_header(): fmt_ci(sc(r["quality_mean"]), sc(r["quality_ci"]), r["n"]),
            "vs SMoE": r["significance"],
            meta.test_header(): fmt_ci(sc(r["test_mean"]), sc(r["test_ci"]), r["n"]),
            f"{unit}/s": fmt_si(r["throughput"]),
            "× dense": fmt_num(r["vs_dense"], 2, "×"),
            "× SMoE": fmt_num(r["vs_smoe"], 2, "×"),
            "peak MB": fmt_num(r["peak_mem_mb"], 0),
            "params": fmt_si(r["params"]),
            "dead": fmt_num(r["dead_experts"], 1) if r["dead_experts"] is not None else "—",
            "entropy": fmt_num(r["load_entropy"], 3),
            "max/mean": fmt_num(r["max_over_mean_load"], 2),
            "excluded": ", ".join(notes) if notes else "",
        })
    cols = ["#", "router", "n", meta.quality_header(), "vs SMoE", meta.test_header(),
            f"{unit}/s", "× dense", "× SMoE", "peak MB", "params", "dead", "entropy", "max/mean",
            "excluded"]
    if not rows:
        return pl.DataFrame(schema={c: (pl.Int64 if c == "n" else pl.Utf8) for c in cols})
    return pl.DataFrame(rows).select(cols)


def display_best_cells(ov: pl.DataFrame, meta: SuiteMeta) -> dict[str, list[int]]:
    """Display column name -> rows to highlight as best."""
    best = best_rows(ov, meta)
    name = {"quality_mean": meta.quality_header(), "test_mean": meta.test_header(),
            "throughput": f"{meta.unit}/s", "vs_dense": "× dense", "vs_smoe": "× SMoE", "peak_mem_mb": "peak MB",
            "dead_experts": "dead", "load_entropy": "entropy", "max_over_mean_load": "max/mean"}
    return {name[k]: v for k, v in best.items() if k in name}


def to_latex(ov: pl.DataFrame, meta: SuiteMeta) -> str:
    """A booktabs table of the overview (best values in bold), ready for a paper."""
    best = best_rows(ov, meta)

    def cell(i: int, col: str, text: str) -> str:
        text = text.replace("±", r"$\pm$").replace("×", r"$\times$").replace("_", r"\_").replace("—", "--")
        return rf"\textbf{{{text}}}" if i in best.get(col, []) else text

    arrow = r"$\uparrow$" if meta.higher_better else r"$\downarrow$"
    pct = r" (\%)" if meta.percent else ""
    test_name = meta.test_name + pct
    k = 100.0 if meta.percent else 1.0

    def sc(v: float | None) -> float | None:
        return None if v is None else v * k
    lines = [r"\begin{tabular}{lrllrrr}", r"\toprule",
             rf"Router & $n$ & {meta.label}{pct} {arrow} & {test_name} & {meta.unit}/s & $\times$ SMoE & load entropy \\",
             r"\midrule"]
    for i, r in enumerate(ov.iter_rows(named=True)):
        sig = {"better": r"$^\blacktriangle$", "worse": r"$^\blacktriangledown$"}.get(r["sig_label"], "")
        lines.append(" & ".join([
            r["router"].replace("_", r"\_"), str(r["n"]),
            cell(i, "quality_mean", fmt_ci(sc(r["quality_mean"]), sc(r["quality_ci"]))) + sig,
            cell(i, "test_mean", fmt_ci(sc(r["test_mean"]), sc(r["test_ci"]))),
            cell(i, "throughput", fmt_si(r["throughput"])),
            cell(i, "vs_smoe", fmt_num(r["vs_smoe"], 2, "×")),
            cell(i, "load_entropy", fmt_num(r["load_entropy"], 3)),
        ]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


# -- Pareto front ------------------------------------------------------------------------------------

def pareto_mask(xs: Sequence[float | None], ys: Sequence[float | None], higher_y_better: bool) -> list[bool]:
    """True for points not dominated by another (x = throughput, higher better; y = quality)."""
    pts = list(zip(xs, ys))
    out = []
    for i, (x, y) in enumerate(pts):
        if x is None or y is None:
            out.append(False)
            continue
        dominated = False
        for j, (x2, y2) in enumerate(pts):
            if i == j or x2 is None or y2 is None:
                continue
            y_ge = y2 >= y if higher_y_better else y2 <= y
            y_gt = y2 > y if higher_y_better else y2 < y
            if x2 >= x and y_ge and (x2 > x or y_gt):
                dominated = True
                break
        out.append(not dominated)
    return out


# -- curves -------------------------------------------------------------------------------------------

def curve_bands(curves: pl.DataFrame, runs: pl.DataFrame, name: str, smooth: int = 1) -> pl.DataFrame:
    """Per router and step: mean over seeds and the min-max band, of curve ``name``.
    ``smooth`` > 1 applies a trailing moving average per run first (for noisy train_loss)."""
    c = curves.filter(pl.col("name") == name).join(runs.select("run_id", "router"), on="run_id")
    if c.height == 0:
        return pl.DataFrame(schema={"router": pl.Utf8, "step": pl.Int64, "mean": pl.Float64, "lo": pl.Float64,
                                    "hi": pl.Float64, "n": pl.UInt32})
    c = c.sort("run_id", "step")
    if smooth > 1:
        c = c.with_columns(pl.col("value").rolling_mean(smooth, min_samples=1).over("run_id"))
    return (c.group_by("router", "step").agg(pl.col("value").mean().alias("mean"), pl.col("value").min().alias("lo"),
                                             pl.col("value").max().alias("hi"), pl.len().alias("n"))
            .sort("router", "step"))


def health_over_training(health: pl.DataFrame, runs: pl.DataFrame, name: str) -> pl.DataFrame:
    """Per router and eval step: health metric ``name`` averaged over layers, then over seeds (with min-max)."""
    h = health.filter(pl.col("name") == name).join(runs.select("run_id", "router"), on="run_id")
    if h.height == 0:
        return pl.DataFrame(schema={"router": pl.Utf8, "step": pl.Int64, "mean": pl.Float64, "lo": pl.Float64,
                                    "hi": pl.Float64, "n": pl.UInt32})
    per_run = h.group_by("router", "run_id", "step").agg(pl.col("value").mean())
    return (per_run.group_by("router", "step").agg(pl.col("value").mean().alias("mean"),
                                                   pl.col("value").min().alias("lo"),
                                                   pl.col("value").max().alias("hi"), pl.len().alias("n"))
            .sort("router", "step"))


# -- lm-eval and bench tables ---------------------------------------------------------------------------

LOWER_BETTER_HINTS = ("ppl", "perplexity", "bpb", "bits", "loss", "error", "err")


def lmeval_table(metrics: pl.DataFrame, runs: pl.DataFrame) -> pl.DataFrame:
    """Long table of lm-eval results per router: task, metric, mean over seeds with 95% CI (n >= 2)
    or the harness' own stderr (n == 1)."""
    schema = {"router": pl.Utf8, "task": pl.Utf8, "metric": pl.Utf8, "mean": pl.Float64, "ci": pl.Float64,
              "stderr": pl.Float64, "n": pl.Int64, "higher_better": pl.Boolean}
    m = metrics.filter(pl.col("name").str.starts_with(LMEVAL_PREFIX)).join(
        distinct_seeds(runs)[0].filter(pl.col("status") == "finished").select("run_id", "router"), on="run_id")
    if m.height == 0:
        return _empty(schema)
    parts = m["name"].str.slice(len(LMEVAL_PREFIX)).str.splitn("/", 2).struct.rename_fields(["task", "metric"])
    m = m.with_columns(parts.struct.field("task"), pl.col("name").str.slice(len(LMEVAL_PREFIX)).alias("_rest"))
    m = m.with_columns(pl.col("_rest").str.slice(pl.col("task").str.len_chars() + 1).alias("metric"))
    m = m.with_columns(pl.when(pl.col("metric") == "").then(pl.lit("value")).otherwise(pl.col("metric"))
                       .alias("metric"))
    rows = []
    for (router, task, metric), g in m.group_by("router", "task", "metric"):
        mean, ci, n = mean_ci(g["value"].to_list())
        se = g["stderr"].drop_nulls()
        rows.append({"router": router, "task": task, "metric": metric, "mean": mean, "ci": ci,
                     "stderr": float(se.mean()) if se.len() and n == 1 else None, "n": n,
                     "higher_better": not any(h in metric.lower() for h in LOWER_BETTER_HINTS)})
    order = {r: i for i, r in enumerate(router_order(m["router"].to_list()))}
    return pl.DataFrame(rows, schema=schema).with_columns(
        pl.col("router").replace_strict(order, default=len(order)).alias("_o")).sort("_o", "task", "metric") \
        .drop("_o")


def lmeval_wide(table: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, list[int]]]:
    """router x 'task / metric' strings, and the best row indices per column."""
    if table.height == 0:
        return pl.DataFrame(), {}
    routers = router_order(table["router"].to_list())
    cols = sorted({(t, m) for t, m in table.select("task", "metric").iter_rows()})
    data: dict[str, list[Any]] = {"router": routers}
    best: dict[str, list[int]] = {}
    for t, mname in cols:
        key = f"{t} / {mname}"
        sub = {r["router"]: r for r in table.filter((pl.col("task") == t) & (pl.col("metric") == mname))
               .iter_rows(named=True)}
        col, nums = [], []
        for r in routers:
            row = sub.get(r)
            if row is None:
                col.append("—")
                nums.append(None)
                continue
            half = row["ci"] if row["ci"] is not None else row["stderr"]
            txt = fmt_ci(row["mean"], half, None)
            if row["ci"] is None and row["stderr"] is not None:
                txt = txt.replace("±", "± se")
            col.append(txt)
            nums.append(row["mean"])
        data[key] = col
        finite = [v for v in nums if v is not None]
        if len(finite) >= 2:
            hb = bool(table.filter((pl.col("task") == t) & (pl.col("metric") == mname))["higher_better"][0])
            b = max(finite) if hb else min(finite)
            best[key] = [i for i, v in enumerate(nums) if v is not None and math.isclose(v, b, rel_tol=1e-12)]
    return pl.DataFrame(data), best


PERF_MAIN = ("fwd_bwd_ms", "tokens_per_s", "ratio_vs_smoe", "ratio_vs_dense", "throughput_vs_dense",
             "throughput_vs_naive", "ratio_vs_naive", "peak_mem_mb", "saved_act_mb", "load_imbalance")
PERF_ID_KEYS = ("candidate", "variant")


def perf_long(perf: pl.DataFrame, bench_id: str | None = None) -> tuple[pl.DataFrame, dict[str, Any]]:
    """One bench (default: the latest) in long form: candidate, router, variant, setting (the config keys
    that vary inside the bench), metric, value, spread, lo, hi; plus the config shared by all its rows."""
    schema = {"candidate": pl.Utf8, "router": pl.Utf8, "variant": pl.Utf8, "setting": pl.Utf8,
              "metric": pl.Utf8, "value": pl.Float64, "spread": pl.Float64, "lo": pl.Float64, "hi": pl.Float64}
    if perf.height == 0:
        return _empty(schema), {}
    if bench_id is None:
        bench_id = perf.sort("created_at")["bench_id"][-1]
    p = perf.filter(pl.col("bench_id") == bench_id)
    if p.height == 0:
        return _empty(schema), {}
    cfgs = []
    for c in p["config"].to_list():
        d = parse_json(c)
        cfgs.append(d if isinstance(d, dict) else {"config": d})
    keys = set().union(*cfgs)
    shared = {k: cfgs[0].get(k) for k in sorted(keys)
              if all(k in c for c in cfgs) and all(c.get(k) == cfgs[0].get(k) for c in cfgs)}
    rows = []
    for r, cfg in zip(p.iter_rows(named=True), cfgs):
        vary = {k: v for k, v in sorted(cfg.items()) if k not in shared and k not in PERF_ID_KEYS}
        v, sp = r["value"], r["spread"]
        rows.append({"candidate": str(cfg.get("candidate") or r["router"]), "router": r["router"],
                     "variant": None if cfg.get("variant") is None else str(cfg.get("variant")),
                     "setting": ", ".join(f"{k}={x}" for k, x in vary.items()), "metric": r["metric"],
                     "value": v, "spread": sp,
                     "lo": None if v is None else v - (sp or 0.0) / 2, "hi": None if v is None else v + (sp or 0.0) / 2})
    return pl.DataFrame(rows, schema=schema), shared


def perf_metrics_order(metrics: Iterable[str]) -> list[str]:
    ms = set(metrics)
    return [m for m in PERF_MAIN if m in ms] + sorted(ms - set(PERF_MAIN))


def perf_table(perf: pl.DataFrame, bench_id: str | None = None) -> pl.DataFrame:
    """One bench as one row per candidate (and setting) with a 'median (IQR spread)' column per metric,
    headline metrics first; columns that would be empty (variant, setting) are left out."""
    long, _ = perf_long(perf, bench_id)
    if long.height == 0:
        return pl.DataFrame()
    long = long.with_columns(pl.struct("value", "spread").map_elements(
        lambda s: _fmt_perf(s["value"], s["spread"]), return_dtype=pl.Utf8).alias("cell"))
    idx = ["candidate", "router", "variant", "setting"]
    wide = long.with_columns(pl.col("variant").fill_null("")).group_by(idx + ["metric"]).agg(pl.col("cell").last()) \
        .pivot(on="metric", index=idx, values="cell")
    order = {r: i for i, r in enumerate(router_order(wide["router"].to_list()))}
    wide = wide.with_columns(pl.col("router").replace_strict(order, default=len(order)).alias("_o")) \
        .sort("setting", "_o", "candidate").drop("_o")
    keep = ["candidate"] + [c for c in ("router", "variant", "setting")
                            if (wide[c] != wide["candidate"]).any() and (wide[c] != "").any()]
    return wide.select(keep + perf_metrics_order(long["metric"].unique().to_list())).fill_null("—")


def _fmt_perf(v: float | None, spread: float | None) -> str:
    if v is None:
        return "—"
    d = 3 if abs(v) < 10 else 1 if abs(v) < 1000 else 0
    return f"{v:,.{d}f}" + (f" (IQR {spread:,.{d}f})" if spread is not None else "")


def config_label(cfg: str | None) -> str:
    if not cfg:
        return ""
    try:
        d = json.loads(cfg)
    except (TypeError, ValueError):
        return str(cfg)
    if not isinstance(d, dict):
        return str(d)
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()))


def bench_choices(perf: pl.DataFrame) -> list[tuple[str, str]]:
    """(bench_id, label) newest first."""
    if perf.height == 0:
        return []
    g = perf.group_by("bench_id").agg(pl.col("created_at").max(), pl.col("machine").first(),
                                      pl.col("git_sha").first(), pl.len()).sort("created_at", descending=True)
    out = []
    for b, at, machine, sha, n in g.iter_rows():
        when = at.strftime("%Y-%m-%d %H:%M") if isinstance(at, datetime) else str(at)
        out.append((b, f"{when} · {sha or '?'} · {machine} · {b} ({n} rows)"))
    return out


# -- one run ----------------------------------------------------------------------------------------------

def run_record(runs: pl.DataFrame, run_id: str) -> dict[str, Any] | None:
    r = runs.filter(pl.col("run_id") == run_id)
    return None if r.height == 0 else r.row(0, named=True)


def parse_json(text: str | None) -> Any:
    if not text:
        return {}
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {"raw": text}


def run_label(r: dict[str, Any]) -> str:
    started = r.get("started_at")
    when = started.strftime("%Y-%m-%d %H:%M") if isinstance(started, datetime) else "?"
    return f"{r['router']} · seed {r['seed']} · {str(r.get('status')).upper()} · {when} · {r['run_id']}"
