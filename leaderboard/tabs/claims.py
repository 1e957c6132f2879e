"""The Claims tab: each paper's directional claim beside the harness' verdict on the runs selected."""
from __future__ import annotations

import pandas as pd
import polars as pl
import streamlit as st

from leaderboard.claims import claims_table, fmt_side
from leaderboard.stats import ALPHA
from leaderboard.suites import SuiteMeta
from leaderboard.ui import styled


CLAIM_COLORS = {"holds": "#137333", "reversed": "#c5221f", "within noise": "#5f6368", "n<2": "#9aa0a6"}


def claims_tab(runs: pl.DataFrame, metrics: pl.DataFrame, meta: SuiteMeta) -> None:
    """Each paper's directional claim beside the harness' verdict on the runs shown (leaderboard.claims)."""
    try:
        table = claims_table(runs, metrics, meta)
    except ValueError as exc:  # a damaged claims table: say so, keep the rest of the page
        st.error(f"{exc}", icon=":material/block:")
        return
    def side(who: str, r: dict) -> str:
        return fmt_side(r[who], r[f"{who}_mean"], r[f"{who}_ci"], r[f"n_{who}"], meta, percent_sign=False)

    rows = [{"claim": r["claim"], "harness verdict": r["verdict"],
             f"harness {meta.quality}": side("router", r) + " vs " + side("baseline", r),
             "paper": f"arXiv {r['arxiv']} · {r['paper']}", "paper's setting": r["setting"],
             "paper's figure": r["figure"]} for r in table.iter_rows(named=True)]
    pdf = pd.DataFrame(rows)
    labels = table["label"].to_list()

    st.dataframe(styled(pdf, label_col="harness verdict", labels=labels, colors=CLAIM_COLORS,
                        label_css="; font-weight: 700") if len(pdf) else pdf, hide_index=True, width="stretch",
                 key="claims")
    direction = "higher" if meta.higher_better else "lower"
    st.caption(f"Each claim reads *router beats baseline* on {meta.quality} ({direction} is better): Welch t-test "
               f"over distinct seeds of the runs selected in the sidebar, α = {ALPHA}. **holds** / **reversed**: "
               f"significantly better / worse; **within noise**: no significant difference at these n; "
               f"**n<2**: too few seeds to test. The papers' settings differ from this suite's; their figures "
               f"are quoted as the claims table (tasks/claims/papers.yaml) gives them, marked where not verified.")
    if labels and all(lab == "n<2" for lab in labels):
        st.info("No claim can be tested yet: run at least two seeds of each router, e.g. "
                "`harness run --suite lm --seeds 0,1,2`.", icon=":material/fact_check:")
