"""MoE router leaderboard (Streamlit): the entry point. Page setup, the sidebar, the header, then one module
per tab under :mod:`leaderboard.tabs`.

    harness board [--store results/harness.duckdb] [--port 8501]
    streamlit run leaderboard/app.py -- --store results/harness.duckdb

The store path comes from ``--store`` after streamlit's ``--``, else $HARNESS_STORE, else
results/harness.duckdb. The page only ever opens the store read-only, on short-lived
connections, and waits (with backoff) while a ``harness run`` holds the write lock.
Every number comes from the Streamlit-free modules (:mod:`leaderboard.store`, ``stats``, ``overview``,
``tables``, ``claims``, ``along``), which are tested without a page.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import polars as pl
import streamlit as st

try:
    import leaderboard  # noqa: F401 - only to see whether the package is importable
except ImportError:  # run as a bare script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# the imports below come after that fix on purpose

from harness.store import DEFAULT_STORE
from leaderboard.formatting import setup_summary
from leaderboard.runs import filter_runs, status_counts
from leaderboard.sidebar import ALL_PRESETS, sidebar_filters
from leaderboard.stats import distinct_seeds
from leaderboard.store import (FILL_COMMAND, StoreBusy, StoreError, load_health, load_metrics,
                               load_perf, load_runs, resolve_store_path, store_stamp, store_state)
from leaderboard.suites import suite_meta
from leaderboard.tabs.along import along_tab
from leaderboard.tabs.bench import bench_tab
from leaderboard.tabs.claims import claims_tab
from leaderboard.tabs.lmeval import lmeval_tab
from leaderboard.tabs.overview import overview_tab
from leaderboard.tabs.routing import routing_tab
from leaderboard.tabs.run_detail import run_detail_tab
from leaderboard.tabs.training import training_tab
from leaderboard.ui import LOCK_WAIT_S, TTL_S, assign_colors, cached, reset_colors

TITLE = "MoE router leaderboard"


def empty_page(path: str, state: str) -> None:
    st.title(TITLE)
    if state == "missing":
        st.info(f"No results store at `{path}` yet.", icon=":material/inbox:")
    else:
        st.info(f"The results store `{path}` holds no runs yet.", icon=":material/inbox:")
    store_flag = "" if path == DEFAULT_STORE else f" --store {path}"
    st.markdown("Fill it by benchmarking the routers, then come back and press **Refresh**:")
    st.code(f"{FILL_COMMAND}{store_flag}\n"
            f"# a CI-sized run takes about a minute:\n"
            f"{FILL_COMMAND} --preset tiny --seeds 0,1{store_flag}", language="bash")
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
        state = store_state(path, timeout=LOCK_WAIT_S, on_wait=on_wait)
    except StoreBusy as exc:
        box.info(f"{exc}. Press **Refresh** to try again.", icon=":material/hourglass_top:")
        st.stop()
    except StoreError as exc:
        box.error(f"{exc}", icon=":material/block:")
        st.stop()
    if waited["attempts"]:
        box.info(f"The store was locked by a writer; waited {time.monotonic() - waited['t0']:.1f} s for it. "
                 f"Showing the data as of {datetime.now():%H:%M:%S}.", icon=":material/hourglass_top:")
    return state


def header(suite: str, preset: str | None, runs: pl.DataFrame, n_dupes: int) -> None:
    """Title, the setup line and the run counts above the tabs."""
    counts = status_counts(runs)
    fin = runs.filter(pl.col("status") == "finished")
    st.title(TITLE)
    sub = [f"suite **{suite}**"]
    if preset and preset != ALL_PRESETS:
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


def main() -> None:
    st.set_page_config(page_title=TITLE, page_icon=":material/hub:", layout="wide")
    reset_colors()
    path = resolve_store_path(sys.argv[1:])
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
    stamp = store_stamp(path)
    try:
        runs_all = cached(load_runs, path, stamp)
        metrics = cached(load_metrics, path, stamp)
        health = cached(load_health, path, stamp)
        perf = cached(load_perf, path, stamp)
    except StoreBusy as exc:
        st.info(f"{exc}. Press **Refresh** to try again.", icon=":material/hourglass_top:")
        return

    if runs_all.height == 0:  # bench rows only
        st.title(TITLE)
        st.caption(f"store `{path}`")
        st.info("No training runs yet; only benchmark rows. Fill the leaderboard with "
                f"`{FILL_COMMAND}`.", icon=":material/inbox:")
        bench_tab(perf, {})
        return

    assign_colors(runs_all["router"].drop_nulls().to_list() + perf["router"].drop_nulls().to_list())
    st.sidebar.markdown("**Filters**")
    suite, runs, filt = sidebar_filters(runs_all)
    st.sidebar.divider()
    st.sidebar.caption(f"store `{path}`  \n{runs_all.height} runs in store · loaded {datetime.now():%H:%M:%S} · "
                       f"cache {TTL_S} s")

    meta = suite_meta(suite, metrics["name"].unique().to_list())
    all_runs = runs  # Run detail lists every run; every statistic counts distinct (spec, seed) only
    runs, n_dupes = distinct_seeds(runs)
    header(suite, filt.get("preset"), runs, n_dupes)
    n_cross = int(all_runs["cross_origin"].sum()) if "cross_origin" in all_runs.columns else 0
    if n_cross:
        st.caption(f":material/call_split: **{n_cross} run{'s' if n_cross != 1 else ''} found in more than one "
                   f"source** (the same run id, or the same spec hash and seed under another id): counted once, "
                   f"like any copy; Run detail names the sources.")

    tabs = st.tabs([":material/leaderboard: Leaderboard", ":material/show_chart: Training curves",
                    ":material/alt_route: Routing", ":material/quiz: lm-eval", ":material/fact_check: Claims",
                    ":material/timeline: Along an axis", ":material/speed: Benchmarks",
                    ":material/manage_search: Run detail"])
    with tabs[0]:  # overview() sets the copies aside itself and names them per router
        overview_tab(all_runs, metrics, health, meta)
    with tabs[1]:
        training_tab(path, stamp, runs, meta)
    with tabs[2]:
        routing_tab(path, stamp, runs, health)
    with tabs[3]:
        lmeval_tab(runs, metrics)
    with tabs[4]:  # each claim on its paper's suite: every suite's runs, the sidebar's cross-suite filters only
        claims_tab(filter_runs(runs_all, routers=filt["routers"], machines=filt["machines"], git_shas=filt["shas"]),
                   metrics)
    with tabs[5]:
        along_tab(runs, metrics, meta)
    with tabs[6]:
        bench_tab(perf, filt)
    with tabs[7]:
        run_detail_tab(path, stamp, all_runs, metrics, meta)


main()
