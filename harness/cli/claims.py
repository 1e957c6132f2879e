"""``harness claims``: the papers' claims beside the harness' verdict on the stored runs.

    harness claims [--store results/harness.duckdb] [--suite lm] [--preset default] [--alpha 0.05]

The verdicts come from :func:`leaderboard.claims.claims_table`, the function the board's Claims tab calls:
paired by seed where the runs pair, else Welch, Holm-adjusted over the claims judged; each claim prints the
test used, the difference ± CI, raw and adjusted p, and what the test could have detected.
"""
from __future__ import annotations

import argparse

import polars as pl

from leaderboard.claims import claims_table, fmt_side, load_claims
from leaderboard.formatting import fmt_diff, fmt_p, kind_name
from leaderboard.runs import suite_preset_runs
from leaderboard.stats import ALPHA, distinct_seeds
from leaderboard.store import load_metrics, load_runs
from leaderboard.suites import suite_meta

from ..spec import SpecError


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    s = sub.add_parser("claims", help="the papers' claims beside the harness' verdict on the stored runs")
    store_arg(s)
    s.add_argument("--suite", default="lm", help="suite whose runs are judged (lm | vision | ...)")
    s.add_argument("--preset", default=None, help="preset whose runs are judged (default: the one with most runs)")
    s.add_argument("--alpha", type=float, default=ALPHA,
                   help="family-wise significance level (Holm over the claims judged)")
    s.add_argument("--claims", default=None, help="a claims YAML instead of the shipped tasks/claims/papers.yaml")
    s.set_defaults(fn=cmd_claims)


def cmd_claims(args: argparse.Namespace) -> int:
    if not 0 < args.alpha < 1:
        raise SpecError(f"--alpha must lie between 0 and 1, got {args.alpha}")
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
