"""Fault matrix: each guarantee in the README's table is one test here (or in test_lm_suite.py)."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import duckdb
import torch
import pytest

from harness.routing import registry
from harness.cli import main
from harness.routing.registry import register_router
from harness.store import SCHEMA_VERSION, Store, StoreError

from baselines.smoe import SMoERouter

from storeq import RESUMABLE, RESUME_GROUP, TINY, default_sigint, q


class Interrupt:
    on = True


class InterruptingRouter(SMoERouter):
    """SMoE that simulates the process being killed at step 20 (KeyboardInterrupt is never caught as 'failed')."""

    def forward(self, x, ctx):
        if Interrupt.on and ctx.training and ctx.step == 20:
            raise KeyboardInterrupt
        return super().forward(x, ctx)


@pytest.fixture
def interrupting():
    register_router("test-interrupt")(InterruptingRouter)
    Interrupt.on = True
    yield
    registry.unregister_router("test-interrupt")


def test_corrupt_checkpoint_clear_error_then_restart(tmp_path, capsys, interrupting):
    store = tmp_path / "h.duckdb"
    args = ["run", "--suite", "lm", "--routers", "test-interrupt", "--store", str(store), *TINY,
            "--set", "train.ckpt_every=10"]
    assert main(args) == 130  # interrupted right after the step-20 checkpoint
    ckpts = list((tmp_path / "runs").glob("*/ckpt.pt"))
    assert len(ckpts) == 1 and q(store, "SELECT status, step FROM runs") == [("interrupted", 20)]
    data = ckpts[0].read_bytes()
    ckpts[0].write_bytes(data[: len(data) // 3])  # truncated
    Interrupt.on = False
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("harness: error: ") and str(ckpts[0]) in err and "--restart" in err and "corrupt or truncated" in err
    assert main(args + ["--restart"]) == 0
    rows = q(store, "SELECT status, error FROM runs ORDER BY started_at")
    assert [r[0] for r in rows] == ["failed", "finished"] and "restart" in rows[0][1]


def test_resume_after_interrupt_continues_same_run(tmp_path, interrupting):
    store = tmp_path / "h.duckdb"
    args = ["run", "--suite", "lm", "--routers", "test-interrupt", "--store", str(store), *TINY,
            "--set", "train.ckpt_every=10"]
    assert main(args) == 130
    Interrupt.on = False
    assert main(args + ["--resume"]) == 0
    assert q(store, "SELECT count(*), min(status), max(step) FROM runs") == [(1, "finished", 30)]


WRITER = textwrap.dedent("""
    import sys, itertools
    from harness.store import Store
    s = Store(sys.argv[1])
    for i in itertools.count():
        rid = f"{sys.argv[2]}-{i}"
        s.start_run({"run_id": rid, "suite": "lm", "router": "smoe", "spec_hash": "h", "seed": i, "status": "running"})
        s.finish_run(rid, "finished", 10, metrics=[{"name": f"m{j}", "value": j} for j in range(200)],
                     curves=[(k, "train_loss", 1.0) for k in range(300)])
        print(i, flush=True)
