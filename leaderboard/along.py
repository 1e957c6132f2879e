"""Verdicts along an axis (issue 28): every router against a baseline at each point of the training budget or
of any spec key, and one label per router across the points. ``harness claims --along``, ``harness compare
--along`` and the board's *Along an axis* tab all call :func:`along_table`.

**Axes.**

* ``budget``: a run trained with several budgets (``train.budgets`` under ``train.schedule: wsd``) records its
  final metrics also as ``<metric>@<b>`` (``val_bpb@250``, ..., ``val_bpb@<train.steps>``); a run without them
  is one point at its ``train.steps`` (its plain ``val_bpb``), so older runs, and runs of ``harness run
  --sweep train.steps=250,500,1000``, are read along the budget too.
* ``KEY``, any spec key (``model.num_experts``, ``train.lr``, ``router_args.xmoe.routing_dim``): finished
  runs are grouped by the value of KEY in their stored config (``runs.config``, the resolved RunSpec; a
  section field missing from an older config takes the field's default). ``router_args.R.k`` applies to the
  runs of router R only: every other router's runs join every point (the key does not change them).

**At each point** the runs there are judged as :func:`leaderboard.verdicts.compare_table` judges a suite:
over distinct seeds (:func:`~leaderboard.verdicts.samples`), paired by seed where the runs' specs agree
outside the router (:func:`~leaderboard.verdicts.pairing_key`; at one point the axis value is the same for
every run, so this is "outside the router, the seed and KEY"), else Welch; the statistics are
:func:`leaderboard.stats.compare`'s (difference, 95% CI, p, MDE).

**Holm family: every (router, point) test of the table at once.** A router's label is read off several of
its tests together ("holds at every point", "crossover between 500 and 1000"), and a reader scans every cell
for a significant one; adjusting per point (or per router) would let a table of k points x m routers show a
false "significant" cell with probability up to about k (or m) times alpha. Over the whole table the chance
that any cell, and so any label resting on it, is a false positive stays at most alpha. The price is power:
the more points and routers, the larger each MDE; the within-noise label quotes the largest.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

import polars as pl

from harness.routing.registry import UnknownRouterError, router_defaults, split_router_name
from harness.spec import SpecError
from leaderboard.formatting import decimals_for, fmt_diff, kind_name
from leaderboard.runs import BASELINE, parse_json, router_order
from leaderboard.stats import ALPHA, distinct_seeds
from leaderboard.suites import SuiteMeta
from leaderboard.verdicts import SECTIONS, Sample, effect_unit, judge, samples

BUDGET = "budget"


class AlongError(SpecError):
    """The axis cannot be read (unknown key, one point, no baseline): ``harness: error: ...``, exit 2."""


ROW_SCHEMA = {
    "router": pl.Utf8, "baseline": pl.Utf8, "point": pl.Utf8, "order": pl.Int64, "x": pl.Float64,
    "test": pl.Utf8, "n": pl.Int64, "n_pairs": pl.Int64, "diff": pl.Float64, "diff_ci": pl.Float64,
    "p": pl.Float64, "p_holm": pl.Float64, "mde": pl.Float64, "direction": pl.Utf8, "note": pl.Utf8,
}
LABEL_SCHEMA = {"router": pl.Utf8, "kind": pl.Utf8, "label": pl.Utf8}


@dataclass(frozen=True)
class Along:
    axis: str
    metric: str
    baseline: str
    points: list[str]       # in axis order
    rows: pl.DataFrame      # one per (router, point): ROW_SCHEMA
    labels: pl.DataFrame    # one per router: LABEL_SCHEMA; kind: holds | reversed | crossover | mixed |
                            # within noise | n<2
    family: int             # tests in the Holm family (the whole table)
    n_runs: int             # distinct finished runs read


# -- the axis ------------------------------------------------------------------------------------------

def fmt_value(v: Any) -> str:
    """A config value as ``--set`` takes it: ``8``, ``0.003``, ``null``, ``true``, ``[250,500]``."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"), sort_keys=True, default=str)
    return str(v)


def _sort_key(v: Any) -> tuple:
    """Numbers by value, then everything else by its text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, fmt_value(v))


def spec_keys() -> list[str]:
    """Every ``section.field`` of a spec: the keys an axis can take (besides ``router_args.R.k``)."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _field(key: str) -> dataclasses.Field:
    section, name = key.split(".")
    return next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)


