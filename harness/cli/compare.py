"""``harness compare``: every router of a suite against a baseline, as controlled experiments.

    harness compare [--store results/harness.duckdb] [--suite lm] [--preset P] [--baseline smoe]
                    [--metric val_bpb] [--alpha 0.05] [--markdown] [--along budget|KEY]

One row per router: mean ± 95% CI over distinct seeds and, against the baseline, the test used (paired by
seed where the runs share their spec outside the router, else Welch), the difference ± CI, raw and
Holm-adjusted p (over every router compared), the minimum detectable effect and the verdict. ``--markdown``
prints the same as a GitHub table (the README's results table is pasted from it). The numbers come from
:func:`leaderboard.verdicts.compare_table`, the computation the board's overview makes. ``--along`` prints
what ``harness claims --along`` prints (on ``--metric``, too): the comparison at each point of the training
budget or of a spec key (docs/along.md).
"""
from __future__ import annotations

import argparse

import polars as pl

from leaderboard.formatting import decimals_for, fmt_ci, fmt_diff, fmt_p, kind_name
from leaderboard.runs import BASELINE, suite_preset_runs
from leaderboard.stats import ALPHA, distinct_seeds
from leaderboard.store import load_metrics, load_runs
from leaderboard.suites import SuiteMeta, suite_meta
from leaderboard.verdicts import TARGET_EFFECT, CompareError, compare_table, effect_unit, metric_meta

from ..spec import SpecError
from .claims import add_along_args, check_alpha, cmd_along

