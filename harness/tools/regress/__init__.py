"""``harness regress``: catch a change that makes a router worse or slower, on any machine.

Quality (``quality.py``, ``gate.py``) — each gated router trains the fixed ``regress``
spec (suite ``lm``) at the golden's primary seed, in parallel worker processes;
its val bits/byte, routing health and router signature are compared with the
committed goldens (``tasks/regress/lm.json``) within tolerances derived from the
recorded seed spread, plus a documented allowance when the machine differs from
the recording one.

Throughput (``ab.py``) — the base revision (default: the one the goldens were
recorded at) is checked out in a temporary worktree and timed against the current
tree in alternating fresh processes on this machine; a rank test decides. Timings
from another machine are never used.

Routers without a golden (third-party plugins) are reported NO-GOLDEN and do not
fail the gate unless named with ``--routers`` or ``--strict``.
"""
from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path

from ... import args as args_
from ...routing.registry import get_router, router_names
from ...spec import load_suite
from . import ab
from .gate import (
    GOLDEN_VERSION,
    Check,
    GoldenError,
    judge_quality,
    load_golden,
    machine_fingerprint,
    make_golden,
    print_checks,
    write_golden,
)
from .quality import QUALITY_METRIC, measure_quality

__all__ = ["GOLDEN_VERSION", "Check", "GoldenError", "cmd_regress", "judge_quality"]

DEFAULT_SUITE, DEFAULT_PRESET = "lm", "regress"


def default_baseline(suite: str) -> Path:
    return Path(str(resources.files("harness.tasks").joinpath("regress", f"{suite}.json")))


def select_routers(args: argparse.Namespace, golden: dict | None) -> tuple[list[str], list[Check]]:
    """(routers to measure, NO-GOLDEN/missing checks for the others)."""

    known = router_names()
    named = args_.split_csv(args.routers)
    for r in named:
        get_router(r)  # unknown / broken plugin: one-line error, exit 2, before anything runs
    if args.update:
        return named or known, []
    g_routers = (golden or {}).get("routers", {})
    notes: list[Check] = []
    if named:
        measure = named
    else:
        measure = [r for r in g_routers if r in known]
        for r in g_routers:
            if r not in known:
                notes.append(Check(r, "-", "FAIL", None, None,
                                   f"has a golden but is not registered: install it, or re-record without it"))
    for r in (measure if named else known):
        if r not in g_routers:
            gated = (bool(named) or args.strict) and not getattr(args, "skip_quality", False)
            notes.append(Check(r, "-", "NO-GOLDEN", None, None,
                               "no golden: record it with --update " + ("(gated)" if gated else "(not gated)"),
                               gated=gated))
    return measure, notes


def cmd_regress(args: argparse.Namespace) -> int:

    t_start = time.perf_counter()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    baseline = Path(args.baseline) if args.baseline else default_baseline(args.suite)
    old = None
    if not args.update:
        old = load_golden(baseline)
    elif baseline.exists():
        try:
            old = load_golden(baseline)
        except GoldenError as exc:  # re-recording replaces an unreadable or older golden
            log(f"regress: replacing the old golden ({exc})")
    measured, notes = select_routers(args, old)
    # quality needs a golden (or --update); throughput A/B needs none: the base revision is the reference
    routers = measured if args.update else [r for r in measured if r in old["routers"]]
    seeds = args.seeds if args.update else [old["seed"]]
    load_suite(args.suite, preset=args.preset, routers=routers, seeds=seeds)  # bad spec: exit 2 before any work
    tree = Path(args.repo).resolve() if args.repo else ab.package_tree()

    # the revision is read before measuring: it must name the code that was measured, not a later HEAD
    revision, dirty = ab.head_revision(tree), ab.tree_is_dirty(tree)
    cost = {r: g.get("run_seconds", 0.0) for r, g in (old or {}).get("routers", {}).items()}
    quality = {} if args.skip_quality or not routers else measure_quality(
        routers, seeds, args.suite, args.preset, args.jobs, log, cost=cost)
    t_quality = time.perf_counter() - t_start

    if args.update:
        if ab.head_revision(tree) != revision:
            log(f"regress: WARNING HEAD moved during the recording; the golden names {str(revision)[:12]}, "
                f"the revision that was measured")
        golden = make_golden(quality, seeds, args.suite, args.preset, old, revision=revision, dirty=dirty)
        if old is not None and old.get("version") == GOLDEN_VERSION:
            print("what moved against the previous golden (primary seed):")
            print_checks(judge_quality(old, {r: q for r, q in quality.items() if r in old["routers"]}, cross=False))
        write_golden(baseline, golden)
        if dirty:
            print("regress: WARNING recorded on a tree with uncommitted changes: commit them, so the golden's "
                  "revision (the throughput base) is the code that was measured")
        for r in sorted(quality):
            vals = [quality[r]["values"][s][QUALITY_METRIC] for s in seeds]
            print(f"  {r:<14} {QUALITY_METRIC} " + " ".join(f"{v:.4f}" for v in vals))
        print(f"golden written: {baseline} ({len(golden['routers'])} routers, seeds {seeds}, "
              f"revision {str(golden['revision'])[:12]}) in {time.perf_counter() - t_start:.0f} s")
        return 0

    here = machine_fingerprint()
    cross = here["fingerprint"] != old.get("machine", {}).get("fingerprint")
    checks = judge_quality(old, quality, cross)
    if cross and quality:
        log(f"regress: recorded on {old.get('machine', {}).get('fingerprint')}, this machine is "
            f"{here['fingerprint']}: cross-machine allowances apply (column 'allowance')")

    speed_routers = [r for r in measured if not get_router(r).is_dense]
    if not args.skip_speed and speed_routers:
        try:
            res = ab.measure_ab(tree, args.base or old.get("revision"), speed_routers, rounds=args.rounds,
                                repeats=args.repeats, log=log)
        except RuntimeError as exc:  # the current tree's own worker failed: that is a regression
            res = ab.ABResult("", skipped=None)
            checks.append(Check("*", "ratio_vs_dense", "FAIL", None, None, str(exc)))
        if res.skipped:
            checks.append(Check("*", "ratio_vs_dense", "SKIPPED", None, None, res.skipped))
        elif res.base_rev:
            for r in speed_routers:
                status, v, g, detail = ab.judge_speed(r, res.base.get(r), res.current.get(r), args.min_effect)
                checks.append(Check(r, "ratio_vs_dense", status, v, g, detail))
    checks += notes
    print_checks(checks)
    bad = [c for c in checks if c.failed]
    wall = time.perf_counter() - t_start
    if bad:
        print(f"regress: {len(bad)} check(s) failed in {wall:.0f} s: "
              + ", ".join(f"{c.router}/{c.metric} {c.status}" for c in bad))
        return 1
    print(f"regress: all {sum(c.status == 'pass' for c in checks)} checks passed in {wall:.0f} s "
          f"(quality {t_quality:.0f} s)" + "".join(f"; {c.status} {c.router}" for c in checks
                                                 if c.status not in ("pass",) and c.router != "*")
          + "".join(f"; throughput SKIPPED: {c.detail}" for c in checks if c.status == "SKIPPED"))
    return 0
