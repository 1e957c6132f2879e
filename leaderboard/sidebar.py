"""The page's sidebar filters: suite, preset, routers, machine, git SHA, spec hash and start date."""
from __future__ import annotations

from datetime import date, timedelta
from typing import Any, Callable

import polars as pl
import streamlit as st

from leaderboard.runs import filter_runs, router_order

ALL_PRESETS = "(all presets)"


def multiselect_all(label: str, options: list[Any], key: str, fmt: Callable[[Any], str] = str,
                    help: str | None = None) -> list[Any] | None:
    """A sidebar multiselect where an empty selection means 'all'; returns None for 'all'.
    Values that disappeared from the options (new data, other suite) are dropped first."""
    if key in st.session_state:
        st.session_state[key] = [v for v in st.session_state[key] if v in options]
    chosen = st.sidebar.multiselect(label, options, key=key, format_func=fmt, help=help,
                                    placeholder=f"all ({len(options)})")
    return list(chosen) if chosen else None


def sidebar_filters(runs: pl.DataFrame) -> tuple[str, pl.DataFrame, dict[str, Any]]:
    """(suite, the runs the filters keep, the filter values the other tabs reuse)."""
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
    preset_opts = presets + ([ALL_PRESETS] if len(presets) > 1 else [])
    if st.session_state.get("preset") not in preset_opts:
        st.session_state.pop("preset", None)
    preset = sb.selectbox("Preset", preset_opts or [ALL_PRESETS], key="preset",
                          help="Compare routers trained with the same preset; mixing presets mixes model sizes.")
    if preset and preset != ALL_PRESETS:
        sr = sr.filter(pl.col("preset") == preset)

    routers = router_order(sr["router"].to_list())
    f_routers = multiselect_all("Routers", routers, "routers")
    machines = sorted(set(sr["machine"].drop_nulls().to_list()))
    f_machines = multiselect_all("Machine", machines, "machines")
    origins = sorted(set(sr["origin"].drop_nulls().to_list())) if "origin" in sr.columns else []
    f_origins = multiselect_all("Origin", origins, "origins",
                                help="The store or bundle directory a run came from (harness board --store A "
                                     "--import DIR).") if len(origins) > 1 else None
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
    filtered = filter_runs(sr, routers=f_routers, machines=f_machines, git_shas=f_shas, spec_hashes=f_specs,
                           date_range=d_range, origins=f_origins)
    return suite, filtered, {"preset": preset, "routers": f_routers, "machines": f_machines, "shas": f_shas}
