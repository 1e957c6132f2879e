"""What every tab of the Streamlit page shares: cached store reads, router colours, the chart frame, the
band chart, and the table styling (best cells, coloured labels)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import altair as alt
import pandas as pd
import polars as pl
import streamlit as st

TTL_S = 30  # cached reads expire after this; the Refresh button clears them at once
LOCK_WAIT_S = 60
CACHE_ENTRIES = 320  # 32 per loader, as when each loader had a cache of its own

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


# -- cached reads (keyed on the file's mtime, expiring after TTL_S) ---------------------------------

@st.cache_data(ttl=TTL_S, max_entries=CACHE_ENTRIES, show_spinner=False)
def _cached_read(loader: str, _load: Callable[..., Any], path: str, stamp: tuple[int, int], *args: Any) -> Any:
    return _load(path, *args, timeout=LOCK_WAIT_S)


def cached(load: Callable[..., Any], path: str, stamp: tuple[int, int], *args: Any) -> Any:
    """``load(path, *args)`` (a :mod:`leaderboard.store` loader), cached on the loader's name, the store's
    ``stamp`` (:func:`leaderboard.store.store_stamp`) and ``args`` (hashable: tuples, not lists)."""
    return _cached_read(f"{load.__module__}.{load.__qualname__}", load, path, stamp, *args)


# -- router colours ------------------------------------------------------------------------------

ROUTER_COLORS: dict[str, str] = dict(KNOWN_COLORS)


def reset_colors() -> None:
    """Forget the colours an earlier run of the page gave to routers outside KNOWN_COLORS."""
    ROUTER_COLORS.clear()
    ROUTER_COLORS.update(KNOWN_COLORS)


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


# -- charts and tables ----------------------------------------------------------------------------

def chart(c: alt.TopLevelMixin, key: str | None = None) -> None:
    st.altair_chart(c.configure_view(strokeWidth=0).configure_axis(labelFontSize=12, titleFontSize=12)
                    .configure_legend(labelFontSize=12, titleFontSize=12, orient="bottom")
                    .configure_title(fontSize=15, subtitleFontSize=12, anchor="start", subtitleColor="#5f6368"),
                    width="stretch", key=key)


def band_chart(bands: pl.DataFrame, routers: list[str], title: str, y_title: str, subtitle: str,
               key: str, reverse: bool = False) -> None:
    """Mean line and min-max band per router over training steps (a :mod:`leaderboard.tables` band frame)."""
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


def styled(df: pd.DataFrame, best: dict[str, list[int]] | None = None, bold: str | int = 0,
           label_col: str | None = None, labels: Sequence[str] = (), colors: dict[str, str] | None = None,
           label_css: str = "") -> Any:
    """``df`` styled: the ``best`` cells (column -> rows) in bold green, row i of ``label_col`` coloured by
    ``colors[labels[i]]`` (plus ``label_css``), and the column ``bold`` (a name or a position) in bold."""
    def style(d: pd.DataFrame) -> pd.DataFrame:
        css = pd.DataFrame("", index=d.index, columns=d.columns)
        for col, rows in (best or {}).items():
            for i in rows:
                css.iloc[i, d.columns.get_loc(col)] = BEST_CSS
        if label_col is not None:
            for i, lab in enumerate(labels):
                css.iloc[i, d.columns.get_loc(label_col)] = f"color: {(colors or {}).get(lab, '#5f6368')}{label_css}"
        css.iloc[:, d.columns.get_loc(bold) if isinstance(bold, str) else bold] = "font-weight: 700"
        return css

    return df.style.apply(style, axis=None)
