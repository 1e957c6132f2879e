"""MoE router leaderboard (Streamlit).

    harness board [--store results/harness.duckdb] [--port 8501]
    streamlit run leaderboard/app.py -- --store results/harness.duckdb

The store path comes from ``--store`` after streamlit's ``--``, else $HARNESS_STORE, else
results/harness.duckdb. The page only ever opens the store read-only, on short-lived
connections, and waits (with backoff) while a ``harness run`` holds the write lock.
All numbers come from :mod:`leaderboard.queries`, which is tested without Streamlit.
"""
from __future__ import annotations

import sys
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Callable

import altair as alt
import pandas as pd
import polars as pl
import streamlit as st

try:
    from leaderboard import queries as q
except ImportError:  # run as a bare script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from leaderboard import queries as q

TTL_S = 30  # cached reads expire after this; the Refresh button clears them at once
LOCK_WAIT_S = 60

KNOWN_COLORS = {  # stable colours for the built-in routers across every chart
    "dense": "#7f7f7f", "smoe": "#1f77b4", "xmoe": "#ff7f0e", "moge": "#2ca02c",
    "stablemoe": "#d62728", "competesmoe": "#9467bd",
}
EXTRA_COLORS = ["#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
                "#7b4173", "#3182bd", "#e6550d", "#31a354"]
SIG_COLORS = {"better": "#137333", "worse": "#c5221f", "within noise": "#5f6368", "baseline": "#202124",
              "n<2": "#9aa0a6", "no SMoE": "#9aa0a6"}
BEST_CSS = "background-color: #e6f4ea; color: #0d652d; font-weight: 700"
STEP_AXIS = alt.Axis(format="~s", tickMinStep=1)
STATUS_ICON = {"finished": ":material/check_circle:", "diverged": ":material/trending_up:",
               "failed": ":material/error:", "running": ":material/hourglass_top:"}


# -- cached reads (keyed on the file's mtime, expiring after TTL_S) ---------------------------------

@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def c_runs(path: str, stamp: tuple[int, int]) -> pl.DataFrame:
    return q.load_runs(path, timeout=LOCK_WAIT_S)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def c_metrics(path: str, stamp: tuple[int, int]) -> pl.DataFrame:
    return q.load_metrics(path, timeout=LOCK_WAIT_S)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def c_health(path: str, stamp: tuple[int, int]) -> pl.DataFrame:
    return q.load_health(path, timeout=LOCK_WAIT_S)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def c_perf(path: str, stamp: tuple[int, int]) -> pl.DataFrame:
    return q.load_perf(path, timeout=LOCK_WAIT_S)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def c_curves(path: str, stamp: tuple[int, int], run_ids: tuple[str, ...], names: tuple[str, ...] | None):
    return q.load_curves(path, list(run_ids), list(names) if names is not None else None, timeout=LOCK_WAIT_S)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def c_curve_names(path: str, stamp: tuple[int, int], run_ids: tuple[str, ...]) -> list[str]:
    return q.curve_names(path, list(run_ids), timeout=LOCK_WAIT_S)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def c_routing(path: str, stamp: tuple[int, int], run_id: str, step: int | None) -> pl.DataFrame:
    return q.load_routing(path, run_id, step, timeout=LOCK_WAIT_S)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def c_routing_steps(path: str, stamp: tuple[int, int], run_id: str) -> list[int]:
    return q.routing_steps(path, run_id, timeout=LOCK_WAIT_S)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def c_runs_with_routing(path: str, stamp: tuple[int, int]) -> list[str]:
    return q.runs_with_routing(path, timeout=LOCK_WAIT_S)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def c_machines(path: str, stamp: tuple[int, int]) -> pl.DataFrame:
    return q.load_machines(path, timeout=LOCK_WAIT_S)


# -- small helpers -----------------------------------------------------------------------------------

ROUTER_COLORS: dict[str, str] = dict(KNOWN_COLORS)


def assign_colors(routers: list[str]) -> None:
    """Fix a colour for every router in the store, so a router keeps its colour in every chart."""
    extra = [c for c in EXTRA_COLORS if c not in ROUTER_COLORS.values()] or EXTRA_COLORS
    i = 0
    for r in sorted(set(routers)):
        if r not in ROUTER_COLORS:
            ROUTER_COLORS[r] = extra[i % len(extra)]
            i += 1


def color_scale(routers: list[str]) -> alt.Scale:
    assign_colors(routers)
    return alt.Scale(domain=list(routers), range=[ROUTER_COLORS[r] for r in routers])


