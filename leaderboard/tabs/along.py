"""The Along an axis tab: every router against a baseline at each point of the training budget or of a spec key
that varies among the runs selected, one label per router across the points (leaderboard.along)."""
from __future__ import annotations

import altair as alt
import pandas as pd
import polars as pl
import streamlit as st

from leaderboard.along import BUDGET, AlongError, along_table, axes
from leaderboard.formatting import fmt_diff, fmt_p, kind_name
from leaderboard.runs import BASELINE, router_order
from leaderboard.stats import ALPHA
from leaderboard.suites import SuiteMeta
from leaderboard.ui import chart, color_scale, styled

KIND_COLORS = {"holds": "#137333", "reversed": "#c5221f", "crossover": "#b06000", "mixed": "#1a73e8",
               "within noise": "#5f6368", "n<2": "#9aa0a6"}


def _pick(label: str, options: list[str], key: str, default: str | None = None, **kw) -> str:  # noqa: ANN003
    """A selectbox that forgets a choice the new data no longer offers (as the sidebar's filters do)."""
    if st.session_state.get(key) not in options:
        st.session_state.pop(key, None)
    index = options.index(default) if default in options else 0
    return st.selectbox(label, options, index=index, key=key, **kw)


def along_tab(runs: pl.DataFrame, metrics: pl.DataFrame, meta: SuiteMeta) -> None:
    choices = axes(runs, metrics, meta.quality)
    if not choices:
        st.info("Nothing varies along an axis in the runs selected: no run records several training budgets and "
                "no spec key takes two values among one router's runs. Sweep one, e.g. "
                "`harness run --sweep model.num_experts=4,8,16`, or record budgets with "
                "`--set train.schedule=wsd --set train.budgets=[250,500,1000]` (docs/along.md).",
                icon=":material/timeline:")
        return
    routers = router_order(runs.filter(pl.col("status") == "finished")["router"].to_list())
    left, right = st.columns(2, gap="large")
    with left:
        axis = _pick("Axis", choices, "along_axis",
                     help="budget: the training budgets a run recorded (val_bpb@250, ...) or its train.steps; "
                          "a spec key: the runs grouped by its value in their resolved spec")
    with right:
        baseline = _pick("Baseline", routers, "along_baseline", default=BASELINE,
                         help="every other router is compared with this one at each point")
    try:
        al = along_table(runs, metrics, meta, axis, baseline)
    except AlongError as exc:
        st.info(f"{exc}", icon=":material/timeline:")
        return

    labels = al.labels
    pdf = pd.DataFrame({"router": labels["router"].to_list(), f"along {axis}": labels["label"].to_list()})
    st.dataframe(styled(pdf, bold="router", label_col=f"along {axis}", labels=labels["kind"].to_list(),
                        colors=KIND_COLORS) if len(pdf) else pdf, hide_index=True, width="stretch",
                 key="along_labels")
    diff_chart(al, meta)
    with st.expander("Each point"):
        rows = [{"router": r["router"], axis: r["point"],
                 f"Δ vs {baseline}": fmt_diff(meta.shown(r["diff"]), meta.shown(r["diff_ci"])),
                 "test": "—" if r["test"] == "n<2" else
                 f"paired, n = {r['n_pairs']}" if r["test"] == "paired" else f"{kind_name(r['test'])}, n = {r['n']}",
                 "p": fmt_p(r["p"]) if r["p"] is not None else "—",
                 "p (Holm)": fmt_p(r["p_holm"]) if r["p_holm"] is not None else "—",
                 "verdict": r["direction"] + (f" ({r['note']})" if r["note"] else "")}
                for r in al.rows.sort("router", "order").iter_rows(named=True)]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="along_rows")
    direction = "higher" if meta.higher_better else "lower"
    st.caption(f"{meta.quality} ({direction} is better), each router − {baseline} at every point of **{axis}**, over "
               f"distinct seeds of the runs selected in the sidebar: paired t-test where the runs pair (same spec "
               f"outside the router), else Welch; p Holm-adjusted over all {al.family} tests of this table, "
               f"α = {ALPHA}. **holds** / **reversed at every point**: significantly better / worse at each; "
               f"**crossover**: significant in opposite directions at two points; **mixed**: significant at some "
               f"points only; **within noise**: nowhere significant, with the largest effect its tests could have "
               f"detected (80% power). Same command: `harness claims --along {axis}`.")


def diff_chart(al, meta: SuiteMeta) -> None:  # noqa: ANN001 - an Along
    """Difference to the baseline ± 95% CI against the axis, one line per router, 0 dashed."""
    d = al.rows.filter(pl.col("diff").is_not_null()).with_columns(
        pl.col("diff").map_elements(meta.shown, return_dtype=pl.Float64).alias("diff"),
        pl.col("diff_ci").fill_null(0.0).map_elements(meta.shown, return_dtype=pl.Float64).alias("ci"))
    if d.height == 0:
        return
    pdf = d.with_columns((pl.col("diff") - pl.col("ci")).alias("lo"), (pl.col("diff") + pl.col("ci")).alias("hi")) \
        .select("router", "point", "x", "diff", "ci", "lo", "hi", "direction").to_pandas()
    numeric = pdf["x"].notna().all()
    x = alt.X("x:Q", title=al.axis, scale=alt.Scale(zero=False), axis=alt.Axis(format="~s" if al.axis == BUDGET
                                                                                else "")) \
        if numeric else alt.X("point:O", title=al.axis, sort=al.points)
    routers = router_order(pdf["router"].tolist())
    color = alt.Color("router:N", scale=color_scale(routers), title=None,
                      legend=alt.Legend(orient="top", direction="horizontal"))
    y = alt.Y("diff:Q", title=f"{al.metric} − {al.baseline} (± 95% CI)")
    tooltip = [alt.Tooltip("router:N"), alt.Tooltip("point:N", title=al.axis),
               alt.Tooltip("diff:Q", format="+.4f", title="Δ"), alt.Tooltip("ci:Q", format=".4f", title="95% CI ±"),
               alt.Tooltip("direction:N", title="verdict")]
    base = alt.Chart(pdf)
    zero = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(strokeDash=[4, 4], color="#202124", opacity=0.5) \
        .encode(y="y:Q")
    layers = [zero,
              base.mark_rule(strokeWidth=2, opacity=0.6).encode(x=x, y=alt.Y("lo:Q"), y2="hi:Q", color=color),
              base.mark_line(strokeWidth=2.2).encode(x=x, y=y, color=color),
              base.mark_point(filled=True, size=90, opacity=1).encode(
                  x=x, y=y, color=color, tooltip=tooltip,
                  shape=alt.condition("datum.direction == 'within noise' || datum.direction == 'n<2'",
                                      alt.value("circle"), alt.value("diamond")))]
    better = "above" if meta.higher_better else "below"
    chart(alt.layer(*layers).properties(height=380, title=alt.TitleParams(
        f"Difference to {al.baseline} along {al.axis}",
        subtitle=[f"{better} the dashed line is better than {al.baseline} · bars: 95% CI · diamonds: significant "
                  f"after Holm"])), key="along_chart")

