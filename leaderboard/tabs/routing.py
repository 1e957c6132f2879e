"""The Routing tab: one run's expert-load heatmap at an evaluation step with its routing health, fluctuation and
load balance over training per router, and when routing settled (StableMoE's measure)."""
from __future__ import annotations

import altair as alt
import pandas as pd
import polars as pl
import streamlit as st

from leaderboard.runs import router_order, sort_by_router
from leaderboard.stats import mean_ci
from leaderboard.store import load_routing, routing_steps, runs_with_routing
from leaderboard.tables import health_over_training
from leaderboard.ui import band_chart, cached, chart, color_scale


def routing_tab(path: str, stamp, runs: pl.DataFrame, health: pl.DataFrame) -> None:
    fin = runs.filter(pl.col("status") == "finished")
    with_routing = set(cached(runs_with_routing, path, stamp))
    cand = fin.filter(pl.col("run_id").is_in(list(with_routing)))
    if cand.height == 0:
        st.info("No routing statistics for these runs (dense models have no router).")
        return
    cand = sort_by_router(cand, "router", "seed")
    ids = cand["run_id"].to_list()
    rec = {r["run_id"]: r for r in cand.iter_rows(named=True)}
    if st.session_state.get("heat_run") not in ids:
        st.session_state.pop("heat_run", None)
    c1, c2 = st.columns([3, 2])
    run_id = c1.selectbox("Run", ids, key="heat_run",
                          format_func=lambda r: f"{rec[r]['router']} · seed {rec[r]['seed']} · {r}")
    steps = cached(routing_steps, path, stamp, run_id)
    step = steps[-1] if steps else None
    if len(steps) > 1:
        if st.session_state.get("heat_step") not in steps:
            st.session_state["heat_step"] = steps[-1]
        step = c2.select_slider("Evaluation step", steps, key="heat_step")
    load = cached(load_routing, path, stamp, run_id, step)
    if load.height == 0:
        st.info("This run recorded no expert loads.")
        return
    n_exp = int(load["expert"].max()) + 1
    pdf = load.with_columns((pl.col("load") * n_exp).alias("rel"), (pl.col("load") * 100).alias("pct")).to_pandas()
    hi = max(2.0, float(pdf["rel"].max()))
    left, right = st.columns([3, 2], gap="large")
    with left:
        base = alt.Chart(pdf).encode(x=alt.X("expert:O", title="expert"),
                                     y=alt.Y("layer:O", title="MoE layer", sort="ascending"))
        rect = base.mark_rect(stroke="white", strokeWidth=1).encode(
            color=alt.Color("rel:Q", title="load × E", scale=alt.Scale(scheme="blueorange", domain=[0, hi],
                                                                       domainMid=1),
                            legend=alt.Legend(orient="right", direction="vertical", gradientLength=120)),
            tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("expert:O"),
                     alt.Tooltip("pct:Q", title="share of routed slots (%)", format=".2f"),
                     alt.Tooltip("rel:Q", title="load × E (1 = uniform)", format=".2f")])
        layers = [rect]
        if n_exp <= 16:
            layers.append(base.mark_text(fontSize=11).encode(
                text=alt.Text("pct:Q", format=".0f"),
                color=alt.condition("datum.rel > 1.6 || datum.rel < 0.35", alt.value("white"), alt.value("#202124"))))
        r = rec[run_id]
        n_layers = int(pdf["layer"].nunique())
        chart(alt.layer(*layers).properties(
            height=max(230, 46 * n_layers + 130),
            title=alt.TitleParams(f"Expert load · {r['router']} seed {r['seed']} · step {step}",
                                  subtitle=["cell: % of routed slots · colour: load × E (1 = uniform, white)"])),
            key="heatmap")
    with right:
        h = health.filter((pl.col("run_id") == run_id) & (pl.col("step") == step))
        if h.height:
            wide = h.pivot(on="name", index="layer", values="value").sort("layer")
            keep = [c for c in ("layer", "load_entropy", "max_over_mean_load", "dead_experts", "fluctuation")
                    if c in wide.columns]
            st.markdown(f"**Routing health at step {step}**")
            st.dataframe(wide.select(keep).to_pandas(), hide_index=True, width="stretch",
                         column_config={"load_entropy": st.column_config.ProgressColumn(
                             "entropy", min_value=0.0, max_value=1.0, format="%.3f"),
                             "max_over_mean_load": st.column_config.NumberColumn("max/mean", format="%.2f"),
                             "dead_experts": st.column_config.NumberColumn("dead", format="%d"),
                             "fluctuation": st.column_config.NumberColumn("fluctuation", format="%.3f")})

    st.divider()
    routers = router_order(fin["router"].to_list())
    left, right = st.columns(2, gap="large")
    with left:
        band_chart(health_over_training(health, fin, "fluctuation"), routers, "Routing fluctuation",
                   "fluctuation", "share of probe tokens whose top-1 expert changed since the previous evaluation",
                   "fluct")
    with right:
        band_chart(health_over_training(health, fin, "load_entropy"), routers, "Load balance",
                   "entropy", "expert-load entropy / log E, mean over layers (1 = uniform)", "entropy")
    last = health.filter(pl.col("name") == "fluctuation_last_change").join(fin.select("run_id", "router"),
                                                                          on="run_id")
    if last.height:
        per_run = last.group_by("router", "run_id").agg(pl.col("value").mean())
        rows = []
        for r in routers:
            mean, ci, n = mean_ci(per_run.filter(pl.col("router") == r)["value"].to_list())
            if n:
                rows.append({"router": r, "last change": mean, "ci": ci or 0.0, "n": n})
        pdf = pd.DataFrame(rows)
        if len(pdf):
            pdf["lo"] = (pdf["last change"] - pdf["ci"]).clip(0, 1)
            pdf["hi"] = (pdf["last change"] + pdf["ci"]).clip(0, 1)
            shown = [r for r in routers if r in set(pdf["router"])]
            xs = alt.Scale(domain=[0, 1], clamp=True)
            y = alt.Y("router:N", sort=shown, title=None, axis=alt.Axis(labelFontWeight="bold"))
            color = alt.Color("router:N", scale=color_scale(shown), legend=None)
            base = alt.Chart(pdf)
            c = alt.layer(
                base.mark_rule(strokeWidth=2.5).encode(
                    x=alt.X("lo:Q", scale=xs, title="fraction of training (0 = settled at once, 1 = still moving)"),
                    x2="hi:Q", y=y, color=color),
                base.mark_point(filled=True, size=110, opacity=1).encode(
                    x=alt.X("last change:Q", scale=xs), y=y, color=color,
                    tooltip=["router", alt.Tooltip("last change:Q", format=".3f"),
                             alt.Tooltip("ci:Q", title="95% CI ±", format=".3f"), alt.Tooltip("n:Q", title="seeds")]),
            ).properties(height=44 * len(pdf) + 150, title=alt.TitleParams(
                "When routing settled (StableMoE's fluctuation measure)",
                subtitle=["per probe token: the last evaluation whose top-1 expert differs from the final one; "
                          "mean ± 95% CI over seeds"]))
            chart(c, key="settle")
