"""Result bundles (issue 34): a run's rows as Parquet + a manifest beside its checkpoint; ``harness run
--store-mode bundles`` (no database file opened), ``harness import`` / ``harness export``, a board over many
sources, and bundles that are refused (data, never code)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.bundles import MANIFEST, TABLES, BundleStore, bundle_path, read_bundle, write_bundle
from harness.bundles.format import SCHEMAS
from harness.bundles.ingest import run_tables
from harness.bundles.sources import merge_sources
from harness.cli import main
from harness.store import SCHEMA_VERSION, Store
from leaderboard.overview import overview
from leaderboard.store import load_health, load_metrics, load_runs
from leaderboard.suites import SUITES
from storeq import TINY, q

# one worker: the module fixture trains once (Makefile: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_bundles")

DET = ["--set", "train.threads=1", "--jobs", "1"]  # same numbers in any process (threads=1)
# columns of the overview that are timings, not results: they differ between any two runs of one spec
TIMED = ("throughput", "throughput_ci", "vs_dense", "vs_smoe", "peak_mem_mb")


def _bundle_run(router: str, seed: int, runs_dir: Path, store: Path, lock_log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_LOCK_LOG": str(lock_log)}
    argv = [sys.executable, "-m", "harness.cli", "run", "--suite", "lm", *TINY, *DET, "--routers", router,
            "--seeds", str(seed), "--store-mode", "bundles", "--runs-dir", str(runs_dir), "--store", str(store)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _table(store) -> pl.DataFrame:
    ov = overview(load_runs(store), load_metrics(store), load_health(store), SUITES["lm"])
    return ov.drop(*TIMED).sort("router")


def _rows(store, table: str) -> list[tuple]:
    cols = [c for c, _ in TABLES[table]]
    return sorted(q(store, f"SELECT {', '.join(cols)} FROM {table}"), key=repr)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two concurrent bundles-mode processes (smoe, dense; seed 0) into one runs directory, and the same two runs
    written to one shared store by one ``harness run`` (the reference)."""
    t = tmp_path_factory.mktemp("bundles")
    runs, never, log = t / "runs", t / "never.duckdb", t / "locks.log"
    t0 = time.monotonic()
    procs = [_bundle_run(r, 0, runs, never, log) for r in ("smoe", "dense")]
    outs = [p.communicate(timeout=600) for p in procs]
    wall = time.monotonic() - t0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    shared = t / "shared" / "h.duckdb"
    assert main(["run", "--suite", "lm", *TINY, *DET, "--routers", "smoe,dense", "--seeds", "0",
                 "--store", str(shared)]) == 0
    return {"t": t, "runs": runs, "never": never, "log": log, "shared": shared, "wall": wall, "outs": outs}


def test_bundle_columns_are_the_stores(tmp_path):
    s = Store(tmp_path / "x.duckdb")
    with s.writer() as con:
        for table, cols in TABLES.items():
            got = con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                              "ORDER BY ordinal_position", [table]).fetchall()
            kind = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.float64(): "DOUBLE",
                    pa.timestamp("us"): "TIMESTAMP"}
            assert got == [(c, kind[ty]) for c, ty in cols], table


