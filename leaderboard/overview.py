"""The Leaderboard tab's numbers: one row per router (mean ± CI over distinct seeds, the comparison with SMoE:
paired by seed where the runs pair, else Welch, Holm-adjusted over the routers shown, with its MDE; throughput
ratios, final routing health), the best value per column, and the same table as strings, CSV and LaTeX."""
from __future__ import annotations

import math

import polars as pl

from harness.metrics import Metric, board_metrics
from leaderboard.formatting import fmt_ci, fmt_diff, fmt_num, fmt_si, kind_name, sig_text
from leaderboard.runs import BASELINE, DENSE, router_order
from leaderboard.stats import ALPHA, distinct_seeds, duplicate_counts, mean_ci
from leaderboard.store import conform, empty
from leaderboard.suites import SuiteMeta
from leaderboard.verdicts import TARGET_EFFECT, Sample, Verdict, judge, resolution, samples


def final_health(health: pl.DataFrame) -> pl.DataFrame:
    """Per run, at its last evaluation step, every declared routing-health column of the board
    (``harness.metrics``, ``source="health"``: dead experts summed over layers, load entropy and max/mean load
    averaged over layers, ...); plus StableMoE's last-change fluctuation (mean over layers)."""
    declared = [m for m in board_metrics() if m.source == "health" and m.name != "fluctuation_last_change"]
    names = [m.name for m in declared]
    schema = {"run_id": pl.Utf8, "health_step": pl.Int64, **{n: pl.Float64 for n in names},
              "fluctuation_last_change": pl.Float64}
    if health.height == 0:
        return empty(schema)
    h = health.filter(pl.col("name").is_in(names))
    last = h.group_by("run_id").agg(pl.col("step").max().alias("health_step"))
    h = h.join(last, on="run_id").filter(pl.col("step") == pl.col("health_step"))
    agg = h.group_by("run_id", "health_step").agg(*[
        getattr(pl.col("value").filter(pl.col("name") == m.name), m.layers)().alias(m.name) for m in declared])
    fl = health.filter(pl.col("name") == "fluctuation_last_change").group_by("run_id").agg(
        pl.col("value").mean().alias("fluctuation_last_change"))
    out = agg.join(fl, on="run_id", how="full", coalesce=True)
    return conform(out, schema)


def per_run_table(runs: pl.DataFrame, metrics: pl.DataFrame, health: pl.DataFrame, meta: SuiteMeta) -> pl.DataFrame:
    """One row per run: its identity, the suite's headline metrics, and final routing health."""
    per_run = [m.name for m in board_metrics() if m.source == "metric"]
    wanted = [meta.quality, meta.test, meta.throughput, *per_run, *meta.extra]
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


def overview_schema() -> dict[str, pl.DataType]:
    """The overview's columns (computed, so a metric declared later is a column too)."""
    return {
        "rank": pl.Int64, "router": pl.Utf8, "n": pl.Int64,
        "quality_mean": pl.Float64, "quality_ci": pl.Float64, "test_mean": pl.Float64, "test_ci": pl.Float64,
        "extra_mean": pl.Float64, "extra_ci": pl.Float64,  # the suite's first extra metric (vision: val_top5)
        "throughput": pl.Float64, "throughput_ci": pl.Float64, "vs_dense": pl.Float64, "vs_smoe": pl.Float64,
        **{m.key: pl.Float64 for m in board_metrics()},  # the declared per-router columns (harness.metrics)
        "fluctuation_last_change": pl.Float64,
        "sig_label": pl.Utf8, "p_value": pl.Float64, "significance": pl.Utf8,
        "test": pl.Utf8, "n_pairs": pl.Int64, "p_holm": pl.Float64, "diff": pl.Float64, "diff_ci": pl.Float64,
        "p_wilcoxon": pl.Float64, "mde": pl.Float64, "n_needed": pl.Int64, "resolution": pl.Utf8,
        "diverged": pl.Int64, "failed": pl.Int64, "running": pl.Int64, "duplicates": pl.Int64,
        "spec_hashes": pl.Int64, "seeds": pl.Utf8,
    }


