"""Streamlit leaderboard: the data layer (leaderboard/store.py, stats, overview, tables) and the page
(leaderboard/app.py and leaderboard/tabs/).

The page is driven headlessly with ``streamlit.testing.v1.AppTest`` over a store filled by a real
tiny ``harness run`` (dense + smoe, two seeds each), plus a few hand-written rows for what a
tiny run does not produce: a failed and a diverged run, lm-eval task metrics and bench rows.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from datetime import date, timedelta
from pathlib import Path
from statistics import stdev

import polars as pl
import pytest
from scipy import stats

from harness.store import DEFAULT_STORE, Store, now
from leaderboard.formatting import fmt_ci, fmt_si, sig_text
from leaderboard.columns import board_columns
from leaderboard.overview import (VERDICT_HEADERS, display_best_cells, display_overview, overview,
                                  to_latex)
from leaderboard.runs import filter_runs, router_order, sort_by_router, status_counts
from leaderboard.stats import holm, mde, mean_ci, pareto_mask, significance, welch
from leaderboard.store import (HEALTH_COLUMNS, StoreBusy, StoreError, StoreMissing, load_health, load_metrics,
                               load_perf, load_routing, load_runs, resolve_store_path, store_state)
from leaderboard.suites import SUITES
from leaderboard.tables import lmeval_table, lmeval_wide, perf_table

# one worker runs this module: its module-scoped fixtures are built once (Makefile: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_leaderboard")

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "leaderboard" / "app.py"
ROUTERS = ("dense", "smoe")
SEEDS = (0, 1)
TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nRuntimeError: boom in router'


# -- fixtures -----------------------------------------------------------------------------------------

def add_extra_rows(store_path: str | Path) -> None:
    """What a tiny --no-eval run does not write: failed/diverged runs, lm-eval metrics, bench rows."""
    store = Store(store_path)
    runs = store_runs(store_path)
    tmpl = runs.filter(pl.col("router") == "smoe").row(0, named=True)
    for status, seed, err in (("failed", 7, TRACEBACK), ("diverged", 8, "non-finite loss (nan) at step 3")):
        row = {k: tmpl[k] for k in ("suite", "router", "spec_hash", "preset", "total_steps", "git_sha",
                                    "machine_id", "config", "versions")}
        row.update(run_id=f"{tmpl['run_id']}-{status}", seed=seed, status="running", step=0, started_at=now())
        store.start_run(row)
        store.finish_run(row["run_id"], status, 3, curves=[(0, "train_loss", 5.0), (1, "train_loss", 4.0)],
                         error=err)
    for r in runs.filter(pl.col("status") == "finished").iter_rows(named=True):
        base = 0.30 if r["router"] == "smoe" else 0.25
        store.add_metrics(r["run_id"], [
            {"name": "lmeval/shakespeare_cloze/acc", "value": base + 0.01 * r["seed"], "stderr": 0.02},
            {"name": "lmeval/shakespeare_ppl/word_perplexity", "value": 900.0 - 100 * base, "stderr": None},
        ])
    store.add_perf([
        {"bench_id": "bench-test-1", "machine_id": tmpl["machine_id"], "git_sha": tmpl["git_sha"], "router": r,
         "config": {"tokens": 4096, "d_model": 32}, "metric": m, "value": v, "spread": 0.1}
        for r, vals in (("dense", (1.0, 2.0)), ("smoe", (1.0, 3.0)))
        for m, v in zip(("ratio_vs_smoe", "fwd_bwd_ms"), vals)
    ])


def store_runs(path) -> pl.DataFrame:
    return load_runs(path)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    from harness.cli import main

    d = tmp_path_factory.mktemp("board")
    path = d / "h.duckdb"
    rc = main(["run", "--suite", "lm", "--preset", "tiny", "--routers", ",".join(ROUTERS),
               "--seeds", ",".join(map(str, SEEDS)), "--no-eval", "--quiet", "--store", str(path),
               "--runs-dir", str(d / "runs")])
    assert rc == 0
    add_extra_rows(path)
    return path


@pytest.fixture()
def fast_apptest(monkeypatch):
    """AppTest scans every installed distribution for Streamlit components on its first run
    (seconds on a loaded machine); the page uses none, so skip that scan."""
    try:
        import streamlit.components.v2.manifest_scanner as scanner

        monkeypatch.setattr(scanner, "scan_component_manifests", lambda *a, **k: [])
    except ImportError:
        pass


def app_for(store: Path | str, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HARNESS_STORE", str(store))
    at = AppTest.from_file(str(APP), default_timeout=60)
    return at


def overview_frame(at):
    frames = [df for df in at.dataframe if "vs SMoE" in list(df.value.columns)]
    assert frames, "overview table not rendered"
    return frames[0].value


def charts(at):
    return at.get("vega_lite_chart")


def chart_specs(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in charts(at)]


def texts(at) -> str:
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "code", "subheader", "title"):
        for e in getattr(at, kind):
            parts.append(str(e.value))
    return "\n".join(parts)


# -- statistics ---------------------------------------------------------------------------------------

def test_mean_ci_matches_hand_computation():
    # x = 1, 2, 3, 4: mean 2.5, sd = sqrt(5/3), t(0.975, 3) = 3.182446305
    mean, half, n = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert n == 4 and mean == pytest.approx(2.5)
    assert half == pytest.approx(3.182446305284263 * math.sqrt(5 / 3) / 2, rel=1e-9)
    assert half == pytest.approx(2.0543, abs=1e-4)
    # n = 2: t(0.975, 1) = 12.7062; x = 5.0, 5.2 -> sd = 0.141421, half = 12.7062 * 0.1 = 1.27062
    mean, half, n = mean_ci([5.0, 5.2])
    assert (mean, n) == (pytest.approx(5.1), 2) and half == pytest.approx(1.270620, abs=1e-5)


def test_mean_ci_small_and_dirty_inputs():
    assert mean_ci([]) == (None, None, 0)
    assert mean_ci([3.0]) == (3.0, None, 1)
    assert mean_ci([None, float("nan"), 2.0, 4.0])[:2][0] == pytest.approx(3.0)
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 0.0, 3)


def test_welch_marks():
    lower = [1.00, 1.01, 0.99, 1.00]
    higher = [1.50, 1.52, 1.49, 1.51]
    # lower-is-better metric (bpb): the lower sample is better than the baseline
    label, p = significance(lower, higher, higher_better=False)
    assert label == "better" and p < 0.001
    assert significance(higher, lower, higher_better=False)[0] == "worse"
    # higher-is-better metric (top-1): reversed
    assert significance(higher, lower, higher_better=True)[0] == "better"
    # overlapping samples
    label, p = significance([1.0, 1.2, 0.9], [1.1, 0.95, 1.05], higher_better=False)
    assert label == "within noise" and p > 0.05
    # one seed on either side: no test
    assert significance([1.0], higher, False) == ("n<2", None)
    assert significance(lower, [1.0], False) == ("n<2", None)
    # the p-value is scipy's Welch test
    from scipy import stats

    ref = stats.ttest_ind([1.0, 1.2, 0.9], [1.1, 0.95, 1.05], equal_var=False).pvalue
    assert p == pytest.approx(ref)
    assert "within noise" in sig_text("within noise", 0.5) and "p=0.50" in sig_text("within noise", 0.5)
    assert sig_text("better", 1e-5).startswith("▲") and "p<0.001" in sig_text("better", 1e-5)


def test_welch_constant_samples():
    assert welch([1.0, 1.0], [1.0, 1.0]) == (0.0, 1.0)
    t, p = welch([1.0, 1.0], [2.0, 2.0])
    assert p == 0.0 and t < 0


def test_pareto_mask():
    # throughput (higher better) vs bpb (lower better)
    xs = [100, 200, 150, 50]
    ys = [1.0, 1.2, 1.3, 0.9]
    assert pareto_mask(xs, ys, higher_y_better=False) == [True, True, False, True]
    assert pareto_mask([1, 2], [None, 1.0], False) == [False, True]


def test_formatting():
    assert fmt_ci(5.9225, 0.0872) == "5.923 ± 0.087"
    assert fmt_ci(5.9, None, 1) == "5.900 (n=1)"
    assert fmt_ci(None, None) == "—"
    assert fmt_si(70883.0) == "70.9k" and fmt_si(None) == "—"


def test_resolve_store_path(monkeypatch):
    monkeypatch.setenv("HARNESS_STORE", "b.duckdb")
    assert resolve_store_path(["--store", "a.duckdb"]) == "a.duckdb"
    assert resolve_store_path([]) == "b.duckdb"
    monkeypatch.delenv("HARNESS_STORE")
    assert resolve_store_path(["-q", "tests/x.py"]) == DEFAULT_STORE
    assert resolve_store_path(["--strict-markers"]) == DEFAULT_STORE  # no abbreviation matching


def synthetic(router_vals: dict[str, list[float]], suite: str = "lm",
              config=None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Runs and metrics frames; ``config(router)``, when given, is each run's stored spec (else none: no pairing)."""
    meta = SUITES[suite]
    runs, metrics = [], []
    for router, vals in router_vals.items():
        for seed, v in enumerate(vals):
            rid = f"{router}-{seed}"
            runs.append({"run_id": rid, "suite": suite, "router": router, "seed": seed, "status": "finished",
                         "spec_hash": f"h-{router}", "preset": "tiny", "machine": "m", "git_sha": "abc",
                         "started_at": None, **({"config": config(router)} if config else {})})
            tp = {"dense": 1000.0, "smoe": 500.0}.get(router, 400.0)
            metrics += [{"run_id": rid, "name": meta.quality, "value": v},
                        {"run_id": rid, "name": meta.test, "value": v + 0.1},
                        {"run_id": rid, "name": meta.throughput, "value": tp},
                        {"run_id": rid, "name": "peak_mem_mb", "value": 100.0}]
    runs_df = pl.DataFrame(runs, schema_overrides={"started_at": pl.Datetime("us")})
    return runs_df, pl.DataFrame(metrics)