def test_two_bundle_processes_never_open_the_store_and_import_equals_the_shared_store(two, capsys):
    runs, never = two["runs"], two["never"]
    assert not never.exists() and not Path(str(never) + ".wal").exists()  # no database file was opened
    assert not two["log"].exists()  # no lock wait: nothing to lock
    assert "harness import" in two["outs"][0][0]
    manifests = sorted(runs.glob("lm-*-s0/bundles/*/manifest.json"))
    assert len(manifests) == 2
    for m in manifests:
        man = json.loads(m.read_text())
        assert man["status"] == "finished" and man["schema_version"] == SCHEMA_VERSION
        assert {p.name for p in m.parent.iterdir()} == {MANIFEST, *(f"{t}.parquet" for t in TABLES)}
    assert not list(runs.rglob(".*tmp-*")) and not list(runs.rglob(".*old-*"))  # no temporaries left behind

    store = two["t"] / "imported.duckdb"
    assert main(["import", str(runs), "--store", str(store), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().startswith("import: 2 imported, 0 updated, 0 already present, 0 refused")
    before = {t: _rows(store, t) for t in TABLES}
    # the board's overview table is the one of the shared store (timings aside)
    assert _table(store).equals(_table(two["shared"]))
    shared_n = {t: len(_rows(two["shared"], t)) for t in TABLES}
    assert {t: len(v) for t, v in before.items()} == shared_n
    # importing again (the runs directory, a glob of its run directories, a bundle itself) adds nothing
    assert main(["import", str(runs), str(runs / "lm-*"), str(manifests[0].parent), "--store", str(store),
                 "--quiet"]) == 0
    assert "0 imported, 0 updated, 2 already present, 0 refused" in capsys.readouterr().out
    assert {t: _rows(store, t) for t in TABLES} == before
    # a finished (spec, seed) in the runs directory is skipped by the next bundles-mode run, as in a store
    assert main(["run", "--suite", "lm", *TINY, *DET, "--routers", "smoe", "--seeds", "0", "--store-mode", "bundles",
                 "--runs-dir", str(runs), "--store", str(never)]) == 0
    assert "already finished" in capsys.readouterr().err and not never.exists()


def test_store_mode_also_writes_each_runs_bundle_and_export_import_round_trips(two, tmp_path, capsys):
    shared = two["shared"]
    ids = [r[0] for r in q(shared, "SELECT run_id FROM runs ORDER BY run_id")]
    con = duckdb.connect(str(shared), read_only=True)
    try:
        for rid in ids:  # the default store mode mirrored every write into the run's bundle
            b = read_bundle(bundle_path(shared.parent / "runs", rid))
            want = run_tables(con, rid)
            for t in TABLES:
                got, exp = b.tables[t], want[t]
                if t == "machines":
                    got, exp = got.drop_columns(["first_seen"]), exp.drop_columns(["first_seen"])
                assert got.equals(exp), (rid, t)
    finally:
        con.close()
    out = tmp_path / "outbox"
    assert main(["export", "--store", str(shared), "--to", str(out), "--quiet"]) == 0
    assert "export: 2 bundles" in capsys.readouterr().out
    empty = tmp_path / "empty.duckdb"
    assert main(["import", str(out), "--store", str(empty), "--quiet"]) == 0
    for t in TABLES:
        assert _rows(empty, t) == _rows(shared, t), t  # every row of every table, timestamps included
    one = tmp_path / "one"
    assert main(["export", "--store", str(shared), "--routers", "dense", "--to", str(one), "--quiet"]) == 0
    assert [p.name for p in one.iterdir()] == [i for i in ids if "-dense-" in i]
    assert main(["export", ids[0][:-3], "--store", str(shared), "--to", str(one), "--quiet"]) == 0  # a prefix


def test_board_over_a_store_and_a_bundle_dir_flags_copies_and_counts_them_once(two, tmp_path):
    merged = tmp_path / "board.duckdb"
    counts = merge_sources(merged, [str(two["shared"])], [str(two["runs"])], log=lambda s: None)
    assert counts == {"runs": 4, "repeated": 0, "refused": 0}
    runs = load_runs(merged)
    assert sorted(set(runs["origin"])) == sorted([str(two["shared"]), str(two["runs"])])
    assert runs["cross_origin"].all()  # each (spec hash, seed) is in both sources
    ov = _table(merged)
    assert ov["n"].to_list() == [1, 1] and ov["duplicates"].to_list() == [1, 1]  # not double-counted
    assert ov.drop("duplicates").equals(_table(two["shared"]).drop("duplicates"))
    # the same run ids from a second source: one row each, the other source named
    export = tmp_path / "outbox"
    assert main(["export", "--store", str(two["shared"]), "--to", str(export), "--quiet"]) == 0
    merged2 = tmp_path / "board2.duckdb"
    counts = merge_sources(merged2, [str(two["shared"])], [str(export)], log=lambda s: None)
    assert counts == {"runs": 2, "repeated": 2, "refused": 0}
    r2 = load_runs(merged2)
    assert r2.height == 2 and set(r2["also_in"]) == {str(export)} and r2["cross_origin"].all()
    # a single store on its own: no origin, nothing flagged
    assert not load_runs(two["shared"])["cross_origin"].any()


def test_jobs_workers_write_bundles_with_their_lm_eval_metrics(tmp_path):
    """--jobs 2 workers in bundles mode: each worker's run and its lm-eval after pretraining land in its bundle."""
    never, runs = tmp_path / "never.duckdb", tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_LOCK_LOG": str(tmp_path / "locks.log")}
    p = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--suite", "lm", "--preset", "tiny", "--quiet",
                        "--routers", "smoe,dense", "--seeds", "0", "--jobs", "2", "--store-mode", "bundles",
                        "--store", str(never)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not never.exists() and not (tmp_path / "locks.log").exists()
    manifests = sorted(runs.glob("*/bundles/*/manifest.json"))
    assert len(manifests) == 2
    for m in manifests:
        names = read_bundle(m.parent).tables["metrics"].column("name").to_pylist()
        assert "val_bpb" in names and any(n.startswith("lmeval/") for n in names), names


def test_the_page_over_merged_sources_shows_origins_and_the_flag(two, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    try:  # the page uses no components: skip AppTest's scan of every installed distribution (as test_leaderboard)
        import streamlit.components.v2.manifest_scanner as scanner

        monkeypatch.setattr(scanner, "scan_component_manifests", lambda *a, **k: [])
    except ImportError:
        pass
    merged = tmp_path / "board.duckdb"
    merge_sources(merged, [str(two["shared"])], [str(two["runs"])], log=lambda s: None)
    monkeypatch.setenv("HARNESS_STORE", str(merged))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "leaderboard" / "app.py"),
                           default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Origin" in [m.label for m in at.sidebar.multiselect]
    text = "\n".join(str(e.value) for kind in ("markdown", "caption") for e in getattr(at, kind))
    assert "4 runs found in more than one source" in text
    assert "origin `" in text and "counted once" in text
    at.sidebar.multiselect(key="origins").select(str(two["runs"])).run()  # one origin: no copies left
    assert not at.exception, [e.value for e in at.exception]
    text = "\n".join(str(e.value) for e in at.caption)
    assert "duplicate run" not in text


# -- a bundle from synthetic rows: the store interface on bundles, refusals, injection ---------------------------

RID = "lm-smoe-0123456789-s0-abcdef"
MACHINE = {"machine_id": "m1", "hostname": "h", "cpu": "c", "threads": 1, "gpu": None, "platform": "p",
           "python": "3"}


def _drive(store) -> None:
    """One run's life through the store interface: start, progress, resume, finish, lm-eval metrics."""
    store.register_machine(MACHINE)
    store.start_run({"run_id": RID, "suite": "lm", "router": "smoe", "spec_hash": "0123456789abcdef", "seed": 0,
                     "preset": "tiny", "status": "running", "step": 0, "total_steps": 20, "git_sha": "abc",
                     "machine_id": "m1", "started_at": datetime(2026, 1, 1), "config": "{}", "versions": "{}"})
    store.update_progress(RID, 10, [(s, "train_loss", 5.0 - s / 10) for s in range(10)] + [(10, "val_bpb", 4.0)])
    store.update_progress(RID, 15, [(s, "train_loss", 4.0) for s in range(10, 16)])
    store.mark_interrupted(RID, 15, "stopped")
    store.truncate_after(RID, 10)  # --resume from the step-10 checkpoint
    store.finish_run(RID, "finished", 20, metrics=[{"name": "val_bpb", "value": 3.5, "split": "val"}],
                     curves=[(s, "train_loss", 3.9) for s in range(10, 20)], routing=[(20, 0, 0, 0.5), (20, 0, 1, 0.5)],
                     routing_health=[(20, 0, "load_entropy", 1.0)], at=datetime(2026, 1, 1, 1))
    store.add_metrics(RID, [{"name": "lmeval/x/acc", "value": 0.5, "stderr": 0.1}])


def test_bundle_store_keeps_exactly_the_rows_the_store_keeps(tmp_path):
    ref = Store(tmp_path / "ref.duckdb")
    _drive(ref)
    bs = BundleStore(tmp_path / "runs")
    _drive(bs)
    b = read_bundle(bundle_path(tmp_path / "runs", RID))
    con = duckdb.connect(str(ref.path), read_only=True)
    try:
        want = run_tables(con, RID)
    finally:
        con.close()
    for t in TABLES:
        got, exp = b.tables[t], want[t]
        if t == "machines":
            got, exp = got.drop_columns(["first_seen"]), exp.drop_columns(["first_seen"])
        assert got.sort_by([(c, "ascending") for c in got.column_names if c != "value"]).equals(
            exp.sort_by([(c, "ascending") for c in exp.column_names if c != "value"])), t
    assert BundleStore(tmp_path / "runs").find_finished("0123456789abcdef", 0)["metrics"]["val_bpb"] == 3.5
    assert BundleStore(tmp_path / "runs").find_resumable("0123456789abcdef", 0) is None


def _synthetic(tmp_path, **run) -> Path:
    row = {"run_id": RID, "suite": "lm", "router": "smoe", "spec_hash": "0123456789abcdef", "seed": 0, "preset": "tiny",
           "status": "finished", "step": 20, "total_steps": 20, "git_sha": "abc", "machine_id": "m1",
           "started_at": datetime(2026, 1, 1), "finished_at": datetime(2026, 1, 1, 1), "config": "{}",
           "versions": "{}", "error": None, **run}
    rid = row["run_id"]
    return write_bundle(tmp_path / "bundles" / "b", {
        "runs": [tuple(row[c] for c, _ in TABLES["runs"])],
        "machines": [("m1", "h", "c", 1, None, "p", "3", datetime(2026, 1, 1))],
        "metrics": [(rid, "val_bpb", 3.5, None, "val", 20)],
        "curves": [(rid, s, "train_loss", 4.0) for s in range(20)],
        "routing": [(rid, 20, 0, 0, 1.0)], "routing_health": [(rid, 20, 0, "load_entropy", 0.0)]})


def _rehash(b: Path) -> None:
    """Recompute the manifest's hash and row counts after a hand edit of a Parquet file (a consistent forgery)."""
    from harness.bundles.format import _digest

    m = json.loads((b / MANIFEST).read_text())
    files = [(f"{t}.parquet", (b / f"{t}.parquet").read_bytes()) for t in TABLES]
    m["content_sha256"] = _digest(files)
    for t in TABLES:
        m["tables"][t]["rows"] = pq.ParquetFile(b / f"{t}.parquet").metadata.num_rows
    (b / MANIFEST).write_text(json.dumps(m))


def _edit_manifest(**kv):
    def f(b: Path) -> None:
        m = json.loads((b / MANIFEST).read_text())
        m.update(kv)
        (b / MANIFEST).write_text(json.dumps(m))
    return f


def _rewrite(table: str, fn):  # noqa: ANN001
    def f(b: Path) -> None:
        pq.write_table(fn(pq.read_table(b / f"{table}.parquet")), b / f"{table}.parquet")
        _rehash(b)
    return f


def _flip_byte(b: Path) -> None:
    p = b / "metrics.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


CORRUPT = {
    "manifest-not-json": (lambda b: (b / MANIFEST).write_text("{not json"), "manifest.json", "not JSON"),
    "manifest-missing": (lambda b: (b / MANIFEST).unlink(), "manifest.json", "no manifest"),
    "manifest-not-a-bundle": (_edit_manifest(format="something-else"), "manifest.json", "bad manifest"),
    "unknown-format-version": (_edit_manifest(format_version=99), "manifest.json", "unknown format version 99"),
    "newer-schema": (_edit_manifest(schema_version=SCHEMA_VERSION + 1), "manifest.json", "newer than this harness"),
    "manifest-bad-rows": (_edit_manifest(tables={t: {"file": "../../x", "rows": 1} for t in TABLES}),
                          "manifest.json", "bad manifest"),
    "hash-mismatch": (_flip_byte, "manifest.json", "content hash mismatch"),
    "not-parquet": (lambda b: ((b / "curves.parquet").write_bytes(b"PAR1 not really"), _rehash_raw(b)),
                    "curves.parquet", "not a readable Parquet file"),
    "missing-column": (_rewrite("metrics", lambda t: t.drop_columns(["stderr"])), "metrics.parquet",
                       "missing column 'stderr'"),
    "wrong-type": (_rewrite("runs", lambda t: t.set_column(4, "seed", pa.array(["0"]))), "runs.parquet",
                   "column 'seed' has type string"),
    "extra-column": (_rewrite("curves", lambda t: t.append_column("x", pa.array([1] * t.num_rows))),
                     "curves.parquet", "unexpected column 'x'"),
    "rows-of-another-run": (_rewrite("curves", lambda t: t.set_column(0, "run_id", pa.array(
        ["lm-other-0-s0-000000"] * t.num_rows))), "curves.parquet", "rows of another run"),
    "two-run-rows": (_rewrite("runs", lambda t: pa.concat_tables([t, t])), "runs.parquet", "2 run rows"),
    "pickle-file": (lambda b: (b / "model.pkl").write_bytes(b"\x80\x04K\x01."), "model.pkl", "unexpected file"),
    "unknown-status": (_rewrite("runs", lambda t: t.set_column(6, "status", pa.array(["hacked"]))), "runs.parquet",
                       "unknown status"),
    "run-id-path": (lambda b: (_rewrite("runs", lambda t: t.set_column(0, "run_id", pa.array(["../../etc"])))(b),
                               _edit_manifest(run_id="../../etc")(b), _rehash(b)), "manifest.json", "not a run id"),
}


def _rehash_raw(b: Path) -> None:
    from harness.bundles.format import _digest

    m = json.loads((b / MANIFEST).read_text())
    m["content_sha256"] = _digest([(f"{t}.parquet", (b / f"{t}.parquet").read_bytes()) for t in TABLES])
    (b / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_a_corrupt_bundle_is_refused_in_one_line_and_nothing_is_written(kind, tmp_path, capsys):
    b = _synthetic(tmp_path)
    corrupt, fname, why = CORRUPT[kind]
    corrupt(b)
    store = tmp_path / "h.duckdb"
    target = b if kind != "manifest-missing" else b.parent  # no manifest: the directory names no bundle
    rc = main(["import", str(target), "--store", str(store), "--quiet"])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, cap.err
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), cap.err
    assert "Traceback" not in cap.err + cap.out
    if kind != "manifest-missing":
        assert str(b / fname) in lines[0] and why in lines[0], lines[0]
    assert not store.exists()  # nothing of it written: not even an empty store


def test_good_bundles_are_imported_beside_a_refused_one(tmp_path, capsys):
    good = _synthetic(tmp_path)
    bad = write_bundle(tmp_path / "bundles" / "c", {t: read_bundle(good).tables[t] for t in TABLES})
    (bad / "x.pkl").write_bytes(b"\x80\x04.")
    store = tmp_path / "h.duckdb"
    assert main(["import", str(tmp_path / "bundles"), "--store", str(store), "--quiet"]) == 2
    cap = capsys.readouterr()
    assert "1 imported, 0 updated, 0 already present, 1 refused" in cap.out
    assert cap.err.strip().splitlines() == [cap.err.strip()] and "x.pkl" in cap.err
    assert q(store, "SELECT count(*) FROM runs") == [(1,)]


def test_strings_that_look_like_sql_are_stored_as_data(tmp_path, capsys):
    evil = "smoe'); DROP TABLE runs; --"
    b = _synthetic(tmp_path, router=evil, suite="lm\"; DELETE FROM metrics; --", config="'; DROP TABLE curves; --",
                   error="x' OR '1'='1")
    store = tmp_path / "h.duckdb"
    assert main(["import", str(b), "--store", str(store), "--quiet"]) == 0
    assert q(store, "SELECT router, suite, config, error FROM runs") == [
        (evil, "lm\"; DELETE FROM metrics; --", "'; DROP TABLE curves; --", "x' OR '1'='1")]
    assert q(store, "SELECT count(*) FROM metrics") == [(1,)] and q(store, "SELECT count(*) FROM curves") == [(20,)]
    out = tmp_path / "out"
    assert main(["export", "--store", str(store), "--routers", evil, "--to", str(out), "--quiet"]) == 0
    assert read_bundle(out / RID).run["router"] == evil
    capsys.readouterr()
    # a run id that would name a path outside the export directory is refused, not followed
    bad = _synthetic(tmp_path / "2")
    CORRUPT["run-id-path"][0](bad)
    assert main(["import", str(bad), "--store", str(store), "--quiet"]) == 2
    assert "not a run id" in capsys.readouterr().err


def test_a_later_version_of_a_run_replaces_the_earlier_one(tmp_path, capsys):
    store = tmp_path / "h.duckdb"
    running = _synthetic(tmp_path / "a", status="running", step=10, finished_at=None)
    assert main(["import", str(running), "--store", str(store), "--quiet"]) == 0
    done = _synthetic(tmp_path / "b")
    assert main(["import", str(done), "--store", str(store), "--quiet"]) == 0
    assert "0 imported, 1 updated" in capsys.readouterr().out
    assert q(store, "SELECT status, step FROM runs") == [("finished", 20)]
    assert main(["import", str(running), "--store", str(store), "--quiet"]) == 0  # the older one changes nothing
    assert "1 already present" in capsys.readouterr().out
    assert q(store, "SELECT status, step FROM runs") == [("finished", 20)]
    assert q(store, "SELECT count(*) FROM curves") == [(20,)]


def test_bundle_write_is_atomic_and_replaces_the_previous_version(tmp_path):
    b = _synthetic(tmp_path)
    first = json.loads((b / MANIFEST).read_text())["content_sha256"]
    tables = read_bundle(b).tables
    tables["metrics"] = pa.concat_tables([tables["metrics"], tables["metrics"]])
    write_bundle(b, tables)
    assert json.loads((b / MANIFEST).read_text())["content_sha256"] != first
    assert read_bundle(b).tables["metrics"].num_rows == 2
    assert sorted(p.name for p in b.parent.iterdir()) == ["b"]  # no temporary or old copy left
    assert SCHEMAS["runs"].names[0] == "run_id"


def test_import_and_export_bad_arguments(tmp_path, capsys):
    for argv, needle in (
            (["import", str(tmp_path / "nothing-here"), "--store", str(tmp_path / "h.duckdb")], "no result bundle"),
            (["export", "--store", str(tmp_path / "none.duckdb"), "--to", str(tmp_path / "o")], "no results store"),
            (["export", "x", "--routers", "smoe", "--store", str(tmp_path / "h.duckdb"), "--to", str(tmp_path / "o")],
             "not both")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)
    assert not (tmp_path / "h.duckdb").exists() and not (tmp_path / "o").exists()


# -- soak (slow): 8 concurrent bundles-mode processes vs the same 8 on one shared store ------------------------

SOAK = [(r, s) for r in ("smoe", "dense", "xmoe", "hash") for s in (0, 1)]  # 8 processes, one run each


def _phase(tmp: Path, mode: str) -> dict:
    store, runs, log = tmp / "h.duckdb", tmp / "runs", tmp / "locks.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_LOCK_LOG": str(log)}
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "--suite", "lm", *TINY, *DET,
                               "--routers", r, "--seeds", str(s), "--store-mode", mode, "--runs-dir", str(runs),
                               "--store", str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for r, s in SOAK]
    outs = [p.communicate(timeout=900) for p in procs]
    wall = time.monotonic() - t0
    bad = [(r, s, p.returncode, err[-1500:]) for (r, s), p, (_, err) in zip(SOAK, procs, outs) if p.returncode]
    waits = [float(x.split()[2]) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    return {"store": store, "runs": runs, "wall_s": round(wall, 1), "bad": bad, "lock_waits": len(waits),
            "worst_lock_wait_s": round(max(waits), 3) if waits else 0.0,
            "total_lock_wait_s": round(sum(waits), 3)}


@pytest.mark.slow
def test_soak_eight_bundle_processes_then_import_equals_eight_on_one_store(tmp_path):
    # the two phases run one after the other; HARNESS_BUNDLE_SOAK_SHARED_FIRST=1 swaps them (a loaded box's load
    # drifts, so a wall-time comparison wants both orders)
    first = _phase(tmp_path / "shared", "store") if os.environ.get("HARNESS_BUNDLE_SOAK_SHARED_FIRST") else None
    a = _phase(tmp_path / "bundles", "bundles")
    assert not a["bad"], a["bad"]
    assert not a["store"].exists() and a["lock_waits"] == 0  # no process opened a database file
    t0 = time.monotonic()
    imported = tmp_path / "imported.duckdb"
    assert main(["import", str(a["runs"]), "--store", str(imported), "--quiet"]) == 0
    import_s = time.monotonic() - t0
    b = first or _phase(tmp_path / "shared", "store")
    assert not b["bad"], b["bad"]
    assert q(imported, "SELECT count(*) FROM runs WHERE status = 'finished'") == [(len(SOAK),)]
    assert _table(imported).equals(_table(b["store"]))
    for t in ("metrics", "curves", "routing", "routing_health"):
        assert len(_rows(imported, t)) == len(_rows(b["store"], t)), t
    report = {"processes": len(SOAK), "bundles_wall_s": a["wall_s"], "bundles_lock_waits": a["lock_waits"],
              "import_s": round(import_s, 2), "shared_wall_s": b["wall_s"], "shared_lock_waits": b["lock_waits"],
              "shared_worst_lock_wait_s": b["worst_lock_wait_s"], "shared_total_lock_wait_s": b["total_lock_wait_s"],
              "order": "shared first" if first else "bundles first", "cpus": os.cpu_count(),
              "loadavg": os.getloadavg()}
    print("\nbundle soak:", json.dumps(report))
    if os.environ.get("HARNESS_SOAK_REPORT"):
        Path(os.environ["HARNESS_SOAK_REPORT"]).write_text(json.dumps(report, indent=1))