""")


def test_kill9_during_store_writes_leaves_no_half_finished_run(tmp_path):
    store = tmp_path / "h.duckdb"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(0)
    for attempt in range(3):
        p = subprocess.Popen([sys.executable, str(script), str(store), f"w{attempt}"], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # at least one run landed
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        bad = q(store, "SELECT r.run_id, count(m.name) FROM runs r LEFT JOIN metrics m USING (run_id) "
                       "WHERE r.status = 'finished' GROUP BY r.run_id HAVING count(m.name) <> 200")
        assert bad == []
        assert q(store, "SELECT count(*) FROM runs WHERE status = 'finished'")[0][0] >= attempt + 1


def test_two_runs_and_a_reader_on_one_store_all_land(tmp_path):
    store = tmp_path / "h.duckdb"
    stop = threading.Event()
    reads = []

    def reader():
        s = Store(store, lock_timeout=120)
        while not stop.is_set():
            if store.exists():
                try:
                    reads.append(len(s.query("SELECT * FROM runs")))
                except StoreError:
                    pass
            time.sleep(0.05)

    t = threading.Thread(target=reader)
    t.start()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "--suite", "lm", "--routers", r,
                               "--store", str(store), *TINY, "--set", "train.steps=16", "--set", "train.threads=1",
                               "--set", "train.ckpt_every=4", "--set", "train.eval_every=4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in ("smoe", "dense")]
    outs = [p.communicate(timeout=600) for p in procs]
    stop.set()
    t.join()
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sorted(q(store, "SELECT router, status FROM runs")) == [("dense", "finished"), ("smoe", "finished")]
    assert reads, "the reader never managed to read while runs were writing"


def test_older_store_is_migrated_newer_store_refused(tmp_path):
    old = tmp_path / "old.duckdb"
    con = duckdb.connect(str(old))
    con.execute("CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, suite VARCHAR, router VARCHAR, spec_hash VARCHAR, "
                "seed INTEGER, status VARCHAR, step INTEGER, git_sha VARCHAR, machine_id VARCHAR, "
                "started_at TIMESTAMP, finished_at TIMESTAMP, config VARCHAR)")
    con.execute("INSERT INTO runs VALUES ('r0','lm','smoe','h',0,'finished',5,'x','m',now(),now(),'{}')")
    con.close()
    s = Store(old)
    s.add_metrics("r0", [{"name": "val_bpb", "value": 2.5}])
    assert q(old, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    assert q(old, "SELECT run_id, preset, versions FROM runs") == [("r0", None, None)]
    assert q(old, "SELECT value FROM metrics") == [(2.5,)]

    new = tmp_path / "new.duckdb"
    Store(new).add_metrics("x", [{"name": "a", "value": 1}])
    con = duckdb.connect(str(new))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreError, match="schema version 99, newer than this harness"):
        Store(new).add_metrics("x", [{"name": "b", "value": 1}])


def test_locked_store_times_out_with_clear_message(tmp_path):
    store = tmp_path / "h.duckdb"
    Store(store).add_metrics("x", [{"name": "a", "value": 1}])
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, time, sys
        c = duckdb.connect({str(store)!r}); print('locked', flush=True); sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # holds the lock until killed
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match="stayed locked by another process"):
            Store(store, lock_timeout=1.0).add_metrics("x", [{"name": "b", "value": 2}])
    finally:
        holder.kill()
        holder.wait()
    Store(store).add_metrics("x", [{"name": "b", "value": 2}])  # lands once the lock is gone
    assert q(store, "SELECT count(*) FROM metrics") == [(2,)]


def test_doctor_reports_ok_and_problems(tmp_path, capsys):
    assert main(["doctor", "--store", str(tmp_path / "h.duckdb")]) == 0
    out = capsys.readouterr().out
    assert "torch == 2.14.1" in out and "all checks passed" in out
    assert main(["doctor", "--store", str(tmp_path / "h.duckdb"), "--set", "data.corpus=wikitext103",
                 "--set", f"data.path={tmp_path / 'nowhere'}"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "wiki.train.raw" in out


# -- SIGTERM / SIGINT mid-run; a full disk or read-only runs directory at a checkpoint -----------------

SIG_COMMON = RESUMABLE
FINAL_KEYS = "name IN ('val_bpb','test_bpb','val_byte_ppl','test_byte_ppl')"


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _harness(*args, sigint_ignored=False):
    """``harness`` in a child; ``sigint_ignored`` starts it the way ``nohup`` or a background job of a
    non-interactive shell does (SIGINT inherited as ignored); otherwise with the default disposition."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_ignore_sigint if sigint_ignored else default_sigint)


@pytest.mark.xdist_group(RESUME_GROUP)
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_recorded_interrupted_then_resume_matches(tmp_path, uninterrupted_80, sig, code):
    store = tmp_path / "h.duckdb"
    # the SIGTERM case starts like nohup (SIGINT ignored) and gets a Ctrl-C first: the harness respects the
    # ignored SIGINT (exit 143 below, not 130) and SIGTERM still stops it
    p = _harness(*SIG_COMMON, "--store", str(store), sigint_ignored=sig == signal.SIGTERM)
    deadline = time.time() + 180
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/ckpt.pt")):
        time.sleep(0.05)
    if sig == signal.SIGTERM:
        os.kill(p.pid, signal.SIGINT)
    time.sleep(0.3)
    assert p.poll() is None, "run finished before it could be signalled; make it longer"
    os.kill(p.pid, sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err[-2000:]
    assert "Traceback" not in err
    assert "--resume" in err.strip().splitlines()[-1]
    (status, error), = q(store, "SELECT status, error FROM runs")
    assert status == "interrupted" and "--resume" in error, (status, error)

    p = _harness(*SIG_COMMON, "--store", str(store), "--resume")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert "resuming" in err
    assert q(store, "SELECT count(*), min(status) FROM runs") == [(1, "finished")]
    got = q(store, f"SELECT name, value FROM metrics WHERE {FINAL_KEYS} ORDER BY name")
    want = q(uninterrupted_80, f"SELECT name, value FROM metrics WHERE {FINAL_KEYS} ORDER BY name")
    assert got == want and len(got) == 4
    assert q(store, "SELECT step, name, count(*) c FROM curves GROUP BY step, name HAVING c > 1") == []


DISK_ARGS = ["run", "--suite", "lm", "--routers", "smoe", *TINY, "--set", "train.ckpt_every=10",
             "--set", "train.eval_every=10"]


def _fail_second_checkpoint(monkeypatch, err):
    """The first checkpoint (step 10) is written; the second (step 20) fails the way the kernel fails it:
    ENOSPC from the writes (the temporary file is /dev/full, a real full device), EROFS from open()."""
    import builtins
    import errno as errno_

    import harness.training.checkpoint as train

    calls = {"n": 0}

    def fake_open(file, mode="r", *a, **k):
        if str(file).endswith("ckpt.tmp") and "w" in mode:
            calls["n"] += 1
            if calls["n"] == 2:
                if err == errno_.ENOSPC:
                    return builtins.open("/dev/full", mode, *a, **k)
                raise OSError(err, os.strerror(err), str(file))
        return builtins.open(file, mode, *a, **k)

    monkeypatch.setattr(train, "open", fake_open, raising=False)  # shadows the builtin in harness.training.checkpoint only
    return calls


@pytest.mark.parametrize("err", ["ENOSPC", "EROFS"])
def test_checkpoint_write_failure_one_line_previous_checkpoint_intact(tmp_path, capsys, monkeypatch, err):
    import errno as errno_

    from harness.training.loop import load_checkpoint

    code = getattr(errno_, err)
    ref = tmp_path / "ref" / "h.duckdb"
    assert main(DISK_ARGS + ["--store", str(ref)]) == 0
    store = tmp_path / "disk" / "h.duckdb"
    calls = _fail_second_checkpoint(monkeypatch, code)
    capsys.readouterr()
    assert main(DISK_ARGS + ["--store", str(store)]) == 2
    assert calls["n"] == 2
    err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("harness: error:")]
    assert len(err_lines) == 1, err_lines
    assert os.strerror(code) in err_lines[0] and "previous checkpoint is intact" in err_lines[0]
    assert "--resume" in err_lines[0]
    ckpt, = (tmp_path / "disk" / "runs").glob("*/ckpt.pt")
    assert load_checkpoint(ckpt)["step"] == 10  # the step-10 checkpoint, untouched
    assert not list((tmp_path / "disk" / "runs").glob("*/*.tmp"))
    (status, error), = q(store, "SELECT status, error FROM runs")
    assert status == "interrupted" and os.strerror(code) in error

    monkeypatch.undo()  # space freed / directory writable again
    assert main(DISK_ARGS + ["--store", str(store), "--resume"]) == 0
    assert q(store, "SELECT count(*), min(status) FROM runs") == [(1, "finished")]
    got = q(store, f"SELECT name, value FROM metrics WHERE {FINAL_KEYS} ORDER BY name")
    assert got == q(ref, f"SELECT name, value FROM metrics WHERE {FINAL_KEYS} ORDER BY name") and len(got) == 4