def test_overview_ranks_ci_and_marks():
    runs, metrics = synthetic({"dense": [1.50, 1.52, 1.49], "smoe": [1.40, 1.41, 1.39], "xmoe": [1.30, 1.31, 1.29],
                               "moge": [1.405, 1.40, 1.39], "solo": [1.2]})
    extra = pl.DataFrame([{"run_id": "bad", "suite": "lm", "router": "xmoe", "seed": 9, "status": "diverged",
                           "spec_hash": "h-xmoe", "preset": "tiny", "machine": "m", "git_sha": "abc",
                           "started_at": None}], schema=runs.schema)
    runs = pl.concat([runs, extra])
    health = pl.DataFrame(schema=HEALTH_COLUMNS)
    ov = overview(runs, metrics, health, SUITES["lm"])
    assert ov["router"].to_list() == ["solo", "xmoe", "moge", "smoe", "dense"]  # bpb: lower first
    assert ov["rank"].to_list() == [1, 2, 3, 4, 5]
    row = {r["router"]: r for r in ov.iter_rows(named=True)}
    m, h, n = mean_ci([1.30, 1.31, 1.29])
    assert row["xmoe"]["quality_mean"] == pytest.approx(m) and row["xmoe"]["quality_ci"] == pytest.approx(h)
    assert row["xmoe"]["n"] == 3 and row["xmoe"]["diverged"] == 1  # the diverged run is counted, not averaged
    assert row["xmoe"]["sig_label"] == "better"
    assert row["dense"]["sig_label"] == "worse"
    assert row["moge"]["sig_label"] == "within noise"
    assert row["smoe"]["sig_label"] == "baseline"
    assert row["solo"]["sig_label"] == "n<2" and row["solo"]["quality_ci"] is None
    assert row["xmoe"]["vs_dense"] == pytest.approx(0.4) and row["xmoe"]["vs_smoe"] == pytest.approx(0.8)
    # no stored configs: nothing pairs, Welch; Holm over the three routers tested (solo has one seed)
    assert {r: row[r]["test"] for r in row} == {"solo": "n<2", "xmoe": "welch", "moge": "welch", "smoe": None,
                                                "dense": "welch"}
    tested = ["dense", "xmoe", "moge"]
    assert [row[r]["p_holm"] for r in tested] == pytest.approx(holm([row[r]["p_value"] for r in tested]))
    assert row["xmoe"]["p_value"] == pytest.approx(welch([1.30, 1.31, 1.29], [1.40, 1.41, 1.39])[1])
    assert row["xmoe"]["diff"] == pytest.approx(-0.10) and row["solo"]["p_holm"] is None
    assert row["moge"]["resolution"].startswith("within noise: effects under ")
    disp = display_overview(ov, SUITES["lm"])
    assert disp.columns[:8] == ["#", "router", "n", "val bpb ↓", "vs SMoE", "Δ vs SMoE", "test", "resolution"]
    x = disp.filter(pl.col("router") == "xmoe").row(0, named=True)
    assert x["test"] == "Welch" and x["Δ vs SMoE"].startswith("-0.100 ± ")
    assert x["vs SMoE"].startswith("▲ better (Welch p") and "Holm p" in x["vs SMoE"]
    assert disp.filter(pl.col("router") == "solo")["val bpb ↓"][0] == "1.200 (n=1)"
    assert disp.filter(pl.col("router") == "xmoe")["excluded"][0] == "1 diverged"
    best = display_best_cells(ov, SUITES["lm"])
    assert best["val bpb ↓"] == [0] and best["tok/s"] == [4]  # dense is fastest
    tex = to_latex(ov, SUITES["lm"])
    assert r"\toprule" in tex and r"\textbf{1.200}" in tex and "xmoe" in tex


