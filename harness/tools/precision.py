"""``harness run --precision D``: add seeds until every compared difference is known to within ±D.

The suite's routers are compared with a baseline (each router vs ``smoe`` by default, paired over seeds:
:func:`leaderboard.stats.compare`). After each round, if any comparison's 95% CI half-width is wider than D,
one more seed is trained for *every* router (whole seeds keep the runs paired), until all are within D or
``--max-seeds`` is reached.

The rule stops on the width of the interval, never on significance. For (near-)normal per-seed
differences the sample SD, which decides the width, is independent of the sample mean, which decides where
the interval lies: stopping on the width leaves the interval's coverage at its nominal 95%. Stopping when
p < 0.05 ("optional stopping") instead picks the seeds whose mean happened to stray, and a non-difference
is declared significant far more often than 5% of the time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import polars as pl

from leaderboard.stats import Comparison, compare
from leaderboard.store import load_metrics, load_runs
from leaderboard.verdicts import samples

from ..spec import SpecError, SuiteSpec
from ..store import Store


@dataclass(frozen=True)
class Round:
    seeds: tuple[int, ...]
    comparisons: dict[str, Comparison]  # router -> comparison with the baseline

    def widest(self) -> tuple[str | None, float]:
        """The router whose difference is least precise, and its CI half-width (inf when not yet known)."""
        worst, width = None, 0.0
        for router, c in self.comparisons.items():
            w = c.diff_ci if c.diff_ci is not None and math.isfinite(c.diff_ci) else math.inf
            if worst is None or w > width:
                worst, width = router, w
        return worst, width


def default_baseline(spec: SuiteSpec) -> str:
    return "smoe" if "smoe" in spec.routers else spec.routers[0]


def check_request(spec: SuiteSpec, target: float, max_seeds: int, baseline: str) -> None:
    if not (target > 0 and math.isfinite(target)):
        raise SpecError(f"--precision must be a positive number (a CI half-width in the metric's units), got {target}")
    if max_seeds < 2:
        raise SpecError(f"--max-seeds must be at least 2 (a CI needs two seeds), got {max_seeds}")
    if baseline not in spec.routers:
        raise SpecError(f"--baseline {baseline!r} is not among the suite's routers ({', '.join(spec.routers)})")
    if len(spec.routers) < 2:
        raise SpecError("--precision compares routers: give at least two (e.g. --routers smoe,xmoe)")
    if len(spec.seeds) > max_seeds:
        raise SpecError(f"the suite already has {len(spec.seeds)} seeds, more than --max-seeds {max_seeds}")


def primary_values(store: Store, spec: SuiteSpec, metric: str) -> dict[str, dict[int, float]]:
    """router -> seed -> the metric of its latest finished run of exactly this spec (the board's own reading:
    :func:`leaderboard.verdicts.samples` over :func:`leaderboard.stats.distinct_seeds`)."""
    runs = spec.runs()
    stored = load_runs(store.path, timeout=store.lock_timeout).filter(
        pl.col("spec_hash").is_in(sorted({r.spec_hash for r in runs})) & pl.col("seed").is_in(sorted(spec.seeds)))
    metrics = load_metrics(store.path, stored["run_id"].to_list(), timeout=store.lock_timeout)
    got = samples(stored, metrics, metric)
    return {r: dict(got[r].values) if r in got else {} for r in spec.routers}


def judge(values: dict[str, dict[int, float]], seeds: tuple[int, ...], baseline: str) -> Round:
    """Every router against the baseline, paired over seeds (one spec outside the router: runs pair)."""
    base = values.get(baseline, {})
    comps = {r: compare(v, base, pairable=True) for r, v in values.items() if r != baseline}
    return Round(seeds, comps)


def next_seed(seeds: tuple[int, ...]) -> int:
    return max(seeds) + 1 if seeds else 0


def run_until_precise(spec: SuiteSpec, run_round: Callable[[SuiteSpec], bool], store: Store, metric: str,
                      target: float, max_seeds: int, baseline: str, log: Callable[[str], None]) -> tuple[Round, bool]:
    """Train ``spec``'s runs, then one more seed for every router while a difference is wider than ``target``.

    ``run_round(spec)`` trains the spec's runs (finished (spec, seed) pairs are skipped) and says whether
    they all finished. Returns the last round and whether the target was met."""
    seeds = tuple(spec.seeds)
    while len(seeds) < 2:  # a CI needs two seeds
        seeds = (*seeds, next_seed(seeds))
    while True:
        spec = replace(spec, seeds=seeds)
        ok = run_round(spec)
        rnd = judge(primary_values(store, spec, metric), seeds, baseline)
        worst, width = rnd.widest()
        where = f"{worst} vs {baseline}" if worst else "no comparison"
        shown = "unknown" if math.isinf(width) else f"±{width:.4g}"
        if not ok:
            log(f"precision: runs failed at n = {len(seeds)} seeds; widest difference {shown} ({where}); stopping")
            return rnd, False
        if width <= target:
            log(f"precision: every difference to {baseline} within ±{target:g} at n = {len(seeds)} seeds "
                f"(widest {shown}, {where})")
            return rnd, True
        if len(seeds) >= max_seeds:
            log(f"precision: target ±{target:g} not reached at --max-seeds {max_seeds}: widest {shown} ({where})")
            return rnd, False
        add = next_seed(seeds)
        log(f"precision: n = {len(seeds)} seeds, widest difference {shown} ({where}) > ±{target:g}; "
            f"adding seed {add} for every router")
        seeds = (*seeds, add)
