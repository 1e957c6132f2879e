"""The Claims tab: each paper's directional claim beside the harness' verdict, each judged on its own suite.

Unlike the other tabs it does not stop at the sidebar's suite: MoGE's claim is about image classification and
the others about language modelling, so the tab reads the runs of every suite (``harness claims`` does the
same) and says per claim which suite and preset judged it. The sidebar's router, machine and git-SHA choices
apply (they mean the same in every suite; nothing chosen keeps every run); its preset, spec-hash and date
choices do not, because their options and defaults are drawn from the selected suite's runs only (the default
date range would otherwise hide another suite's runs started on other days)."""
from __future__ import annotations

import pandas as pd
import polars as pl
import streamlit as st

from leaderboard.claims import claim_meta, claims_table, fmt_side, judged_on
from leaderboard.formatting import fmt_diff, fmt_p, kind_name
from leaderboard.stats import ALPHA
from leaderboard.ui import styled
from leaderboard.verdicts import TARGET_EFFECT, effect_unit


CLAIM_COLORS = {"holds": "#137333", "reversed": "#c5221f", "within noise": "#5f6368", "n<2": "#9aa0a6"}
SCOPE = "among the runs selected"  # where a claim's missing runs are missing from


def claims_tab(runs: pl.DataFrame, metrics: pl.DataFrame) -> None:
    """Each paper's claim beside the harness' verdict (leaderboard.claims), judged on the claim's suite among
    ``runs`` (every suite's runs that the sidebar's cross-suite filters keep)."""
    try:
        table = claims_table(runs, metrics, scope=SCOPE)
    except ValueError as exc:  # a damaged claims table: say so, keep the rest of the page
        st.error(f"{exc}", icon=":material/block:")
        return

    def side(who: str, r: dict) -> str:
        return fmt_side(r[who], r[f"{who}_mean"], r[f"{who}_ci"], r[f"n_{who}"], claim_meta(r), percent_sign=True)

    def test(r: dict) -> str:
        if r["test"] == "n<2":
            return r["note"] or "—"
        how = f"paired, n = {r['n_pairs']}" if r["test"] == "paired" else kind_name(r["test"])
        return how + (f" ({r['note']})" if r["note"] else "")

    def diff(r: dict) -> str:
        m = claim_meta(r)
        return fmt_diff(m.shown(r["diff"]), m.shown(r["diff_ci"])) + (" pp" if m.percent and r["diff"] is not None
                                                                        else "")

    rows = [{"claim": r["claim"], "harness verdict": r["verdict"], "judged on": judged_on(r, short=True),
             "metric": f"{r['metric']} {'↑' if r['higher_better'] else '↓'}",
             "harness (mean ± 95% CI)": side("router", r) + " vs " + side("baseline", r),
             "test": test(r), "Δ (router − baseline)": diff(r),
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
    family = table["p_holm"].drop_nulls().len()
    used = list(dict.fromkeys(zip(table["suite"].to_list(), table["preset"].to_list())))
    metas = dict.fromkeys(claim_meta(r) for r in table.iter_rows(named=True))
    small = " or ".join(f"{m.shown(TARGET_EFFECT):g} {effect_unit(m)}" + (f" ({m.name})" if len(metas) > 1 else "")
                        for m in metas)
    st.caption(f"Each claim reads *router beats baseline* on the primary metric of the suite its paper's evidence "
               f"comes from (*judged on*: suite · preset, the claim's own preset or else that suite's preset with "
               f"most runs; *metric*: ↑ higher / ↓ lower is better), over distinct seeds of every suite's runs "
               f"that the sidebar's router, machine and git-SHA filters keep (its suite, preset, spec-hash and "
               f"date choices select within one suite and do not apply here). The paired t-test over the seeds "
               f"both ran where the runs are a controlled experiment (same spec outside the router), else "
               f"Welch's t-test; p Holm-adjusted over the {family} claim{'s' if family != 1 else ''} tested, one "
               f"family across suites, α = {ALPHA}. **holds** / **reversed**: significantly better / worse after "
               f"Holm; **within noise**: no significant difference at these n (*resolution*: the effects this "
               f"test could not have seen at 80% power, and the seeds {small} would need); "
               f"**n<2**: too few seeds to test, or no runs of the claim's suite (*test* says which). The papers' "
               f"settings differ from these suites'; their figures are quoted as the claims table "
               f"(tasks/claims/papers.yaml) gives them, with where each was read, marked where not verified. "
               f"`harness claims` judges the same way on the whole store.")
    if labels and all(lab == "n<2" for lab in labels):
        cmds = ", ".join(f"`harness run --suite {s}{f' --preset {p}' if p else ''} --seeds 0,1,2`" for s, p in used)
        st.info(f"No claim can be tested yet: run at least two seeds of each router on the claims' suites, "
                f"e.g. {cmds}.", icon=":material/fact_check:")
