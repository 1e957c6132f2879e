"""Issue 32: one MoEConfig from the spec to the layer, its rules checked once; the MoEModel contract; the plugin
re-export modules; kernels on the one Registry; the suite hooks."""
from __future__ import annotations

import pytest
import torch

from harness.layers.build import build_ffn
from harness.layers.config import ConfigError, MoEConfig
from harness.layers.moe_layer import MoELayer
from harness.models.base import MoEModel
from harness.models.lm import MoEDecoderLM
from harness.spec import SpecError, load_suite
from harness.suites import get_adapter
from harness.suites.lm import build_lm


def test_from_spec_fills_keys_older_runs_lack():
    run = load_suite("lm", preset="tiny", routers=["smoe"]).runs()[0]
    d = run.to_dict()
    old = {**d, "model": {k: v for k, v in d["model"].items()
                          if k not in ("moe_last", "shared_experts", "experts_impl", "zero_experts", "copy_experts",
                                       "constant_experts", "balance_scope", "balance_window", "expert_parallel")}}
    assert MoEConfig.from_spec(old) == MoEConfig.from_spec(run)
    c = MoEConfig.from_spec(run)
    assert (c.router, c.num_experts, c.top_k, c.d_ff) == ("smoe", run.model.num_experts, run.model.top_k, run.model.d_ff)


@pytest.mark.parametrize("changes, key", [
    ({"top_k": 9}, "model.top_k=9 must be between 1 and model.num_experts=8"),
    ({"moe_every": 0}, "model.moe_every=0 must be positive"),
    ({"shared_experts": -1}, "model.shared_experts=-1 must be an integer >= 0"),
    ({"experts_impl": "fast"}, "model.experts_impl='fast' must be one of"),
    ({"shared_experts": 1, "expert_parallel": True}, "with model.expert_parallel=true is not supported"),
    ({"zero_experts": 1, "expert_parallel": True}, "zero-computation experts"),
    ({"router": "moepp", "copy_experts": 1}, "pins its null experts"),
    ({"balance_scope": "batch"}, "model.balance_scope='batch' must be one of micro, global"),
    ({"balance_window": 3}, "model.balance_window=3 needs model.balance_scope=global"),
])
def test_each_rule_once_same_line_at_build_and_in_the_spec(changes, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace("[", r"\[")):
        MoEConfig(**changes)
    overrides = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items()
                 if k != "router"]
    with pytest.raises(SpecError, match=key.replace("(", r"\(")):
        load_suite("lm", routers=[changes.get("router", "smoe")], overrides=overrides)


def test_keyword_form_builds_what_the_config_builds():
    cfg = MoEConfig(router="smoe", num_experts=4, top_k=2, d_ff=16, shared_experts=1, zero_experts=1)
    torch.manual_seed(0)
    a = build_ffn(cfg, 8)
    torch.manual_seed(0)
    b = build_ffn("smoe", 8, 16, 4, 2, shared_experts=1, zero_experts=1)
    assert isinstance(a, MoELayer) and a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    with pytest.raises(TypeError):
        build_ffn(cfg, 8, 16, 4)  # the config holds the other options


def test_lm_keyword_form_equals_config_form_and_blocks_follow_is_moe_block():
    kw = dict(d_ff=16, num_experts=4, top_k=2, moe_every=2)
    torch.manual_seed(0)
    a = MoEDecoderLM("smoe", d_model=16, n_layers=3, n_heads=2, context=8, **kw)
    torch.manual_seed(0)
    b = MoEDecoderLM(MoEConfig(router="smoe", **kw), d_model=16, n_layers=3, n_heads=2, context=8)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert [isinstance(blk.ffn, MoELayer) for blk in a.blocks] == [a.moe_config.is_moe_block(i, 3) for i in range(3)] \
        == [True, False, True]
    assert isinstance(a, MoEModel) and a.moe_layers() == [a.blocks[0].ffn, a.blocks[2].ffn]


def test_balance_scope_reaches_the_layer_from_the_spec():
    run = load_suite("lm", preset="tiny", routers=["smoe"],
                     overrides=["model.balance_scope=global", "model.balance_window=2"]).runs()[0]
    layers = build_lm(run).moe_layers()
    assert layers and all(m.balance_scope == "global" and m.global_balance.window == 2 for m in layers)


def test_plugin_import_paths_are_plain_modules_with_the_same_objects():
    import sys

    import harness.layers.moe
    import harness.losses
    import harness.moe
    import harness.registry
    import harness.router
    import harness.routing.losses
    import harness.routing.registry
    import harness.routing.router

    assert sys.modules["harness.router"] is not harness.routing.router  # no sys.modules swap
    assert harness.router.Router is harness.routing.router.Router
    assert harness.registry.register_router is harness.routing.registry.register_router
    assert harness.registry.ROUTERS is harness.routing.registry.ROUTERS
    assert harness.losses.BALANCE_SCOPES is harness.routing.losses.BALANCE_SCOPES
    assert harness.moe.MoELayer is harness.layers.moe.MoELayer and harness.moe.MoEConfig is MoEConfig


def test_kernels_on_the_registry_keep_their_order():
    from harness.layers import kernels

    assert kernels.EXPERTS_IMPLS == ("auto", "loop", "loop_recompute", "fused", "padded_bmm", "grouped_mm")
    assert kernels.KERNELS["loop"] is kernels.run_loop and "auto" not in kernels.KERNELS
    from leaderboard.suites import SUITES

    assert "lm" in SUITES and [m.name for m in SUITES.values()] == ["lm", "vision"]


def test_suite_hooks_replace_name_tests():
    assert get_adapter("lm").lm_eval is True and get_adapter("vision").lm_eval is False
    run = load_suite("vision", preset="tiny", routers=["smoe"]).runs()[0]
    assert get_adapter("vision").warm_cache(run) is None  # nothing to build ahead


def test_regress_rules_read_declared_directions():
    from harness import metrics
    from harness.tools.regress.gate import RULES, worse_direction

    for name, rule in RULES.items():
        assert rule.worse == worse_direction(name)
    assert worse_direction("weight_sum") == "both" and metrics.direction("lmeval/x/word_perplexity") is False
    assert metrics.direction("acc") is True


def test_competesmoe_reads_the_step_from_on_step_only():
    from harness.routing.registry import create_router
    from harness.routing.router import RouteContext

    torch.manual_seed(0)
    r = create_router("competesmoe", 8, 4, 2, competition_prob=1.0, warmup_fraction=0.5)
    x = torch.randn(6, 8)
    # the context's step says past warm-up; the router was never told: step 0 of 1, in warm-up, no competition
    assert not r._competes(x, RouteContext(training=True, step=90, total_steps=100))
    r.on_step(90, 100)
    assert r._competes(x, RouteContext(training=True, step=0, total_steps=1))
