"""The other tabs' tables: training curves and routing health over steps (mean and min-max band over seeds),
lm-eval results per router and task, and one ``harness bench`` as a table."""
from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Iterable

import polars as pl

from harness import metrics as declared
from leaderboard.formatting import fmt_ci, fmt_perf
from leaderboard.runs import parse_json, router_order, sort_by_router
from leaderboard.stats import distinct_seeds, mean_ci
from leaderboard.store import empty

LMEVAL_PREFIX = "lmeval/"


BAND_SCHEMA = {"router": pl.Utf8, "step": pl.Int64, "mean": pl.Float64, "lo": pl.Float64, "hi": pl.Float64,
               "n": pl.UInt32}


def _bands(values: pl.DataFrame) -> pl.DataFrame:
    """Per router and step of a (router, step, value) frame: mean, min (lo), max (hi) and count."""
    return (values.group_by("router", "step").agg(pl.col("value").mean().alias("mean"),
                                                   pl.col("value").min().alias("lo"),
                                                   pl.col("value").max().alias("hi"), pl.len().alias("n"))
            .sort("router", "step"))


def curve_bands(curves: pl.DataFrame, runs: pl.DataFrame, name: str, smooth: int = 1) -> pl.DataFrame:
    """Per router and step: mean over seeds and the min-max band, of curve ``name``.
    ``smooth`` > 1 applies a trailing moving average per run first (for noisy train_loss)."""
    c = curves.filter(pl.col("name") == name).join(runs.select("run_id", "router"), on="run_id")
    if c.height == 0:
        return empty(BAND_SCHEMA)
    c = c.sort("run_id", "step")
    if smooth > 1:
        c = c.with_columns(pl.col("value").rolling_mean(smooth, min_samples=1).over("run_id"))
    return _bands(c)


def health_over_training(health: pl.DataFrame, runs: pl.DataFrame, name: str) -> pl.DataFrame:
    """Per router and eval step: health metric ``name`` averaged over layers, then over seeds (with min-max)."""
    h = health.filter(pl.col("name") == name).join(runs.select("run_id", "router"), on="run_id")
    if h.height == 0:
        return empty(BAND_SCHEMA)
    return _bands(h.group_by("router", "run_id", "step").agg(pl.col("value").mean()))


def lmeval_table(metrics: pl.DataFrame, runs: pl.DataFrame) -> pl.DataFrame:
    """Long table of lm-eval results per router: task, metric, mean over seeds with 95% CI (n >= 2)
    or the harness' own stderr (n == 1)."""
    schema = {"router": pl.Utf8, "task": pl.Utf8, "metric": pl.Utf8, "mean": pl.Float64, "ci": pl.Float64,
              "stderr": pl.Float64, "n": pl.Int64, "higher_better": pl.Boolean}
    m = metrics.filter(pl.col("name").str.starts_with(LMEVAL_PREFIX)).join(
        distinct_seeds(runs)[0].filter(pl.col("status") == "finished").select("run_id", "router"), on="run_id")
    if m.height == 0:
        return empty(schema)
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
                     "higher_better": declared.direction(metric) is not False})
    return sort_by_router(pl.DataFrame(rows, schema=schema), "router", "task", "metric")


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
        return empty(schema), {}
    if bench_id is None:
        bench_id = perf.sort("created_at")["bench_id"][-1]
    p = perf.filter(pl.col("bench_id") == bench_id)
    if p.height == 0:
        return empty(schema), {}
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
        lambda s: fmt_perf(s["value"], s["spread"]), return_dtype=pl.Utf8).alias("cell"))
    idx = ["candidate", "router", "variant", "setting"]
    wide = long.with_columns(pl.col("variant").fill_null("")).group_by(idx + ["metric"]).agg(pl.col("cell").last()) \
        .pivot(on="metric", index=idx, values="cell")
    wide = sort_by_router(wide, "setting", "router", "candidate")
    keep = ["candidate"] + [c for c in ("router", "variant", "setting")
                            if (wide[c] != wide["candidate"]).any() and (wide[c] != "").any()]
    return wide.select(keep + perf_metrics_order(long["metric"].unique().to_list())).fill_null("—")


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
