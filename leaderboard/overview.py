"""The Leaderboard tab's numbers: one row per router (mean ± CI over distinct seeds, the comparison with SMoE:
paired by seed where the runs pair, else Welch, Holm-adjusted over the routers shown, with its MDE; throughput
ratios, final routing health), the best value per column, and the same table as strings, CSV and LaTeX."""
from __future__ import annotations

import math

import polars as pl

from harness.metrics import board_metrics
from leaderboard.columns import Column, board_columns
from leaderboard.formatting import fmt_diff, kind_name, sig_text
from leaderboard.runs import BASELINE, router_order
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
    """One row per run: its identity, the suite's metrics of the overview's columns, and final routing health."""
    wanted = list(dict.fromkeys(c.metric for c in board_columns(meta) if c.metric and c.source == "metric"))
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


def overview_schema(meta: SuiteMeta) -> dict[str, pl.DataType]:
    """The overview's columns: rank, router, n, every column of :func:`leaderboard.columns.board_columns`
    (computed, so a metric declared later is a column too), the comparison with the baseline, the counts."""
    return {
        "rank": pl.Int64, "router": pl.Utf8, "n": pl.Int64,
        **{k: pl.Float64 for c in board_columns(meta) for k in c.keys},
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

    columns = board_columns(meta, baseline)
    refs = {c.key: mean(vals(c.ratio[1], c.metric)) if c.ratio[1] in by_router else None
            for c in columns if c.ratio and c.metric}
    have_base = bool(vals(baseline, meta.quality))
    verdicts = {}
    if have_base:  # one family: every router the table shows against the baseline
        by = samples(fin, metrics, meta.quality)
        others = [r for r in by_router if r != baseline]
        verdicts = dict(zip(others, judge([(by.get(r, Sample({})), by[baseline]) for r in others],
                                          meta.higher_better, alpha)))
    rows = []
    for r, df in by_router.items():
        values, n = router_values(columns, refs, lambda col: vals(r, col), mean)
        v = verdicts.get(r)
        label = "baseline" if r == baseline and have_base else "no SMoE" if v is None else v.direction
        c = counts.get(r, {})
        rows.append({
            "router": r, "n": n, **values, "sig_label": label, **verdict_columns(label, v, meta),
            "diverged": c.get("diverged", 0), "failed": c.get("failed", 0), "running": c.get("running", 0),
            "duplicates": dupes.get(r, 0), "spec_hashes": df["spec_hash"].n_unique() if df.height else 0,
            "seeds": ",".join(str(s) for s in sorted(df["seed"].to_list())) if df.height else "",
        })
    schema = overview_schema(meta)
    if not rows:
        return empty(schema)
    out = pl.DataFrame(rows, schema={k: v for k, v in schema.items() if k != "rank"})
    out = out.sort("quality_mean", descending=meta.higher_better, nulls_last=True)
    out = out.with_columns(
        pl.when(pl.col("quality_mean").is_not_null())
        .then(pl.col("quality_mean").rank("min", descending=meta.higher_better))
        .otherwise(None).cast(pl.Int64).alias("rank"))
    return out.select(list(schema))


def router_values(columns: list[Column], refs: dict[str, float | None], vals, mean) -> tuple[dict, int]:
    """One router's value of each column (and its CI where it has one), and its n (the verdict column's seeds).
    ``vals(col)`` is the router's per-run values of a per-run column; ``refs`` the ratios' reference means."""
    out: dict[str, float | None] = {}
    n = 0
    for c in columns:
        if c.ratio:
            num, ref = out[c.ratio[0]], refs.get(c.key)
            out[c.key] = num / ref if num is not None and ref else None
        elif c.ci:
            out[c.key], out[c.ci], k = mean_ci(vals(c.metric)) if c.metric else (None, None, 0)
            n = k if c.verdict else n
        else:
            out[c.key] = mean(vals(c.metric)) if c.metric else None
    return out, n


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


def best_rows(ov: pl.DataFrame, meta: SuiteMeta) -> dict[str, list[int]]:
    """Column -> row indices holding its best value (ties all count), in each column's declared direction."""
    out: dict[str, list[int]] = {}
    for c in board_columns(meta):
        if c.higher_better is None or c.key not in ov.columns:
            continue
        vs = ov[c.key].to_list()
        finite = [v for v in vs if v is not None and math.isfinite(v)]
        if not finite or (len(finite) < 2 and not c.mark_single):
            continue
        best = max(finite) if c.higher_better else min(finite)
        out[c.key] = [i for i, v in enumerate(vs) if v is not None and math.isclose(v, best, rel_tol=1e-12)]
    return out


def test_cell(kind: str | None, n_pairs: int | None) -> str:
    """Which test compared the router with SMoE: ``paired, n = 3`` (pairs of seeds), ``Welch``, ``—``."""
    if kind is None or kind == "n<2":
        return "—"
    return f"paired, n = {n_pairs}" if kind == "paired" else kind_name(kind)


def display_overview(ov: pl.DataFrame, meta: SuiteMeta) -> pl.DataFrame:
    """The overview as strings, with the column headers the page shows (same row order as ``ov``): the
    columns of :func:`leaderboard.columns.board_columns` that are shown, the comparison after the verdict's."""
    shown = [c for c in board_columns(meta) if c.shown]
    cols = ["#", "router", "n"]
    for c in shown:
        cols += [c.header, *(VERDICT_HEADERS if c.verdict else [])]
    cols.append("excluded")
    rows = []
    for r in ov.iter_rows(named=True):
        rows.append({
            "#": str(r["rank"]) if r["rank"] is not None else "—",
            "router": r["router"],
            "n": r["n"],
            "vs SMoE": r["significance"],
            "Δ vs SMoE": fmt_diff(meta.shown(r["diff"]), meta.shown(r["diff_ci"])),
            "test": test_cell(r["test"], r["n_pairs"]),
            "resolution": r["resolution"] or "",
            **{c.header: c.cell(r[c.key], r[c.ci] if c.ci else None, r["n"]) for c in shown},
            "excluded": excluded_cell(r),
        })
    if not rows:
        return pl.DataFrame(schema={c: (pl.Int64 if c == "n" else pl.Utf8) for c in cols})
    return pl.DataFrame(rows).select(cols)


# the comparison with the baseline, shown after the verdict's column
VERDICT_HEADERS = ["vs SMoE", "Δ vs SMoE", "test", "resolution"]


def excluded_cell(r: dict) -> str:
    """A router's runs left out of the statistics: ``1 diverged, 2 duplicates``, ``3 specs!``."""
    notes = []
    for status in ("diverged", "failed", "running"):
        if r[status]:
            notes.append(f"{r[status]} {status}")
    if r.get("duplicates"):
        notes.append(f"{r['duplicates']} duplicate{'s' if r['duplicates'] != 1 else ''}")
    if r["spec_hashes"] and r["spec_hashes"] > 1:
        notes.append(f"{r['spec_hashes']} specs!")
    return ", ".join(notes)


def display_best_cells(ov: pl.DataFrame, meta: SuiteMeta) -> dict[str, list[int]]:
    """Display column name -> rows to highlight as best."""
    best = best_rows(ov, meta)
    name = {c.key: c.header for c in board_columns(meta) if c.shown}
    return {name[k]: v for k, v in best.items() if k in name}


def to_latex(ov: pl.DataFrame, meta: SuiteMeta) -> str:
    """A booktabs table of the overview (best values in bold), ready for a paper: the columns with a ``latex``
    header."""
    best = best_rows(ov, meta)
    paper = [c for c in board_columns(meta) if c.latex]

    def cell(i: int, col: str, text: str) -> str:
        text = text.replace("±", r"$\pm$").replace("×", r"$\times$").replace("_", r"\_").replace("—", "--")
        return rf"\textbf{{{text}}}" if i in best.get(col, []) else text

    lines = [rf"\begin{{tabular}}{{lr{''.join(c.latex[1] for c in paper)}}}", r"\toprule",
             "Router & $n$" + "".join(f" & {c.latex[0]}" for c in paper) + r" \\",
             r"\midrule"]
    for i, r in enumerate(ov.iter_rows(named=True)):
        sig = {"better": r"$^\blacktriangle$", "worse": r"$^\blacktriangledown$"}.get(r["sig_label"], "")
        lines.append(" & ".join([
            r["router"].replace("_", r"\_"), str(r["n"]),
            *[cell(i, c.key, c.cell(r[c.key], r[c.ci] if c.ci else None, None)) + (sig if c.verdict else "")
              for c in paper],
        ]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)