def chart(c: alt.TopLevelMixin, key: str | None = None) -> None:
    st.altair_chart(c.configure_view(strokeWidth=0).configure_axis(labelFontSize=12, titleFontSize=12)
                    .configure_legend(labelFontSize=12, titleFontSize=12, orient="bottom")
                    .configure_title(fontSize=15, subtitleFontSize=12, anchor="start", subtitleColor="#5f6368"),
                    width="stretch", key=key)


def multiselect_all(label: str, options: list[Any], key: str, fmt: Callable[[Any], str] = str,
                    help: str | None = None) -> list[Any] | None:
    """A sidebar multiselect where an empty selection means 'all'; returns None for 'all'.
    Values that disappeared from the options (new data, other suite) are dropped first."""
    if key in st.session_state:
        st.session_state[key] = [v for v in st.session_state[key] if v in options]
    chosen = st.sidebar.multiselect(label, options, key=key, format_func=fmt, help=help,
                                    placeholder=f"all ({len(options)})")
    return list(chosen) if chosen else None


def fmt_dt(v: Any) -> str:
    return v.strftime("%Y-%m-%d %H:%M:%S") if isinstance(v, datetime) else ("—" if v is None else str(v))


def duration(a: Any, b: Any) -> str:
    if not isinstance(a, datetime) or not isinstance(b, datetime):
        return "—"
    s = (b - a).total_seconds()
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def setup_summary(runs: pl.DataFrame) -> str:
    """One line describing the model/training setup of the shown runs (from their resolved spec)."""
    fin = runs.filter(pl.col("status") == "finished")
    src = fin if fin.height else runs
    if src.height == 0:
        return ""
    cfg = q.parse_json(src["config"][0])
    m, t, d = cfg.get("model", {}), cfg.get("train", {}), cfg.get("data", {})
    parts = []
    if d.get("corpus") or d.get("dataset"):
        parts.append(str(d.get("corpus") or d.get("dataset")))
    if m:
        parts.append(f"d_model {m.get('d_model')}, {m.get('n_layers')} layers, "
                     f"{m.get('num_experts')} experts top-{m.get('top_k')}")
    if t:
        parts.append(f"{t.get('steps')} steps × batch {t.get('batch_size')}")
    return " · ".join(str(p) for p in parts)


def ci_exprs(meta: q.SuiteMeta) -> list[pl.Expr]:
    """lo/hi of the quality CI for error bars, clipped to the metric's range (top-1 lives in [0, 1])."""
    lo = pl.col("quality_mean") - pl.col("quality_ci").fill_null(0)
    hi = pl.col("quality_mean") + pl.col("quality_ci").fill_null(0)
    if meta.bounds:
        lo, hi = lo.clip(*meta.bounds), hi.clip(*meta.bounds)
    return [lo.alias("lo"), hi.alias("hi")]


def qfmt(meta: q.SuiteMeta, tooltip: bool = False) -> str:
    if meta.percent:
        return ".2%" if tooltip else ".0%"
    return ".4f" if tooltip else ""


# -- pages --------------------------------------------------------------------------------------------

def empty_page(path: str, state: str) -> None:
    st.title("MoE router leaderboard")
    if state == "missing":
        st.info(f"No results store at `{path}` yet.", icon=":material/inbox:")
    else:
        st.info(f"The results store `{path}` holds no runs yet.", icon=":material/inbox:")
    store_flag = "" if path == q.DEFAULT_STORE else f" --store {path}"
    st.markdown("Fill it by benchmarking the routers, then come back and press **Refresh**:")
    st.code(f"{q.FILL_COMMAND}{store_flag}\n"
            f"# a CI-sized run takes about a minute:\n"
            f"{q.FILL_COMMAND} --preset tiny --seeds 0,1{store_flag}", language="bash")
    st.caption("Each run records its metrics, curves and routing statistics in the store; the leaderboard "
               "reads it read-only and never blocks a running benchmark.")


