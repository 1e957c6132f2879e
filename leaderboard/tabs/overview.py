"""The Leaderboard tab: the overview table (mean ± 95% CI over distinct seeds, the comparison with SMoE: paired by
seed where the runs pair, else Welch, Holm-adjusted, with its MDE; throughput, routing health), the
quality-vs-throughput Pareto chart, the forest plot, per-run values and the exports."""
from __future__ import annotations

import altair as alt
import pandas as pd
import polars as pl
import streamlit as st

from leaderboard.columns import board_columns
from leaderboard.overview import display_best_cells, display_overview, overview, per_run_table, to_latex
from leaderboard.runs import status_counts
from leaderboard.stats import distinct_seeds, pareto_mask
from leaderboard.suites import SuiteMeta
from leaderboard.ui import SIG_COLORS, chart, color_scale, styled


def ci_exprs(meta: SuiteMeta) -> list[pl.Expr]:
    """lo/hi of the quality CI for error bars, clipped to the metric's range (top-1 lives in [0, 1])."""
    lo = pl.col("quality_mean") - pl.col("quality_ci").fill_null(0)
    hi = pl.col("quality_mean") + pl.col("quality_ci").fill_null(0)
    if meta.bounds:
        lo, hi = lo.clip(*meta.bounds), hi.clip(*meta.bounds)
    return [lo.alias("lo"), hi.alias("hi")]


def qfmt(meta: SuiteMeta, tooltip: bool = False) -> str:
    if meta.percent:
        return ".2%" if tooltip else ".0%"
    return ".4f" if tooltip else ""


def overview_tab(runs: pl.DataFrame, metrics: pl.DataFrame, health: pl.DataFrame,
                    meta: SuiteMeta) -> None:
    ov = overview(runs, metrics, health, meta)
    fin = ov.filter(pl.col("n") > 0)
    if fin.height == 0:
        c = status_counts(runs)
        st.warning(f"No finished runs match these filters ({c['diverged']} diverged, {c['failed']} failed, "
                   f"{c['running']} running). Widen the filters in the sidebar.", icon=":material/filter_alt_off:")
        return
    disp = display_overview(ov, meta).to_pandas()
    best = display_best_cells(ov, meta)
    labels = ov["sig_label"].to_list()

    st.dataframe(
        styled(disp, best, bold="router", label_col="vs SMoE", labels=labels, colors=SIG_COLORS),
        hide_index=True, width="stretch", key="overview",
        column_config={
            "#": st.column_config.TextColumn("#", width="small", help="rank by mean validation quality"),
            "router": st.column_config.TextColumn("router"),
            "n": st.column_config.NumberColumn("n", width="small", help="finished seeds"),
            "vs SMoE": st.column_config.TextColumn(
                "vs SMoE", help="the validation metric against SMoE: better / worse / within noise, decided on the "
                                "Holm-adjusted p over the routers shown (α = 0.05); raw p beside it. "
                                "'n<2' when no test is possible"),
            "Δ vs SMoE": st.column_config.TextColumn(
                "Δ vs SMoE", help="router − SMoE, mean ± 95% CI (of the per-seed differences when paired)"),
            "test": st.column_config.TextColumn(
                "test", help="paired t-test over the seeds both ran, when the runs' specs are the same outside "
                             "the router (same batches, same starting weights); else Welch's t-test"),
            "resolution": st.column_config.TextColumn(
                "resolution", help="minimum detectable effect: the smallest true difference this test finds "
                                   "with 80% power at α = 0.05 for its n and the observed spread, and the seeds "
                                   "a 0.01 difference would need"),
            # the metric columns (quality, test, extra, throughput and its ratios, the declared ones)
            **{c.header: st.column_config.TextColumn(c.header, help=c.help)
               for c in board_columns(meta) if c.shown},
            "excluded": st.column_config.TextColumn(
                "excluded", help="this router's runs left out of the statistics (diverged / failed / unfinished; "
                                 "duplicates: re-runs of a finished spec and seed, of which only the latest counts); "
                                 "'specs!' = several spec hashes are mixed, filter by spec hash"),
        },
    )
    n_tests = ov["p_holm"].drop_nulls().len()  # the Holm family: the routers that could be tested
    st.caption(f"Finished runs only. **Bold green** = best in column. Quality: mean ± 95% CI over seeds "
               f"(Student t). *vs SMoE*: {meta.quality} against SMoE, paired over seeds where the runs pair "
               f"(same spec outside the router), else Welch; labels decided on the Holm-adjusted p over the "
               f"{n_tests} comparison{'s' if n_tests != 1 else ''} shown, α = 0.05. *resolution*: what the "
               f"test could have detected (80% power). Routing health at the final evaluation step, averaged "
               f"over seeds.")

    left, right = st.columns([3, 2], gap="large")
    with left:
        pareto_chart(ov, meta)
    with right:
        forest_chart(ov, meta)

    with st.expander("Per-run values"):
        pr = per_run_table(distinct_seeds(runs)[0].filter(pl.col("status") == "finished"), metrics, health,
                             meta)
        st.dataframe(pr.drop("machine").to_pandas(), hide_index=True, width="stretch")
    with st.expander("Export: LaTeX (booktabs) and CSV"):
        st.code(to_latex(fin, meta), language="latex")
        st.download_button("Download overview CSV", display_overview(ov, meta).write_csv(),
                           file_name=f"leaderboard_{meta.name}.csv", mime="text/csv", key="dl_csv")


