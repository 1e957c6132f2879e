"""The Benchmarks tab: one ``harness bench`` (median and IQR per candidate and metric) as a table and charts."""
from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd
import polars as pl
import streamlit as st

from leaderboard.runs import router_order, sort_by_router
from leaderboard.tables import bench_choices, perf_long, perf_metrics_order, perf_table
from leaderboard.ui import chart, color_scale


def bench_tab(perf: pl.DataFrame, filt: dict[str, Any]) -> None:
    p = perf
    if filt.get("machines") is not None:
        p = p.filter(pl.col("machine").is_in(filt["machines"]))
    if filt.get("shas") is not None:
        p = p.filter(pl.col("git_sha").is_in(filt["shas"]))
    if p.height == 0:
        st.info("No benchmark rows for these filters. `harness bench` measures forward/backward time, "
                "throughput and the ratio to SMoE of every router.", icon=":material/speed:")
        return
    choices = bench_choices(p)
    ids = [c[0] for c in choices]
    label = dict(choices)
    if st.session_state.get("bench") not in ids:
        st.session_state.pop("bench", None)
    bench = st.selectbox("Benchmark", ids, key="bench", format_func=lambda b: label[b])
    table = perf_table(p, bench)
    long, shared = perf_long(p, bench)
    st.dataframe(table.to_pandas(), hide_index=True, width="stretch", key="perf")
    shared_txt = ", ".join(f"{k}={v}" for k, v in shared.items())
    st.caption("median (IQR) over repeats, as recorded by `harness bench`"
               + (f" · shared config: {shared_txt}" if shared_txt else ""))
    metrics_here = perf_metrics_order(long["metric"].unique().to_list())
    if not metrics_here:
        return
    default = next((m for m in ("ratio_vs_smoe", "fwd_bwd_ms", "tokens_per_s") if m in metrics_here),
                   metrics_here[0])
    if st.session_state.get("bench_metric") not in metrics_here:
        st.session_state["bench_metric"] = default
    metric = st.selectbox("Chart metric", metrics_here, key="bench_metric")
    d = long.filter(pl.col("metric") == metric)
    cands = d.select("candidate", "router").unique()
    cand_order = sort_by_router(cands, "router", "candidate")["candidate"].to_list()
    routers = router_order(d["router"].to_list())
    settings = sorted(set(d["setting"].to_list()))
    for i, setting in enumerate(settings[:8]):
        pdf = d.filter(pl.col("setting") == setting).to_pandas()
        base = alt.Chart(pdf).encode(y=alt.Y("candidate:N", sort=cand_order, title=None,
                                             axis=alt.Axis(labelFontWeight="bold")))
        layers = [base.mark_bar(height={"band": 0.7}).encode(
                      x=alt.X("value:Q", title=metric),
                      color=alt.Color("router:N", scale=color_scale(routers), legend=None),
                      tooltip=["candidate", "router", "variant", alt.Tooltip("value:Q", format=".4g", title="median"),
                               alt.Tooltip("spread:Q", format=".4g", title="IQR")]),
                  base.mark_rule(color="#202124").encode(x="lo:Q", x2="hi:Q")]
        if metric.startswith(("ratio_vs_", "throughput_vs_")):
            layers.append(alt.Chart(pd.DataFrame({"x": [1.0]})).mark_rule(strokeDash=[4, 4], color="#202124")
                          .encode(x="x:Q"))
        sub = [setting] if setting else []
        chart(alt.layer(*layers).properties(
            height=40 * len(pdf) + 110,
            title=alt.TitleParams(metric, subtitle=sub + ["bar: median · whisker: ± IQR/2"])), key=f"bench_chart_{i}")
    if len(settings) > 8:
        st.caption(f"{len(settings) - 8} more settings in the table above.")
