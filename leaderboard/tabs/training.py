"""The Training curves tab: validation quality and training loss over steps per router (mean over seeds with a
min-max band), and any other recorded curve."""
from __future__ import annotations

import polars as pl
import streamlit as st

from leaderboard.runs import router_order
from leaderboard.store import curve_names, load_curves
from leaderboard.suites import SuiteMeta
from leaderboard.tables import curve_bands
from leaderboard.ui import band_chart, cached


def training_tab(path: str, stamp, runs: pl.DataFrame, meta: SuiteMeta) -> None:
    top_l, top_r = st.columns(2, gap="large")
    incl = top_l.toggle("Include diverged / failed / running runs", value=False, key="curves_all",
                        help="Their curves stop where they stopped.")
    use = runs if incl else runs.filter(pl.col("status") == "finished")
    if use.height == 0:
        st.info("No runs to plot with these filters.")
        return
    ids = tuple(use["run_id"].to_list())
    routers = router_order(use["router"].to_list())
    curves = cached(load_curves, path, stamp, ids, (meta.quality, "train_loss"))
    n_pts = curves.filter(pl.col("name") == "train_loss").group_by("run_id").len()["len"].max() or 1
    smooth = top_r.slider("train-loss smoothing (moving average over logged points)", 1, 50,
                          value=int(max(1, min(20, n_pts // 15))), key="smooth")
    left, right = st.columns(2, gap="large")
    with left:
        band_chart(curve_bands(curves, use, meta.quality), routers, f"{meta.label} during training",
                   meta.quality, "line: mean over seeds · band: min–max", "curve_val")
    with right:
        band_chart(curve_bands(curves, use, "train_loss", smooth=smooth), routers, "Training loss (task)",
                   "train_loss", f"moving average over {smooth} logged points · band: min–max over seeds",
                   "curve_train")
    names = [n for n in cached(curve_names, path, stamp, ids) if n not in (meta.quality, "train_loss")]
    if names:
        pick = st.selectbox("More curves", names, key="curve_more",
                            help="aux/*: auxiliary losses · stat/*: router statistics · lr: learning rate")
        more = cached(load_curves, path, stamp, ids, (pick,))
        band_chart(curve_bands(more, use, pick), routers, pick, pick, "mean over seeds · band: min–max",
                   "curve_more")