def open_store(path: str) -> str:
    """Wait for the store to be readable (showing st.info while a writer holds the lock)."""
    box = st.empty()
    waited = {"attempts": 0, "t0": time.monotonic()}

    def on_wait(attempt: int, secs: float) -> None:
        waited["attempts"] = attempt
        box.info(f"The results store is locked by a writer (a `harness run` is saving results); "
                 f"retrying with backoff… (attempt {attempt}, {secs:.1f} s)", icon=":material/hourglass_top:")

    try:
        state = q.store_state(path, timeout=LOCK_WAIT_S, on_wait=on_wait)
    except q.StoreBusy as exc:
        box.info(f"{exc}. Press **Refresh** to try again.", icon=":material/hourglass_top:")
        st.stop()
    except q.StoreError as exc:
        box.error(f"{exc}", icon=":material/block:")
        st.stop()
    if waited["attempts"]:
        box.info(f"The store was locked by a writer; waited {time.monotonic() - waited['t0']:.1f} s for it. "
                 f"Showing the data as of {datetime.now():%H:%M:%S}.", icon=":material/hourglass_top:")
    return state


def sidebar_filters(runs: pl.DataFrame) -> tuple[str, pl.DataFrame, dict[str, Any]]:
    sb = st.sidebar
    suites = [s for s in ("lm", "vision") if s in set(runs["suite"].to_list())]
    suites += sorted(s for s in set(runs["suite"].drop_nulls().to_list()) if s not in suites)
    if not suites:
        suites = ["lm"]
    suite = sb.selectbox("Suite", suites, key="suite",
                         format_func=lambda s: {"lm": "lm · language modelling", "vision": "vision · image "
                                                "classification"}.get(s, s))
    sr = runs.filter(pl.col("suite") == suite)

    counts = sr.group_by("preset").len().sort("len", descending=True)
    presets = [p for p in counts["preset"].to_list() if p is not None]
    preset_opts = presets + (["(all presets)"] if len(presets) > 1 else [])
    if st.session_state.get("preset") not in preset_opts:
        st.session_state.pop("preset", None)
    preset = sb.selectbox("Preset", preset_opts or ["(all presets)"], key="preset",
                          help="Compare routers trained with the same preset; mixing presets mixes model sizes.")
    if preset and preset != "(all presets)":
        sr = sr.filter(pl.col("preset") == preset)

    routers = q.router_order(sr["router"].to_list())
    f_routers = multiselect_all("Routers", routers, "routers")
    machines = sorted(set(sr["machine"].drop_nulls().to_list()))
    f_machines = multiselect_all("Machine", machines, "machines")
    shas = sorted(set(sr["git_sha"].drop_nulls().to_list()))
    f_shas = multiselect_all("Git SHA", shas, "shas")
    spec_opts = sr.select("spec_hash", "router").unique().sort("router", "spec_hash")
    spec_router = {h: r for h, r in spec_opts.iter_rows()}
    f_specs = multiselect_all("Spec hash", list(spec_router), "specs",
                              fmt=lambda h: f"{h[:10]} · {spec_router.get(h, '?')}",
                              help="The hash of a run's resolved spec (one per router and config).")
    d_range = None
    dates = sr["started_at"].drop_nulls()
    if dates.len():
        lo, hi = dates.min().date(), dates.max().date()
        lo_bound, hi_bound = lo - timedelta(days=3650), max(hi, date.today())
        cur = st.session_state.get("dates")
        if cur is not None and (not isinstance(cur, (tuple, list)) or any(
                d is not None and (d < lo_bound or d > hi_bound) for d in cur)):
            st.session_state.pop("dates")
        kw = {} if "dates" in st.session_state else {"value": (lo, hi)}
        got = sb.date_input("Started between", min_value=lo_bound, max_value=hi_bound, key="dates",
                            help=f"runs here started {lo:%Y-%m-%d}" + (f" to {hi:%Y-%m-%d}" if hi != lo else ""),
                            **kw)
        if isinstance(got, (tuple, list)) and len(got) == 2:
            d_range = (got[0], got[1])
    filtered = q.filter_runs(sr, routers=f_routers, machines=f_machines, git_shas=f_shas, spec_hashes=f_specs,
                             date_range=d_range)
    return suite, filtered, {"preset": preset, "routers": f_routers, "machines": f_machines, "shas": f_shas}


