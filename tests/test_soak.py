"""Soak: 4 concurrent ``harness run --preset tiny`` writers and 2 leaderboard readers on one store.

Bounded: a writer starts another invocation only while its last one (x 1.25) still fits before the
3-minute bound (``HARNESS_SOAK_SECONDS`` caps the launch window), so the test ends within 3 minutes
however loaded the machine is, and every invocation started also lands. Every
invocation must exit 0 (no lock-timeout exit), every run must land ``finished`` with all its rows
(final metrics, the full train-loss curve, routing rows for the MoE router), and no reader call may
fail. The worst lock wait comes from the store's retry loop ($HARNESS_LOCK_LOG, harness/store.py).
``HARNESS_SOAK_REPORT=path`` also writes the figures as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from storeq import q

pytestmark = pytest.mark.slow

WRITERS, READERS = 4, 2
HARD_LIMIT = 175.0  # seconds: the bound of the whole soak
WINDOW = float(os.environ.get("HARNESS_SOAK_SECONDS", str(HARD_LIMIT)))
STEPS = 30  # the tiny preset; log_every = 1, so every step has a train_loss point
# two runs per invocation, one after another: on a loaded 2-core machine a process start (torch, lm-eval
# imports) costs about as much as a tiny run; three runs per invocation overran the 3-minute bound at load 12
ROUTERS = ("smoe", "dense")


def _writer(k: int, store, deadline: float, out: list) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_LOCK_LOG": str(store) + ".locklog"}
    i, last = 0, 0.0
    while time.monotonic() < deadline and (i == 0 or time.monotonic() + 1.25 * last < START[0] + HARD_LIMIT - 5):
        seed = 1000 * (k + 1) + i
        i += 1
        argv = [sys.executable, "-m", "harness.cli", "run", "--suite", "lm", "--preset", "tiny", "--no-eval",
                "--quiet", "--routers", ",".join(ROUTERS), "--seeds", str(seed), "--jobs", "1", "--store", str(store),
                # checkpoints and progress rows every 5 steps: many short write transactions to contend
                "--set", "train.ckpt_every=5", "--set", "train.eval_every=10"]
        t0 = time.monotonic()
        try:
            p = subprocess.run(argv, capture_output=True, text=True, env=env,
                               timeout=max(5.0, HARD_LIMIT - (time.monotonic() - START[0])))
            last = time.monotonic() - t0
            out.append({"writer": k, "seed": seed, "rc": p.returncode, "err": p.stderr[-3000:], "seconds": last})
        except subprocess.TimeoutExpired as exc:
            out.append({"writer": k, "seed": seed, "rc": "timeout", "err": str(exc)[-500:],
                        "seconds": time.monotonic() - t0})
            return


START = [0.0]


def _reader(store, stop: threading.Event, calls: list, errors: list) -> None:
    from leaderboard import store as board  # the board's own read path

    while not stop.is_set():
        if not store.exists():
            time.sleep(0.05)
            continue
        t0 = time.monotonic()
        try:
            runs = board.load_runs(store, timeout=120)
            ids = runs["run_id"].to_list() if len(runs) else None
            board.load_metrics(store, ids, timeout=120)
            board.load_curves(store, ids, timeout=120)
            board.load_health(store, ids, timeout=120)
            board.store_state(store, timeout=120)
            calls.append(time.monotonic() - t0)
        except Exception as exc:  # noqa: BLE001 - every reader failure is a finding
            errors.append(f"{type(exc).__name__}: {exc}")
        time.sleep(0.02)


def test_soak_four_writers_two_readers_one_store(tmp_path):
    store = tmp_path / "soak.duckdb"
    START[0] = time.monotonic()
    deadline = START[0] + WINDOW
    results: list[dict] = []
    reader_calls: list[float] = []
    reader_errors: list[str] = []
    stop = threading.Event()
    writers = [threading.Thread(target=_writer, args=(k, store, deadline, results)) for k in range(WRITERS)]
    readers = [threading.Thread(target=_reader, args=(store, stop, reader_calls, reader_errors))
               for _ in range(READERS)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(timeout=HARD_LIMIT + 10)
    stop.set()
    for t in readers:
        t.join(timeout=60)
    wall = time.monotonic() - START[0]

    attempted = len(ROUTERS) * len(results)
    bad = [r for r in results if r["rc"] != 0]
    rows = q(store, "SELECT router, seed, status FROM runs")
    finished = {(r, s) for r, s, st in rows if st == "finished"}
    complete = q(store, """
        SELECT r.router, r.seed FROM runs r WHERE r.status = 'finished'
          AND (SELECT count(*) FROM metrics m WHERE m.run_id = r.run_id AND m.name IN
               ('val_bpb', 'test_bpb', 'train_tok_per_s', 'peak_mem_mb', 'params_total')) = 5
          AND (SELECT count(*) FROM curves c WHERE c.run_id = r.run_id AND c.name = 'train_loss') = ?
          AND (r.router = 'dense' OR (SELECT count(*) FROM routing g WHERE g.run_id = r.run_id) > 0)
    """, [STEPS])
    dup = q(store, "SELECT run_id, step, name, count(*) c FROM curves GROUP BY ALL HAVING c > 1")
    waits = []
    log = tmp_path / "soak.duckdb.locklog"
    if log.exists():
        waits = [float(line.split()[2]) for line in log.read_text().splitlines() if line.strip()]
    report = {
        "writers": WRITERS, "readers": READERS, "window_s": WINDOW, "wall_s": round(wall, 1),
        "invocations": len(results),
        "invocation_s": [round(r["seconds"], 1) for r in results], "runs_attempted": attempted, "runs_landed": len(complete),
        "runs_finished": len(finished), "failed_invocations": len(bad),
        "lock_waits": len(waits), "worst_lock_wait_s": round(max(waits), 3) if waits else 0.0,
        "reader_calls": len(reader_calls), "reader_errors": len(reader_errors),
        "worst_reader_call_s": round(max(reader_calls), 3) if reader_calls else None,
        "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
    }
    print("\nsoak:", json.dumps(report))
    if os.environ.get("HARNESS_SOAK_REPORT"):
        with open(os.environ["HARNESS_SOAK_REPORT"], "w") as fh:
            json.dump(report, fh, indent=1)
    assert results, "no writer invocation completed"
    assert not bad, [(r["writer"], r["seed"], r["rc"], r["err"][-800:]) for r in bad]
    assert not any("stayed locked" in r["err"] for r in results)
    assert len(rows) == attempted and len(finished) == attempted, rows
    assert len(complete) == attempted, sorted(finished - set(complete))
    assert dup == []
    assert not reader_errors, reader_errors[:5]
    assert reader_calls, "the readers never read"
    # no assert on `wall`: the bound is each writer's subprocess timeout (a timed-out invocation fails above)
