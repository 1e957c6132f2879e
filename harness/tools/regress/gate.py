"""Goldens and verdicts for ``harness regress``.

A golden file (``tasks/regress/<suite>.json``) holds, per router, the spec hash and
for every gated metric its value at the primary seed, the values over all recorded
seeds, their standard deviation and the tolerance derived from it. It also names
the revision it was recorded at (the default base of the throughput A/B) and the
machine fingerprint (CPU model, torch version, machine type). It holds no timing:
throughput is only ever compared within one invocation on one machine (``ab.py``).

Metric rules (``RULES``): which direction is worse, the tolerance floor, and the
documented cross-machine allowance. On the recording machine a rerun reproduces
the golden to the last bit, so the tolerance only has to absorb harmless code
changes; on another CPU, floating-point kernels differ (AVX2 vs AVX-512 paths in
oneDNN/MKL), training drifts by a little, and the allowance is added on top. The
allowance is far smaller than what the faults the gate exists for produce (see
the table in ``docs/regress.md``).
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch

from ... import metrics as declared
from ...errors import UserError
from ...store import machine_info, package_versions
from .quality import QUALITY_METRIC

GOLDEN_VERSION = 2


class GoldenError(UserError):
    """A missing, unreadable or outdated golden file (the message says how to re-record)."""


@dataclass(frozen=True)
class Rule:
    worse: str             # "higher" | "lower" | "both": which way a change fails
    floor: float           # absolute tolerance floor
    rel_floor: float       # tolerance floor as a share of |golden|
    spread: float          # tolerance = max(spread * seed std, floor, rel_floor * |golden|)
    cross_abs: float       # cross-machine allowance, absolute ...
    cross_rel: float       # ... plus this share of |golden|


def worse_direction(metric: str) -> str:
    """Which way a change of ``metric`` fails: against its declared direction (``harness.metrics``); "both" for a
    metric declared without one or not declared (``weight_sum``: a router's combine-weight mass, neither way)."""
    higher = declared.higher_is_better(metric)
    return "both" if higher is None else ("lower" if higher else "higher")


def _rule(metric: str, floor: float, rel_floor: float, spread: float, cross_abs: float, cross_rel: float) -> Rule:
    return Rule(worse_direction(metric), floor, rel_floor, spread, cross_abs, cross_rel)


RULES: dict[str, Rule] = {  # metric: (floor, rel_floor, spread, cross_abs, cross_rel); the direction is declared
    QUALITY_METRIC:       _rule(QUALITY_METRIC, 0.01, 0.0, 2.0, 0.02, 0.0),
    "load_entropy":       _rule("load_entropy", 0.02, 0.0, 3.0, 0.02, 0.0),
    "max_over_mean_load": _rule("max_over_mean_load", 0.0, 0.10, 3.0, 0.0, 0.05),
    "dead_experts":       _rule("dead_experts", 0.5, 0.0, 3.0, 0.0, 0.0),
    "weight_sum":         _rule("weight_sum", 0.02, 0.0, 3.0, 0.01, 0.0),
}
SIGNATURE_RULE = Rule("both", 1e-6, 0.25, 3.0, 0.0, 0.10)  # sig:aux/* and sig:stat/*


def rule_for(metric: str) -> Rule:
    return RULES.get(metric, SIGNATURE_RULE)


def machine_fingerprint() -> dict[str, str]:


    m = machine_info()
    fp = {"cpu": m["cpu"], "torch": torch.__version__, "arch": platform.machine(), "gpu": m.get("gpu") or ""}
    return {**fp, "fingerprint": "|".join(fp[k] for k in ("cpu", "arch", "torch", "gpu"))}


@dataclass
class Check:
    router: str
    metric: str
    status: str        # pass | FAIL | NO-GOLDEN | SPEC-CHANGED | SKIPPED | NO-BASE
    value: float | None
    golden: float | None
    detail: str
    tolerance: float | None = None
    allowance: float | None = None
    gated: bool = True     # a NO-GOLDEN router fails only when gated (named with --routers, or --strict)

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "SPEC-CHANGED") or (self.status == "NO-GOLDEN" and self.gated)


# -- recording ------------------------------------------------------------------------------

def metric_entry(metric: str, primary: float, values: list[float]) -> dict[str, Any]:
    rule = rule_for(metric)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    tol = max(rule.spread * spread, rule.floor, rule.rel_floor * abs(primary))
    return {"value": primary, "seed_values": values, "seed_std": spread, "tolerance": tol, "worse": rule.worse}