def test_overview_pairs_by_seed_and_labels_on_holm():
    """One suite launched together: its runs pair by seed. xmoe 0.02 bpb below SMoE on every seed, moge
    0.015 below with more scatter, dense 0.05 above, hash level: moge's p < 0.05 alone, not after Holm."""
    cfg = json.dumps({"suite": "lm", "model": {"d_model": 32}, "train": {"steps": 30}, "seed": 0})
    smoe = [1.40, 1.50, 1.45, 1.42]  # seed-to-seed spread 0.04: Welch would see nothing below it
    vals = {"smoe": smoe,
            "dense": [v + d for v, d in zip(smoe, (0.05, 0.06, 0.04, 0.05))],
            "xmoe": [v - d for v, d in zip(smoe, (0.020, 0.021, 0.019, 0.020))],
            "moge": [v - d for v, d in zip(smoe, (0.005, 0.015, 0.025, 0.015))],  # t = 3.674, df 3: p = 0.035
            "hash": [v + d for v, d in zip(smoe, (0.01, -0.01, 0.0, 0.0))]}
    runs, metrics = synthetic(vals, config=lambda router: cfg)
    ov = overview(runs, metrics, pl.DataFrame(schema=HEALTH_COLUMNS), SUITES["lm"])
    row = {r["router"]: r for r in ov.iter_rows(named=True)}
    for r in ("dense", "xmoe", "moge", "hash"):
        assert row[r]["test"] == "paired" and row[r]["n_pairs"] == 4
        assert row[r]["p_value"] == pytest.approx(stats.ttest_rel(vals[r], smoe).pvalue)
    assert row["moge"]["diff"] == pytest.approx(-0.015)
    assert row["moge"]["p_value"] == pytest.approx(0.0348970, abs=1e-6)  # significant alone
    assert row["moge"]["p_holm"] == pytest.approx(2 * 0.0348970, abs=2e-6)  # third smallest of four: x 2
    assert row["moge"]["sig_label"] == "within noise" and row["xmoe"]["sig_label"] == "better"
    assert row["dense"]["sig_label"] == "worse" and row["hash"]["sig_label"] == "within noise"
    order = ["dense", "xmoe", "moge", "hash"]
    assert [row[r]["p_holm"] for r in order] == pytest.approx(holm([row[r]["p_value"] for r in order]))
    assert welch(vals["xmoe"], smoe)[1] > 0.3  # the same numbers unpaired: lost in the seed-to-seed spread
    m = row["moge"]
    assert m["mde"] == pytest.approx(mde(stdev([0.005, 0.015, 0.025, 0.015]), 4))
    assert m["resolution"] == (f"within noise: effects under {m['mde']:.3f} bpb undetectable at n = 4; "
                               f"0.01 bpb needs ≈ {m['n_needed']} seeds")
    cell = display_overview(ov, SUITES["lm"]).filter(pl.col("router") == "moge").row(0, named=True)
    assert cell["test"] == "paired, n = 4"
    assert cell["Δ vs SMoE"] == "-0.015 ± 0.013"  # t(0.975, 3) = 3.1824 x sd 0.008165 / sqrt(4) = 0.01299
    assert cell["vs SMoE"].startswith("≈ within noise (paired p=0.0") and ", Holm p=0.0" in cell["vs SMoE"]
    # one router's runs from another experiment (more steps): it falls back to Welch, the rest stay paired
    other = json.dumps({"suite": "lm", "model": {"d_model": 32}, "train": {"steps": 60}, "seed": 0})
    runs, metrics = synthetic(vals, config=lambda router: other if router == "xmoe" else cfg)
    row = {r["router"]: r for r in overview(runs, metrics, pl.DataFrame(schema=HEALTH_COLUMNS),
                                            SUITES["lm"]).iter_rows(named=True)}
    assert row["xmoe"]["test"] == "welch" and row["xmoe"]["sig_label"] == "within noise"
    assert row["dense"]["test"] == "paired"


