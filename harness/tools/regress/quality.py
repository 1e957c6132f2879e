"""Quality side of ``harness regress``: train each router on the fixed ``regress`` spec and summarise it.

One run = one router x one seed of suite ``lm``, preset ``regress`` (a model that
learns real structure: every router's golden val_bpb is below 3.0 bits/byte on the
shipped corpus). Besides the validation bits/byte, a run is summarised by what its
routing looked like, because a subtly broken router (weights not renormalised, a
balance loss with the wrong sign or gone, a stage that never starts, a
competition that never happens, a penalty switched off) can leave bits/byte
almost unmoved while its routing changes plainly:

* health at the final evaluation, mean over MoE layers (``harness.training.health``):
  ``load_entropy``, ``max_over_mean_load``, ``dead_experts`` (summed),
  ``weight_sum`` (mean per-token combine-weight mass);
* each router's own signature: the mean over the second half of training of every
  ``aux/<loss>`` and ``stat/<name>`` curve it logs — StableMoE's ``stat/stage``,
  CompeteSMoE's ``stat/competed``, MoGE's penalty ``aux/...``, the balance loss.

Runs go to a throw-away store, in parallel worker processes (``harness.training.parallel``)
or, with ``jobs=1``, in this process (so a test can monkeypatch a router).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import duckdb

from ...spec import load_suite
from ...store import Store
from ...suites import get_adapter
from ...training.loop import train_run
from ...training.parallel import Failed, run_parallel

QUALITY_METRIC = "val_bpb"          # lower is better
HEALTH = ("load_entropy", "max_over_mean_load", "dead_experts", "weight_sum")
SIGNATURE_PREFIXES = ("aux/", "stat/")


def summarise_store(db: Path, run_id: str) -> dict[str, float]:
    """Health at the last evaluation (layer means; dead experts summed) and signature means of one run."""

    con = duckdb.connect(str(db), read_only=True)
    try:
        out: dict[str, float] = {}
        rows = con.execute(
            "SELECT name, CASE WHEN name = 'dead_experts' THEN sum(value) ELSE avg(value) END FROM routing_health "
            "WHERE run_id = ? AND step = (SELECT max(step) FROM routing_health WHERE run_id = ?) "
            "AND name IN (SELECT unnest(?)) GROUP BY name", [run_id, run_id, list(HEALTH)]).fetchall()
        out.update({name: float(v) for name, v in rows})
        total = con.execute("SELECT total_steps FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
        rows = con.execute(
            "SELECT name, avg(value) FROM curves WHERE run_id = ? AND step >= ? AND "
            "(name LIKE 'aux/%' OR name LIKE 'stat/%') GROUP BY name", [run_id, total // 2]).fetchall()
        out.update({f"sig:{name}": float(v) for name, v in rows})
    finally:
        con.close()
    return out


def run_one(item: tuple[str, int, str, str, tuple[str, ...], str], log: Callable[[str], None]) -> dict[str, Any]:
    """Train one (router, seed) of the regress spec into its own store under ``tmp``; its summary."""

    router, seed, suite, preset, overrides, tmp = item
    spec = load_suite(suite, preset=preset, routers=[router], seeds=[seed],
                      overrides=["eval.enabled=false", *overrides])
    (run,) = spec.runs()
    db = Path(tmp) / f"{router.replace('@', '_')}-{seed}.duckdb"  # one store per run: no lock waits
    t0 = time.perf_counter()
    res = train_run(run, get_adapter(spec.suite), Store(db), Path(tmp) / "runs", progress=False,
                    log=lambda s: None)
    seconds = time.perf_counter() - t0
    values = {QUALITY_METRIC: res.metrics.get(QUALITY_METRIC)} if res.status == "finished" else {}
    if res.status == "finished":
        values.update(summarise_store(db, res.run_id))
    log(f"regress: {router} seed {seed}: {res.status} {QUALITY_METRIC}={res.metrics.get(QUALITY_METRIC)}")
    return {"router": router, "seed": seed, "spec_hash": run.spec_hash, "status": res.status, "seconds": seconds,
            "error": (res.error or "").strip().splitlines()[-1:] or None, "values": values}


def measure_quality(routers: list[str], seeds: list[int], suite: str, preset: str, jobs: int,
                    log: Callable[[str], None], overrides: tuple[str, ...] = (),
                    cost: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """router -> {"spec_hash", "status": {seed: status}, "values": {seed: {metric: value}}, "seconds"}.

    ``cost`` (router -> seconds one run took when the golden was recorded) orders the runs longest
    first, so the last worker to finish is not the one that drew the slowest router.
    """

    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="harness-regress-") as tmp:
        order = sorted(routers, key=lambda r: -(cost or {}).get(r, 0.0))
        items = [(r, s, suite, preset, tuple(overrides), tmp) for r in order for s in seeds]
        if jobs <= 1:
            results = [run_one(item, log) for item in items]
        else:
            results = run_parallel(items, min(jobs, len(items)), run_one, log=log)
        for item, res in zip(items, results):
            router, seed = item[0], item[1]
            entry = out.setdefault(router, {"spec_hash": None, "status": {}, "values": {}, "errors": {}})
            if isinstance(res, Failed):
                entry["status"][seed] = "failed"
                entry["errors"][seed] = res.error.strip().splitlines()[-1] if res.error else "worker failed"
                continue
            entry["spec_hash"] = res["spec_hash"]
            entry["status"][seed] = res["status"]
            entry["values"][seed] = res["values"]
            entry.setdefault("seconds", []).append(res["seconds"])
            if res.get("error"):
                entry["errors"][seed] = res["error"][0]
    return out