def leaderboard_tab(path: str, stamp, runs: pl.DataFrame, metrics: pl.DataFrame, health: pl.DataFrame,
                    meta: q.SuiteMeta) -> None:
    ov = q.overview(runs, metrics, health, meta)
    fin = ov.filter(pl.col("n") > 0)
    if fin.height == 0:
        c = q.status_counts(runs)
        st.warning(f"No finished runs match these filters ({c['diverged']} diverged, {c['failed']} failed, "
                   f"{c['running']} running). Widen the filters in the sidebar.", icon=":material/filter_alt_off:")
        return
    disp = q.display_overview(ov, meta).to_pandas()
    best = q.display_best_cells(ov, meta)
    labels = ov["sig_label"].to_list()

    def style(df: pd.DataFrame) -> pd.DataFrame:
        css = pd.DataFrame("", index=df.index, columns=df.columns)
        for col, rows in best.items():
            for i in rows:
                css.iloc[i, df.columns.get_loc(col)] = BEST_CSS
        for i, lab in enumerate(labels):
            css.iloc[i, df.columns.get_loc("vs SMoE")] = f"color: {SIG_COLORS.get(lab, '#5f6368')}"
        css.iloc[:, df.columns.get_loc("router")] = "font-weight: 700"
        return css

    qcol, tcol = meta.quality_header(), meta.test_header()
    st.dataframe(
        disp.style.apply(style, axis=None), hide_index=True, width="stretch", key="overview",
        column_config={
            "#": st.column_config.TextColumn("#", width="small", help="rank by mean validation quality"),
            "router": st.column_config.TextColumn("router"),
            "n": st.column_config.NumberColumn("n", width="small", help="finished seeds"),
            qcol: st.column_config.TextColumn(qcol, help="mean ± 95% CI (Student t over seeds)"),
            "vs SMoE": st.column_config.TextColumn(
                "vs SMoE", help="Welch t-test of the validation metric against SMoE (α = 0.05); "
                                "'n<2' when either side has fewer than two seeds"),
            tcol: st.column_config.TextColumn(tcol, help="test split, mean ± 95% CI"),
            f"{meta.unit}/s": st.column_config.TextColumn(f"{meta.unit}/s", help="training throughput, mean"),
            "× dense": st.column_config.TextColumn("× dense", help="throughput relative to the dense baseline"),
            "× SMoE": st.column_config.TextColumn(
                "× SMoE", help="throughput relative to SMoE (<1× = routing overhead over SMoE)"),
            "peak MB": st.column_config.TextColumn("peak MB", help="peak memory during training"),
            "dead": st.column_config.TextColumn(
                "dead", help="experts with no routed token at the final evaluation, summed over layers"),
            "entropy": st.column_config.TextColumn(
                "entropy", help="expert-load entropy / log E at the final evaluation (1 = uniform)"),
            "max/mean": st.column_config.TextColumn("max/mean", help="busiest expert's load ÷ mean"),
            "excluded": st.column_config.TextColumn(
                "excluded", help="this router's runs left out of the statistics (diverged / failed / unfinished; "
                                 "duplicates: re-runs of a finished spec and seed, of which only the latest counts); "
                                 "'specs!' = several spec hashes are mixed, filter by spec hash"),
        },
    )
    st.caption(f"Finished runs only. **Bold green** = best in column. Quality: mean ± 95% CI over seeds "
               f"(Student t). *vs SMoE*: Welch t-test on {meta.quality}, α = 0.05. Routing health at the "
               f"final evaluation step, averaged over seeds.")

    left, right = st.columns([3, 2], gap="large")
    with left:
        pareto_chart(ov, meta)
    with right:
        forest_chart(ov, meta)

    with st.expander("Per-run values"):
        pr = q.per_run_table(q.distinct_seeds(runs)[0].filter(pl.col("status") == "finished"), metrics, health,
                             meta)
        st.dataframe(pr.drop("machine").to_pandas(), hide_index=True, width="stretch")
    with st.expander("Export: LaTeX (booktabs) and CSV"):
        st.code(q.to_latex(fin, meta), language="latex")
        st.download_button("Download overview CSV", q.display_overview(ov, meta).write_csv(),
                           file_name=f"leaderboard_{meta.name}.csv", mime="text/csv", key="dl_csv")


def pareto_chart(ov: pl.DataFrame, meta: q.SuiteMeta) -> None:
    d = ov.filter(pl.col("quality_mean").is_not_null() & pl.col("throughput").is_not_null())
    if d.height == 0:
        st.info("No throughput/quality pairs to plot yet.")
        return
    front = q.pareto_mask(d["throughput"].to_list(), d["quality_mean"].to_list(), meta.higher_better)
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


def forest_chart(ov: pl.DataFrame, meta: q.SuiteMeta) -> None:
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
                                        "green / red: significantly better / worse than SMoE (Welch), grey: within noise"])),
        key="forest")


