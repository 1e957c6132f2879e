"""``harness claims``: the papers' claims beside the harness' verdict on the stored runs.

    harness claims [--store results/harness.duckdb] [--suite lm] [--preset default] [--alpha 0.05]
    harness claims --along budget|KEY [--baseline smoe]     every router vs the baseline at each point of an axis

The verdicts come from :func:`leaderboard.claims.claims_table`, the function the board's Claims tab calls:
paired by seed where the runs pair, else Welch, Holm-adjusted over the claims judged; each claim prints the
test used, the difference ± CI, raw and adjusted p, and what the test could have detected. ``--along`` prints
:func:`leaderboard.along.along_table` instead (docs/along.md): one label per router across the points of the
training budget or of a spec key, then the difference ± CI and p at each point.
"""
from __future__ import annotations

import argparse

import polars as pl

from leaderboard.along import along_table, check_axis, to_text
from leaderboard.claims import claims_table, fmt_side, load_claims
from leaderboard.formatting import fmt_diff, fmt_p, kind_name
from leaderboard.runs import BASELINE, suite_preset_runs
from leaderboard.stats import ALPHA, distinct_seeds
from leaderboard.store import load_metrics, load_runs
from leaderboard.suites import SuiteMeta, suite_meta
from leaderboard.verdicts import metric_meta

from ..spec import SpecError


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    s = sub.add_parser("claims", help="the papers' claims beside the harness' verdict on the stored runs")
    store_arg(s)
    s.add_argument("--suite", default="lm", help="suite whose runs are judged (lm | vision | ...)")
    s.add_argument("--preset", default=None, help="preset whose runs are judged (default: the one with most runs)")
    s.add_argument("--alpha", type=float, default=ALPHA,
                   help="family-wise significance level (Holm over the claims judged)")
    s.add_argument("--claims", default=None, help="a claims YAML instead of the shipped tasks/claims/papers.yaml")
    add_along_args(s)
    s.set_defaults(fn=cmd_claims)


def add_along_args(s: argparse.ArgumentParser, baseline: bool = True) -> None:
    """``--along`` (and its ``--baseline``), shared with ``harness compare``."""
    s.add_argument("--along", default=None, metavar="budget|KEY",
                   help="every router against the baseline at each point of the training budget or of a spec key "
                        "(e.g. model.num_experts), one label per router across the points (docs/along.md)")
    if baseline:  # dest is not "baseline": that name is checked as an output file elsewhere
        s.add_argument("--baseline", dest="baseline_router", default=None, metavar="ROUTER",
                       help=f"--along: the router every other is compared against (default {BASELINE})")


def check_alpha(alpha: float) -> None:
    """``--alpha`` of claims and compare: a significance level strictly between 0 and 1."""
    if not 0 < alpha < 1:
        raise SpecError(f"--alpha must lie between 0 and 1, got {alpha}")