def test_overview_vision_is_higher_better_and_no_smoe():
    runs, metrics = synthetic({"dense": [0.50, 0.52], "xmoe": [0.60, 0.61]}, suite="vision")
    ov = overview(runs, metrics, pl.DataFrame(schema=HEALTH_COLUMNS), SUITES["vision"])
    assert ov["router"].to_list() == ["xmoe", "dense"]  # top-1: higher first
    assert set(ov["sig_label"]) == {"no SMoE"}
    assert ov["vs_smoe"].null_count() == 2


def test_overview_vision_shows_top5_beside_top1():
    runs, metrics = synthetic({"dense": [0.50, 0.52], "smoe": [0.60, 0.62]}, suite="vision")
    top5 = pl.DataFrame([{"run_id": r, "name": "val_top5", "value": v}
                         for r, v in (("dense-0", 0.90), ("dense-1", 0.92), ("smoe-0", 0.95), ("smoe-1", 0.97))])
    meta = SUITES["vision"]
    ov = overview(runs, pl.concat([metrics, top5]), pl.DataFrame(schema=HEALTH_COLUMNS), meta)
    row = {r["router"]: r for r in ov.iter_rows(named=True)}
    assert row["smoe"]["extra_mean"] == pytest.approx(0.96) and row["dense"]["extra_mean"] == pytest.approx(0.91)
    disp = display_overview(ov, meta)
    assert meta.extra_header() == "val top-5 % ↑" and meta.extra_header() in disp.columns
    assert disp[meta.extra_header()].to_list()[0].startswith("96.0")  # percentage, smoe (ranked first)
    assert display_best_cells(ov, meta)[meta.extra_header()] == [0]
    assert "val top-5" not in " ".join(display_overview(overview(*synthetic({"smoe": [1.0]}), pl.DataFrame(
        schema=HEALTH_COLUMNS), SUITES["lm"]), SUITES["lm"]).columns)  # lm has no extra column


def test_filter_runs():
    runs, _ = synthetic({"dense": [1.0, 1.1], "smoe": [1.0]})
    runs = runs.with_columns(pl.lit(None, dtype=pl.Datetime("us")).alias("started_at"))
    assert filter_runs(runs, routers=["smoe"]).height == 1
    assert filter_runs(runs, spec_hashes=["h-dense"]).height == 2
    assert filter_runs(runs, suite="vision").height == 0
    assert filter_runs(runs).height == 3


def test_sort_by_router_puts_the_references_first():
    df = pl.DataFrame({"router": ["xmoe", "smoe", "dense", "moge", "smoe"], "seed": [0, 1, 0, 0, 0],
                       "setting": ["b", "a", "a", "a", "a"]})
    assert router_order(df["router"]) == ["dense", "smoe", "moge", "xmoe"]
    out = sort_by_router(df, "router", "seed")
    assert list(zip(out["router"], out["seed"])) == [("dense", 0), ("smoe", 0), ("smoe", 1), ("moge", 0), ("xmoe", 0)]
    assert sort_by_router(df, "setting", "router")["router"].to_list() == ["dense", "smoe", "smoe", "moge", "xmoe"]
    assert sort_by_router(df).columns == df.columns  # the rank column is dropped again


# -- loaders over the real store --------------------------------------------------------------------------

