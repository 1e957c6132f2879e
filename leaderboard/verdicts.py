"""Verdicts as controlled experiments (issue 27): which runs pair, every router against a baseline, the family
of comparisons a table shows judged together.

The statistics are :mod:`leaderboard.stats` (:func:`~leaderboard.stats.compare`, :func:`~leaderboard.stats.holm`);
this module decides what they are fed. Two routers' runs at the same seed pair only when they ran the same
experiment outside the router: :func:`pairing_key` is the run's resolved spec (the ``config`` JSON stored with
it) without the router's name and arguments, so runs of a suite launched together pair, and runs that
differ in anything else (steps, model size, data) are compared as independent samples (Welch), and the
output says so. ``model.top_k`` is left out too: a router that fixes its own k (StableMoE) still ran the same
experiment outside the router. The board's overview, the Claims tab, ``harness
claims`` and ``harness compare`` all go through :func:`judge`, so they agree.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import polars as pl

from harness.spec import DataSpec, EvalSpec, ModelSpec, SpecError, TrainSpec, left_out_of_hash
from leaderboard.formatting import fmt_resolution
from leaderboard.runs import BASELINE, parse_json, router_order
from leaderboard.stats import ALPHA, N_MAX, Comparison, compare, distinct_seeds, holm, mean_ci
from harness.metrics import higher_is_better as declared_direction
from leaderboard.suites import SuiteMeta

# The difference worth resolving that the "needs ≈ N seeds" clause is quoted for, in the metric's units:
# 0.01 bits/byte on lm (about the gap between the routers the papers compare at this scale); one point of
# top-1 on vision.
TARGET_EFFECT = 0.01

# What a run's config holds that is not the experiment outside the router: the router itself, and the seed
# and preset name (the seed is what pairs; the preset's values are in the sections).
NOT_PAIRED = ("router", "router_args", "seed", "preset")
SECTIONS = {"model": ModelSpec, "data": DataSpec, "train": TrainSpec, "eval": EvalSpec}


class CompareError(SpecError):
    """Nothing to compare against (a user error: ``harness: error: ...``, exit 2)."""


def _hash_view(cls: type, section: dict[str, Any]) -> dict[str, Any]:
    """A config section as the spec hash sees it (:func:`harness.spec.hash_view`'s rules, on the stored JSON):
    where data is read from and how many workers never count; fields added later count only when set."""
    out = dict(section)
    for f in dataclasses.fields(cls):
        if f.name in out and left_out_of_hash(f, out[f.name]):
            del out[f.name]
    return out


def pairing_key(config_json: str | Mapping[str, Any] | None) -> str | None:
    """A hash of a run's resolved spec with the router's name and arguments (and the seed) left out: two
    routers' runs at one seed are a controlled experiment exactly when their keys are equal. None when the
    config is missing or unreadable (such runs never pair)."""
    cfg = parse_json(config_json) if not isinstance(config_json, Mapping) else dict(config_json)
    if not isinstance(cfg, dict) or not cfg or set(cfg) == {"raw"}:
        return None
    view = {k: v for k, v in cfg.items() if k not in NOT_PAIRED}
    for name, cls in SECTIONS.items():
        if isinstance(view.get(name), dict):
            view[name] = _hash_view(cls, view[name])
    if isinstance(view.get("model"), dict):
        # a router that fixes its own k (StableMoE is top-1 only) stores it as model.top_k; at one seed it still
        # sees the same batches and starts from the same weights outside the router (the expert bank does not
        # depend on k: harness.layers.streams), so its runs pair with the others'
        view["model"].pop("top_k", None)
    blob = json.dumps(view, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Sample:
    """One router's distinct finished runs on one metric: seed -> value, and the pairing key they share
    (None: unknown, several specs mixed, or a seed measured twice: then it pairs with nothing)."""
    values: Mapping[Hashable, float]
    pairing: str | None = None


def pairs_with(a: Sample, b: Sample) -> bool:
    return a.pairing is not None and a.pairing == b.pairing


def samples(runs: pl.DataFrame, metrics: pl.DataFrame, metric: str) -> dict[str, Sample]:
    """Router -> :class:`Sample` of ``metric`` over its distinct finished runs (:func:`distinct_seeds`)."""
    runs, _ = distinct_seeds(runs)
    fin = runs.filter(pl.col("status") == "finished")
    if "config" not in fin.columns:
        fin = fin.with_columns(pl.lit(None, dtype=pl.Utf8).alias("config"))
    vals = metrics.filter(pl.col("name") == metric).group_by("run_id").agg(pl.col("value").last())
    rows = fin.select("run_id", "router", "seed", "spec_hash", "config").join(vals, on="run_id")
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows.iter_rows(named=True):
        if r["value"] is not None:
            by.setdefault(r["router"], []).append(r)
    out = {}
    for router, rs in by.items():
        keys = {pairing_key(r["config"]) for r in rs}
        seeds = [r["seed"] for r in rs]
        if len(set(seeds)) == len(seeds):
            out[router] = Sample({r["seed"]: r["value"] for r in rs}, keys.pop() if len(keys) == 1 else None)
        else:  # one seed under several specs: every value counts (Welch), but a seed is no longer one pair
            out[router] = Sample({(r["seed"], r["run_id"]): r["value"] for r in rs}, None)
    return out


@dataclass(frozen=True)
class Verdict:
    """A comparison judged within its family: the Holm-adjusted p and the direction decided on it."""
    comparison: Comparison
    p_holm: float | None
    direction: str       # "better" | "worse" | "within noise" | "n<2" (router vs baseline)
    family: int          # tests in the Holm family
    note: str = ""       # why the runs were not paired, when they were not

    @property
    def test(self) -> str:
        return self.comparison.kind


def _why_unpaired(a: Sample, b: Sample, c: Comparison) -> str:
    if c.paired or c.kind == "n<2":
        return ""
    if a.pairing is None or b.pairing is None:
        return "run configs unknown or mixed"
    if a.pairing != b.pairing:
        return "specs differ outside the router"
    return "fewer than 2 common seeds"


def judge(pairs: Sequence[tuple[Sample, Sample]], higher_better: bool, alpha: float = ALPHA) -> list[Verdict]:
    """Each (router, baseline) pair compared (paired where they pair), Holm-adjusted over the family of the
    tests that ran, the direction decided on the adjusted p."""
    comps = [compare(a.values, b.values, pairable=pairs_with(a, b), alpha=alpha) for a, b in pairs]
    adjusted = holm([c.p for c in comps])
    family = sum(p is not None for p in adjusted)
    out = []
    for (a, b), c, q in zip(pairs, comps, adjusted):
        if q is None:
            direction = "n<2"
        elif q < alpha:
            direction = "better" if ((c.diff or 0.0) > 0) == higher_better else "worse"
        else:
            direction = "within noise"
        out.append(Verdict(c, q, direction, family, _why_unpaired(a, b, c)))
    return out


def effect_unit(meta: SuiteMeta) -> str:
    """The unit an effect is quoted in: ``bpb`` for val_bpb, ``pp`` (percentage points) for a percentage."""
    return "pp" if meta.percent else meta.quality.split("_")[-1]


def resolution(c: Comparison, meta: SuiteMeta, label: str = "") -> str:
    """The MDE sentence of a comparison, in the units the board shows (``label: effects under ...``)."""
    return fmt_resolution(meta.shown(c.mde), c.n, effect_unit(meta), meta.shown(TARGET_EFFECT),
                          c.n_for(TARGET_EFFECT), N_MAX if c.sd else None, label)


def higher_is_better(metric: str, meta: SuiteMeta) -> bool:
    """The suite's direction for its own metrics; for another metric its declared direction
    (harness.metrics), else guessed from its name."""
    if metric in (meta.quality, meta.test, *meta.extra):
        return meta.higher_better
    declared = declared_direction(metric)
    if declared is not None:
        return declared
    if metric.endswith("_per_s"):
        return True
    return not any(k in metric for k in ("loss", "bpb", "ppl", "err", "bits", "mem", "_ms"))


def metric_meta(meta: SuiteMeta, metric: str | None) -> SuiteMeta:
    """``meta`` with ``metric`` as its quality metric (direction and percent scaling to match)."""
    if metric is None or metric == meta.quality:
        return meta
    return dataclasses.replace(meta, quality=metric, higher_better=higher_is_better(metric, meta),
                               percent=meta.percent and metric in (meta.test, *meta.extra),
                               label=metric.replace("_", " "))


COMPARE_SCHEMA = {
    "router": pl.Utf8, "n": pl.Int64, "mean": pl.Float64, "ci": pl.Float64, "seeds": pl.Utf8,
    "test": pl.Utf8, "n_pairs": pl.Int64, "diff": pl.Float64, "diff_ci": pl.Float64,
    "p": pl.Float64, "p_holm": pl.Float64, "p_wilcoxon": pl.Float64, "mde": pl.Float64, "n_needed": pl.Int64,
    "label": pl.Utf8, "note": pl.Utf8, "resolution": pl.Utf8,
}


def compare_table(runs: pl.DataFrame, metrics: pl.DataFrame, meta: SuiteMeta, baseline: str = BASELINE,
                  metric: str | None = None, alpha: float = ALPHA) -> pl.DataFrame:
    """One row per router of ``runs`` (the runs of ONE suite and preset): mean ± 95% CI of ``metric`` (default:
    the suite's primary) over distinct seeds, and against ``baseline``: the test used, the difference ± CI, raw
    and Holm-adjusted p (the family: every router compared), the MDE, the seeds a :data:`TARGET_EFFECT` needs
    and the label ('better' | 'worse' | 'within noise' | 'n<2'; the baseline's row: 'baseline').

    Raises :class:`CompareError` when ``baseline`` has no finished run with the metric."""
    mm = metric_meta(meta, metric)
    by = samples(runs, metrics, mm.quality)
    if not by.get(baseline, Sample({})).values:
        have = ", ".join(router_order(by)) or "none"
        raise CompareError(f"no finished run of the baseline {baseline!r} has {mm.quality} "
                           f"(routers with {mm.quality}: {have}); pick one with --baseline")
    others = [r for r in router_order(by) if r != baseline]
    routers = [baseline, *others]  # the reference row first
    verdicts = dict(zip(others, judge([(by[r], by[baseline]) for r in others], mm.higher_better, alpha)))
    rows = []
    for r in routers:
        vals = list(by[r].values.values())
        mean, ci, n = mean_ci(vals)
        seeds = sorted({k[0] if isinstance(k, tuple) else k for k in by[r].values})
        row = {"router": r, "n": n, "mean": mean, "ci": ci, "seeds": ",".join(map(str, seeds))}
        v = verdicts.get(r)
        if v is None:
            row.update(test="baseline", label="baseline", note="", resolution="")
        else:
            c = v.comparison
            row.update(test=c.kind, n_pairs=c.n if c.paired else None, diff=c.diff, diff_ci=c.diff_ci, p=c.p,
                       p_holm=v.p_holm, p_wilcoxon=c.p_wilcoxon, mde=c.mde, n_needed=c.n_for(TARGET_EFFECT),
                       label=v.direction, note=v.note, resolution=resolution(c, mm))
        rows.append(row)
    return pl.DataFrame(rows, schema=COMPARE_SCHEMA)