def cmd_claims(args: argparse.Namespace) -> int:
    check_alpha(args.alpha)
    if args.along is None and args.baseline_router is not None:
        raise SpecError("--baseline picks the reference of --along; each claim names its own baseline")
    if args.along is not None:
        return cmd_along(args)
    claims = load_claims(args.claims)
    runs = load_runs(args.store, timeout=60)
    suite_runs, preset, presets = suite_preset_runs(runs, args.suite, args.preset)
    metrics = load_metrics(args.store, suite_runs["run_id"].to_list(), timeout=60)
    meta = suite_meta(args.suite, metrics["name"].unique().to_list())
    table = claims_table(suite_runs, metrics, meta, claims, args.alpha)
    _, dupes = distinct_seeds(suite_runs)
    direction = "higher" if meta.higher_better else "lower"
    print(f"claims on {args.store}: suite {args.suite}, preset {preset or '(none)'}, "
          f"{suite_runs.filter(pl.col('status') == 'finished').height - dupes} distinct finished runs"
          + (f" ({dupes} duplicate{'s' if dupes != 1 else ''} set aside)" if dupes else "")
          + (f"; other presets: {', '.join(p for p in presets if p != preset)}" if len(presets) > 1 else ""))
    family = table["p_holm"].drop_nulls().len()
    print(f"verdict: {meta.quality} ({direction} is better) over distinct seeds: paired t-test where the runs pair "
          f"(same spec outside the router), else Welch; Holm-adjusted over the {family} claim"
          f"{'s' if family != 1 else ''} tested, alpha {args.alpha}")
    for r in table.iter_rows(named=True):
        print()
        print(f"{r['claim']}: {r['verdict']}")
        print(f"  harness: {fmt_side(r['router'], r['router_mean'], r['router_ci'], r['n_router'], meta)} vs "
              f"{fmt_side(r['baseline'], r['baseline_mean'], r['baseline_ci'], r['n_baseline'], meta)} "
              f"({meta.quality}, mean ± 95% CI)")
        if r["test"] != "n<2":
            print(f"  test:    {test_line(r, meta)}")
        if r["resolution"]:
            print(f"  power:   {r['resolution'].removeprefix('within noise: ')}")
        print(f"  paper:   arXiv {r['arxiv']}: {r['paper']}")
        print(f"  setting: {r['setting']}")
        print(f"  figure:  {r['figure']}")
    if table.height and (table["label"] == "n<2").all():
        print(f"\nno claim can be tested yet: run at least two seeds of each router, e.g. "
              f"harness run --suite {args.suite} --preset {preset or 'default'} --seeds 0,1,2 --store {args.store}")
    return 0


def test_line(r: dict, meta) -> str:  # noqa: ANN001 - a SuiteMeta
    """``paired over 3 seeds; competesmoe - smoe = -1.000 ± 0.124; p=0.004, Holm p=0.012 (over 3 claims)``."""
    how = f"paired over {r['n_pairs']} seeds" if r["test"] == "paired" else \
        f"{kind_name(r['test'])} ({r['note']})" if r["note"] else kind_name(r["test"])
    wil = f", Wilcoxon {fmt_p(r['p_wilcoxon'])}" if r["p_wilcoxon"] is not None else ""
    return (f"{how}; {r['router']} - {r['baseline']} = {fmt_diff(meta.shown(r['diff']), meta.shown(r['diff_ci']))}; "
            f"{fmt_p(r['p'])}, Holm {fmt_p(r['p_holm'])}{wil}")


def cmd_along(args: argparse.Namespace, metric: str | None = None) -> int:
    """``--along AXIS``: the header, then :func:`leaderboard.along.to_text`."""
    check_axis(args.along)  # before the store is read: a typo is a typo whatever the store holds
    baseline = args.baseline_router or BASELINE
    runs = load_runs(args.store, timeout=60)
    suite_runs, preset, presets = suite_preset_runs(runs, args.suite, args.preset)
    metrics = load_metrics(args.store, suite_runs["run_id"].to_list(), timeout=60)
    meta: SuiteMeta = metric_meta(suite_meta(args.suite, metrics["name"].unique().to_list()), metric)
    al = along_table(suite_runs, metrics, meta, args.along, baseline, args.alpha)
    print(f"along {al.axis} on {args.store}: suite {args.suite}, preset {preset or '(none)'}, {al.n_runs} distinct "
          f"finished runs; points: {', '.join(al.points)}"
          + (f"; other presets: {', '.join(p for p in presets if p != preset)}" if len(presets) > 1 else ""))
    print(f"{meta.quality} ({'higher' if meta.higher_better else 'lower'} is better), router - {baseline} at each "
          f"point: paired t-test where the runs pair (same spec outside the router), else Welch; Holm over the "
          f"{al.family} test{'s' if al.family != 1 else ''} of this table, alpha {args.alpha}")
    print()
    print(to_text(al, meta))
    return 0