def test_loaders_read_the_real_store(store_path):
    assert store_state(store_path) == "ready"
    runs = load_runs(store_path)
    assert set(runs["router"]) == set(ROUTERS)
    assert status_counts(runs) == {"finished": 4, "diverged": 1, "failed": 1, "running": 0}
    assert runs["machine"].null_count() == 0
    meta = SUITES["lm"]
    metrics, health = load_metrics(store_path), load_health(store_path)
    ov = overview(runs, metrics, health, meta)
    assert ov["router"].to_list() and set(ov["router"]) == set(ROUTERS)
    row = {r["router"]: r for r in ov.iter_rows(named=True)}
    for r in ROUTERS:
        vals = metrics.join(runs.filter((pl.col("router") == r) & (pl.col("status") == "finished")), on="run_id") \
            .filter(pl.col("name") == "val_bpb")["value"].to_list()
        assert len(vals) == len(SEEDS)
        assert row[r]["quality_mean"] == pytest.approx(sum(vals) / len(vals))
        assert row[r]["n"] == len(SEEDS)
    assert row["smoe"]["failed"] == 1 and row["smoe"]["diverged"] == 1
    assert row["dense"]["vs_dense"] == pytest.approx(1.0) and row["smoe"]["vs_smoe"] == pytest.approx(1.0)
    assert row["smoe"]["load_entropy"] is not None and 0 < row["smoe"]["load_entropy"] <= 1
    assert row["dense"]["load_entropy"] is None  # no router, no routing health
    # health rows are unique per (run, step, layer, name) even though the final eval step is repeated
    assert health.group_by("run_id", "step", "layer", "name").len()["len"].max() == 1
    smoe_run = runs.filter((pl.col("router") == "smoe") & (pl.col("status") == "finished"))["run_id"][0]
    load = load_routing(store_path, smoe_run)
    assert load.height and load.group_by("layer").agg(pl.col("load").sum())["load"].to_list() == \
        pytest.approx([1.0] * load["layer"].n_unique())
    lm = lmeval_table(metrics, runs)
    assert set(lm["task"]) == {"shakespeare_cloze", "shakespeare_ppl"}
    ppl = lm.filter(pl.col("metric") == "word_perplexity")
    assert not ppl["higher_better"].any()
    wide, best = lmeval_wide(lm)
    assert wide["router"].to_list() == ["dense", "smoe"]
    assert best["shakespeare_cloze / acc"] == [1] and best["shakespeare_ppl / word_perplexity"] == [1]
    perf = load_perf(store_path)
    pt = perf_table(perf)
    assert set(pt.columns) >= {"candidate", "ratio_vs_smoe", "fwd_bwd_ms"} and pt.height == 2
    assert pt["fwd_bwd_ms"].to_list() == ["2.000 (IQR 0.100)", "3.000 (IQR 0.100)"]


