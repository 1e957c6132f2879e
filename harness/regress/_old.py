"""``harness regress``: catch a change that makes a router worse or slower.

Quality — each router trains the small fixed-seed spec (suite ``lm``, preset
``regress``) and its validation bits/byte is compared with the committed golden
value (``tasks/regress/lm.json``). The tolerance was derived when the golden was
recorded: ``max(2 * std over seeds, min_tolerance)``, i.e. a change smaller than
the seed-to-seed noise does not fail the build. Every golden carries the run's
spec hash: if the spec changed (model size, steps, router defaults...) the
comparison is refused loudly ("spec changed: re-record with --update") rather
than comparing apples to oranges.

Throughput — one MoE layer per router and the dense equal-FLOP FFN, fwd+bwd,
interleaved in this process (``harness.profile.run_layer_bench``); per repeat the
ratio t_router / t_dense. A router regresses when BOTH hold (asv-style):
  * a one-sided Mann-Whitney U test says the new ratios are larger than the
    golden ratios (p < 0.05), and
  * the median ratio grew by more than ``min_effect`` (default 10%).
So noise on a shared machine does not fail the build but a real 20% slowdown does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

GOLDEN_VERSION = 1
DEFAULT_SUITE, DEFAULT_PRESET = "lm", "regress"
QUALITY_METRIC = "val_bpb"          # lower is better
MIN_TOLERANCE = 0.01                # bits/byte
MIN_EFFECT = 0.10                   # throughput: smallest slowdown that counts
ALPHA = 0.01                        # shared machines: p < 0.05 alone fired on unchanged code
BENCH = dict(tokens=2048, d_model=128, d_ff=256, num_experts=8, top_k=2)
BENCH_REPEATS = 9


class GoldenError(RuntimeError):
    pass


def default_baseline(suite: str) -> Path:
    return Path(str(resources.files("harness.tasks").joinpath("regress", f"{suite}.json")))


@dataclass
class Check:
    router: str
    metric: str
    status: str        # pass | FAIL | NO-GOLDEN | SPEC-CHANGED
    value: float | None
    golden: float | None
    detail: str


# -- measurements -------------------------------------------------------------------------

def measure_quality(routers: list[str], seeds: list[int], suite: str, preset: str,
                    log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Train each router x seed on the fixed spec in a throw-away store; val metric per seed."""
    from .runner import get_adapter
    from .spec import load_suite
    from .store import Store
    from .train import train_run

    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="harness-regress-") as tmp:
        store = Store(Path(tmp) / "regress.duckdb")
        spec = load_suite(suite, preset=preset, routers=routers, seeds=seeds, overrides=["eval.enabled=false"])
        adapter = get_adapter(spec.suite)
        for run in spec.runs():
            res = train_run(run, adapter, store, Path(tmp) / "runs", progress=False, log=log)
            entry = out.setdefault(run.router, {"spec_hash": run.spec_hash, "values": {}, "status": {}})
            entry["values"][run.seed] = res.metrics.get(QUALITY_METRIC)
            entry["status"][run.seed] = res.status
            log(f"regress: {run.router} seed {run.seed}: {res.status} {QUALITY_METRIC}="
                f"{res.metrics.get(QUALITY_METRIC)}")
    return out


def measure_throughput(routers: list[str], repeats: int, log: Callable[[str], None]) -> dict[str, list[float]]:
    """Per-repeat fwd+bwd time ratios router / dense (amortised for scheduled routers)."""
    import torch

    from .profile import LayerConfig, run_layer_bench

    # one thread, like the regress preset's training: small ops on 2 threads swing 2-5x with other load
    torch.set_num_threads(1)
    names = sorted(set(routers) | {"dense"})
    bench = run_layer_bench(LayerConfig(**BENCH), names, naive=False, repeats=repeats, warmup=2, phases=False,
                            mem_repeats=1, log=log)
    series = ratio_series(bench)
    return {r: series[r] for r in routers if r in series}