def band_chart(bands: pl.DataFrame, routers: list[str], title: str, y_title: str, subtitle: str,
               key: str, reverse: bool = False) -> None:
    if bands.height == 0:
        st.info(f"No {y_title} recorded for these runs.")
        return
    pdf = bands.to_pandas()
    present = set(pdf["router"])
    scale = color_scale([r for r in routers if r in present])
    x = alt.X("step:Q", title="training step", axis=STEP_AXIS)
    ys = alt.Scale(zero=False, reverse=reverse)
    band = alt.Chart(pdf).mark_area(opacity=0.15).encode(
        x=x, y=alt.Y("lo:Q", scale=ys), y2="hi:Q", color=alt.Color("router:N", scale=scale, legend=None))
    line = alt.Chart(pdf).mark_line(strokeWidth=2.2, point=bool(pdf["step"].nunique() <= 12)).encode(
        x=x, y=alt.Y("mean:Q", title=y_title, scale=ys),
        color=alt.Color("router:N", scale=scale, title=None,
                        legend=alt.Legend(orient="top", direction="horizontal", symbolType="stroke",
                                          symbolStrokeWidth=3)),
        tooltip=[alt.Tooltip("router:N"), alt.Tooltip("step:Q"), alt.Tooltip("mean:Q", format=".4f"),
                 alt.Tooltip("lo:Q", format=".4f", title="min"), alt.Tooltip("hi:Q", format=".4f", title="max"),
                 alt.Tooltip("n:Q", title="seeds")])
    chart((band + line).resolve_legend(color="independent")
          .properties(height=360, title=alt.TitleParams(title, subtitle=[subtitle])), key=key)


