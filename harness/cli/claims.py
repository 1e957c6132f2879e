"""``harness claims``: the papers' claims beside the harness' verdict on the stored runs.

    harness claims [--store results/harness.duckdb] [--alpha 0.05]   each claim on its paper's suite
    harness claims --suite lm [--preset default]                      every claim on one suite
    harness claims --along budget|KEY [--baseline smoe]     every router vs the baseline at each point of an axis

The verdicts come from :func:`leaderboard.claims.claims_table`, the function the board's Claims tab calls.
Each claim is judged on the suite its paper's evidence comes from (``suite`` in tasks/claims/papers.yaml:
MoGE's ImageNet claim on vision, the language-modelling claims on lm), on the claim's ``preset`` or else
that suite's preset with most runs; a suite with no finished runs gives ``n<2`` and the command that would
fill it, never another suite's verdict. ``--suite X`` judges every claim on X instead (``--preset`` then
picks X's preset): how a claim fares outside its paper's setting. Paired by seed where the runs pair,
else Welch, Holm-adjusted over all the claims tested (one family across suites); each claim prints what
judged it (suite, preset, runs), the test used, the difference ± CI in its suite's units, raw and adjusted
p, and what the test could have detected. ``--along`` prints :func:`leaderboard.along.along_table`
instead (docs/along.md): one label per router across the points of the training budget or of a spec key,
then the difference ± CI and p at each point.
"""
from __future__ import annotations

import argparse

import polars as pl

from leaderboard.along import along_table, check_axis, to_text
from leaderboard.claims import claim_meta, claims_table, fmt_side, judged_on, load_claims
from leaderboard.formatting import fmt_diff, fmt_p, kind_name
from leaderboard.runs import BASELINE, suite_preset_runs
from leaderboard.stats import ALPHA
from leaderboard.store import load_metrics, load_runs
from leaderboard.suites import SuiteMeta, suite_meta
from leaderboard.verdicts import metric_meta

from ..spec import SpecError

ALONG_SUITE = "lm"  # --along without --suite


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    s = sub.add_parser("claims", help="the papers' claims beside the harness' verdict on the stored runs")
    store_arg(s)
    s.add_argument("--suite", default=None,
                   help="judge every claim on this suite's runs (lm | vision | ...); default: each claim on its "
                        f"paper's suite (tasks/claims/papers.yaml); --along: default {ALONG_SUITE}")
    s.add_argument("--preset", default=None,
                   help="with --suite: the preset whose runs are judged (default: the one with most runs)")
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
    if args.preset is not None and args.suite is None:  # a preset belongs to one suite; the claims span two
        raise SpecError("--preset picks a preset of --suite: add --suite (without it each claim is judged on its "
                        "own suite and preset, tasks/claims/papers.yaml)")
    claims = load_claims(args.claims)
    runs = load_runs(args.store, timeout=60)
    suites = [args.suite] if args.suite is not None else sorted({c.suite for c in claims})
    runs = runs.filter(pl.col("suite").is_in(suites))
    metrics = load_metrics(args.store, runs["run_id"].to_list(), timeout=60)
    table = claims_table(runs, metrics, claims, args.alpha, suite=args.suite, preset=args.preset)
    rows = list(table.iter_rows(named=True))
    if not rows:
        print(f"claims on {args.store}: the claims table lists no claims")
        return 0
    groups: dict[tuple[str, str | None], list[dict]] = {}
    for r in rows:  # in the order the claims first use them
        groups.setdefault((r["suite"], r["preset"]), []).append(r)
    print(f"claims on {args.store}: " + "; ".join(
        group_text(rs[0], f"every claim (--suite {args.suite})" if args.suite is not None else
                   f"{len(rs)} claim{'s' if len(rs) != 1 else ''}") for rs in groups.values()))
    metas = {r["suite"]: claim_meta(r) for r in rows}
    if len(metas) == 1:
        m = next(iter(metas.values()))
        on = f"{m.quality} ({'higher' if m.higher_better else 'lower'} is better)"
    else:
        on = "each claim on its suite's metric (" + "; ".join(
            f"{s}: {m.quality}, {'higher' if m.higher_better else 'lower'} is better" for s, m in metas.items()) + ")"
    family = table["p_holm"].drop_nulls().len()
    print(f"verdict: {on} over distinct seeds: paired t-test where the runs pair (same spec outside the router), "
          f"else Welch; Holm-adjusted over the {family} claim{'s' if family != 1 else ''} tested"
          f"{' (one family across suites)' if len(metas) > 1 else ''}, alpha {args.alpha}")
    for r in rows:
        meta = claim_meta(r)
        print()
        print(f"{r['claim']}: {r['verdict']}")
        print(f"  judged on: {judged_on(r)}")
        print(f"  harness: {fmt_side(r['router'], r['router_mean'], r['router_ci'], r['n_router'], meta)} vs "
              f"{fmt_side(r['baseline'], r['baseline_mean'], r['baseline_ci'], r['n_baseline'], meta)} "
              f"({meta.quality}, mean ± 95% CI)")
        if r["test"] != "n<2":
            print(f"  test:    {test_line(r, meta)}")
        elif r["note"]:
            print(f"  note:    {r['note']}")
        if r["resolution"]:
            print(f"  power:   {r['resolution'].removeprefix('within noise: ')}")
        print(f"  paper:   arXiv {r['arxiv']}: {r['paper']}")
        print(f"  setting: {r['setting']}")
        print(f"  figure:  {r['figure']}")
    if rows and all(r["label"] == "n<2" for r in rows):
        cmds = [f"harness run --suite {s} --preset {p or 'default'} --seeds 0,1,2 --store {args.store}"
                for s, p in groups]
        print(f"\nno claim can be tested yet: run at least two seeds of each router, e.g. {' and '.join(cmds)}")
    return 0


