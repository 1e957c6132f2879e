"""Zero-computation experts (issue 31, MoE++ arXiv 2410.07348): the layer's null experts on hand-computed inputs,
their loads and FLOPs, capacity, variable k, the all-expert-outputs path, the spec keys, and that every existing
router is unchanged while the keys are 0."""
from __future__ import annotations

import math

import pytest
import torch

from harness.cli import main
from harness.layers.moe import MoELayer, build_ffn
from harness.layers.null_experts import NullExperts, NullMix, ffn_flops
from harness.routing.router import RouteContext, Router, Routing
from harness.spec import SpecError, left_out_of_hash, load_suite, ModelSpec

MIX = NullMix(constant=1, copy=1, zero=1)  # experts E_ffn (constant), E_ffn + 1 (copy), E_ffn + 2 (zero)


class FixedRouter(Router):
    """Routes by a given [T, k] table (indices, weights); optionally asks for every expert's output first."""

    def __init__(self, d_model, num_experts, top_k, idx=None, w=None, all_outputs=False, variable=False):
        super().__init__(d_model, num_experts, top_k)
        self.idx, self.w, self.all_outputs = idx, w, all_outputs
        self.variable = variable
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    @property
    def num_slots(self):
        return self.idx.shape[1]

    def forward(self, x, ctx):
        if self.all_outputs:
            ctx.all_expert_outputs()
        return Routing(self.idx, self.w + 0 * self.dummy, None)


def _null(d=2):
    n = NullExperts(d, MIX)
    with torch.no_grad():
        n.const_gate.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))  # W_c = I: a = softmax(x)
        n.const_vec.copy_(torch.tensor([[10.0, 20.0]]))
    return n


def test_null_outputs_by_hand():
    n = _null()
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
    out = n.outputs(x, torch.tensor([0, 1, 2]))
    # constant on [0, 0]: a = softmax([0, 0]) = (1/2, 1/2) -> [5, 10]; copy -> x; zero -> 0
    assert torch.allclose(out[0], torch.tensor([5.0, 10.0]))
    assert torch.equal(out[1], x[1]) and torch.equal(out[2], torch.zeros(2))
    a = torch.softmax(torch.tensor([3.0, -1.0]), 0)
    assert torch.allclose(n.outputs(x[2:], torch.tensor([0]))[0], a[0] * x[2] + a[1] * torch.tensor([10.0, 20.0]))
    allc = n.forward_all(x)
    assert allc.shape == (3, 3, 2) and torch.equal(allc[:, 1], x) and torch.equal(allc[:, 2], torch.zeros(3, 2))
    assert n.flops(torch.tensor([4, 5, 6])) == 4 * 7 * 2  # constant slots only


def _layer(idx, w, capacity_factor=None, **kw):
    torch.manual_seed(0)
    E_ffn = 2
    router = FixedRouter(2, E_ffn + MIX.total, idx.shape[1], idx=idx, w=w, **kw)
    layer = MoELayer(2, 4, router, capacity_factor=capacity_factor, null_experts=MIX)
    with torch.no_grad():
        layer.null_experts.const_gate.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
        layer.null_experts.const_vec.copy_(torch.tensor([[10.0, 20.0]]))
    return layer


X = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
IDX = torch.tensor([[0, 2], [3, 4], [1, 4]])          # token 0: FFN 0 + constant; 1: copy + zero; 2: FFN 1 + zero
W = torch.tensor([[0.5, 0.5], [0.75, 0.25], [1.0, 0.0]])


def test_layer_combines_ffn_and_null_outputs_by_hand():
    layer = _layer(IDX, W)
    y, r = layer(X, training=True)
    e = layer.experts
    want = torch.stack([0.5 * e.expert(0, X[:1])[0] + 0.5 * torch.tensor([5.0, 10.0]),
                        0.75 * X[1],
                        e.expert(1, X[2:])[0]])
    assert torch.allclose(y, want, atol=1e-6)
    # loads over every expert the router scores: FFN 0, FFN 1, constant, copy, zero
    assert layer.last_counts.tolist() == [1, 1, 1, 1, 2]
    assert r.stats["ffn_experts_per_token"] == pytest.approx(2 / 3)
    assert r.stats["null_share"] == pytest.approx(4 / 6)
    assert layer.expert_flops() == ffn_flops(2, 2, 4) + 7 * 2 * 1 == 4 * 2 * 2 * 4 + 14
    # the same through ctx.all_expert_outputs() (CompeteSMoE's path): every expert incl. the null ones, once
    y2, _ = _layer(IDX, W, all_outputs=True)(X, training=True)
    assert torch.allclose(y2, y, atol=1e-6)
    # gradients reach the constant expert's parameters and the input
    x = X.clone().requires_grad_(True)
    layer(x, training=True)[0].sum().backward()
    assert layer.null_experts.const_vec.grad.abs().sum() > 0 and x.grad is not None


