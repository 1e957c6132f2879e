"""The Run detail tab: one run (any status) with its metrics, curves, resolved spec, versions and machine;
a failed run's traceback."""
from __future__ import annotations

from datetime import datetime

import altair as alt
import polars as pl
import streamlit as st

from leaderboard.formatting import duration, fmt_dt, run_label
from leaderboard.runs import parse_json
from leaderboard.store import curve_names, load_curves, load_machines
from leaderboard.suites import SuiteMeta
from leaderboard.ui import KNOWN_COLORS, STEP_AXIS, cached, chart


STATUS_ICON = {"finished": ":material/check_circle:", "diverged": ":material/trending_up:",
               "failed": ":material/error:", "running": ":material/hourglass_top:"}


def run_detail_tab(path: str, stamp, runs: pl.DataFrame, metrics: pl.DataFrame, meta: SuiteMeta) -> None:
    if runs.height == 0:
        st.info("No runs match the filters.")
        return
    ordered = runs.sort("started_at", descending=True, nulls_last=True)
    ids = ordered["run_id"].to_list()
    rec = {r["run_id"]: r for r in ordered.iter_rows(named=True)}
    if st.session_state.get("detail_run") not in ids:
        st.session_state.pop("detail_run", None)
    run_id = st.selectbox("Run", ids, key="detail_run", format_func=lambda r: run_label(rec[r]))
    r = rec[run_id]
    status = r["status"]
    st.subheader(f"{STATUS_ICON.get(status, '')} {r['router']} · seed {r['seed']} · {status}")
    st.markdown(f"**steps** {r['step']} / {r['total_steps']} · **wall time** "
                f"{duration(r['started_at'], r['finished_at'])} · **preset** {r['preset'] or '—'} · "
                f"**git** `{r['git_sha'] or '—'}` · **spec** `{r['spec_hash'] or '—'}` · "
                f"**started** {fmt_dt(r['started_at'])} · **machine** {r['machine']}")
    if r.get("origin"):  # a board over several sources (harness board --store A --import DIR)
        st.caption(f"origin `{r['origin']}`" + (f" · also in `{r['also_in']}`" if r.get("also_in") else "")
                   + (" · :material/call_split: another source holds this spec hash and seed (counted once)"
                      if r.get("cross_origin") else ""))
    if status == "diverged":
        st.warning(f"Diverged: {r['error'] or 'no message'}", icon=":material/trending_up:")
    elif status == "failed":
        st.error("Failed — traceback:", icon=":material/error:")
        st.code(r["error"] or "(no traceback recorded)", language="python")
    elif status == "running":
        st.info("Still running (or interrupted: `harness run --resume` continues it).", icon=":material/hourglass_top:")
    elif r["error"]:
        st.code(r["error"], language="text")

    m = metrics.filter(pl.col("run_id") == run_id).select("name", "value", "stderr", "split", "step").sort("name")
    left, right = st.columns([2, 3], gap="large")
    with left:
        st.markdown("**Metrics**")
        if m.height:
            st.dataframe(m.to_pandas(), hide_index=True, width="stretch",
                         column_config={"value": st.column_config.NumberColumn(format="%.6g"),
                                        "stderr": st.column_config.NumberColumn(format="%.3g")})
        else:
            st.caption("no metrics recorded (only finished runs write their final metrics)")
    with right:
        names = cached(curve_names, path, stamp, (run_id,))
        if names:
            default = [n for n in (meta.quality, "train_loss") if n in names] or names[:1]
            pick = st.multiselect("Curves", names, default=default, key=f"detail_curves_{run_id}")
            cv = cached(load_curves, path, stamp, (run_id,), tuple(pick)) if pick else None
            for i, name in enumerate(pick):
                d = cv.filter(pl.col("name") == name).to_pandas()
                c = alt.Chart(d).mark_line(point=len(d) <= 12, color=KNOWN_COLORS.get(r["router"], "#1f77b4")) \
                    .encode(x=alt.X("step:Q", title="training step", axis=STEP_AXIS),
                            y=alt.Y("value:Q", scale=alt.Scale(zero=False), title=name),
                            tooltip=["step", alt.Tooltip("value:Q", format=".5g")]) \
                    .properties(height=200, title=name)
                chart(c, key=f"detail_chart_{i}")
        else:
            st.caption("no curves recorded")

    a, b, c = st.columns([3, 2, 2], gap="large")
    with a:
        st.markdown("**Resolved spec**")
        st.json(parse_json(r["config"]), expanded=2)
    with b:
        st.markdown("**Versions**")
        st.json(parse_json(r["versions"]), expanded=True)
    with c:
        st.markdown("**Machine**")
        mach = cached(load_machines, path, stamp)
        mrow = mach.filter(pl.col("machine_id") == r["machine_id"]) if mach.height else mach
        info = {k: (fmt_dt(v) if isinstance(v, datetime) else v) for k, v in mrow.row(0, named=True).items()} \
            if mrow.height else {"machine_id": r["machine_id"]}
        st.json(info, expanded=True)
        st.caption(f"run_id `{run_id}` · started {fmt_dt(r['started_at'])} · finished {fmt_dt(r['finished_at'])}")
