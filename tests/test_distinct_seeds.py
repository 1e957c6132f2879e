"""No pseudo-replication (issue 21, part 4): a finished (spec hash, seed) is not trained twice unless
``--rerun``, and every statistic on the board counts one run per spec hash and seed (the latest)."""
from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl
import pytest

from harness.cli import main
from leaderboard.overview import display_overview, overview
from leaderboard.stats import distinct_seeds, duplicate_counts, mean_ci
from leaderboard.store import HEALTH_COLUMNS, load_health, load_metrics, load_runs
from leaderboard.suites import SUITES
from storeq import TINY
from storeq import q as sql

STEPS = ["--set", "train.steps=8", "--set", "train.eval_every=4"]


def test_second_run_is_skipped_rerun_adds_a_copy_the_board_counts_once(tmp_path, capsys):
    store = tmp_path / "h.duckdb"
    args = ["run", "--suite", "lm", "--routers", "smoe", "--seeds", "0", "--store", str(store), *TINY, *STEPS]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0  # nothing to do is success
    err = capsys.readouterr().err
    skips = [ln for ln in err.splitlines() if ln.startswith("skip ")]
    assert len(skips) == 1, err
    assert "router=smoe seed=0" in skips[0] and "already finished" in skips[0] and "--rerun" in skips[0]
    assert "val_bpb=" in skips[0]
    assert sql(store, "SELECT count(*) FROM runs") == [(1,)]

    assert main([*args, "--rerun"]) == 0
    assert "skip " not in capsys.readouterr().err
    rows = sql(store, "SELECT spec_hash, seed, status FROM runs")
    assert len(rows) == 2 and len(set(rows)) == 1  # two finished copies of one (spec, seed)
    runs, metrics = load_runs(store), load_metrics(store)
    kept, dropped = distinct_seeds(runs)
    assert dropped == 1 and kept.height == 1
    assert kept["run_id"][0] == runs.sort("finished_at")["run_id"][-1]  # the latest finished
    ov = overview(runs, metrics, load_health(store), SUITES["lm"])
    row = ov.row(0, named=True)
    assert row["n"] == 1 and row["quality_ci"] is None and row["duplicates"] == 1
    assert "1 duplicate" in display_overview(ov, SUITES["lm"])["excluded"][0]


def _runs(rows: list[tuple[str, str, int, float, int]]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(run_id, router, seed, value, minutes after t0 it finished) -> runs and metrics frames."""
    t0 = datetime(2026, 1, 1)
    runs = pl.DataFrame([{"run_id": rid, "suite": "lm", "router": r, "spec_hash": f"h-{r}", "seed": s,
                          "status": "finished", "preset": "tiny", "machine": "m", "git_sha": "abc",
                          "started_at": t0 + timedelta(minutes=m - 1), "finished_at": t0 + timedelta(minutes=m)}
                         for rid, r, s, _, m in rows])
    metrics = pl.DataFrame([{"run_id": rid, "name": "val_bpb", "value": v} for rid, _, _, v, _ in rows])
    return runs, metrics


def test_copies_do_not_shrink_the_ci_or_invent_significance():
    # the inflation: identical copies of ONE seed per router marked every router "better (p<0.001)"
    rows = [(f"smoe-{i}", "smoe", 0, 3.50, i) for i in range(50)] + \
           [(f"xmoe-{i}", "xmoe", 0, 3.40, i) for i in range(50)]
    runs, metrics = _runs(rows)
    ov = overview(runs, metrics, pl.DataFrame(schema=HEALTH_COLUMNS), SUITES["lm"])
    x = {r["router"]: r for r in ov.iter_rows(named=True)}["xmoe"]
    assert x["n"] == 1 and x["quality_ci"] is None and x["sig_label"] == "n<2" and x["duplicates"] == 49
    # two distinct seeds, each run three times: n = 2 and the CI of the two distinct values (not 0)
    rows = [(f"s0-{i}", "smoe", 0, 3.50, i) for i in range(3)] + [(f"s1-{i}", "smoe", 1, 3.54, i) for i in range(3)]
    runs, metrics = _runs(rows)
    ov = overview(runs, metrics, pl.DataFrame(schema=HEALTH_COLUMNS), SUITES["lm"])
    r = ov.row(0, named=True)
    mean, half, n = mean_ci([3.50, 3.54])
    assert r["n"] == n == 2 and r["quality_mean"] == pytest.approx(mean)
    assert r["quality_ci"] == pytest.approx(half) and r["quality_ci"] > 0
    assert half == pytest.approx(12.7062047 * 0.02, rel=1e-6)  # t(.975, 1) * sd / sqrt(2), sd = 0.04 / sqrt(2)


def test_latest_finished_copy_is_the_one_kept():
    runs, metrics = _runs([("old", "smoe", 0, 3.6, 1), ("new", "smoe", 0, 3.5, 5), ("mid", "smoe", 0, 3.7, 3),
                           ("other", "smoe", 1, 3.55, 2)])
    unfinished = runs.filter(pl.col("run_id") == "old").with_columns(
        pl.lit("x").alias("run_id"), pl.lit("diverged").alias("status"))
    kept, dropped = distinct_seeds(pl.concat([runs, unfinished]))
    assert dropped == 2
    assert sorted(kept["run_id"]) == ["new", "other", "x"]  # unfinished runs stay (they are only counted)
    assert duplicate_counts(runs) == {"smoe": 2}
    assert distinct_seeds(kept.filter(pl.col("status") == "finished"))[1] == 0