def overview(runs: pl.DataFrame, metrics: pl.DataFrame, health: pl.DataFrame, meta: SuiteMeta,
             baseline: str = BASELINE, alpha: float = ALPHA) -> pl.DataFrame:
    """One row per router (finished runs only), ranked by mean quality, best first.

    ``runs`` is the already-filtered run table of ONE suite; diverged/failed/running runs in it are
    only counted. ``vs_dense``/``vs_smoe`` are throughput ratios (router / reference, >1 = faster).
    ``sig_label``/``significance`` compare the quality metric with ``baseline``
    (:func:`leaderboard.verdicts.judge`): paired by seed where the runs pair (``test``), the difference
    router - baseline ± CI, the raw ``p_value`` and ``p_holm`` over the routers in the table (the label is
    decided on ``p_holm``), the MDE and the seeds a :data:`~leaderboard.verdicts.TARGET_EFFECT` would need."""
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
    have_base = bool(vals(baseline, meta.quality))
    verdicts = {}
    if have_base:  # one family: every router the table shows against the baseline
        by = samples(fin, metrics, meta.quality)
        others = [r for r in by_router if r != baseline]
        verdicts = dict(zip(others, judge([(by.get(r, Sample({})), by[baseline]) for r in others],
                                          meta.higher_better, alpha)))
    rows = []
    for r, df in by_router.items():
        q_mean, q_ci, n = mean_ci(vals(r, meta.quality))
        t_mean, t_ci, _ = mean_ci(vals(r, meta.test))
        x_mean, x_ci, _ = mean_ci(vals(r, meta.extra[0])) if meta.extra else (None, None, 0)
        tp_mean, tp_ci, _ = mean_ci(vals(r, meta.throughput))
        v = verdicts.get(r)
        label = "baseline" if r == baseline and have_base else "no SMoE" if v is None else v.direction
        c = counts.get(r, {})
        rows.append({
            "router": r, "n": n, "quality_mean": q_mean, "quality_ci": q_ci, "test_mean": t_mean, "test_ci": t_ci,
            "extra_mean": x_mean, "extra_ci": x_ci, "throughput": tp_mean, "throughput_ci": tp_ci,
            "vs_dense": tp_mean / dense_tp if tp_mean is not None and dense_tp else None,
            "vs_smoe": tp_mean / base_tp if tp_mean is not None and base_tp else None,
            **{m.key: mean(vals(r, m.name)) for m in board_metrics()},
            "fluctuation_last_change": mean(vals(r, "fluctuation_last_change")),
            "sig_label": label, **verdict_columns(label, v, meta),
            "diverged": c.get("diverged", 0), "failed": c.get("failed", 0), "running": c.get("running", 0),
            "duplicates": dupes.get(r, 0), "spec_hashes": df["spec_hash"].n_unique() if df.height else 0,
            "seeds": ",".join(str(s) for s in sorted(df["seed"].to_list())) if df.height else "",
        })
    if not rows:
        return empty(overview_schema())
    schema = overview_schema()
    out = pl.DataFrame(rows, schema={k: v for k, v in schema.items() if k != "rank"})
    out = out.sort("quality_mean", descending=meta.higher_better, nulls_last=True)
    out = out.with_columns(
        pl.when(pl.col("quality_mean").is_not_null())
        .then(pl.col("quality_mean").rank("min", descending=meta.higher_better))
        .otherwise(None).cast(pl.Int64).alias("rank"))
    return out.select(list(schema))


def verdict_columns(label: str, v: Verdict | None, meta: SuiteMeta) -> dict[str, object]:
    """The overview's comparison columns of one router (``v`` None: the baseline itself, or no baseline)."""
    if v is None:
        return {"p_value": None, "p_holm": None, "significance": sig_text(label, None), "test": None, "n_pairs": None,
                "diff": None, "diff_ci": None, "p_wilcoxon": None, "mde": None, "n_needed": None, "resolution": ""}
    c = v.comparison
    return {"p_value": c.p, "p_holm": v.p_holm, "significance": sig_text(label, c.p, v.p_holm, c.kind),
            "test": c.kind, "n_pairs": c.n if c.paired else None, "diff": c.diff, "diff_ci": c.diff_ci,
            "p_wilcoxon": c.p_wilcoxon, "mde": c.mde, "n_needed": c.n_for(TARGET_EFFECT),
            "resolution": resolution(c, meta, "within noise" if label == "within noise" else "")}


def best_direction() -> dict[str, bool]:
    """Overview column -> True if higher is better: throughput and its ratios, then every declared column
    with a direction (harness.metrics)."""
    return {"throughput": True, "vs_dense": True, "vs_smoe": True,
            **{m.key: m.higher_better for m in board_metrics() if m.higher_better is not None}}


def best_rows(ov: pl.DataFrame, meta: SuiteMeta) -> dict[str, list[int]]:
    """Column -> row indices holding its best value (ties all count)."""
    direction = {"quality_mean": meta.higher_better, "test_mean": meta.higher_better,
                 "extra_mean": meta.higher_better, **best_direction()}
    out: dict[str, list[int]] = {}
    for col, higher in direction.items():
        if col not in ov.columns:
            continue
        vs = ov[col].to_list()
        finite = [v for v in vs if v is not None and math.isfinite(v)]
        if len(finite) < 2 and col not in ("quality_mean", "test_mean", "extra_mean"):
            continue
        if not finite:
            continue
        best = max(finite) if higher else min(finite)
        out[col] = [i for i, v in enumerate(vs) if v is not None and math.isclose(v, best, rel_tol=1e-12)]
    return out


