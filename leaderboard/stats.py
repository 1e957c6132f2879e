"""The board's statistics.

A router's score is the mean over seeds of its finished runs, one per spec hash and seed (the latest:
:func:`distinct_seeds`; a re-run copy is not another seed), with a 95% confidence interval from Student's t
(``mean ± t(0.975, n-1) * s / sqrt(n)``); "differs from SMoE" is Welch's unequal-variance t-test at
alpha = 0.05, only when both sides have at least two seeds.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import polars as pl
from scipy import stats

ALPHA = 0.05
CONFIDENCE = 0.95


def finite(values: Iterable[float | None]) -> list[float]:
    """The values that are numbers and finite, as floats (None, NaN and inf left out)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> tuple[float | None, float | None, int]:
    """(mean, half-width of the Student-t confidence interval, n) over the finite values.
    The half-width is None when n < 2."""
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return None, None, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, None, n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n), n


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """Welch's t-test: (t, two-sided p) of a vs b, or None when either side has n < 2."""
    a, b = finite(a), finite(b)
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if max(a) == min(a) and max(b) == min(b):  # both constant: Welch is undefined
        return (0.0, 1.0) if ma == mb else (math.copysign(math.inf, ma - mb), 0.0)
    with warnings.catch_warnings():  # one constant sample: scipy warns about precision, the test is fine
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def significance(a: Sequence[float], b: Sequence[float], higher_better: bool,
                 alpha: float = ALPHA) -> tuple[str, float | None]:
    """Label for router samples ``a`` against baseline samples ``b``:
    'better' / 'worse' (Welch p < alpha), 'within noise', or 'n<2'."""
    res = welch(a, b)
    if res is None:
        return "n<2", None
    t, p = res
    if p >= alpha:
        return "within noise", p
    better = (t > 0) == higher_better
    return ("better" if better else "worse"), p


def distinct_seeds(runs: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """One finished run per (spec hash, seed), the latest finished; and how many finished copies were set aside.

    Re-running a finished (spec, seed) (``harness run --rerun``) measures the same thing again: the
    copy has the same numbers, and counting it as another seed shrinks the CI to 0 and invents
    significance (pseudo-replication, issue 21). Every statistic on the board goes through this;
    unfinished runs are kept (they are only counted)."""
    if runs.height == 0 or not {"status", "spec_hash", "seed"} <= set(runs.columns):
        return runs, 0
    fin = runs.filter(pl.col("status") == "finished")
    order = [c for c in ("finished_at", "started_at", "run_id") if c in runs.columns]
    keep = fin.sort(order, descending=True, nulls_last=True).unique(subset=["spec_hash", "seed"], keep="first")
    dropped = fin.height - keep.height
    if dropped == 0:
        return runs, 0
    kept = keep["run_id"].to_list()
    return runs.filter((pl.col("status") != "finished") | pl.col("run_id").is_in(kept)), dropped


def duplicate_counts(runs: pl.DataFrame) -> dict[str, int]:
    """Router -> finished copies :func:`distinct_seeds` sets aside."""
    if runs.height == 0:
        return {}
    fin = runs.filter(pl.col("status") == "finished")
    kept, _ = distinct_seeds(fin)
    a = dict(fin.group_by("router").len().iter_rows())
    b = dict(kept.group_by("router").len().iter_rows())
    return {r: int(a[r] - b.get(r, 0)) for r in a if a[r] - b.get(r, 0)}


def pareto_mask(xs: Sequence[float | None], ys: Sequence[float | None], higher_y_better: bool) -> list[bool]:
    """True for points not dominated by another (x = throughput, higher better; y = quality)."""
    pts = list(zip(xs, ys))
    out = []
    for i, (x, y) in enumerate(pts):
        if x is None or y is None:
            out.append(False)
            continue
        dominated = False
        for j, (x2, y2) in enumerate(pts):
            if i == j or x2 is None or y2 is None:
                continue
            y_ge = y2 >= y if higher_y_better else y2 <= y
            y_gt = y2 > y if higher_y_better else y2 < y
            if x2 >= x and y_ge and (x2 > x or y_gt):
                dominated = True
                break
        out.append(not dominated)
    return out