VERDICT = {"better": "better", "worse": "worse", "within noise": "within noise", "n<2": "n<2 (no test)",
           "baseline": "baseline"}


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    s = sub.add_parser("compare", help="every router against a baseline: paired by seed, Holm-adjusted, with the "
                                       "minimum detectable effect")
    store_arg(s)
    s.add_argument("--suite", default="lm", help="suite whose runs are compared (lm | vision | ...)")
    s.add_argument("--preset", default=None, help="preset whose runs are compared (default: the one with most runs)")
    # dest is not "baseline": that name is checked as an output file for `harness regress --baseline FILE`
    s.add_argument("--baseline", dest="baseline_router", default=BASELINE, metavar="ROUTER",
                   help=f"router every other is compared against (default {BASELINE})")
    s.add_argument("--metric", default=None, help="metric compared (default: the suite's primary, lm val_bpb)")
    s.add_argument("--alpha", type=float, default=ALPHA, help="family-wise significance level (Holm)")
    s.add_argument("--markdown", action="store_true", help="print a GitHub markdown table")
    add_along_args(s, baseline=False)
    s.set_defaults(fn=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    check_alpha(args.alpha)
    if not args.baseline_router.strip():
        raise SpecError("--baseline must name a router, e.g. --baseline smoe")
    if args.along is not None:
        if args.markdown:
            raise SpecError("--markdown prints the comparison at one point; with --along, drop --markdown")
        return cmd_along(args, args.metric)
    runs = load_runs(args.store, timeout=60)
    suite_runs, preset, presets = suite_preset_runs(runs, args.suite, args.preset)
    if suite_runs.filter(pl.col("status") == "finished").height == 0:
        suites = sorted(set(runs["suite"].drop_nulls().to_list()))
        raise CompareError(f"{args.store} has no finished run of suite {args.suite!r}"
                           + (f" with preset {preset!r}" if preset else "")
                           + (f" (suites with runs: {', '.join(suites)})" if suites else " (it holds no runs)"))
    metrics = load_metrics(args.store, suite_runs["run_id"].to_list(), timeout=60)
    meta = metric_meta(suite_meta(args.suite, metrics["name"].unique().to_list()), args.metric)
    if args.metric is not None and args.metric not in set(metrics["name"].to_list()):
        names = sorted(n for n in set(metrics["name"].to_list()) if "/" not in n)
        raise CompareError(f"no run of suite {args.suite!r} preset {preset!r} has the metric {args.metric!r} "
                           f"(metrics: {', '.join(names)})")
    table = compare_table(suite_runs, metrics, meta, args.baseline_router, alpha=args.alpha)
    if args.markdown:
        print(to_markdown(table, meta, args.baseline_router))
        return 0
    _, dupes = distinct_seeds(suite_runs)
    family = table["p_holm"].drop_nulls().len()
    print(f"compare on {args.store}: suite {args.suite}, preset {preset or '(none)'}, "
          f"{suite_runs.filter(pl.col('status') == 'finished').height - dupes} distinct finished runs"
          + (f"; other presets: {', '.join(p for p in presets if p != preset)}" if len(presets) > 1 else ""))
    print(f"{meta.quality} ({'higher' if meta.higher_better else 'lower'} is better) vs {args.baseline_router}: "
          f"paired t-test where the runs pair (same spec outside the router), else Welch; Holm over the {family} "
          f"comparison{'s' if family != 1 else ''}, alpha {args.alpha}; MDE at 80% power")
    print()
    print(to_text(table, meta, args.baseline_router))
    notes = [f"{r['router']}: {r['resolution']}" for r in table.iter_rows(named=True) if r["resolution"]]
    unpaired = [f"{r['router']}: Welch, {r['note']}" for r in table.iter_rows(named=True) if r["note"]]
    if notes or unpaired:
        print()
        for line in unpaired + notes:
            print(line)
    return 0


def rows(table: pl.DataFrame, meta: SuiteMeta, baseline: str) -> list[dict[str, str]]:
    """The table as the strings both outputs print, under their column headers."""
    unit = effect_unit(meta)
    out = []
    for r in table.iter_rows(named=True):
        base = r["label"] == "baseline"
        mde = meta.shown(r["mde"])
        out.append({
            "router": r["router"], "n": str(r["n"]),
            f"{meta.quality} (95% CI)": fmt_ci(meta.shown(r["mean"]), meta.shown(r["ci"]), r["n"]),
            "test": "—" if base or r["test"] == "n<2" else
            f"paired (n={r['n_pairs']})" if r["test"] == "paired" else kind_name(r["test"]),
            f"Δ vs {baseline}": "—" if base else fmt_diff(meta.shown(r["diff"]), meta.shown(r["diff_ci"])),
            "p": "—" if r["p"] is None else fmt_p(r["p"]).removeprefix("p="),
            "p (Holm)": "—" if r["p_holm"] is None else fmt_p(r["p_holm"]).removeprefix("p="),
            f"MDE ({unit})": "—" if mde is None else f"{mde:.{decimals_for(mde)}f}",
            f"seeds for {meta.shown(TARGET_EFFECT):g}": "—" if base or r["n_needed"] is None else str(r["n_needed"]),
            "verdict": VERDICT.get(r["label"], r["label"]),
        })
    return out


def to_text(table: pl.DataFrame, meta: SuiteMeta, baseline: str) -> str:
    """Aligned plain-text columns."""
    rs = rows(table, meta, baseline)
    if not rs:
        return "(no routers)"
    cols = list(rs[0])
    width = {c: max(len(c), *(len(r[c]) for r in rs)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols).rstrip()]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols).rstrip() for r in rs]
    return "\n".join(lines)


def to_markdown(table: pl.DataFrame, meta: SuiteMeta, baseline: str) -> str:
    """A GitHub table; numbers right-aligned."""
    rs = rows(table, meta, baseline)
    cols = list(rs[0]) if rs else ["router"]
    align = {c: ":---" if c in ("router", "test", "verdict") else "---:" for c in cols}
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(f" {align[c]} " for c in cols) + "|"]
    lines += ["| " + " | ".join(r[c].replace("|", "\\|") for c in cols) + " |" for r in rs]
    return "\n".join(lines)