def fmt_metric(m: Metric, v: float | None) -> str:
    """A declared metric's cell: its format spec, ``si`` (1.2k) or ``pct`` (x 100); ``—`` when missing."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if m.fmt == "si":
        return fmt_si(v)
    return f"{v * 100 if m.percent else v:{'.1f' if m.percent else m.fmt}}"


def test_cell(kind: str | None, n_pairs: int | None) -> str:
    """Which test compared the router with SMoE: ``paired, n = 3`` (pairs of seeds), ``Welch``, ``—``."""
    if kind is None or kind == "n<2":
        return "—"
    return f"paired, n = {n_pairs}" if kind == "paired" else kind_name(kind)


def display_overview(ov: pl.DataFrame, meta: SuiteMeta) -> pl.DataFrame:
    """The overview as strings, with the column headers the page shows (same row order as ``ov``)."""
    unit = meta.unit
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
            meta.quality_header(): fmt_ci(meta.shown(r["quality_mean"]), meta.shown(r["quality_ci"]), r["n"]),
            "vs SMoE": r["significance"],
            "Δ vs SMoE": fmt_diff(meta.shown(r["diff"]), meta.shown(r["diff_ci"])),
            "test": test_cell(r["test"], r["n_pairs"]),
            "resolution": r["resolution"] or "",
            meta.test_header(): fmt_ci(meta.shown(r["test_mean"]), meta.shown(r["test_ci"]), r["n"]),
            **({meta.extra_header(): fmt_ci(meta.shown(r["extra_mean"]), meta.shown(r["extra_ci"]), r["n"])}
               if meta.extra else {}),
            f"{unit}/s": fmt_si(r["throughput"]),
            "× dense": fmt_num(r["vs_dense"], 2, "×"),
            "× SMoE": fmt_num(r["vs_smoe"], 2, "×"),
            **{m.board: fmt_metric(m, r[m.key]) for m in board_metrics()},
            "excluded": ", ".join(notes) if notes else "",
        })
    cols = ["#", "router", "n", meta.quality_header(), "vs SMoE", "Δ vs SMoE", "test", "resolution",
            meta.test_header(), *([meta.extra_header()] if meta.extra else []),
            f"{unit}/s", "× dense", "× SMoE", *[m.board for m in board_metrics()], "excluded"]
    if not rows:
        return pl.DataFrame(schema={c: (pl.Int64 if c == "n" else pl.Utf8) for c in cols})
    return pl.DataFrame(rows).select(cols)


def display_best_cells(ov: pl.DataFrame, meta: SuiteMeta) -> dict[str, list[int]]:
    """Display column name -> rows to highlight as best."""
    best = best_rows(ov, meta)
    name = {"quality_mean": meta.quality_header(), "test_mean": meta.test_header(),
            **({"extra_mean": meta.extra_header()} if meta.extra else {}),
            "throughput": f"{meta.unit}/s", "vs_dense": "× dense", "vs_smoe": "× SMoE",
            **{m.key: m.board for m in board_metrics()}}
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
    paper = [m for m in board_metrics() if m.paper]
    lines = [rf"\begin{{tabular}}{{lrllrr{'r' * len(paper)}}}", r"\toprule",
             rf"Router & $n$ & {meta.label}{pct} {arrow} & {test_name} & {meta.unit}/s & $\times$ SMoE"
             + "".join(f" & {m.label}" for m in paper) + r" \\",
             r"\midrule"]
    for i, r in enumerate(ov.iter_rows(named=True)):
        sig = {"better": r"$^\blacktriangle$", "worse": r"$^\blacktriangledown$"}.get(r["sig_label"], "")
        lines.append(" & ".join([
            r["router"].replace("_", r"\_"), str(r["n"]),
            cell(i, "quality_mean", fmt_ci(meta.shown(r["quality_mean"]), meta.shown(r["quality_ci"]))) + sig,
            cell(i, "test_mean", fmt_ci(meta.shown(r["test_mean"]), meta.shown(r["test_ci"]))),
            cell(i, "throughput", fmt_si(r["throughput"])),
            cell(i, "vs_smoe", fmt_num(r["vs_smoe"], 2, "×")),
            *[cell(i, m.key, fmt_metric(m, r[m.key])) for m in paper],
        ]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)