def test_capacity_limits_ffn_experts_only():
    idx = torch.tensor([[0, 2], [0, 3], [0, 4], [0, 3]])  # FFN 0 taken 4 times, the null experts 4 times
    w = torch.full((4, 2), 0.5)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    layer = _layer(idx, w, capacity_factor=1.0)
    assert layer.capacity(4) == math.ceil(1.0 * 4 * 2 / 5) == 2  # k T / (E_ffn + n_null)
    y, r = layer(x, training=True)
    assert r.stats["dropped_tokens"] == 2.0
    assert layer.last_counts.tolist() == [2, 0, 1, 2, 1]  # FFN 0 capped, null slots never dropped
    assert r.stats["null_share"] == pytest.approx(4 / 8)
    # tokens 2 and 3 lost their FFN slot (first come first served): their copy / zero / constant parts remain
    assert torch.allclose(y[3], 0.5 * x[3], atol=1e-6)  # copy only


def test_variable_k_unused_slots_and_null_slots():
    idx = torch.tensor([[3, 0, 1], [4, 2, 0]])
    w = torch.tensor([[0.6, 0.4, 0.0], [0.5, 0.5, 0.0]])  # weight 0: unused slot
    torch.manual_seed(0)
    router = FixedRouter(2, 5, 2, idx=idx, w=w)
    router.variable_k = True
    layer = MoELayer(2, 4, router, null_experts=MIX)
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    y, r = layer(x, training=True)
    assert layer.last_counts.tolist() == [1, 0, 1, 1, 1]
    assert r.stats["ffn_experts_per_token"] == pytest.approx(0.5)


def test_every_router_unchanged_while_the_keys_are_0(monkeypatch):
    """smoe's layer output and gradients from a fixed seed equal those recorded before null experts existed
    (HEAD 1fbeeb8's code, the same script), and no key adds a parameter or a buffer to the state dict.
    Recorded with the router's ATen composite, so it runs here (the fused router tail rounds its backward
    within a few ulp of it: tests/test_fast_router_tail.py)."""
    import baselines.smoe

    monkeypatch.setattr(baselines.smoe, "router_tail", lambda *a, **k: None)
    torch.manual_seed(0)
    layer = build_ffn("smoe", 16, 32, 4, 2)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, r = layer(x, RouteContext(training=True, step=50, total_steps=100))
    (y.square().sum() + sum(r.aux_losses.values(), torch.zeros(()))).backward()
    assert layer.null_experts is None and "dropped_tokens" in r.stats and "null_share" not in r.stats
    assert float(y.detach().double().sum()) == 0.5076051615178585
    assert float(y.detach().double().abs().sum()) == 80.39235254004598
    assert float(x.grad.double().abs().sum()) == 39.10996286512818
    assert float(layer.router.gate.weight.grad.double().abs().sum()) == 38.97691932879388
    assert float(layer.experts.w1.grad.double().abs().sum()) == 486.2277053661419
    assert layer.last_counts.tolist() == [20, 14, 23, 23]
    assert sorted(layer.state_dict()) == ["experts.b1", "experts.b2", "experts.w1", "experts.w2", "router.gate.weight"]


def test_same_ffn_experts_with_and_without_null_experts():
    """The null experts are added beside the same E FFN experts: same bank init from the same stream."""
    a = build_ffn("smoe", 8, 16, 4, 2, init_stream=(0, "blocks.0.ffn"))
    b = build_ffn("smoe", 8, 16, 4, 2, init_stream=(0, "blocks.0.ffn"), zero_experts=1, copy_experts=2)
    assert b.num_experts == 7 and b.num_ffn_experts == 4 and b.router.num_experts == 7
    assert torch.equal(a.experts.w1, b.experts.w1) and torch.equal(a.experts.b2, b.experts.b2)
    assert build_ffn("dense", 8, 16, 4, 2, zero_experts=1).__class__.__name__ == "DenseFFN"


def test_spec_keys_hash_and_validation():
    s = load_suite("lm", preset="tiny", routers=["smoe"])
    for key in ("zero_experts", "copy_experts", "constant_experts"):
        f = next(f for f in ModelSpec.__dataclass_fields__.values() if f.name == key)
        assert left_out_of_hash(f, 0) and not left_out_of_hash(f, 1)
    s1 = load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.zero_experts=1"])
    assert s1.runs()[0].spec_hash != s.runs()[0].spec_hash
    with pytest.raises(SpecError, match="model.zero_experts=-1 must be an integer >= 0"):
        load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.zero_experts=-1"])
    with pytest.raises(SpecError, match="pins its null experts"):
        load_suite("lm", preset="tiny", routers=["moepp"], overrides=["model.copy_experts=1"])
    with pytest.raises(SpecError, match="expert_parallel"):
        load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.copy_experts=1",
                                                                      "model.expert_parallel=true"])
    with pytest.raises(ValueError, match="not carried over to an expert-parallel layer"):
        lay = build_ffn("smoe", 8, 16, 4, 2, zero_experts=1)
        MoELayer(8, 16, lay.router, experts=lay.experts)  # what ExpertParallelMoELayer.from_layer builds


def test_cli_negative_key_is_one_line_exit_2(capsys):
    rc = main(["run", "--suite", "lm", "--preset", "tiny", "--no-eval", "--quiet", "--set", "model.zero_experts=-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("harness: error: ") and "zero_experts" in err[0]