def training_tab(path: str, stamp, runs: pl.DataFrame, meta: q.SuiteMeta) -> None:
    top_l, top_r = st.columns(2, gap="large")
    incl = top_l.toggle("Include diverged / failed / running runs", value=False, key="curves_all",
                        help="Their curves stop where they stopped.")
    use = runs if incl else runs.filter(pl.col("status") == "finished")
    if use.height == 0:
        st.info("No runs to plot with these filters.")
        return
    ids = tuple(use["run_id"].to_list())
    routers = q.router_order(use["router"].to_list())
    curves = c_curves(path, stamp, ids, (meta.quality, "train_loss"))
    n_pts = curves.filter(pl.col("name") == "train_loss").group_by("run_id").len()["len"].max() or 1
    smooth = top_r.slider("train-loss smoothing (moving average over logged points)", 1, 50,
                          value=int(max(1, min(20, n_pts // 15))), key="smooth")
    left, right = st.columns(2, gap="large")
    with left:
        band_chart(q.curve_bands(curves, use, meta.quality), routers, f"{meta.label} during training",
                   meta.quality, "line: mean over seeds · band: min–max", "curve_val")
    with right:
        band_chart(q.curve_bands(curves, use, "train_loss", smooth=smooth), routers, "Training loss (task)",
                   "train_loss", f"moving average over {smooth} logged points · band: min–max over seeds",
                   "curve_train")
    names = [n for n in c_curve_names(path, stamp, ids) if n not in (meta.quality, "train_loss")]
    if names:
        pick = st.selectbox("More curves", names, key="curve_more",
                            help="aux/*: auxiliary losses · stat/*: router statistics · lr: learning rate")
        more = c_curves(path, stamp, ids, (pick,))
        band_chart(q.curve_bands(more, use, pick), routers, pick, pick, "mean over seeds · band: min–max",
                   "curve_more")


def routing_tab(path: str, stamp, runs: pl.DataFrame, health: pl.DataFrame) -> None:
    fin = runs.filter(pl.col("status") == "finished")
    with_routing = set(c_runs_with_routing(path, stamp))
    cand = fin.filter(pl.col("run_id").is_in(list(with_routing)))
    if cand.height == 0:
        st.info("No routing statistics for these runs (dense models have no router).")
        return
    cand = cand.with_columns(pl.col("router").replace_strict(
        {r: i for i, r in enumerate(q.router_order(cand["router"].to_list()))}, default=99).alias("_o")) \
        .sort("_o", "seed").drop("_o")
    ids = cand["run_id"].to_list()
    rec = {r["run_id"]: r for r in cand.iter_rows(named=True)}
    if st.session_state.get("heat_run") not in ids:
        st.session_state.pop("heat_run", None)
    c1, c2 = st.columns([3, 2])
    run_id = c1.selectbox("Run", ids, key="heat_run",
                          format_func=lambda r: f"{rec[r]['router']} · seed {rec[r]['seed']} · {r}")
    steps = c_routing_steps(path, stamp, run_id)
    step = steps[-1] if steps else None
    if len(steps) > 1:
        if st.session_state.get("heat_step") not in steps:
            st.session_state["heat_step"] = steps[-1]
        step = c2.select_slider("Evaluation step", steps, key="heat_step")
    load = c_routing(path, stamp, run_id, step)
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
    routers = q.router_order(fin["router"].to_list())
    left, right = st.columns(2, gap="large")
    with left:
        band_chart(q.health_over_training(health, fin, "fluctuation"), routers, "Routing fluctuation",
                   "fluctuation", "share of probe tokens whose top-1 expert changed since the previous evaluation",
                   "fluct")
    with right:
        band_chart(q.health_over_training(health, fin, "load_entropy"), routers, "Load balance",
                   "entropy", "expert-load entropy / log E, mean over layers (1 = uniform)", "entropy")
    last = health.filter(pl.col("name") == "fluctuation_last_change").join(fin.select("run_id", "router"),
                                                                          on="run_id")
    if last.height:
        per_run = last.group_by("router", "run_id").agg(pl.col("value").mean())
        rows = []
        for r in routers:
            mean, ci, n = q.mean_ci(per_run.filter(pl.col("router") == r)["value"].to_list())
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


def lmeval_tab(runs: pl.DataFrame, metrics: pl.DataFrame) -> None:
    table = q.lmeval_table(metrics, runs)
    if table.height == 0:
        st.info("No lm-eval results for these runs. `harness run --suite lm` evaluates the tasks after "
                "pretraining (unless `--no-eval`); `harness eval` evaluates finished runs later.", icon=":material/quiz:")
        return
    wide, best = q.lmeval_wide(table)
    pdf = wide.to_pandas()

    def style(df: pd.DataFrame) -> pd.DataFrame:
        css = pd.DataFrame("", index=df.index, columns=df.columns)
        for col, rows in best.items():
            for i in rows:
                css.iloc[i, df.columns.get_loc(col)] = BEST_CSS
        css.iloc[:, 0] = "font-weight: 700"
        return css

    st.dataframe(pdf.style.apply(style, axis=None), hide_index=True, width="stretch", key="lmeval")
    st.caption("mean ± 95% CI over seeds; with one seed, ± se is lm-eval's own standard error. Best per task in "
               "bold green (lower is better for perplexity-like metrics).")
    with st.expander("Long format"):
        st.dataframe(table.to_pandas(), hide_index=True, width="stretch")


CLAIM_COLORS = {"holds": "#137333", "reversed": "#c5221f", "within noise": "#5f6368", "n<2": "#9aa0a6"}


def claims_tab(runs: pl.DataFrame, metrics: pl.DataFrame, meta: q.SuiteMeta) -> None:
    """Each paper's directional claim beside the harness' verdict on the runs shown (harness.claims)."""
    from harness.claims import claims_table

    try:
        table = claims_table(runs, metrics, meta)
    except ValueError as exc:  # a damaged claims table: say so, keep the rest of the page
        st.error(f"{exc}", icon=":material/block:")
        return
    k = 100.0 if meta.percent else 1.0

    def side(router: str, mean: float | None, ci: float | None, n: int) -> str:
        return f"{router} {q.fmt_ci(None if mean is None else mean * k, None if ci is None else ci * k)} (n={n})"

    rows = [{"claim": r["claim"], "harness verdict": r["verdict"],
             f"harness {meta.quality}": side(r["router"], r["router_mean"], r["router_ci"], r["n_router"]) + " vs "
             + side(r["baseline"], r["baseline_mean"], r["baseline_ci"], r["n_baseline"]),
             "paper": f"arXiv {r['arxiv']} · {r['paper']}", "paper's setting": r["setting"],
             "paper's figure": r["figure"]} for r in table.iter_rows(named=True)]
    pdf = pd.DataFrame(rows)
    labels = table["label"].to_list()

    def style(df: pd.DataFrame) -> pd.DataFrame:
        css = pd.DataFrame("", index=df.index, columns=df.columns)
        for i, lab in enumerate(labels):
            css.iloc[i, df.columns.get_loc("harness verdict")] = \
                f"color: {CLAIM_COLORS.get(lab, '#5f6368')}; font-weight: 700"
        css.iloc[:, 0] = "font-weight: 700"
        return css

    st.dataframe(pdf.style.apply(style, axis=None) if len(pdf) else pdf, hide_index=True, width="stretch",
                 key="claims")
    direction = "higher" if meta.higher_better else "lower"
    st.caption(f"Each claim reads *router beats baseline* on {meta.quality} ({direction} is better): Welch t-test "
               f"over distinct seeds of the runs selected in the sidebar, α = {q.ALPHA}. **holds** / **reversed**: "
               f"significantly better / worse; **within noise**: no significant difference at these n; "
               f"**n<2**: too few seeds to test. The papers' settings differ from this suite's; their figures "
               f"are quoted as the claims table (tasks/claims/papers.yaml) gives them, marked where not verified.")
    if labels and all(lab == "n<2" for lab in labels):
        st.info("No claim can be tested yet: run at least two seeds of each router, e.g. "
                "`harness run --suite lm --seeds 0,1,2`.", icon=":material/fact_check:")


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
    choices = q.bench_choices(p)
    ids = [c[0] for c in choices]
    label = dict(choices)
    if st.session_state.get("bench") not in ids:
        st.session_state.pop("bench", None)
    bench = st.selectbox("Benchmark", ids, key="bench", format_func=lambda b: label[b])
    table = q.perf_table(p, bench)
    long, shared = q.perf_long(p, bench)
    st.dataframe(table.to_pandas(), hide_index=True, width="stretch", key="perf")
    shared_txt = ", ".join(f"{k}={v}" for k, v in shared.items())
    st.caption("median (IQR) over repeats, as recorded by `harness bench`"
               + (f" · shared config: {shared_txt}" if shared_txt else ""))
    metrics_here = q.perf_metrics_order(long["metric"].unique().to_list())
    if not metrics_here:
        return
    default = next((m for m in ("ratio_vs_smoe", "fwd_bwd_ms", "tokens_per_s") if m in metrics_here),
                   metrics_here[0])
    if st.session_state.get("bench_metric") not in metrics_here:
        st.session_state["bench_metric"] = default
    metric = st.selectbox("Chart metric", metrics_here, key="bench_metric")
    d = long.filter(pl.col("metric") == metric)
    cands = d.select("candidate", "router").unique()
    order = {r: i for i, r in enumerate(q.router_order(cands["router"].to_list()))}
    cand_order = [c for c, _ in sorted(cands.iter_rows(), key=lambda cr: (order.get(cr[1], 99), cr[0]))]
    routers = q.router_order(d["router"].to_list())
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


def run_detail_tab(path: str, stamp, runs: pl.DataFrame, metrics: pl.DataFrame, meta: q.SuiteMeta) -> None:
    if runs.height == 0:
        st.info("No runs match the filters.")
        return
    ordered = runs.sort("started_at", descending=True, nulls_last=True)
    ids = ordered["run_id"].to_list()
    rec = {r["run_id"]: r for r in ordered.iter_rows(named=True)}
    if st.session_state.get("detail_run") not in ids:
        st.session_state.pop("detail_run", None)
    run_id = st.selectbox("Run", ids, key="detail_run", format_func=lambda r: q.run_label(rec[r]))
    r = rec[run_id]
    status = r["status"]
    st.subheader(f"{STATUS_ICON.get(status, '')} {r['router']} · seed {r['seed']} · {status}")
    st.markdown(f"**steps** {r['step']} / {r['total_steps']} · **wall time** "
                f"{duration(r['started_at'], r['finished_at'])} · **preset** {r['preset'] or '—'} · "
                f"**git** `{r['git_sha'] or '—'}` · **spec** `{r['spec_hash'] or '—'}` · "
                f"**started** {fmt_dt(r['started_at'])} · **machine** {r['machine']}")
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
        names = c_curve_names(path, stamp, (run_id,))
        if names:
            default = [n for n in (meta.quality, "train_loss") if n in names] or names[:1]
            pick = st.multiselect("Curves", names, default=default, key=f"detail_curves_{run_id}")
            cv = c_curves(path, stamp, (run_id,), tuple(pick)) if pick else None
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
        st.json(q.parse_json(r["config"]), expanded=2)
    with b:
        st.markdown("**Versions**")
        st.json(q.parse_json(r["versions"]), expanded=True)
    with c:
        st.markdown("**Machine**")
        mach = c_machines(path, stamp)
        mrow = mach.filter(pl.col("machine_id") == r["machine_id"]) if mach.height else mach
        info = {k: (fmt_dt(v) if isinstance(v, datetime) else v) for k, v in mrow.row(0, named=True).items()} \
            if mrow.height else {"machine_id": r["machine_id"]}
        st.json(info, expanded=True)
        st.caption(f"run_id `{run_id}` · started {fmt_dt(r['started_at'])} · finished {fmt_dt(r['finished_at'])}")


# -- main -------------------------------------------------------------------------------------------------

def main() -> None:
    st.set_page_config(page_title="MoE router leaderboard", page_icon=":material/hub:", layout="wide")
    path = q.resolve_store_path(sys.argv[1:])
    st.markdown("<style>[data-testid='stMainBlockContainer'], .block-container {padding-top: 2.5rem}</style>",
                unsafe_allow_html=True)

    st.sidebar.markdown("### :material/hub: MoE leaderboard")
    if st.sidebar.button("↻ Refresh data", key="refresh", width="stretch",
                         help=f"Re-read the store now (reads are otherwise cached for {TTL_S} s)"):
        st.cache_data.clear()
    state = open_store(path)
    if state != "ready":
        st.sidebar.caption(f"store: `{path}`")
        empty_page(path, state)
        return
    stamp = q.store_stamp(path)
    try:
        runs_all = c_runs(path, stamp)
        metrics = c_metrics(path, stamp)
        health = c_health(path, stamp)
        perf = c_perf(path, stamp)
    except q.StoreBusy as exc:
        st.info(f"{exc}. Press **Refresh** to try again.", icon=":material/hourglass_top:")
        return

    if runs_all.height == 0:  # bench rows only
        st.title("MoE router leaderboard")
        st.caption(f"store `{path}`")
        st.info("No training runs yet; only benchmark rows. Fill the leaderboard with "
                f"`{q.FILL_COMMAND}`.", icon=":material/inbox:")
        bench_tab(perf, {})
        return

    assign_colors(runs_all["router"].drop_nulls().to_list() + perf["router"].drop_nulls().to_list())
    st.sidebar.markdown("**Filters**")
    suite, runs, filt = sidebar_filters(runs_all)
    st.sidebar.divider()
    st.sidebar.caption(f"store `{path}`  \n{runs_all.height} runs in store · loaded {datetime.now():%H:%M:%S} · "
                       f"cache {TTL_S} s")

    meta = q.suite_meta(suite, metrics["name"].unique().to_list())
    all_runs = runs  # Run detail lists every run; every statistic counts distinct (spec, seed) only
    runs, n_dupes = q.distinct_seeds(runs)
    counts = q.status_counts(runs)
    fin = runs.filter(pl.col("status") == "finished")

    st.title("MoE router leaderboard")
    preset = filt.get("preset")
    sub = [f"suite **{suite}**"]
    if preset and preset != "(all presets)":
        sub.append(f"preset **{preset}**")
    setup = setup_summary(runs)
    if setup:
        sub.append(setup)
    machines = runs["machine"].n_unique()
    sub.append(f"{machines} machine{'s' if machines != 1 else ''}")
    st.markdown(" · ".join(sub))
    cols = st.columns(6)
    cols[0].metric("routers", fin["router"].n_unique())
    cols[1].metric("finished runs", counts["finished"])
    cols[2].metric("seeds / router", f"{fin.group_by('router').len()['len'].max() or 0}")
    cols[3].metric("diverged", counts["diverged"], help="excluded from the overview")
    cols[4].metric("failed", counts["failed"], help="excluded from the overview; see Run detail")
    cols[5].metric("running / unfinished", counts["running"], help="excluded from the overview")
    if n_dupes:
        st.caption(f":material/content_copy: **{n_dupes} duplicate run{'s' if n_dupes != 1 else ''} set aside**: "
                   f"finished again with the same spec hash and seed as another run (`harness run --rerun`). "
                   f"A copy is not another seed, so every statistic here counts one run per spec hash and "
                   f"seed, the latest finished; Run detail still lists them all.")

    tabs = st.tabs([":material/leaderboard: Leaderboard", ":material/show_chart: Training curves",
                    ":material/alt_route: Routing", ":material/quiz: lm-eval", ":material/fact_check: Claims",
                    ":material/speed: Benchmarks", ":material/manage_search: Run detail"])
    stamp_ = stamp
    with tabs[0]:  # overview() sets the copies aside itself and names them per router
        leaderboard_tab(path, stamp_, all_runs, metrics, health, meta)
    with tabs[1]:
        training_tab(path, stamp_, runs, meta)
    with tabs[2]:
        routing_tab(path, stamp_, runs, health)
    with tabs[3]:
        lmeval_tab(runs, metrics)
    with tabs[4]:
        claims_tab(runs, metrics, meta)
    with tabs[5]:
        bench_tab(perf, filt)
    with tabs[6]:
        run_detail_tab(path, stamp_, all_runs, metrics, meta)


main()