def pareto_chart(ov: pl.DataFrame, meta: SuiteMeta) -> None:
    d = ov.filter(pl.col("quality_mean").is_not_null() & pl.col("throughput").is_not_null())
    if d.height == 0:
        st.info("No throughput/quality pairs to plot yet.")
        return
    front = pareto_mask(d["throughput"].to_list(), d["quality_mean"].to_list(), meta.higher_better)
    d = d.with_columns(pl.Series("pareto", front),
                       *ci_exprs(meta))
    pdf = d.select("router", "n", "throughput", "quality_mean", "quality_ci", "lo", "hi", "pareto", "vs_smoe",
                   "significance").to_pandas()
    routers = d["router"].to_list()
    tp = [v for v in d["throughput"].to_list() if v and v > 0]
    log = len(tp) >= 2 and max(tp) / min(tp) > 4
    if log:  # pad the domain so the edge points and their labels stay inside the plot
        dom = [min(tp) / 1.25, max(tp) * 1.6]
    else:
        span = (max(tp) - min(tp)) if len(tp) >= 2 and max(tp) > min(tp) else (max(tp) if tp else 1.0) * 0.2
        dom = [max(0.0, min(tp) - 0.12 * span), max(tp) + 0.3 * span] if tp else None
    x = alt.X("throughput:Q", title=f"training throughput ({meta.unit}/s{', log scale' if log else ''})",
              scale=alt.Scale(type="log" if log else "linear", zero=False, nice=False, domain=dom),
              axis=alt.Axis(format="~s"))
    y_title = f"{meta.quality} ({'higher' if meta.higher_better else 'lower'} is better)"
    y = alt.Y("quality_mean:Q", title=y_title, scale=alt.Scale(zero=False, reverse=not meta.higher_better),
              axis=alt.Axis(format=qfmt(meta)) if meta.percent else alt.Axis())
    color = alt.Color("router:N", scale=color_scale(routers), legend=None)
    tooltip = [alt.Tooltip("router:N"), alt.Tooltip("n:Q", title="seeds"),
               alt.Tooltip("quality_mean:Q", title=meta.quality, format=qfmt(meta, True)),
               alt.Tooltip("quality_ci:Q", title="95% CI ±", format=qfmt(meta, True)),
               alt.Tooltip("throughput:Q", title=f"{meta.unit}/s", format=",.0f"),
               alt.Tooltip("vs_smoe:Q", title="× SMoE throughput", format=".2f"),
               alt.Tooltip("significance:N", title="vs SMoE")]
    base = alt.Chart(pdf)
    layers = []
    if sum(front) >= 2:
        layers.append(alt.Chart(pdf[pdf["pareto"]]).mark_line(strokeDash=[6, 4], color="#9aa0a6", strokeWidth=1.5)
                      .encode(x=x, y=y, order="throughput:Q"))
    layers += [
        base.mark_rule(strokeWidth=2).encode(x=x, y=alt.Y("lo:Q", scale=alt.Scale(zero=False)), y2="hi:Q",
                                             color=color),
        base.mark_point(filled=True, size=140, opacity=1).encode(
            x=x, y=y, color=color, tooltip=tooltip,
            shape=alt.condition("datum.pareto", alt.value("circle"), alt.value("diamond"))),
        base.mark_text(align="left", dx=9, dy=-9, fontSize=13, fontWeight="bold").encode(
            x=x, y=y, text="router:N", color=color),
    ]
    chart(alt.layer(*layers).properties(
        height=400, title=alt.TitleParams("Quality vs throughput",
                                          subtitle=["up and right is better · dashed: Pareto front · bars: 95% CI"])),
        key="pareto")


