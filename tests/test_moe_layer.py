"""The MoE layer against references: dense FFN in the degenerate case, a naive per-token loop, capacity."""
import math

import pytest
import torch
import torch.nn.functional as F

from harness.layers.moe import ExpertBank, MoELayer, build_ffn
from harness.routing.router import RouteContext, Router, Routing


class FixedRouter(Router):
    """Routes by a fixed table (test helper; not registered)."""

    def __init__(self, d_model, num_experts, top_k, table=None, weights=None):
        super().__init__(d_model, num_experts, top_k)
        self.table, self.w = table, weights

    def forward(self, x, ctx):
        return Routing(indices=self.table, weights=self.w, logits=None)


def naive_reference(layer: MoELayer, x, idx, w):
    """Per-token, per-slot loop: y_t = sum_j w_tj * FFN_{idx_tj}(x_t)."""
    ex = layer.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = ex.act(x[t] @ ex.w1[e] + ex.b1[e])
            out[t] += w[t, j] * (h @ ex.w2[e] + ex.b2[e])
    return out


def test_one_expert_k1_weight1_equals_dense_ffn():
    torch.manual_seed(0)
    d, f, T = 8, 16, 11
    router = FixedRouter(d, 1, 1, table=torch.zeros(T, 1, dtype=torch.long), weights=torch.ones(T, 1))
    layer = MoELayer(d, f, router)
    x = torch.randn(T, d)
    fc1 = torch.nn.Linear(d, f)
    fc2 = torch.nn.Linear(f, d)
    with torch.no_grad():
        fc1.weight.copy_(layer.experts.w1[0].t())
        fc1.bias.copy_(layer.experts.b1[0])
        fc2.weight.copy_(layer.experts.w2[0].t())
        fc2.bias.copy_(layer.experts.b2[0])
    y, _ = layer(x, RouteContext())
    torch.testing.assert_close(y, fc2(F.gelu(fc1(x))))


@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (7, 4, 2), (33, 8, 3), (16, 3, 3), (50, 16, 2)])
def test_layer_equals_naive_reference(T, E, k):
    torch.manual_seed(T + E + k)
    d, f = 8, 12
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    layer = MoELayer(d, f, FixedRouter(d, E, k, table=idx, weights=w))
    with torch.no_grad():
        layer.experts.b1.normal_()
        layer.experts.b2.normal_()
    x = torch.randn(T, d)
    y, _ = layer(x, RouteContext())
    torch.testing.assert_close(y, naive_reference(layer, x, idx, w), rtol=1e-5, atol=1e-5)


def test_experts_without_tokens_and_gradients():
    torch.manual_seed(1)
    d, f, T, E = 8, 12, 10, 6
    idx = torch.zeros(T, 2, dtype=torch.long)
    idx[:, 1] = 3  # experts 1, 2, 4, 5 get nothing
    layer = MoELayer(d, f, FixedRouter(d, E, 2, table=idx, weights=torch.full((T, 2), 0.5)))
    x = torch.randn(T, d, requires_grad=True)
    y, _ = layer(x, RouteContext())
    y.sum().backward()
    g = layer.experts.w1.grad
    assert g[0].abs().sum() > 0 and g[3].abs().sum() > 0
    assert g[1].abs().sum() == 0 and g[5].abs().sum() == 0
    assert layer.last_counts.tolist() == [T, 0, 0, T, 0, 0]


def test_capacity_drops_least_preferred_slots_first():
    d, f, T, E, k = 4, 8, 8, 2, 2
    # all first choices go to expert 0, all second choices to expert 1
    idx = torch.stack([torch.zeros(T, dtype=torch.long), torch.ones(T, dtype=torch.long)], 1)
    layer = MoELayer(d, f, FixedRouter(d, E, k, table=idx, weights=torch.ones(T, k)), capacity_factor=0.5)
    assert layer.capacity(T) == math.ceil(0.5 * T * k / E) == 4
    x = torch.randn(T, d)
    y, routing = layer(x, RouteContext())
    assert routing.stats["dropped_tokens"] == 8.0
    # tokens 0..3 keep both experts, tokens 4..7 are dropped entirely (output 0)
    ref = naive_reference(layer, x, idx, torch.ones(T, k))
    torch.testing.assert_close(y[:4], ref[:4])
    assert torch.all(y[4:] == 0)

    # k-major priority: first choices beat second choices for the same expert
    idx2 = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0]])
    l2 = MoELayer(d, f, FixedRouter(d, E, k, table=idx2, weights=torch.ones(4, k)), capacity_factor=0.5)
    assert l2.capacity(4) == 2
    y2, r2 = l2(torch.randn(4, d), RouteContext())
    assert r2.stats["dropped_tokens"] == 4.0  # the four second choices


