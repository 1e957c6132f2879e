"""``harness run --jobs N``: runs in parallel worker processes, one store, the sequential semantics."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from harness.routing import registry
from harness.cli import main
from harness.training.parallel import Failed, default_jobs, run_parallel
from harness.routing.registry import register_router
from harness.routing.router import Router, Routing

from storeq import TINY, default_sigint, q

SHORT = [*TINY, "--set", "train.steps=12", "--set", "train.eval_every=6", "--set", "train.ckpt_every=6"]
FINAL = "name LIKE 'val_%' OR name LIKE 'test_%' OR name = 'params_total'"


def _metrics(store):
    return q(store, f"SELECT r.router, r.seed, m.name, m.value FROM metrics m JOIN runs r USING (run_id) "
                    f"WHERE {FINAL} ORDER BY 1, 2, 3")


def test_jobs2_same_metrics_as_jobs1_one_row_per_run(tmp_path, capsys):
    common = ["run", "--suite", "lm", "--routers", "smoe,dense", "--seeds", "0,1", *SHORT]
    assert main([*common, "--jobs", "1", "--store", str(tmp_path / "seq.duckdb")]) == 0
    capsys.readouterr()
    assert main([*common, "--jobs", "2", "--store", str(tmp_path / "par.duckdb")]) == 0
    err = capsys.readouterr().err
    assert "4 runs in 2 worker processes" in err
    assert "(worker 1)" in err and "(worker 2)" in err
    for router in ("smoe", "dense"):
        for seed in (0, 1):
            assert f"finished: router={router} seed={seed} val_bpb=" in err
    seq, par = _metrics(tmp_path / "seq.duckdb"), _metrics(tmp_path / "par.duckdb")
    assert len(par) > 8 and par == seq  # bit for bit: same process-independent numerics, threads=1
    rows = q(tmp_path / "par.duckdb", "SELECT router, seed, count(*), min(status) FROM runs GROUP BY 1, 2 ORDER BY 1, 2")
    assert rows == [("dense", 0, 1, "finished"), ("dense", 1, 1, "finished"),
                    ("smoe", 0, 1, "finished"), ("smoe", 1, 1, "finished")]
    # the training curves landed too, none twice
    assert q(tmp_path / "par.duckdb", "SELECT count(*) FROM curves WHERE name = 'train_loss'") == \
        q(tmp_path / "seq.duckdb", "SELECT count(*) FROM curves WHERE name = 'train_loss'")


def test_lm_eval_after_each_run_in_its_worker(tmp_path, capfd):
    store = tmp_path / "h.duckdb"
    args = [a for a in SHORT if a != "--no-eval"]
    assert main(["run", "--suite", "lm", "--routers", "smoe,dense", "--jobs", "2", "--set", "eval.limit=3",
                 "--store", str(store), *args]) == 0
    rows = q(store, "SELECT r.router, count(*) FROM metrics m JOIN runs r USING (run_id) "
                    "WHERE m.name LIKE 'lmeval/%' GROUP BY 1 ORDER BY 1")
    assert [r[0] for r in rows] == ["dense", "smoe"] and all(n >= 4 for _, n in rows)
    assert "lm-eval shakespeare_cloze" in capfd.readouterr().err  # printed by the worker itself


def test_unpicklable_after_run_hook_runs_in_the_parent(tmp_path):
    from dataclasses import replace

    from harness.training.runner import run_suite
    from harness.spec import load_suite
    from harness.store import Store

    spec = load_suite("lm", preset="tiny", routers=["smoe", "dense"],
                      overrides=["train.steps=6", "train.eval_every=6", "train.ckpt_every=6"])
    spec = replace(spec, eval=replace(spec.eval, enabled=False))
    seen, lines = [], []

    def after(run, res):  # a closure: cannot be pickled to a worker
        seen.append((run.router, res.run_id, os.getpid()))

    results = run_suite(spec, Store(tmp_path / "h.duckdb"), tmp_path / "runs", after_run=after, jobs=2,
                        log=lines.append)
    assert [(r.router, r.status) for r in results] == [("smoe", "finished"), ("dense", "finished")]
    assert sorted(seen) == sorted((r.router, r.run_id, os.getpid()) for r in results)
    assert any("(worker 2)" in ln for ln in lines)


class JobsNaNRouter(Router):
    """Top-1 router whose logits become NaN from step 5 on."""

    def __init__(self, d_model, num_experts, top_k):
        super().__init__(d_model, num_experts, top_k)
        self.gate = torch.nn.Linear(d_model, num_experts)

    def forward(self, x, ctx):
        logits = self.gate(x).float()
        if ctx.training and ctx.step >= 5:
            logits = logits * float("nan")
        w, idx = logits.softmax(-1).topk(self.top_k, -1)
        return Routing(indices=idx, weights=w, logits=logits)


class JobsRaisingRouter(JobsNaNRouter):
    def forward(self, x, ctx):
        if ctx.step >= 3:
            raise RuntimeError("router bug on purpose")
        return super().forward(x, ctx)


class JobsDyingRouter(JobsNaNRouter):
    """Kills its own process at step 3: a worker that dies (OOM killer, segfault) mid-run."""

    def forward(self, x, ctx):
        if ctx.training and ctx.step >= 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x, ctx)


@pytest.fixture
def bad_routers():
    # registered in this process only: --jobs carries them to the workers by reference
    names = {"jobs-nan": JobsNaNRouter, "jobs-raise": JobsRaisingRouter, "jobs-die": JobsDyingRouter}
    for name, cls in names.items():
        register_router(name)(cls)
    yield
    for name in names:
        registry.unregister_router(name)


def test_failures_under_jobs2_recorded_and_suite_continues(tmp_path, bad_routers, capsys):
    store = tmp_path / "h.duckdb"
    rc = main(["run", "--suite", "lm", "--routers", "jobs-raise,jobs-die,jobs-nan,smoe", "--jobs", "2",
               "--store", str(store), *SHORT])
    assert rc == 1  # not every run finished
    err = capsys.readouterr().err
    rows = {r[0]: r[1:] for r in q(store, "SELECT router, status, step, error FROM runs")}
    assert set(rows) == {"jobs-raise", "jobs-die", "jobs-nan", "smoe"}
    assert rows["jobs-raise"][0] == "failed" and "router bug on purpose" in rows["jobs-raise"][2]
    assert "Traceback" in rows["jobs-raise"][2]
    assert rows["jobs-nan"][0] == "diverged" and rows["jobs-nan"][1] == 5
    assert "non-finite router logits" in rows["jobs-nan"][2]
    assert rows["jobs-die"][0] == "failed" and "died (killed by SIGKILL)" in rows["jobs-die"][2]
    assert rows["smoe"][0] == "finished"
    assert "FAILED: RuntimeError: router bug on purpose" in err  # train_run's own line, relayed by the parent
    assert "failed: router=jobs-die seed=0" in err and "died (killed by SIGKILL)" in err
    assert "diverged: router=jobs-nan seed=0" in err
    assert "finished: router=smoe seed=0 val_bpb=" in err


@pytest.mark.parametrize("args,needle", [
    (["--nproc", "2", "--jobs", "2"], "--jobs runs whole runs in parallel processes and --nproc"),
    (["--jobs", "0"], "got 0"),  # (argparse's type check or _resolve_jobs: both name --jobs)
])
def test_bad_jobs_refused_one_line_exit_2(tmp_path, capsys, args, needle):
    store = tmp_path / "h.duckdb"
    assert main(["run", "--suite", "lm", "--routers", "smoe,dense", "--store", str(store), *TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("harness: error: ") and needle in err, err
    assert "--jobs" in err
    assert not store.exists()


def test_default_jobs():
    assert default_jobs(1, 8, cpus=2) == 2
    assert default_jobs(1, 1, cpus=16) == 1      # never more workers than runs
    assert default_jobs(4, 10, cpus=16) == 4
    assert default_jobs(None, 10, cpus=16) == 1  # torch's default threads already use every core
    assert default_jobs(3, 10, cpus=2) == 1


def _square(x, log):
    log(f"squaring {x}")
    if x == 3:
        raise ValueError("three")
    return x * x


def test_run_parallel_order_logs_and_errors():
    seen = []
    out = run_parallel([1, 2, 3, 4], 2, _square, log=seen.append)
    assert out[:2] == [1, 4] and out[3] == 16
    assert isinstance(out[2], Failed) and "ValueError: three" in out[2].error and out[2].exitcode is None
    assert sorted(seen) == [f"squaring {i}" for i in (1, 2, 3, 4)]


def _harness(*args):
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_sigint)


def _children(pid):
    """The worker processes of ``pid`` (not multiprocessing's resource tracker)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = [int(p) for p in fh.read().split()]
    except OSError:
        return []
    out = []
    for k in kids:
        try:
            with open(f"/proc/{k}/cmdline", "rb") as fh:
                if b"spawn_main" in fh.read():
                    out.append(k)
        except OSError:
            pass
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_checkpoints(runs_dir, n, p):
    deadline = time.time() + 240
    while time.time() < deadline and len(list(runs_dir.glob("*/ckpt.pt"))) < n and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "suite finished before it could be interrupted; make it longer"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_workers_kill9_takes_them_along_resume_finishes(tmp_path):
    common = ["run", "--suite", "lm", "--routers", "smoe,dense", *TINY, "--set", "train.steps=60",
              "--set", "train.ckpt_every=10", "--set", "train.eval_every=20", "--jobs", "2",
              "--store", str(tmp_path / "h.duckdb")]
    runs_dir = tmp_path / "runs"
    # Ctrl-C (SIGINT to the whole process group, as a terminal sends it): exit 130, no worker left
    p = _harness(*common)
    _wait_for_checkpoints(runs_dir, 2, p)
    workers = _children(p.pid)
    assert len(workers) == 2
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted; unfinished runs can be continued with --resume" in err
    assert "Traceback" not in err
    assert not any(_alive(w) for w in workers)
    # left resumable: "running" (or "interrupted" where train_run records the stop)
    statuses = {s for (s,) in q(tmp_path / "h.duckdb", "SELECT DISTINCT status FROM runs")}
    assert statuses and statuses <= {"running", "interrupted"}

    # kill -9 of the parent alone: the workers go with it (no orphan keeps writing)
    p = _harness(*common, "--resume")
    deadline = time.time() + 120
    while time.time() < deadline and len(_children(p.pid)) < 2:
        time.sleep(0.05)
    workers = _children(p.pid)
    time.sleep(1.0)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert workers and not any(_alive(w) for w in workers)

    p = _harness(*common, "--resume")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "resuming" in err
    assert q(tmp_path / "h.duckdb", "SELECT router, count(*), min(status) FROM runs GROUP BY 1 ORDER BY 1") == \
        [("dense", 1, "finished"), ("smoe", 1, "finished")]
    assert q(tmp_path / "h.duckdb", "SELECT step, name, run_id, count(*) c FROM curves GROUP BY ALL HAVING c > 1") == []


def test_entry_point_plugin_trains_through_harness_run_jobs2(tmp_path):
    """A third-party router registered only by its entry point (a distribution outside the repo, found through
    its .dist-info on PYTHONPATH) trains through ``harness run --jobs 2``: the CLI in a fresh process, each
    run in a spawned worker that must find the plugin itself; its rows land like a built-in's."""
    from test_registry import make_fake_distribution

    site = make_fake_distribution(tmp_path / "site")
    store = tmp_path / "h.duckdb"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--suite", "lm", "--routers", "hashrouter,smoe",
                        *SHORT, "--jobs", "2", "--store", str(store)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 runs in 2 worker processes" in p.stderr
    assert q(store, "SELECT router, status, step FROM runs ORDER BY router") == \
        [("hashrouter", "finished", 12), ("smoe", "finished", 12)]
    assert {n for (n,) in q(store, "SELECT m.name FROM metrics m JOIN runs r USING (run_id) "
                                   "WHERE r.router = 'hashrouter'")} >= {"val_bpb", "test_bpb", "params_total"}
    assert q(store, "SELECT count(*) > 0 FROM routing g JOIN runs r USING (run_id) WHERE r.router = 'hashrouter'") \
        == [(True,)]
