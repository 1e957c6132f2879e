"""The lm-eval tab: each router's downstream-task results, mean ± 95% CI over seeds, best per task marked."""
from __future__ import annotations

import polars as pl
import streamlit as st

from leaderboard.tables import lmeval_table, lmeval_wide
from leaderboard.ui import styled


def lmeval_tab(runs: pl.DataFrame, metrics: pl.DataFrame) -> None:
    table = lmeval_table(metrics, runs)
    if table.height == 0:
        st.info("No lm-eval results for these runs. `harness run --suite lm` evaluates the tasks after "
                "pretraining (unless `--no-eval`); `harness eval` evaluates finished runs later.", icon=":material/quiz:")
        return
    wide, best = lmeval_wide(table)
    pdf = wide.to_pandas()

    st.dataframe(styled(pdf, best), hide_index=True, width="stretch", key="lmeval")
    st.caption("mean ± 95% CI over seeds; with one seed, ± se is lm-eval's own standard error. Best per task in "
               "bold green (lower is better for perplexity-like metrics).")
    with st.expander("Long format"):
        st.dataframe(table.to_pandas(), hide_index=True, width="stretch")