def test_all_expert_path_matches_dispatch():
    torch.manual_seed(2)
    d, f, T, E, k = 8, 12, 9, 4, 2
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)

    class AllRouter(FixedRouter):
        def forward(self, x, ctx):
            ctx.all_expert_outputs()
            return super().forward(x, ctx)

    a = MoELayer(d, f, FixedRouter(d, E, k, table=idx, weights=w))
    b = MoELayer(d, f, AllRouter(d, E, k, table=idx, weights=w))
    b.load_state_dict(a.state_dict())
    x = torch.randn(T, d)
    ya, _ = a(x, RouteContext())
    calls = []
    orig = b.experts.forward_segments
    b.experts.forward_segments = lambda *args: calls.append(1) or orig(*args)
    yb, _ = b(x, RouteContext())
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    assert calls == [], "experts ran twice although the router asked for all expert outputs"


def test_forward_all_matches_each_expert():
    torch.manual_seed(3)
    bank = ExpertBank(3, 6, 10)
    x = torch.randn(5, 6)
    allo = bank.forward_all(x)
    for e in range(3):
        torch.testing.assert_close(allo[:, e], bank.expert(e, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smoe_layer_dtypes_and_leading_dims(dtype):
    layer = build_ffn("smoe", 16, 32, 4, 2).to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype)
    y, r = layer(x, RouteContext(training=True))
    assert y.shape == x.shape and y.dtype == dtype
    assert r.indices.shape == (10, 2)


def test_bad_router_output_shape_is_reported():
    T, d = 4, 8
    layer = MoELayer(d, 8, FixedRouter(d, 2, 2, table=torch.zeros(T, 1, dtype=torch.long), weights=torch.ones(T, 1)))
    with pytest.raises(RuntimeError, match="expected \\(4, 2\\)"):
        layer(torch.randn(T, d), RouteContext())


def test_dense_baseline_has_equal_active_flops():
    dense = build_ffn("dense", 16, 32, 8, 2)
    assert dense.fc1.out_features == 32 * 2
    moe = build_ffn("smoe", 16, 32, 8, 2)
    per_token_dense = dense.fc1.weight.numel() + dense.fc2.weight.numel()
    per_token_moe = 2 * (moe.experts.w1[0].numel() + moe.experts.w2[0].numel())
    assert per_token_dense == per_token_moe


def test_forward_is_its_named_steps():
    """route -> permute -> run_experts -> combine, called by hand, is forward bit for bit; the Dispatch plan."""
    from harness.layers.moe import STEPS

    torch.manual_seed(4)
    d, f, T, E, k = 6, 10, 12, 3, 2
    idx = torch.tensor([[0, 1]] * 8 + [[2, 0]] * 4)
    w = torch.rand(T, k)
    layer = MoELayer(d, f, FixedRouter(d, E, k, table=idx, weights=w), capacity_factor=1.0, shared_experts=1)
    x = torch.randn(T, d)
    marks = []
    y, _ = layer(x, RouteContext(), mark=marks.append)
    assert marks == list(STEPS)

    ctx = RouteContext()
    routing = layer.route(x, ctx)
    plan = layer.permute(x, routing, ctx)
    assert not plan.from_all_outputs
    cap = layer.capacity(T)  # ceil(1.0 * 12 * 2 / 3) = 8: expert 0 has 12 slots, 4 (second choices) drop
    assert cap == 8 and plan.counts.tolist() == [8, 8, 4] and plan.dropped == 4
    assert plan.rows().shape == (20, d) and plan.order.shape == plan.token.shape == (20,)
    # expert 0's segment: the 8 first choices (tokens 0..7) in token order; the 4 second choices dropped
    assert plan.token[:8].tolist() == list(range(8))
    y2 = layer.combine(x, plan, layer.run_experts(plan))
    assert torch.equal(y, y2)


def test_route_context_attach_experts():
    ctx = RouteContext()
    with pytest.raises(RuntimeError, match="no experts attached"):
        ctx.all_expert_outputs()
    calls = []
    ctx.attach_experts(lambda: calls.append(1) or torch.ones(2, 3, 4))
    assert not ctx.has_all_expert_outputs
    assert ctx.all_expert_outputs().shape == (2, 3, 4) and ctx.all_expert_outputs() is ctx.all_expert_outputs()
    assert calls == [1] and ctx.has_all_expert_outputs  # memoised
    ctx.attach_experts(lambda: torch.zeros(1))  # new experts: the old outputs are forgotten
    assert not ctx.has_all_expert_outputs and ctx.all_expert_outputs().shape == (1,)


def test_all_expert_path_plans_no_slots():
    d, f, T, E, k = 4, 8, 5, 3, 2
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]])

    class AllRouter(FixedRouter):
        def forward(self, x, ctx):
            ctx.all_expert_outputs()
            return super().forward(x, ctx)

    layer = MoELayer(d, f, AllRouter(d, E, k, table=idx, weights=torch.ones(T, k)))
    x = torch.randn(T, d)
    ctx = RouteContext()
    routing = layer.route(x, ctx)
    plan = layer.permute(x, routing, ctx)
    assert plan.from_all_outputs and plan.x_sorted is None and plan.counts.tolist() == [4, 3, 3]
    y = layer.combine(x, plan, ctx.all_expert_outputs())
    torch.testing.assert_close(y, naive_reference(layer, x, idx, torch.ones(T, k)), rtol=1e-5, atol=1e-5)