def group_text(r: dict, claims: str) -> str:
    """One suite and preset the claims were judged on: ``suite lm, preset default, 9 distinct finished runs (1
    duplicate set aside; other presets: tiny) for 6 claims``; ``suite vision, no finished runs, for 1 claim``."""
    extra = [f"{r['n_dupes']} duplicate{'s' if r['n_dupes'] != 1 else ''} set aside"] if r["n_dupes"] else []
    extra += [f"other presets: {r['other_presets']}"] if r["other_presets"] else []
    extra_text = f" ({'; '.join(extra)})" if extra else ""
    if not r["n_runs"]:
        preset = f", preset {r['preset']}" if r["preset"] else ""
        return f"suite {r['suite']}{preset}, no finished runs{extra_text}, for {claims}"
    runs = f"{r['n_runs']} distinct finished run{'s' if r['n_runs'] != 1 else ''}"
    return f"suite {r['suite']}, preset {r['preset'] or '(none)'}, {runs}{extra_text} for {claims}"


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
    suite = args.suite or ALONG_SUITE
    runs = load_runs(args.store, timeout=60)
    suite_runs, preset, presets = suite_preset_runs(runs, suite, args.preset)
    metrics = load_metrics(args.store, suite_runs["run_id"].to_list(), timeout=60)
    meta: SuiteMeta = metric_meta(suite_meta(suite, metrics["name"].unique().to_list()), metric)
    al = along_table(suite_runs, metrics, meta, args.along, baseline, args.alpha)
    print(f"along {al.axis} on {args.store}: suite {suite}, preset {preset or '(none)'}, {al.n_runs} distinct "
          f"finished runs; points: {', '.join(al.points)}"
          + (f"; other presets: {', '.join(p for p in presets if p != preset)}" if len(presets) > 1 else ""))
    print(f"{meta.quality} ({'higher' if meta.higher_better else 'lower'} is better), router - {baseline} at each "
          f"point: paired t-test where the runs pair (same spec outside the router), else Welch; Holm over the "
          f"{al.family} test{'s' if al.family != 1 else ''} of this table, alpha {args.alpha}")
    print()
    print(to_text(al, meta))
    return 0