def forest_chart(ov: pl.DataFrame, meta: SuiteMeta) -> None:
    d = ov.filter(pl.col("quality_mean").is_not_null()).with_columns(
        *ci_exprs(meta))
    if d.height == 0:
        return
    pdf = d.select("router", "quality_mean", "quality_ci", "lo", "hi", "sig_label", "significance", "n").to_pandas()
    order = d["router"].to_list()
    y = alt.Y("router:N", sort=order, title=None, axis=alt.Axis(labelFontWeight="bold"))
    x_scale = alt.Scale(zero=False, reverse=not meta.higher_better)
    sig_scale = alt.Scale(domain=list(SIG_COLORS), range=list(SIG_COLORS.values()))
    base = alt.Chart(pdf)
    layers = [
        base.mark_rule(strokeWidth=2.5).encode(
            x=alt.X("lo:Q", scale=x_scale, title=f"{meta.quality} (mean ± 95% CI; better →)",
                    axis=alt.Axis(format=qfmt(meta)) if meta.percent else alt.Axis()), x2="hi:Q", y=y,
            color=alt.Color("sig_label:N", scale=sig_scale, legend=None)),
        base.mark_point(filled=True, size=110, opacity=1).encode(
            x=alt.X("quality_mean:Q", scale=x_scale), y=y,
            color=alt.Color("sig_label:N", scale=sig_scale, legend=None),
            tooltip=[alt.Tooltip("router:N"), alt.Tooltip("quality_mean:Q", format=qfmt(meta, True), title=meta.quality),
                     alt.Tooltip("quality_ci:Q", format=qfmt(meta, True), title="95% CI ±"),
                     alt.Tooltip("n:Q", title="seeds"),
                     alt.Tooltip("significance:N", title="vs SMoE")]),
    ]
    base_row = d.filter(pl.col("sig_label") == "baseline")
    if base_row.height:
        ref = pd.DataFrame({"x": [base_row["quality_mean"][0]]})
        layers.insert(0, alt.Chart(ref).mark_rule(strokeDash=[4, 4], color="#202124", opacity=0.5)
                      .encode(x=alt.X("x:Q", scale=x_scale)))
    chart(alt.layer(*layers).properties(
        height=44 * len(order) + 150,
        title=alt.TitleParams(f"{meta.label} by router",
                              subtitle=["mean ± 95% CI · dashed: SMoE mean",
                                        "green / red: significantly better / worse than SMoE (Holm-adjusted), "
                                        "grey: within noise"])),
        key="forest")