def ratio_series(bench) -> dict[str, list[float]]:
    """router -> per-repeat t_router / t_dense at the same k (amortised over a router's variants)."""
    samples = {res.label: res.samples.get("fwd_bwd") for res in bench.results}
    out: dict[str, list[float]] = {}
    by_router: dict[str, list[Any]] = {}
    for res in bench.results:
        if res.kind == "moe":
            by_router.setdefault(res.router, []).append(res)
    for router, parts in by_router.items():
        k = parts[0].top_k
        dense = samples.get("dense" if k == bench.cfg.top_k else f"dense[k={k}]")
        if not dense:
            continue
        weighted = [p for p in parts if p.weight is not None]
        if len(weighted) >= 2:
            t = [sum(p.weight * p.samples["fwd_bwd"][i] for p in weighted) for i in range(len(dense))]
        else:
            main = next((p for p in parts if p.label == router), parts[0])
            t = main.samples["fwd_bwd"]
        out[router] = [a / b for a, b in zip(t, dense)]
    return out


# -- judging --------------------------------------------------------------------------------

def mann_whitney_greater(new: list[float], old: list[float]) -> float:
    """One-sided p-value that ``new`` tends to be larger than ``old``."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(new, old, alternative="greater").pvalue)


def judge(golden: dict[str, Any], quality: dict[str, dict[str, Any]], speed: dict[str, list[float]],
          min_effect: float = MIN_EFFECT) -> list[Check]:
    checks: list[Check] = []
    g_routers = golden.get("routers", {})
    for router in sorted(set(quality) | set(speed)):
        g = g_routers.get(router)
        if g is None:
            for metric in ([QUALITY_METRIC] if router in quality else []) + (["ratio_vs_dense"] if router in speed else []):
                checks.append(Check(router, metric, "NO-GOLDEN", None, None, "record it with --update"))
            continue
        if router in quality:
            q = quality[router]
            gq = g["quality"]
            seed = golden["seed"]
            val = q["values"].get(seed)
            if q["spec_hash"] != g["spec_hash"]:
                checks.append(Check(router, QUALITY_METRIC, "SPEC-CHANGED", val, gq["value"],
                                    f"spec hash {q['spec_hash']} != golden {g['spec_hash']}: the spec or router "
                                    f"defaults changed; re-record with `harness regress --update`"))
            elif val is None or q["status"].get(seed) != "finished":
                checks.append(Check(router, QUALITY_METRIC, "FAIL", val, gq["value"],
                                    f"run {q['status'].get(seed)}"))
            else:
                delta = val - gq["value"]
                ok = delta <= gq["tolerance"]  # lower is better: only getting worse fails
                checks.append(Check(router, QUALITY_METRIC, "pass" if ok else "FAIL", val, gq["value"],
                                    f"delta {delta:+.4f} (tolerance {gq['tolerance']:.4f})"))
        if router in speed and "throughput" in g and g["throughput"].get("bench", BENCH) != BENCH:
            checks.append(Check(router, "ratio_vs_dense", "SPEC-CHANGED", None, g["throughput"]["median"],
                                f"golden measured on bench {g['throughput']['bench']}, now {BENCH}; "
                                f"re-record with `harness regress --update`"))
        elif router in speed and "throughput" in g:
            new = speed[router]
            old = g["throughput"]["samples"]
            m_new, m_old = statistics.median(new), statistics.median(old)
            p = mann_whitney_greater(new, old)
            grew = m_new / m_old - 1
            bad = p < ALPHA and grew > min_effect
            checks.append(Check(router, "ratio_vs_dense", "FAIL" if bad else "pass", m_new, m_old,
                                f"{grew:+.1%} (p={p:.3g}; fails if p<{ALPHA} and >{min_effect:.0%})"))
    return checks


def make_golden(quality: dict[str, dict[str, Any]], speed: dict[str, list[float]], seeds: list[int],
                suite: str, preset: str, old: dict[str, Any] | None) -> dict[str, Any]:
    from .store import machine_info, package_versions

    routers = dict((old or {}).get("routers", {}))
    for router, q in quality.items():
        vals = [v for s, v in q["values"].items() if v is not None and q["status"][s] == "finished"]
        if len(vals) != len(seeds):
            raise GoldenError(f"cannot record a golden for {router}: not every seed finished ({q['status']})")
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        entry = {"spec_hash": q["spec_hash"],
                 "quality": {"metric": QUALITY_METRIC, "value": q["values"][seeds[0]],
                             "tolerance": max(2 * spread, MIN_TOLERANCE), "seed_values": vals,
                             "seed_std": spread}}
        if router in speed:
            entry["throughput"] = {"metric": "ratio_vs_dense", "samples": speed[router],
                                   "median": statistics.median(speed[router]), "bench": BENCH}
        routers[router] = entry
    m = machine_info()
    return {"version": GOLDEN_VERSION, "suite": suite, "preset": preset, "seed": seeds[0], "seeds": seeds,
            "versions": package_versions(), "machine": {k: m[k] for k in ("cpu", "threads", "gpu")},
            "routers": dict(sorted(routers.items()))}


def load_golden(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise GoldenError(f"no golden file at {path}; record one with `harness regress --update --baseline {path}`")
    try:
        g = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GoldenError(f"golden file {path} is not valid JSON ({exc}); re-record with --update") from exc
    if g.get("version") != GOLDEN_VERSION:
        raise GoldenError(f"golden file {path} has version {g.get('version')}, expected {GOLDEN_VERSION}; "
                          f"re-record with --update")
    return g


def print_checks(checks: list[Check], out=sys.stdout) -> None:
    import polars as pl

    df = pl.DataFrame([{"router": c.router, "metric": c.metric, "status": c.status, "value": c.value,
                        "golden": c.golden, "detail": c.detail} for c in checks])
    with pl.Config(tbl_rows=200, float_precision=4, tbl_width_chars=200, fmt_str_lengths=120):
        print(df, file=out)


# -- CLI ------------------------------------------------------------------------------------

def cmd_regress(args: argparse.Namespace) -> int:
    from .registry import get_router, router_names

    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    baseline = Path(args.baseline) if args.baseline else default_baseline(args.suite)
    old = load_golden(baseline) if (baseline.exists() or not args.update) else None
    routers = [r for r in (args.routers.split(",") if args.routers else router_names()) if r]
    for r in routers:
        get_router(r)
    moe_routers = [r for r in routers if not get_router(r).is_dense]
    seeds = [int(s) for s in args.seeds.split(",")] if args.update else [old["seed"]]
    quality = {} if args.skip_quality else measure_quality(routers, seeds, args.suite, args.preset, log)
    speed = {} if args.skip_speed else measure_throughput(moe_routers, args.repeats, log)
    if args.update:
        golden = make_golden(quality, speed, seeds, args.suite, args.preset, old)
        if old is not None:
            moved = judge(old, {r: {**q, "values": {old["seed"]: q["values"].get(old["seed"])}}
                                for r, q in quality.items()}, speed)
            print("what moved against the previous golden:")
            print_checks(moved)
        baseline.parent.mkdir(parents=True, exist_ok=True)
        baseline.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        print(f"golden written: {baseline} ({len(golden['routers'])} routers)")
        return 0
    checks = judge(old, quality, speed, args.min_effect)
    print_checks(checks)
    bad = [c for c in checks if c.status != "pass"]
    if bad:
        print(f"regress: {len(bad)} check(s) failed: " + ", ".join(f"{c.router}/{c.metric} {c.status}" for c in bad))
        return 1
    print(f"regress: all {len(checks)} checks passed")
    return 0


def register_cli(sub, store_arg) -> None:
    p = sub.add_parser("regress", help="quality + throughput regression against committed goldens")
    p.add_argument("--suite", default=DEFAULT_SUITE)
    p.add_argument("--preset", default=DEFAULT_PRESET)
    p.add_argument("--routers", default=None, help="comma-separated (default: every registered router)")
    p.add_argument("--baseline", default=None, help="golden JSON (default: tasks/regress/<suite>.json)")
    p.add_argument("--update", action="store_true", help="re-record the goldens and say what moved")
    p.add_argument("--seeds", default="0,1,2", help="seeds measured by --update for the tolerance")
    p.add_argument("--repeats", type=int, default=BENCH_REPEATS)
    p.add_argument("--min-effect", type=float, default=MIN_EFFECT)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_regress)