def _lock_holder(path: Path) -> subprocess.Popen:
    """A writer in another process that holds the DuckDB lock on ``path`` until its stdin is closed."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys
        con = duckdb.connect({str(path)!r})
        print("locked", flush=True)
        sys.stdin.read()
        con.close()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _release(holder: subprocess.Popen) -> None:
    if not holder.stdin.closed:
        holder.stdin.close()


def test_connect_waits_for_a_writer_then_reads(store_path, tmp_path):
    """A writer in another process holds the DuckDB lock: the reader retries with backoff and says so, and
    reads once the writer lets go (released from the first retry, not after a fixed sleep)."""
    copy = tmp_path / "locked.duckdb"
    copy.write_bytes(Path(store_path).read_bytes())
    holder = _lock_holder(copy)
    try:
        waits = []

        def on_wait(attempt, secs):
            waits.append(attempt)
            _release(holder)

        assert store_state(copy, timeout=120, on_wait=on_wait) == "ready"
        assert waits, "the lock was never seen"
    finally:
        _release(holder)
        holder.wait(timeout=30)


def test_connect_gives_up_with_storebusy(store_path, tmp_path):
    copy = tmp_path / "locked2.duckdb"
    copy.write_bytes(Path(store_path).read_bytes())
    holder = _lock_holder(copy)
    try:
        with pytest.raises(StoreBusy, match="locked by a writer"):
            load_runs(copy, timeout=0.3)
    finally:
        _release(holder)
        holder.wait(timeout=30)


def test_missing_and_garbage_store(tmp_path):
    assert store_state(tmp_path / "nope.duckdb") == "missing"
    with pytest.raises(StoreMissing):
        load_runs(tmp_path / "nope.duckdb")
    bad = tmp_path / "bad.duckdb"
    bad.write_text("not a database")
    with pytest.raises(StoreError):
        store_state(bad)


# -- the page ------------------------------------------------------------------------------------------

def test_app_renders_overview_and_charts(store_path, monkeypatch, fast_apptest):
    at = app_for(store_path, monkeypatch).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error
    ov = overview_frame(at)
    assert sorted(ov["router"]) == sorted(ROUTERS)
    runs, metrics = load_runs(store_path), load_metrics(store_path)
    for r in ROUTERS:
        vals = metrics.join(runs.filter((pl.col("router") == r) & (pl.col("status") == "finished")),
                            on="run_id").filter(pl.col("name") == "val_bpb")["value"].to_list()
        mean, half, _ = mean_ci(vals)
        cell = ov.loc[ov["router"] == r, "val bpb ↓"].iloc[0]
        assert cell == fmt_ci(mean, half), cell
        assert ov.loc[ov["router"] == r, "n"].iloc[0] == len(SEEDS)
    assert ov.loc[ov["router"] == "smoe", "vs SMoE"].iloc[0] == "— baseline"
    dense_mark = ov.loc[ov["router"] == "dense", "vs SMoE"].iloc[0]
    assert ("within noise" in dense_mark) or ("better" in dense_mark) or ("worse" in dense_mark)
    # one `harness run` of both routers: the same spec outside the router, so dense pairs with smoe by seed
    assert ov.loc[ov["router"] == "dense", "test"].iloc[0] == "paired, n = 2"
    assert "paired p" in dense_mark and "Holm p" in dense_mark
    assert ov.loc[ov["router"] == "dense", "× dense"].iloc[0] == "1.00×"
    assert "1 diverged" in ov.loc[ov["router"] == "smoe", "excluded"].iloc[0]

    specs = chart_specs(at)
    titles = {(s.get("title") or {}).get("text") if isinstance(s.get("title"), dict) else s.get("title")
              for s in specs}
    assert {"Quality vs throughput", "val bpb by router", "val bpb during training", "Training loss (task)",
            "Routing fluctuation", "Load balance"} <= titles, titles
    assert any(str(t).startswith("Expert load · smoe") for t in titles), titles
    assert len(charts(at)) >= 8
    # status counts and the sidebar filters
    assert [m.value for m in at.metric][:2] == ["2", "4"]
    labels = [w.label for w in at.sidebar.multiselect]
    assert {"Routers", "Machine", "Git SHA", "Spec hash"} <= set(labels)
    assert [w.label for w in at.sidebar.date_input] == ["Started between"]
    # lm-eval and bench tables
    lm = [df.value for df in at.dataframe if "shakespeare_cloze / acc" in list(df.value.columns)]
    assert lm and list(lm[0]["router"]) == ["dense", "smoe"]
    perf = [df.value for df in at.dataframe if "fwd_bwd_ms" in list(df.value.columns)]
    assert perf and len(perf[0]) == 2
    assert r"\begin{tabular}" in texts(at)


def test_filters_change_rows(store_path, monkeypatch, fast_apptest):
    at = app_for(store_path, monkeypatch).run()
    smoe_hash = load_runs(store_path).filter(pl.col("router") == "smoe")["spec_hash"][0]
    at.sidebar.multiselect(key="specs").set_value([smoe_hash]).run()
    assert not at.exception
    assert list(overview_frame(at)["router"]) == ["smoe"]
    at.sidebar.multiselect(key="specs").set_value([]).run()  # empty = all again
    assert sorted(overview_frame(at)["router"]) == sorted(ROUTERS)
    at.sidebar.multiselect(key="routers").set_value(["dense"]).run()
    ov = overview_frame(at)
    assert list(ov["router"]) == ["dense"] and ov["vs SMoE"].iloc[0] == "no SMoE"
    at.sidebar.multiselect(key="routers").set_value([]).run()
    # a date range before every run: nothing left, and the page says so
    past = date.today() - timedelta(days=400)
    at.sidebar.date_input(key="dates").set_value((past, past + timedelta(days=1))).run()
    assert not at.exception
    assert not [df for df in at.dataframe if "vs SMoE" in list(df.value.columns)]
    assert any("No finished runs match" in w.value for w in at.warning)


def test_run_detail_shows_failed_traceback(store_path, monkeypatch, fast_apptest):
    at = app_for(store_path, monkeypatch).run()
    failed = load_runs(store_path).filter(pl.col("status") == "failed")["run_id"][0]
    at.selectbox(key="detail_run").set_value(failed).run()
    assert not at.exception
    assert any("RuntimeError: boom in router" in c.value for c in at.code)
    assert any(json.loads(j.value).get("suite") == "lm" for j in at.json if j.value.startswith("{"))
    assert any("torch" in j.value for j in at.json)  # versions


def test_app_waits_for_a_locked_store_and_says_so(store_path, tmp_path, monkeypatch, fast_apptest):
    import leaderboard.store as lstore

    copy = tmp_path / "busy.duckdb"
    copy.write_bytes(Path(store_path).read_bytes())
    holder = _lock_holder(copy)
    real = lstore.is_lock_error

    def lock_seen(exc):  # the page has met the lock: let the writer finish
        hit = real(exc)
        if hit:
            _release(holder)
        return hit

    monkeypatch.setattr(lstore, "is_lock_error", lock_seen)
    try:
        at = app_for(copy, monkeypatch).run()
    finally:
        _release(holder)
        holder.wait(timeout=30)
    assert not at.exception
    assert any("locked by a writer" in i.value for i in at.info), [i.value for i in at.info]
    assert sorted(overview_frame(at)["router"]) == sorted(ROUTERS)


def test_app_refresh_button(store_path, monkeypatch, fast_apptest):
    at = app_for(store_path, monkeypatch).run()
    at.sidebar.button(key="refresh").click().run()
    assert not at.exception and overview_frame(at) is not None


def test_empty_and_missing_store_pages(tmp_path, monkeypatch, fast_apptest):
    at = app_for(tmp_path / "none.duckdb", monkeypatch).run()
    assert not at.exception
    assert "harness run --suite lm" in "\n".join(c.value for c in at.code)
    assert any("No results store" in i.value for i in at.info)
    assert not (tmp_path / "none.duckdb").exists()  # the page never creates the store

    empty = tmp_path / "empty.duckdb"
    with Store(empty).writer():
        pass  # schema only, no runs
    at = app_for(empty, monkeypatch).run()
    assert not at.exception
    assert any("holds no runs" in i.value for i in at.info)
    assert "harness run --suite lm" in "\n".join(c.value for c in at.code)


def test_board_cli_builds_the_streamlit_command(monkeypatch, tmp_path):
    import harness.tools.board as board
    from harness.cli import build_parser

    seen = {}

    def fake_call(cmd, **kw):
        seen["cmd"] = cmd
        return 0

    monkeypatch.setattr(board.subprocess, "call", fake_call)
    args = build_parser().parse_args(["board", "--store", str(tmp_path / "x.duckdb"), "--port", "8765"])
    assert args.fn(args) == 0
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert Path(cmd[4]) == APP
    assert cmd[cmd.index("--server.port") + 1] == "8765"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    assert cmd[cmd.index("--") + 1:] == ["--store", str((tmp_path / "x.duckdb").resolve())]


# -- the overview's shape pinned (issue 32: its columns come from declarations; the board must not change) ------

def pinned_overview(suite: str):
    """An lm or vision store with every column filled: params, top-5, routing health on two layers, one seed alone."""
    vals = ({"dense": [1.50, 1.52], "smoe": [1.40, 1.42], "xmoe": [1.30, 1.31], "solo": [1.2]} if suite == "lm"
            else {"dense": [0.50, 0.52], "smoe": [0.60, 0.62], "xmoe": [0.65, 0.66]})
    runs, metrics = synthetic(vals, suite=suite)
    extra, health = [], []
    for i, rid in enumerate(runs["run_id"].to_list()):
        extra += [{"run_id": rid, "name": "params_total", "value": 1.5e6 + i},
                  {"run_id": rid, "name": "val_top5", "value": 0.9 + 0.01 * i}]
        for name, v in (("dead_experts", float(i % 3)), ("load_entropy", 0.9 - 0.01 * i),
                        ("max_over_mean_load", 1.5 + 0.1 * i), ("fluctuation_last_change", 0.1 * i)):
            health += [{"run_id": rid, "step": 30, "layer": layer, "name": name, "value": v} for layer in (0, 1)]
    meta = SUITES[suite]
    return overview(runs, pl.concat([metrics, pl.DataFrame(extra)]), pl.DataFrame(health, schema=HEALTH_COLUMNS),
                    meta), meta


OVERVIEW_COLUMNS = [
    "rank", "router", "n", "quality_mean", "quality_ci", "test_mean", "test_ci", "extra_mean", "extra_ci",
    "throughput", "throughput_ci", "vs_dense", "vs_smoe", "peak_mem_mb", "params", "dead_experts", "load_entropy",
    "max_over_mean_load", "fluctuation_last_change", "sig_label", "p_value", "significance", "test", "n_pairs",
    "p_holm", "diff", "diff_ci", "p_wilcoxon", "mde", "n_needed", "resolution", "diverged", "failed", "running",
    "duplicates", "spec_hashes", "seeds",
]
PINNED = {
    'lm': {
        "columns": ['#', 'router', 'n', 'val bpb ↓', 'vs SMoE', 'Δ vs SMoE', 'test', 'resolution', 'test bpb ↓', 'tok/s', '× dense', '× SMoE', 'peak MB', 'params', 'dead', 'entropy', 'max/mean', 'excluded'],
        "best": {'val bpb ↓': [0], 'test bpb ↓': [0], 'tok/s': [3], '× dense': [3], '× SMoE': [3], 'peak MB': [0, 1, 2, 3], 'dead': [0], 'entropy': [3], 'max/mean': [3]},
        "csv": [
            '#,router,n,val bpb ↓,vs SMoE,Δ vs SMoE,test,resolution,test bpb ↓,tok/s,× dense,× SMoE,peak MB,params,dead,entropy,max/mean,excluded',
            '1,solo,1,1.200 (n=1),n<2,-0.210,—,"",1.300 (n=1),400,0.40×,0.80×,100,1.5M,0.0,0.840,2.10,""',
            '2,xmoe,2,1.305 ± 0.064,"▲ better (Welch p=0.027, Holm p=0.039)",-0.105 ± 0.069,Welch,effects under 0.063 bpb undetectable at n = 2; 0.01 bpb needs ≈ 21 seeds,1.405 ± 0.064,400,0.40×,0.80×,100,1.5M,3.0,0.855,1.95,""',
            '3,smoe,2,1.41 ± 0.13,— baseline,—,—,"",1.51 ± 0.13,500,0.50×,1.00×,100,1.5M,2.0,0.875,1.75,""',
            '4,dense,2,1.51 ± 0.13,"▼ worse (Welch p=0.019, Holm p=0.039)",+0.100 ± 0.061,Welch,effects under 0.080 bpb undetectable at n = 2; 0.01 bpb needs ≈ 33 seeds,1.61 ± 0.13,1k,1.00×,2.00×,100,1.5M,1.0,0.895,1.55,""',
        ],
        "latex": [
            '\\begin{tabular}{lrllrrr}',
            '\\toprule',
            'Router & $n$ & val bpb $\\downarrow$ & test bpb & tok/s & $\\times$ SMoE & load entropy \\\\',
            '\\midrule',
            'solo & 1 & \\textbf{1.200} & \\textbf{1.300} & 400 & 0.80$\\times$ & 0.840 \\\\',
            'xmoe & 2 & 1.305 $\\pm$ 0.064$^\\blacktriangle$ & 1.405 $\\pm$ 0.064 & 400 & 0.80$\\times$ & 0.855 \\\\',
            'smoe & 2 & 1.41 $\\pm$ 0.13 & 1.51 $\\pm$ 0.13 & 500 & 1.00$\\times$ & 0.875 \\\\',
            'dense & 2 & 1.51 $\\pm$ 0.13$^\\blacktriangledown$ & 1.61 $\\pm$ 0.13 & \\textbf{1k} & \\textbf{2.00$\\times$} & \\textbf{0.895} \\\\',
            '\\bottomrule',
            '\\end{tabular}',
        ],
    },
    'vision': {
        "columns": ['#', 'router', 'n', 'val top-1 % ↑', 'vs SMoE', 'Δ vs SMoE', 'test', 'resolution', 'test top-1 % ↑', 'val top-5 % ↑', 'img/s', '× dense', '× SMoE', 'peak MB', 'params', 'dead', 'entropy', 'max/mean', 'excluded'],
        "best": {'val top-1 % ↑': [0], 'test top-1 % ↑': [0], 'val top-5 % ↑': [0], 'img/s': [2], '× dense': [2], '× SMoE': [2], 'peak MB': [0, 1, 2], 'dead': [2], 'entropy': [2], 'max/mean': [2]},
        "csv": [
            '#,router,n,val top-1 % ↑,vs SMoE,Δ vs SMoE,test,resolution,test top-1 % ↑,val top-5 % ↑,img/s,× dense,× SMoE,peak MB,params,dead,entropy,max/mean,excluded',
            '1,xmoe,2,65.5 ± 6.4,"≈ within noise (Welch p=0.092, Holm p=0.092)",+4.5 ± 6.9,Welch,within noise: effects under 6.3 pp undetectable at n = 2; 1 pp needs ≈ 21 seeds,75.5 ± 6.4,94.5 ± 6.4,400,0.40×,0.80×,100,1.5M,3.0,0.855,1.95,""',
            '2,smoe,2,61.0 ± 12.7,— baseline,—,—,"",71.0 ± 12.7,92.5 ± 6.4,500,0.50×,1.00×,100,1.5M,2.0,0.875,1.75,""',
            '3,dense,2,51.0 ± 12.7,"▼ worse (Welch p=0.019, Holm p=0.039)",-10.0 ± 6.1,Welch,effects under 8.0 pp undetectable at n = 2; 1 pp needs ≈ 33 seeds,61.0 ± 12.7,90.5 ± 6.4,1k,1.00×,2.00×,100,1.5M,1.0,0.895,1.55,""',
        ],
        "latex": [
            '\\begin{tabular}{lrllrrr}',
            '\\toprule',
            'Router & $n$ & val top-1 (\\%) $\\uparrow$ & test top-1 (\\%) & img/s & $\\times$ SMoE & load entropy \\\\',
            '\\midrule',
            'xmoe & 2 & \\textbf{65.5 $\\pm$ 6.4} & \\textbf{75.5 $\\pm$ 6.4} & 400 & 0.80$\\times$ & 0.855 \\\\',
            'smoe & 2 & 61.0 $\\pm$ 12.7 & 71.0 $\\pm$ 12.7 & 500 & 1.00$\\times$ & 0.875 \\\\',
            'dense & 2 & 51.0 $\\pm$ 12.7$^\\blacktriangledown$ & 61.0 $\\pm$ 12.7 & \\textbf{1k} & \\textbf{2.00$\\times$} & \\textbf{0.895} \\\\',
            '\\bottomrule',
            '\\end{tabular}',
        ],
    },
}


@pytest.mark.parametrize("suite", ["lm", "vision"])
def test_the_overview_table_is_pinned(suite):
    """Columns, headers, order, cell formats, best-cell marks, CSV and LaTeX of the overview, as the board showed
    them before its fixed columns (quality, test, extra, throughput, x dense, x SMoE) came from declarations."""
    ov, meta = pinned_overview(suite)
    assert ov.columns == OVERVIEW_COLUMNS
    disp = display_overview(ov, meta)
    want = PINNED[suite]
    assert disp.columns == want["columns"]
    assert disp.write_csv().splitlines() == want["csv"]
    assert display_best_cells(ov, meta) == want["best"]
    assert to_latex(ov, meta).splitlines() == want["latex"]
    empty_disp = display_overview(ov.clear(), meta)
    assert empty_disp.columns == want["columns"] and empty_disp.height == 0
    # the page's tooltips of the metric columns, as tabs/overview.py wrote them out before (leaderboard.columns)
    helps = {c.header: c.help for c in board_columns(meta) if c.shown}
    assert list(helps) == [h for h in want["columns"] if h not in ("#", "router", "n", "excluded", *VERDICT_HEADERS)]
    assert {h: helps[h] for h in helps if h not in ("peak MB", "params", "dead", "entropy", "max/mean")} == {
        meta.quality_header(): "mean ± 95% CI (Student t over seeds)",
        meta.test_header(): "test split, mean ± 95% CI",
        **({meta.extra_header(): "val_top5 on the whole validation split, mean ± 95% CI"} if meta.extra else {}),
        f"{meta.unit}/s": "training throughput, mean",
        "× dense": "throughput relative to the dense baseline",
        "× SMoE": "throughput relative to SMoE (<1× = routing overhead over SMoE)"}
    assert helps["entropy"] == "expert-load entropy / log E at the final evaluation (1 = uniform)"