def check_axis(axis: str) -> None:
    """An unknown axis is an error that names the closest key."""
    if axis == BUDGET or axis in spec_keys():
        return
    parts = axis.split(".")
    if parts[0] == "router_args" and len(parts) == 3 and all(parts):
        return
    close = difflib.get_close_matches(axis, [BUDGET, *spec_keys()], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise AlongError(f"axis {axis!r}: unknown key{hint}; an axis is 'budget' or a spec key such as "
                     f"model.num_experts, train.steps, router_args.xmoe.routing_dim")


def config_value(cfg: dict, key: str) -> tuple[bool, Any]:
    """(whether KEY applies to this run, its value) from a run's stored config."""
    parts = key.split(".")
    if parts[0] == "router_args":
        if split_router_name(str(cfg.get("router")))[0] != parts[1] and cfg.get("router") != parts[1]:
            return False, None
        args = cfg.get("router_args") or {}  # the router's own kwargs: what the spec set, not its defaults
        if parts[2] in args:
            return True, args[parts[2]]
        try:
            return True, router_defaults(str(cfg.get("router"))).get(parts[2])
        except UnknownRouterError:  # a router no longer registered: its default is unknown
            return True, None
    section = cfg.get(parts[0]) if isinstance(cfg.get(parts[0]), dict) else {}
    if parts[1] in section:
        return True, section[parts[1]]
    f = _field(key)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return True, list(default) if isinstance(default, tuple) else default  # as JSON stores it


def _total_steps(r: dict, cfg: dict) -> int | None:
    steps = (cfg.get("train") or {}).get("steps") if isinstance(cfg.get("train"), dict) else None
    for v in (steps, r.get("total_steps"), r.get("step")):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return int(v)
    return None


def _last_values(metrics: pl.DataFrame, ids: list[str]) -> dict[str, dict[str, float]]:
    """run_id -> {metric name: value} (the last row, as :func:`leaderboard.verdicts.samples` reads it)."""
    m = metrics.filter(pl.col("run_id").is_in(ids) & pl.col("value").is_not_null())
    out: dict[str, dict[str, float]] = {}
    for rid, name, v in m.group_by("run_id", "name", maintain_order=True).agg(pl.col("value").last()).iter_rows():
        out.setdefault(rid, {})[name] = v
    return out


ALL = object()  # the point value of a run the axis key does not apply to: it joins every point


def _finished(runs: pl.DataFrame) -> list[dict[str, Any]]:
    """The distinct finished runs, each with its parsed config under ``cfg``."""
    runs, _ = distinct_seeds(runs)
    out = []
    for r in runs.filter(pl.col("status") == "finished").iter_rows(named=True):
        cfg = parse_json(r.get("config"))
        out.append({**r, "cfg": cfg if isinstance(cfg, dict) else {}})
    return out


def _at(r: dict[str, Any], vals: dict[str, float], metric: str, axis: str) -> list[tuple[Any, float]]:
    """One run's (point, metric value) pairs on ``axis``."""
    if axis == BUDGET:
        at = {int(n[len(metric) + 1:]): v for n, v in vals.items()
              if n.startswith(metric + "@") and n[len(metric) + 1:].isdigit()}
        if not at and metric in vals:  # no budget rows: the run's own metric at its own length
            steps = _total_steps(r, r["cfg"])
            at = {steps: vals[metric]} if steps is not None else {}
        return sorted(at.items())
    if metric not in vals:
        return []
    applies, v = config_value(r["cfg"], axis)
    return [(v if applies else ALL, vals[metric])]


def axis_values(runs: pl.DataFrame, metrics: pl.DataFrame, metric: str, axis: str) -> list[tuple[str, Any, float]]:
    """``(run_id, point value, metric value)`` for every distinct finished run (:data:`ALL` as the point
    value of a run the key does not apply to)."""
    check_axis(axis)
    fin = _finished(runs)
    vals = _last_values(metrics, [r["run_id"] for r in fin])
    return [(r["run_id"], p, v) for r in fin for p, v in _at(r, vals.get(r["run_id"], {}), metric, axis)]


def _points(values: list[tuple[str, Any, float]]) -> list[Any]:
    distinct: dict[str, Any] = {}
    for _, v, _ in values:
        if v is not ALL:
            distinct.setdefault(fmt_value(v), v)
    return sorted(distinct.values(), key=_sort_key)


def axes(runs: pl.DataFrame, metrics: pl.DataFrame, metric: str) -> list[str]:
    """The axes worth reading on these runs: ``budget`` and every spec key whose value varies among ONE
    router's finished runs (varying across routers only is no axis: StableMoE's resolved ``model.top_k`` is 1
    in a top-2 suite, beside the others' 2)."""
    fin = _finished(runs)
    vals = _last_values(metrics, [r["run_id"] for r in fin])
    keys = [k for k in spec_keys() if _field(k).metadata.get("hash") != "never"]  # threads, workers: not numbers
    for r in fin:
        if isinstance(r["cfg"].get("router_args"), dict):
            base = split_router_name(str(r["cfg"].get("router")))[0]
            keys += [k for k in (f"router_args.{base}.{a}" for a in r["cfg"]["router_args"]) if k not in keys]
    out = []
    for axis in [BUDGET, *keys]:
        seen: dict[str, set[str]] = {}
        for r in fin:
            for p, _ in _at(r, vals.get(r["run_id"], {}), metric, axis):
                if p is not ALL:
                    seen.setdefault(r["router"], set()).add(fmt_value(p))
        if any(len(s) > 1 for s in seen.values()):
            out.append(axis)
    return out


# -- the table --------------------------------------------------------------------------------------------

def along_table(runs: pl.DataFrame, metrics: pl.DataFrame, meta: SuiteMeta, axis: str,
                baseline: str = BASELINE, alpha: float = ALPHA) -> Along:
    """Every router but ``baseline`` against it at each point of ``axis`` on ``meta.quality``, over ``runs``
    (the runs of ONE suite, and usually one preset), Holm-adjusted over the whole table (module docstring).
    Raises :class:`AlongError` for an unknown axis, an axis with fewer than two points, or a baseline
    without finished runs on it."""
    metric = meta.quality
    values = axis_values(runs, metrics, metric, axis)
    pts = _points(values)
    if not values:
        raise AlongError(f"no finished run has {metric}; nothing to read along {axis!r}")
    if len(pts) < 2:
        if axis == BUDGET:
            raise AlongError(f"axis 'budget': every finished run has one budget ({fmt_value(pts[0])} steps); "
                             f"record several with --set train.schedule=wsd --set train.budgets=[250,500,1000], "
                             f"or run --sweep train.steps=250,500,1000")
        if not pts:
            raise AlongError(f"axis {axis!r}: no finished run has {axis} (it applies to router "
                             f"{axis.split('.')[1]!r} only)")
        raise AlongError(f"axis {axis!r}: every finished run has {axis}={fmt_value(pts[0])}; an axis needs two "
                         f"values or more (harness run --sweep {axis}=V1,V2,...)")
    runs, _ = distinct_seeds(runs)
    fin = runs.filter(pl.col("status") == "finished")
    by_point: list[dict[str, Sample]] = []
    for p in pts:  # the runs at this point, their metric there as the metric samples() reads
        at = [(rid, v) for rid, pv, v in values if pv is ALL or fmt_value(pv) == fmt_value(p)]
        ids = [rid for rid, _ in at]
        m = pl.DataFrame({"run_id": ids, "name": [metric] * len(at), "value": [v for _, v in at]},
                         schema={"run_id": pl.Utf8, "name": pl.Utf8, "value": pl.Float64})
        by_point.append(samples(fin.filter(pl.col("run_id").is_in(ids)), m, metric))
    if not any(bp.get(baseline, Sample({})).values for bp in by_point):
        have = ", ".join(router_order({r for bp in by_point for r in bp})) or "none"
        raise AlongError(f"no finished run of the baseline {baseline!r} has {metric} (routers with {metric}: "
                         f"{have}); pick one with --baseline")
    others = [r for r in router_order({r for bp in by_point for r in bp}) if r != baseline]
    cells = [(r, i) for r in others for i in range(len(pts))]
    none = Sample({})
    verdicts = judge([(by_point[i].get(r, none), by_point[i].get(baseline, none)) for r, i in cells],
                     meta.higher_better, alpha)
    numeric = all(_sort_key(p)[0] == 0 for p in pts)
    rows = []
    for (r, i), v in zip(cells, verdicts):
        c = v.comparison
        rows.append({"router": r, "baseline": baseline, "point": fmt_value(pts[i]), "order": i,
                     "x": float(pts[i]) if numeric else None, "test": c.kind, "n": c.n,
                     "n_pairs": c.n if c.paired else None, "diff": c.diff, "diff_ci": c.diff_ci, "p": c.p,
                     "p_holm": v.p_holm, "mde": c.mde, "direction": v.direction, "note": v.note})
    table = pl.DataFrame(rows, schema=ROW_SCHEMA) if rows else pl.DataFrame(schema=ROW_SCHEMA)
    labels = [{"router": r, **dict(zip(("kind", "label"), router_label(table.filter(pl.col("router") == r), meta)))}
              for r in others]
    return Along(axis, metric, baseline, [fmt_value(p) for p in pts], table,
                 pl.DataFrame(labels, schema=LABEL_SCHEMA) if labels else pl.DataFrame(schema=LABEL_SCHEMA),
                 sum(v.p_holm is not None for v in verdicts), fin.height)


def router_label(rows: pl.DataFrame, meta: SuiteMeta) -> tuple[str, str]:
    """(kind, label) of one router's rows in axis order, from the directions decided on the Holm p:

    * ``holds at every point`` / ``reversed at every point``: significantly better / worse at all of them;
    * ``crossover between X and Y (better at X, worse at Y)``: significant in opposite directions; X and Y
      the adjacent significant points where the sign changes (every change, when there are several);
    * ``mixed: holds at ...; within noise at ...``: significant at some points only;
    * ``within noise at every point (could have detected ±MDE)``: the largest MDE of its tests;
    * ``n<2 at every point``: no test anywhere. Points without a test are named (``n<2 at ...``)."""
    rs = rows.sort("order").iter_rows(named=True)
    seq = [(r["point"], r["direction"], r["mde"]) for r in rs]
    at = {d: [p for p, dd, _ in seq if dd == d] for d in ("better", "worse", "within noise", "n<2")}
    untested = f"; n<2 at {', '.join(at['n<2'])}" if at["n<2"] else ""
    if at["better"] and at["worse"]:
        sig = [(p, d) for p, d, _ in seq if d in ("better", "worse")]
        changes = [f"between {a} and {b} ({da} at {a}, {db} at {b})" for (a, da), (b, db) in zip(sig, sig[1:])
                   if da != db]
        return "crossover", "crossover " + "; ".join(changes)
    if not at["better"] and not at["worse"]:
        if not at["within noise"]:
            return "n<2", "n<2 at every point (no test)"
        mdes = [m for _, d, m in seq if d == "within noise" and m is not None and math.isfinite(m)]
        could = ""
        if mdes:
            big = meta.shown(max(mdes))
            could = f" (could have detected ±{big:.{decimals_for(big)}f} {effect_unit(meta)})"
        return "within noise", f"within noise at every point{' tested' if untested else ''}{could}{untested}"
    sig_dir, word = ("better", "holds") if at["better"] else ("worse", "reversed")
    if len(at[sig_dir]) == len(seq):
        return ("holds" if sig_dir == "better" else "reversed"), f"{word} at every point"
    noise = f"; within noise at {', '.join(at['within noise'])}" if at["within noise"] else ""
    return "mixed", f"mixed: {word} at {', '.join(at[sig_dir])}{noise}{untested}"


# -- as text (harness claims --along, harness compare --along) --------------------------------------------

def to_text(al: Along, meta: SuiteMeta) -> str:
    """Per router: ``xmoe vs smoe: crossover between 4 and 16 (...)``, then one aligned line per point with the
    difference ± 95% CI, the test, raw and Holm p and the direction."""
    def p3(p: float | None) -> str:
        return "—" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"

    blocks = []
    label = dict(zip(al.labels["router"].to_list(), al.labels["label"].to_list()))
    for router in al.labels["router"].to_list():
        head = [al.axis, f"Δ {al.metric}", "test", "p", "Holm p", "verdict"]
        lines = [head]
        for r in al.rows.filter(pl.col("router") == router).sort("order").iter_rows(named=True):
            test = "—" if r["test"] == "n<2" else f"paired n={r['n_pairs']}" if r["test"] == "paired" else \
                f"{kind_name(r['test'])} n={r['n']}"
            lines.append([r["point"], fmt_diff(meta.shown(r["diff"]), meta.shown(r["diff_ci"])), test, p3(r["p"]),
                          p3(r["p_holm"]), r["direction"] + (f" ({r['note']})" if r["note"] else "")])
        width = [max(len(ln[i]) for ln in lines) for i in range(len(head))]
        body = ["  " + "  ".join(c.ljust(w) for c, w in zip(ln, width)).rstrip() for ln in lines]
        blocks.append("\n".join([f"{router} vs {al.baseline}: {label[router]}", *body]))
    return "\n\n".join(blocks) if blocks else "(no router besides the baseline)"
