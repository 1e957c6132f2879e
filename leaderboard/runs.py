"""Selecting and ordering runs: the sidebar's filters, status counts, the router order every table and chart
uses (dense and SMoE, the references, first), and a run's stored JSON."""
from __future__ import annotations

import json
from datetime import date
from typing import Any, Iterable, Sequence

import polars as pl

BASELINE = "smoe"
DENSE = "dense"


def filter_runs(
    runs: pl.DataFrame,
    suite: str | None = None,
    presets: Sequence[str] | None = None,
    routers: Sequence[str] | None = None,
    machines: Sequence[str] | None = None,
    git_shas: Sequence[str] | None = None,
    spec_hashes: Sequence[str] | None = None,
    date_range: tuple[date, date] | None = None,
    origins: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Each filter given as a collection keeps the runs whose value is in it (None = no filter)."""
    df = runs
    if suite is not None:
        df = df.filter(pl.col("suite") == suite)
    for col, allowed in (("preset", presets), ("router", routers), ("machine", machines),
                         ("git_sha", git_shas), ("spec_hash", spec_hashes), ("origin", origins)):
        if allowed is not None:
            df = df.filter(pl.col(col).is_in(list(allowed)))
    if date_range is not None and len(date_range) == 2 and date_range[0] is not None and date_range[1] is not None:
        lo, hi = date_range
        d = pl.col("started_at").dt.date()
        df = df.filter((d >= lo) & (d <= hi))
    return df


def suite_preset_runs(runs: pl.DataFrame, suite: str, preset: str | None) -> tuple[pl.DataFrame, str | None, list[str]]:
    """The runs of one suite and one preset (``preset`` None: the preset with most runs), that preset, and every
    preset the suite has runs of (most runs first): what ``harness claims`` and ``harness compare`` judge."""
    suite_runs = runs.filter(pl.col("suite") == suite)
    presets = suite_runs.group_by("preset").len().sort("len", descending=True)["preset"].drop_nulls().to_list()
    preset = preset or (presets[0] if presets else None)
    if preset is not None:
        suite_runs = suite_runs.filter(pl.col("preset") == preset)
    return suite_runs, preset, presets


def status_counts(runs: pl.DataFrame) -> dict[str, int]:
    out = {s: 0 for s in ("finished", "diverged", "failed", "running")}
    for s, n in runs.group_by("status").len().iter_rows():
        out[s] = out.get(s, 0) + int(n)
    return out


def router_order(routers: Iterable[str]) -> list[str]:
    """dense and smoe first (the references), then the rest alphabetically."""
    rs = sorted(set(r for r in routers if r is not None))
    head = [r for r in (DENSE, BASELINE) if r in rs]
    return head + [r for r in rs if r not in head]


def sort_by_router(df: pl.DataFrame, *by: str, col: str = "router") -> pl.DataFrame:
    """``df`` sorted by the columns ``by`` (default: just ``col``), the router column ``col`` in
    :func:`router_order` rather than alphabetically; a router it does not know sorts last."""
    by = by or (col,)
    rank = {r: i for i, r in enumerate(router_order(df[col].to_list()))}
    key = "_router_rank"
    return df.with_columns(pl.col(col).replace_strict(rank, default=len(rank)).alias(key)) \
        .sort([key if c == col else c for c in by]).drop(key)


def parse_json(text: str | None) -> Any:
    if not text:
        return {}
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {"raw": text}
