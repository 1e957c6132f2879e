"""harness regress: a deliberately broken router fails on exactly that router and metric."""
import json
import time

import pytest
import torch

from harness import registry
from harness.cli import main
from harness.regress import judge
from harness.registry import register_router

from baselines.smoe import SMoERouter


class Broken:
    quality = False
    speed = False


class BadQualityRouter(SMoERouter):
    """SMoE whose routing becomes random (experts and weights ignore the input) when Broken.quality is set."""

    def forward(self, x, ctx):
        r = super().forward(x, ctx)
        if Broken.quality:
            T, k = r.indices.shape
            r.indices = torch.rand(T, self.num_experts, device=x.device).topk(k, -1).indices
            r.weights = torch.rand_like(r.weights)
        return r


class SlowRouter(SMoERouter):
    """SMoE that sleeps on every forward when Broken.speed is set."""

    def forward(self, x, ctx):
        if Broken.speed:
            time.sleep(0.05)
        return super().forward(x, ctx)


@pytest.fixture
def plugins():
    register_router("test-badq")(BadQualityRouter)
    register_router("test-slow")(SlowRouter)
    Broken.quality = Broken.speed = False
    yield
    registry.unregister_router("test-badq")
    registry.unregister_router("test-slow")


@pytest.mark.slow
def test_broken_router_fails_exactly_its_metric(tmp_path, plugins, capsys):
    golden = tmp_path / "golden.json"
    common = ["regress", "--routers", "smoe,test-badq,test-slow", "--baseline", str(golden), "--quiet",
              "--repeats", "7"]
    assert main(common + ["--update", "--seeds", "0,1"]) == 0
    g = json.loads(golden.read_text())
    assert set(g["routers"]) == {"smoe", "test-badq", "test-slow"}
    assert g["routers"]["smoe"]["quality"]["tolerance"] >= 0.01
    capsys.readouterr()

    assert main(common) == 0  # unchanged code passes
    capsys.readouterr()

    Broken.quality = Broken.speed = True
    assert main(common) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") >= 2
    summary = out.strip().splitlines()[-1]
    assert "test-badq/val_bpb FAIL" in summary and "test-slow/ratio_vs_dense FAIL" in summary
    assert "smoe/" not in summary.replace("test-", "")  # the unchanged router passes both checks
    assert "test-badq/ratio_vs_dense" not in summary and "test-slow/val_bpb" not in summary


def test_spec_change_is_refused_loudly():
    golden = {"seed": 0, "routers": {"smoe": {"spec_hash": "aaa", "quality": {"value": 2.0, "tolerance": 0.05}}}}
    quality = {"smoe": {"spec_hash": "bbb", "values": {0: 2.0}, "status": {0: "finished"}}}
    (c,) = judge(golden, quality, {})
    assert c.status == "SPEC-CHANGED" and "--update" in c.detail


def test_throughput_rule_needs_both_significance_and_effect():
    golden = {"seed": 0, "routers": {"r": {"spec_hash": "h", "quality": {"value": 1, "tolerance": 1},
                                           "throughput": {"samples": [1.0, 1.01, 0.99, 1.02, 0.98, 1.0, 1.01]}}}}
    noisy = [1.03, 1.05, 1.04, 1.06, 1.02, 1.05, 1.04]      # significant but only +4%: passes
    slow = [1.25, 1.22, 1.24, 1.2, 1.26, 1.23, 1.21]         # +23%: fails
    wild = [0.8, 1.5, 0.9, 1.4, 1.0, 1.3, 0.95]              # big spread, not significant: passes
    assert judge(golden, {}, {"r": noisy})[0].status == "pass"
    assert judge(golden, {}, {"r": slow})[0].status == "FAIL"
    assert judge(golden, {}, {"r": wild})[0].status == "pass"


def test_throughput_golden_from_another_bench_config_is_refused():
    golden = {"seed": 0, "routers": {"r": {"spec_hash": "h", "quality": {"value": 1, "tolerance": 1},
                                           "throughput": {"samples": [1.0] * 7, "median": 1.0,
                                                          "bench": {"tokens": 1}}}}}
    (c,) = judge(golden, {}, {"r": [1.0] * 7})
    assert c.status == "SPEC-CHANGED" and "--update" in c.detail
