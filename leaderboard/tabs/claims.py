"""The Claims tab: each paper's directional claim beside the harness' verdict on the runs selected."""
from __future__ import annotations

import pandas as pd
import polars as pl
import streamlit as st

from leaderboard.claims import claims_table, fmt_side
from leaderboard.formatting import fmt_diff, fmt_p, kind_name
from leaderboard.stats import ALPHA
from leaderboard.suites import SuiteMeta
from leaderboard.ui import styled
from leaderboard.verdicts import TARGET_EFFECT, effect_unit


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

    def test(r: dict) -> str:
        if r["test"] == "n<2":
            return "—"
        how = f"paired, n = {r['n_pairs']}" if r["test"] == "paired" else kind_name(r["test"])
        return how + (f" ({r['note']})" if r["note"] else "")

    rows = [{"claim": r["claim"], "harness verdict": r["verdict"],
             f"harness {meta.quality}": side("router", r) + " vs " + side("baseline", r),
             "test": test(r), "Δ (router − baseline)": fmt_diff(meta.shown(r["diff"]), meta.shown(r["diff_ci"])),
             "p": fmt_p(r["p"]) if r["p"] is not None else "—",
             "p (Holm)": fmt_p(r["p_holm"]) if r["p_holm"] is not None else "—",
             "resolution": r["resolution"],
             "paper": f"arXiv {r['arxiv']} · {r['paper']}", "paper's setting": r["setting"],
             "paper's figure": r["figure"]} for r in table.iter_rows(named=True)]
    pdf = pd.DataFrame(rows)
    labels = table["label"].to_list()

    st.dataframe(styled(pdf, label_col="harness verdict", labels=labels, colors=CLAIM_COLORS,
                        label_css="; font-weight: 700") if len(pdf) else pdf, hide_index=True, width="stretch",
                 key="claims")
    direction = "higher" if meta.higher_better else "lower"
    family = table["p_holm"].drop_nulls().len()
    st.caption(f"Each claim reads *router beats baseline* on {meta.quality} ({direction} is better), over distinct "
               f"seeds of the runs selected in the sidebar: the paired t-test over the seeds both ran where the "
               f"runs are a controlled experiment (same spec outside the router), else Welch's t-test; p "
               f"Holm-adjusted over the {family} claim{'s' if family != 1 else ''} tested, α = {ALPHA}. "
               f"**holds** / **reversed**: significantly better / worse after Holm; **within noise**: no "
               f"significant difference at these n (*resolution*: the effects this test could not have seen "
               f"at 80% power, and the seeds {meta.shown(TARGET_EFFECT):g} {effect_unit(meta)} would need); "
               f"**n<2**: too few seeds to test. The papers' settings differ from this suite's; their figures "
               f"are quoted as the claims table (tasks/claims/papers.yaml) gives them, marked where not verified.")
    if labels and all(lab == "n<2" for lab in labels):
        st.info("No claim can be tested yet: run at least two seeds of each router, e.g. "
                "`harness run --suite lm --seeds 0,1,2`.", icon=":material/fact_check:")
