"""LM suite end to end: rows in the store, kill -9 + resume, NaN guard, failing routers, bad specs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from harness.routing import registry
from harness.cli import main
from harness.routing.registry import register_router
from harness.routing.router import Router, Routing
from harness.spec import SpecError, load_suite

from storeq import RESUMABLE, RESUME_GROUP, TINY, q


def test_tiny_run_writes_expected_rows(tmp_path):
    store = tmp_path / "h.duckdb"
    assert main(["run", "--suite", "lm", "--routers", "dense,smoe", "--store", str(store), *TINY]) == 0
    runs = q(store, "SELECT router, status, step, total_steps, spec_hash, seed, config, versions, machine_id, git_sha "
                    "FROM runs ORDER BY router")
    assert [r[:4] for r in runs] == [("dense", "finished", 30, 30), ("smoe", "finished", 30, 30)]
    cfg = json.loads(runs[1][6])
    assert cfg["router"] == "smoe" and cfg["model"]["num_experts"] == 4 and cfg["seed"] == 0
    assert "torch" in json.loads(runs[1][7])
    assert q(store, "SELECT cpu, threads FROM machines WHERE machine_id = ?", [runs[1][8]])[0][1] >= 1
    metrics = dict(q(store, "SELECT m.name, m.value FROM metrics m JOIN runs r USING (run_id) WHERE r.router='smoe'"))
    for name in ("val_bpb", "test_bpb", "val_byte_ppl", "test_word_ppl", "train_tok_per_s", "peak_mem_mb"):
        assert name in metrics and metrics[name] > 0, name
    assert 1.0 < metrics["test_bpb"] < 8.0
    curves = {r[0] for r in q(store, "SELECT DISTINCT name FROM curves")}
    assert {"train_loss", "lr", "val_bpb", "aux/balance", "aux/z_loss"} <= curves
    # routing health only for the MoE run: per layer x expert loads that sum to 1 per (step, layer)
    sums = q(store, "SELECT g.step, g.layer, sum(g.load) FROM routing g JOIN runs r USING (run_id) "
                    "WHERE r.router='smoe' GROUP BY g.step, g.layer")
    assert sums and all(abs(s - 1) < 1e-6 for _, _, s in sums)
    assert not q(store, "SELECT * FROM routing JOIN runs USING (run_id) WHERE router='dense'")
    health = {r[0] for r in q(store, "SELECT DISTINCT name FROM routing_health")}
    assert {"load_entropy", "dead_experts", "max_over_mean_load", "fluctuation", "fluctuation_last_change"} <= health
    # train loss falls
    tl = q(store, "SELECT c.value FROM curves c JOIN runs r USING (run_id) WHERE r.router='smoe' "
                  "AND c.name='train_loss' ORDER BY c.step")
    assert tl[-1][0] < tl[0][0] - 0.5


def test_rerun_gives_same_numbers(tmp_path):
    vals = []
    for i in range(2):
        store = tmp_path / f"h{i}.duckdb"
        assert main(["run", "--suite", "lm", "--routers", "smoe", "--store", str(store), *TINY,
                     "--set", "train.steps=12"]) == 0
        vals.append(q(store, "SELECT name, value FROM metrics WHERE name LIKE 'val_%' OR name LIKE 'test_%' "
                             "ORDER BY name"))
    assert vals[0] == vals[1]


def _harness(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.xdist_group(RESUME_GROUP)
def test_kill9_then_resume_matches_uninterrupted(tmp_path, uninterrupted_80):
    common = RESUMABLE
    ref_store = uninterrupted_80
    store = tmp_path / "killed" / "h.duckdb"
    p = _harness(*common, "--store", str(store))
    ckpts = tmp_path / "killed" / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpts.glob("*/ckpt.pt")):
        time.sleep(0.05)
    time.sleep(0.3)
    assert p.poll() is None, "run finished before it could be killed; make it longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert q(store, "SELECT status FROM runs") == [("running",)]

    p = _harness(*common, "--store", str(store), "--resume")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "resuming" in err
    assert q(store, "SELECT count(*), min(status) FROM runs") == [(1, "finished")]
    keys = "name IN ('val_bpb','test_bpb','val_byte_ppl','test_byte_ppl')"
    got = q(store, f"SELECT name, value FROM metrics WHERE {keys} ORDER BY name")
    want = q(ref_store, f"SELECT name, value FROM metrics WHERE {keys} ORDER BY name")
    assert got == want and len(got) == 4
    # the resumed run's curves have no duplicated steps
    dup = q(store, "SELECT step, name, count(*) c FROM curves GROUP BY step, name HAVING c > 1")
    assert dup == []
    assert q(store, "SELECT count(*) FROM curves WHERE name='train_loss'") == \
        q(ref_store, "SELECT count(*) FROM curves WHERE name='train_loss'")


class NaNRouter(Router):
    """Top-1 router whose logits become NaN from step 5 on (tests the NaN guard)."""

    def __init__(self, d_model, num_experts, top_k):
        super().__init__(d_model, num_experts, top_k)
        self.gate = torch.nn.Linear(d_model, num_experts)

    def forward(self, x, ctx):
        logits = self.gate(x).float()
        if ctx.training and ctx.step >= 5:
            logits = logits * float("nan")
        p = logits.softmax(-1)
        w, idx = p.topk(self.top_k, -1)
        return Routing(indices=idx, weights=w, logits=logits)


class RaisingRouter(NaNRouter):
    def forward(self, x, ctx):
        if ctx.step >= 3:
            raise RuntimeError("router bug on purpose")
        return super().forward(x, ctx)


@pytest.fixture
def bad_routers():
    register_router("test-nan")(NaNRouter)
    register_router("test-raise")(RaisingRouter)
    yield
    registry.unregister_router("test-nan")
    registry.unregister_router("test-raise")


def test_nan_marks_diverged_and_failure_marks_failed_suite_continues(tmp_path, bad_routers):
    store = tmp_path / "h.duckdb"
    rc = main(["run", "--suite", "lm", "--routers", "test-nan,test-raise,smoe", "--store", str(store), *TINY,
               "--set", "train.steps=10"])
    assert rc == 1  # not every run finished
    rows = dict((r[0], r[1:]) for r in q(store, "SELECT router, status, step, error FROM runs"))
    assert rows["test-nan"][0] == "diverged" and rows["test-nan"][1] == 5
    assert "non-finite router logits" in rows["test-nan"][2] and "step 5" in rows["test-nan"][2]
    assert rows["test-raise"][0] == "failed" and "router bug on purpose" in rows["test-raise"][2]
    assert "Traceback" in rows["test-raise"][2]
    assert rows["smoe"][0] == "finished"


@pytest.mark.parametrize("args,needle", [
    (["--set", "model.d_modle=8"], "unknown key 'model.d_modle' (did you mean 'model.d_model'?)"),
    (["--set", "train.steps=abc"], "train.steps must be an integer"),
    (["--set", "model.top_k=9"], "model.top_k=9 must be between 1 and model.num_experts=4"),
    (["--set", "data.corpus=enwik8"], "enwik8"),
    (["--set", "data.corpus=wikitext103", "--set", "data.path=/nonexistent/wt103"], "wiki.train.raw"),
    (["--routers", "smoee"], "Did you mean 'smoe'"),
    (["--set", "router_args.smoe.balance_weight=-1"], "balance_weight"),
    (["--set", "router_args.smoe.nonsense=1"], "nonsense"),
    (["--preset", "nosuch"], "unknown preset 'nosuch'"),
])
def test_bad_spec_one_line_exit_2_nothing_written(tmp_path, capsys, args, needle):
    store = tmp_path / "h.duckdb"
    base = ["run", "--suite", "lm", "--store", str(store), "--quiet", "--no-eval"]
    if "--preset" not in args:
        base += ["--preset", "tiny"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error:") and "\n" not in err, err
    assert needle in err, err
    assert not store.exists()


def test_spec_hash_stable_and_sensitive():
    a = load_suite("lm", preset="tiny", routers=["smoe"]).runs()[0]
    b = load_suite("lm", preset="tiny", routers=["smoe"]).runs()[0]
    c = load_suite("lm", preset="tiny", routers=["smoe"], overrides=["train.lr=0.001"]).runs()[0]
    d = load_suite("lm", preset="tiny", routers=["smoe"], seeds=[1], overrides=["train.threads=1"]).runs()[0]
    assert a.spec_hash == b.spec_hash == d.spec_hash  # seed and thread count are not part of the hash
    assert a.spec_hash != c.spec_hash
    assert d.seed == 1


def test_paper_preset_resolves():
    s = load_suite("lm", preset="paper", routers=["smoe"])
    assert (s.model.d_model, s.model.n_layers, s.model.num_experts, s.model.context) == (264, 6, 16, 512)
    assert s.train.steps == 60000 and s.train.batch_size == 48 and s.data.corpus == "enwik8"
    with pytest.raises(SpecError, match="unknown preset"):
        load_suite("lm", preset="nope")


def test_set_accepts_exponent_floats_yaml_reads_as_strings():
    """YAML 1.1 parses `1e-2` (no dot) as a string; `--set train.lr=1e-2` still means 0.01."""
    from harness.spec import load_suite

    spec = load_suite("lm", preset="tiny", overrides=["train.lr=1e-2", "train.weight_decay=5E-3"], routers=["smoe"])
    run = spec.runs()[0]
    assert run.train.lr == 0.01 and run.train.weight_decay == 0.005


def test_final_validation_pass_reads_the_whole_split(tmp_path, monkeypatch):
    """The verdict's metric (the last val pass, and the test pass) covers the whole split; periodic passes
    read train.eval_batches. `tiny` caps the final passes (train.final_eval_batches) only to stay CI-sized."""
    from harness.suites.lm import LMSuite

    calls = []
    real = LMSuite.evaluate

    def spy(self, model, run, split, device, hook, max_batches):
        calls.append((split, max_batches))
        return real(self, model, run, split, device, hook, max_batches)

    monkeypatch.setattr(LMSuite, "evaluate", spy)
    store = tmp_path / "h.duckdb"
    assert main(["run", "--suite", "lm", "--routers", "smoe", "--store", str(store), *TINY, "--set", "train.steps=4",
                 "--set", "train.eval_every=2", "--set", "train.final_eval_batches=null"]) == 0
    assert calls == [("val", 2), ("val", None), ("test", None)]
    calls.clear()
    assert main(["run", "--suite", "lm", "--routers", "smoe", "--store", str(store), *TINY, "--set", "train.steps=4",
                 "--set", "train.eval_every=2"]) == 0
    assert calls == [("val", 2), ("val", 16), ("test", 16)]  # the tiny preset's cap