def test_unwritable_runs_dir_refused_before_the_run(tmp_path, capsys, monkeypatch):
    """A runs directory that cannot be written (read-only mount, full disk) is found before training:
    exit 2, one line, no run row. (Tests run as root, which chmod cannot stop: the write fails by patch.)"""
    import errno as errno_
    import tempfile

    import harness.args as argtypes

    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):  # noqa: A002
        if dir is not None and os.path.basename(str(dir)) == "runs":
            raise OSError(errno_.EROFS, os.strerror(errno_.EROFS), str(dir))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(argtypes.tempfile, "mkstemp", mkstemp)
    store = tmp_path / "h.duckdb"
    assert main(DISK_ARGS + ["--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("harness: error: cannot write runs directory"), err
    assert "Read-only file system" in err[0] and "--runs-dir" in err[0]
    assert not store.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("raised", [duckdb.InterruptException("INTERRUPT Error"), RuntimeError("Query interrupted")],
                         ids=["InterruptException", "RuntimeError"])
def test_ctrl_c_inside_a_store_write_is_an_interrupt_not_a_failure(tmp_path, raised):
    """DuckDB swallows a KeyboardInterrupt that lands mid-query and raises its own error; the store turns it back
    into KeyboardInterrupt (so the run is recorded interrupted and resumable, not failed) and commits nothing."""
    store = Store(tmp_path / "h.duckdb")
    store.add_metrics("x", [{"name": "a", "value": 1}])
    with pytest.raises(KeyboardInterrupt):
        with store.writer() as con:
            con.execute("INSERT INTO metrics (run_id, name, value) VALUES ('x', 'b', 2)")
            raise raised
    assert q(tmp_path / "h.duckdb", "SELECT name FROM metrics") == [("a",)]
    with pytest.raises(RuntimeError, match="boom"):  # any other error stays what it was
        with store.writer():
            raise RuntimeError("boom")


def test_a_signal_during_a_checkpoint_write_waits_for_the_write(tmp_path):
    """Ctrl-C inside torch.save left a half-written zip whose cleanup raised a RuntimeError, and the run was
    recorded failed; now the signal is held until the atomic write is done, then delivered as usual."""
    from harness.training.checkpoint import atomic_save

    path = tmp_path / "ckpt.pt"
    state = {"step": 10, "w": torch.arange(10_000.0)}

    class Interrupting(dict):
        def __reduce__(self):  # runs inside torch.save: the signal lands mid-write
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            return dict, (dict(self),)

    # Python's own Ctrl-C handler, whatever this process inherited (`(trap '' INT; make test)` starts it ignored)
    prev = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_save(path, {"state": Interrupting(state)}, "checkpoint")
    finally:
        signal.signal(signal.SIGINT, prev)
    got = torch.load(path, weights_only=False)["state"]  # the file this test wrote
    assert got["step"] == 10 and torch.equal(got["w"], state["w"])
    assert not path.with_suffix(".tmp").exists()