def make_golden(quality: dict[str, dict[str, Any]], seeds: list[int], suite: str, preset: str,
                old: dict[str, Any] | None, revision: str | None, dirty: bool) -> dict[str, Any]:

    routers = dict((old or {}).get("routers", {}))
    # A partial update (``--update --routers a,b`` over a golden that holds other routers too) merges: the other
    # routers' entries and the file's header (revision = the throughput base, machine, versions) stay as they were,
    # and each router recorded now carries its own revision and machine. Only a full re-record writes a new header.
    partial = (old is not None and old.get("version") == GOLDEN_VERSION and bool(set(routers) - set(quality)))
    if partial:
        for key, want in (("suite", suite), ("preset", preset), ("seeds", list(seeds))):
            if old.get(key) != want:
                raise GoldenError(f"cannot merge into the golden: it was recorded with {key} {old.get(key)!r}, this "
                                  f"update used {want!r}; use the golden's, or re-record every router")
    for router, q in quality.items():
        if any(q["status"].get(s) != "finished" for s in seeds):
            raise GoldenError(f"cannot record a golden for {router}: not every seed finished ({q['status']}"
                              f"{'; ' + str(q['errors']) if q.get('errors') else ''})")
        per_seed = [q["values"][s] for s in seeds]
        names = sorted(set.intersection(*(set(v) for v in per_seed)))  # gated only if every seed has it
        routers[router] = {"spec_hash": q["spec_hash"],
                           "metrics": {n: metric_entry(n, per_seed[0][n], [v[n] for v in per_seed]) for n in names},
                           # not gated (timings never are): orders the gate's runs longest first
                           "run_seconds": statistics.median(q.get("seconds") or [0.0])}
        if partial:
            routers[router].update(revision=revision, recorded_on_dirty_tree=dirty,
                                   machine=machine_fingerprint()["fingerprint"])
    if partial:
        return {**old, "routers": dict(sorted(routers.items()))}
    return {"version": GOLDEN_VERSION, "suite": suite, "preset": preset, "seed": seeds[0], "seeds": seeds,
            "revision": revision, "recorded_on_dirty_tree": dirty, "versions": package_versions(),
            "machine": machine_fingerprint(), "routers": dict(sorted(routers.items()))}


def load_golden(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise GoldenError(f"no golden file at {path}; record one with `harness regress --update --baseline {path}`")
    try:
        g = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GoldenError(f"golden file {path} is not valid JSON ({exc}); re-record with --update") from exc
    if not isinstance(g, dict) or g.get("version") != GOLDEN_VERSION:
        raise GoldenError(f"golden file {path} has version {g.get('version') if isinstance(g, dict) else '?'}, "
                          f"expected {GOLDEN_VERSION}; re-record with `harness regress --update`")
    return g


def write_golden(path: Path, golden: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


# -- judging ----------------------------------------------------------------------------------

def judge_metric(router: str, metric: str, value: float | None, g: dict[str, Any], cross: bool) -> Check:
    rule = rule_for(metric)
    gv, tol = g["value"], g["tolerance"]
    allow = (rule.cross_abs + rule.cross_rel * abs(gv)) if cross else 0.0
    if value is None or (isinstance(value, float) and math.isnan(value)):
        what = "the router no longer logs it" if metric.startswith("sig:") else "not measured"
        return Check(router, metric, "FAIL", None, gv, f"missing ({what})", tol, allow)
    delta = value - gv
    worse = {"higher": delta, "lower": -delta, "both": abs(delta)}[rule.worse]
    ok = worse <= tol + allow
    return Check(router, metric, "pass" if ok else "FAIL", value, gv,
                 f"delta {delta:+.4g} ({'worse if ' + rule.worse if rule.worse != 'both' else 'either way'})",
                 tol, allow)


def judge_quality(golden: dict[str, Any], quality: dict[str, dict[str, Any]], cross: bool) -> list[Check]:
    checks: list[Check] = []
    seed = golden["seed"]
    for router in sorted(quality):
        q, g = quality[router], golden["routers"].get(router)
        if g is None:
            continue  # reported by the caller as NO-GOLDEN
        if q["status"].get(seed) != "finished":
            err = q.get("errors", {}).get(seed)
            checks.append(Check(router, QUALITY_METRIC, "FAIL", None, g["metrics"][QUALITY_METRIC]["value"],
                                f"run {q['status'].get(seed)}{': ' + err if err else ''}"))
            continue
        if q["spec_hash"] != g["spec_hash"]:
            checks.append(Check(router, QUALITY_METRIC, "SPEC-CHANGED", q["values"][seed].get(QUALITY_METRIC),
                                g["metrics"][QUALITY_METRIC]["value"],
                                f"spec hash {q['spec_hash']} != golden {g['spec_hash']}: the spec or router "
                                f"defaults changed; re-record with `harness regress --update`"))
            continue
        vals = q["values"][seed]
        for metric, gm in g["metrics"].items():
            checks.append(judge_metric(router, metric, vals.get(metric), gm, cross))
    return checks


def print_checks(checks: list[Check], out=None) -> None:

    out = out if out is not None else sys.stdout  # at call time: a captured or redirected stdout

    df = pl.DataFrame([{"router": c.router, "metric": c.metric, "status": c.status, "value": c.value,
                        "golden": c.golden, "tolerance": c.tolerance, "allowance": c.allowance,
                        "detail": c.detail} for c in checks],
                      schema={"router": pl.Utf8, "metric": pl.Utf8, "status": pl.Utf8, "value": pl.Float64,
                              "golden": pl.Float64, "tolerance": pl.Float64, "allowance": pl.Float64,
                              "detail": pl.Utf8})
    with pl.Config(tbl_rows=500, float_precision=4, tbl_width_chars=220, fmt_str_lengths=110,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print(df, file=out)
