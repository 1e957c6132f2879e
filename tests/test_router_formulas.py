"""Formula tests for the published routers (X-MoE, StableMoE, CompeteSMoE, MoGE).

Each router is pinned against values computed by hand on a tiny input, then
trained for a few dozen steps inside a toy residual model (the loss must fall),
and its hyper-parameter domain checks are exercised.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.competesmoe import SHARED_COUNTER, CompeteSMoERouter
from baselines.moge import MoGERouter, gaussian_kernel, group_sparsity_penalty, map_shape
from baselines.stablemoe import StableMoERouter, stablemoe_balance_loss
from baselines.xmoe import XMoERouter
from harness.layers.moe import build_ffn
from harness.routing.registry import create_router
from harness.routing.router import RouteContext

# float(loss) on graph-attached scalars is intended here (hand-value comparisons)
pytestmark = [pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar"),
              pytest.mark.usefixtures("one_thread")]


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


# ---------------------------------------------------------------------------
# X-MoE
# ---------------------------------------------------------------------------


def test_xmoe_scores_are_cosine_over_temperature_and_bounded():
    torch.manual_seed(0)
    r = XMoERouter(8, 4, 2, routing_dim=3, temperature=0.5)
    with torch.no_grad():
        r.proj.weight.copy_(torch.eye(3, 8))  # W_p keeps the first 3 coordinates
        r.expert_embeddings.copy_(torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 0.5], [1.0, 1.0, 0]]))
    x = torch.zeros(1, 8)
    x[0, :3] = torch.tensor([3.0, 4.0, 0.0])  # |W_p x| = 5
    out = r(x, RouteContext(training=True))
    # cos with e_0..e_3: 3/5, 4/5, 0, 7/(5 sqrt 2); divided by tau = 0.5
    expected = torch.tensor([[0.6, 0.8, 0.0, 7 / (5 * math.sqrt(2))]]) / 0.5
    torch.testing.assert_close(out.logits, expected)
    assert out.logits.dtype == torch.float32
    assert out.indices.tolist() == [[3, 1]]
    p = expected.softmax(-1)[0]
    torch.testing.assert_close(out.weights[0], torch.stack([p[3], p[1]]) / (p[3] + p[1]))
    assert out.stats["temperature"] == pytest.approx(0.5)

    # bounded by 1/tau for arbitrary inputs (both normalised: |cos| <= 1)
    r2 = XMoERouter(16, 8, 2)
    big = r2(torch.randn(64, 16) * 100, RouteContext()).logits
    assert big.abs().max() <= 1 / 0.07 + 1e-3


def test_xmoe_temperature_learnable_or_fixed_and_code_variant():
    r = XMoERouter(8, 4, 1)
    assert r.raw_temperature.requires_grad
    assert isinstance(r.raw_temperature, nn.Parameter)
    fixed = XMoERouter(8, 4, 1, learnable_temperature=False, temperature=0.3)
    assert not isinstance(fixed.raw_temperature, nn.Parameter)
    assert all(p is not fixed.raw_temperature for p in fixed.parameters())
    # the official code's scores: token not normalised, no temperature
    code = XMoERouter(8, 4, 1, normalize_tokens=False, temperature=1.0, learnable_temperature=False)
    x = torch.randn(5, 8)
    h = x @ code.proj.weight.t()
    e = F.normalize(code.expert_embeddings, dim=-1)
    torch.testing.assert_close(code(x, RouteContext()).logits, (h @ e.t()).detach())
    # balance loss as SMoE, optional z-loss
    out = XMoERouter(8, 4, 2, z_loss_weight=1e-3)(x, RouteContext(training=True))
    assert set(out.aux_losses) == {"balance", "z_loss"}


# ---------------------------------------------------------------------------
# StableMoE
# ---------------------------------------------------------------------------


def _stablemoe_fixture():
    r = StableMoERouter(2, 2, 1, vocab_size=8, distill_dim=3)
    with torch.no_grad():
        r.centroids.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([0, 1, 2, 3])
    return r, x, ids


def test_stablemoe_balance_loss_hand_value_and_sigmoid_gate():
    r, x, ids = _stablemoe_fixture()
    out = r(x, RouteContext(training=True, token_ids=ids))
    # scores s_t = x_t (identity centroids): assignments 0, 0, 0, 1 -> |A| = (3, 1), n = T/E = 2
    assert out.indices[:, 0].tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(out.weights[:, 0], torch.tensor([sigmoid(2), sigmoid(1), sigmoid(3), sigmoid(1)]))
    raw = 0.5 * (sigmoid(2) + sigmoid(1) + sigmoid(3)) + (-0.5) * sigmoid(1)
    assert float(stablemoe_balance_loss(x @ torch.eye(2), torch.tensor([0, 0, 0, 1]))) == pytest.approx(raw, rel=1e-6)
    # default: per-token mean (the official code's effective normalisation), alpha = 0.3
    assert float(out.aux_losses["balance"]) == pytest.approx(0.3 * raw / 4, rel=1e-6)
    # distillation: 0.3 * mean cross-entropy of the distilled scores against the stage-1 argmax
    s_hat = r.distill_embedding(ids) @ r.distill_centroids.t()
    ce = F.cross_entropy(s_hat, torch.tensor([0, 0, 0, 1]))
    assert float(out.aux_losses["distill"]) == pytest.approx(0.3 * float(ce), rel=1e-5)
    assert out.stats["stage"] == 1.0
    # literal sums
    rs = StableMoERouter(2, 2, 1, vocab_size=8, loss_reduction="sum")
    with torch.no_grad():
        rs.centroids.copy_(torch.eye(2))
    assert float(rs(x, RouteContext(training=True, token_ids=ids)).aux_losses["balance"]) == pytest.approx(0.3 * raw, rel=1e-6)


def test_stablemoe_balance_loss_gradient_direction():
    # overloaded expert 0 gets its scores pushed down, underloaded expert 1 up
    s = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]], requires_grad=True)
    stablemoe_balance_loss(s, torch.tensor([0, 0, 0, 1])).backward()
    assert (s.grad[:3, 0] > 0).all() and s.grad[3, 1] < 0


def test_stablemoe_stage2_freezes_distilled_router_under_adamw_weight_decay():
    torch.manual_seed(0)
    layer = build_ffn("stablemoe", d_model=8, d_ff=16, num_experts=4, top_k=1, router_kwargs={"vocab_size": 16})
    router: StableMoERouter = layer.router
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 16, (32,))
    N = 20

    def step(s: int) -> tuple[torch.Tensor, dict]:
        router.on_step(s, N)
        x = torch.randn(32, 8)
        y, routing = layer(x, training=True, step=s, total_steps=N, token_ids=ids)
        loss = y.pow(2).mean() + sum(routing.aux_losses.values())
        opt.zero_grad(set_to_none=False)  # the harsher variant: a zeroed grad would still be decayed
        loss.backward()
        opt.step()
        return routing.indices.clone(), routing.aux_losses

    _, aux = step(0)  # stage 1: the distilled router trains (and has AdamW state now)
    assert router.stage.item() == 1 and {"balance", "distill"} <= set(aux)
    assert router.distill_centroids.grad is not None

    idx_a, aux = step(2)  # 2 >= 0.1 * 20 -> stage 2
    assert router.in_stage2 and aux == {}
    assert all(not p.requires_grad and p.grad is None for p in router.distilled_parameters())
    frozen = [p.detach().clone() for p in router.distilled_parameters()]
    cent = router.centroids.detach().clone()
    idx_b, _ = step(3)
    idx_c, _ = step(4)
    for before, p in zip(frozen, router.distilled_parameters()):
        torch.testing.assert_close(p, before, rtol=0, atol=0)
    assert not torch.equal(router.centroids, cent)  # the sigmoid gate keeps training
    assert torch.equal(idx_a, idx_b) and torch.equal(idx_b, idx_c)  # routing depends on the token only
    # stage 2 routes by the distilled scores
    out = router(torch.randn(32, 8), RouteContext(training=True, token_ids=ids))
    s_hat = router.distill_embedding(ids) @ router.distill_centroids.t()
    assert torch.equal(out.indices[:, 0], s_hat.argmax(-1))
    assert out.stats["stage"] == 2.0


def test_stablemoe_distill_inputs_and_errors():
    r = StableMoERouter(4, 2, 1, vocab_size=10)
    x = torch.randn(3, 4)
    assert r(x, RouteContext(token_ids=torch.tensor([0, 1, 2]))).indices.shape == (3, 1)
    # no fallback to positions any more: the token reading embeds the token (tests/test_stablemoe_vision.py)
    with pytest.raises(ValueError, match="needs ctx.token_ids"):
        r(x, RouteContext(positions=torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match="vocab_size"):
        r(x, RouteContext(token_ids=torch.tensor([0, 1, 10])))
    pos = StableMoERouter(4, 2, 1, vocab_size=10, distill_input="position")
    assert pos(x, RouteContext(positions=torch.tensor([0, 1, 2]))).indices.shape == (3, 1)
    with pytest.raises(ValueError, match="stablemoe"):
        StableMoERouter(4, 2, 2)  # top-1 only
    assert StableMoERouter.capacity_factor == 2.0


# ---------------------------------------------------------------------------
# CompeteSMoE
# ---------------------------------------------------------------------------

# fixed expert outputs [T=2, E=3, d=2]: each row is c * (1, 1) except one
_OUT = torch.tensor(
    [
        [[1.0, 1.0], [3.0, 3.0], [-2.0, -2.0]],
        [[0.0, 0.0], [-1.0, -1.0], [2.0, 4.0]],
    ]
)


def _compete_ctx(**kw) -> RouteContext:
    return RouteContext(training=True, step=0, total_steps=10, expert_fn=lambda: _OUT.clone(), **kw)


def test_competesmoe_v2_routing_from_fixed_expert_outputs():
    r = CompeteSMoERouter(2, 3, 2, competition_prob=1.0, warmup_fraction=0.0)
    x = torch.randn(2, 2)
    ctx = _compete_ctx()
    out = r(x, ctx)
    # affinity = mean_d softplus(out)
    a = [[softplus(1), softplus(3), softplus(-2)], [softplus(0), softplus(-1), 0.5 * (softplus(2) + softplus(4))]]
    assert out.indices.tolist() == [[1, 0], [2, 0]]
    w = torch.tensor([[a[0][1], a[0][0]], [a[1][2], a[1][0]]])
    torch.testing.assert_close(out.weights, w / w.sum(-1, keepdim=True))
    # router loss: 0.01 * MSE(softmax(logits), softmax(affinity))
    probs = (x @ r.gate.weight.t()).softmax(-1)
    target = torch.tensor(a).softmax(-1)
    assert float(out.aux_losses["router_mse"]) == pytest.approx(0.01 * float(((probs - target) ** 2).mean()), rel=1e-5)
    # diversity: cosine of the two chosen outputs; token 0: (3,3) vs (1,1) -> 1; token 1: (2,4) vs (0,0) -> 0.
    # The v2 code zeroes the diagonal of each [k, k] similarity matrix and averages over all k^2 = 4 entries:
    # token 0 -> (0 + 1 + 1 + 0) / 4, token 1 -> 0; mean 0.25
    assert float(out.aux_losses["diversity"]) == pytest.approx(0.01 * 0.25, rel=1e-5)
    # balance on competition steps: Switch loss with P from softmax(affinity), f from the competition's FIRST
    # choices (moe.py balanceloss: one_hot(...)[0]): experts 1 and 2
    f = torch.tensor([0.0, 1 / 2, 1 / 2])
    assert float(out.aux_losses["balance"]) == pytest.approx(0.01 * 3 * float((f * target.mean(0)).sum()), rel=1e-5)
    assert out.stats["competed"] == 1.0
    router_sets = [sorted(row) for row in probs.topk(2, -1).indices.tolist()]
    agree = sum(s == c for s, c in zip(router_sets, [[0, 1], [0, 2]])) / 2
    assert out.stats["competition_agreement"] == pytest.approx(agree)
    assert ctx.shared[SHARED_COUNTER] == 1 and ctx.has_all_expert_outputs


def test_competesmoe_v1_norm_affinity_and_softmax_weights():
    r = CompeteSMoERouter(2, 3, 2, version=1, competition_prob=1.0, warmup_fraction=0.0)
    out = r(torch.randn(2, 2), _compete_ctx())
    n = [[math.sqrt(2), 3 * math.sqrt(2), 2 * math.sqrt(2)], [0.0, math.sqrt(2), math.sqrt(20)]]
    assert out.indices.tolist() == [[1, 2], [2, 1]]
    torch.testing.assert_close(out.weights, torch.tensor([[n[0][1], n[0][2]], [n[1][2], n[1][1]]]).softmax(-1))
    assert "diversity" not in out.aux_losses  # v1 has no diversity term


def test_competesmoe_schedule_warmup_eval_and_layer_cap():
    x = torch.randn(2, 2)
    r = CompeteSMoERouter(2, 3, 2, competition_prob=1.0)  # warm-up 5%
    r.on_step(4, 100)
    assert r(x, _compete_ctx()).stats["competed"] == 0.0
    r.on_step(5, 100)
    assert r(x, _compete_ctx()).stats["competed"] == 1.0
    assert r(x, RouteContext(training=False, expert_fn=lambda: _OUT)).stats["competed"] == 0.0
    normal = r(x, RouteContext(training=False))
    assert set(normal.aux_losses) == {"balance", "z_loss"}

    routers = [CompeteSMoERouter(2, 3, 2, competition_prob=1.0, warmup_fraction=0.0) for _ in range(5)]
    shared: dict = {}
    competed = [rt(x, _compete_ctx(shared=shared)).stats["competed"] for rt in routers]
    assert competed == [1.0, 1.0, 1.0, 0.0, 0.0] and shared[SHARED_COUNTER] == 3

    torch.manual_seed(0)
    rp = CompeteSMoERouter(2, 3, 2, competition_prob=0.3, warmup_fraction=0.0, max_competing_layers=None)
    rate = sum(rp(x, _compete_ctx()).stats["competed"] for _ in range(200)) / 200
    assert 0.2 < rate < 0.4


def test_competesmoe_layer_runs_experts_once():
    torch.manual_seed(0)
    layer = build_ffn("competesmoe", 8, 16, 4, 2, router_kwargs={"competition_prob": 1.0, "warmup_fraction": 0.0})
    calls = []
    orig = layer.experts.forward_all
    layer.experts.forward_all = lambda x: calls.append(1) or orig(x)
    x = torch.randn(6, 8)
    y, routing = layer(x, training=True)
    assert calls == [1] and routing.stats["competed"] == 1.0
    all_out = orig(x)
    expected = sum(routing.weights[:, j : j + 1] * all_out[torch.arange(6), routing.indices[:, j]] for j in range(2))
    torch.testing.assert_close(y, expected)


# ---------------------------------------------------------------------------
# MoGE
# ---------------------------------------------------------------------------


def test_moge_map_layout():
    assert map_shape(16) == (4, 4)
    assert map_shape(32) == (4, 8)
    assert map_shape(8) == (2, 4)
    assert map_shape(12) == (3, 4)
    assert map_shape(7) == (1, 7)
    assert map_shape(4) == (2, 2)


def test_moge_penalty_on_2x2_map_by_hand():
    sigma, eps = 1.0, 1e-6
    # 3x3 Gaussian at sigma=1: centre 1, edge e^{-1/2}, corner e^{-1}; normalised by their sum
    w0, w1, w2 = 1.0, math.exp(-0.5), math.exp(-1.0)
    S = w0 + 4 * w1 + 4 * w2
    torch.testing.assert_close(
        gaussian_kernel(sigma, 3), torch.tensor([[w2, w1, w2], [w1, w0, w1], [w2, w1, w2]]) / S
    )
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0]])  # 2x2 maps [[a, b], [c, d]]
    expected = 0.0
    for a, b, c, d in z.tolist():
        sq = {"a": a * a, "b": b * b, "c": c * c, "d": d * d}
        # zero padding: each position sees itself, its two edge neighbours and the diagonal one
        pos = [
            w0 * sq["a"] + w1 * (sq["b"] + sq["c"]) + w2 * sq["d"],
            w0 * sq["b"] + w1 * (sq["a"] + sq["d"]) + w2 * sq["c"],
            w0 * sq["c"] + w1 * (sq["a"] + sq["d"]) + w2 * sq["b"],
            w0 * sq["d"] + w1 * (sq["b"] + sq["c"]) + w2 * sq["a"],
        ]
        expected += sum(math.sqrt(p / S + eps) for p in pos) / 4
    expected /= 2  # mean over tokens
    got = group_sparsity_penalty(z, 2, 2, sigma, kernel_size=3, eps=eps, padding="same", reduction="mean")
    assert float(got) == pytest.approx(expected, rel=1e-6)

    # the earlier reading (moge@paper) applies it to its logits, weighted, instead of the balance loss
    r = create_router("moge@paper", 4, 4, 2, sigma_max=1.0, sigma_min=1.0)
    x = torch.randn(5, 4)
    out = r(x, RouteContext(training=True))
    assert set(out.aux_losses) == {"group_sparsity"}
    ref = 3e-3 * group_sparsity_penalty(x @ r.gate.weight.t(), 2, 2, 1.0, eps=1e-6, padding="same", reduction="mean")
    assert float(out.aux_losses["group_sparsity"]) == pytest.approx(float(ref), rel=1e-5)
    rb = MoGERouter(4, 4, 2, keep_balance_loss=True, penalize="probs", z_loss_weight=1e-3)
    assert set(rb(x, RouteContext(training=True)).aux_losses) == {"group_sparsity", "balance", "z_loss"}


def test_moge_group_sparsity_prefers_grouped_scores():
    # same total energy: two adjacent experts (one group) cost less than two far-apart ones
    # (valid windows cover the map's border less often, so compare experts every window sees: the interior)
    grouped = torch.zeros(1, 16)
    grouped[0, [5, 6]] = 3.0  # (1,1) and (1,2): neighbours
    spread = torch.zeros(1, 16)
    spread[0, [5, 10]] = 3.0  # (1,1) and (2,2): diagonal
    assert group_sparsity_penalty(grouped, 4, 4, 1.0) < group_sparsity_penalty(spread, 4, 4, 1.0)
    grouped, spread = torch.zeros(1, 16), torch.zeros(1, 16)
    grouped[0, [0, 1]] = 3.0
    spread[0, [0, 15]] = 3.0
    assert group_sparsity_penalty(grouped, 4, 4, 1.0, padding="same") < group_sparsity_penalty(spread, 4, 4, 1.0, padding="same")


def test_moge_sigma_schedule():
    lin = MoGERouter(4, 16, 2, sigma_max=3.0, sigma_min=1.0, sigma_schedule="linear")
    cos = MoGERouter(4, 16, 2, sigma_max=3.0, sigma_min=1.0, sigma_schedule="cosine")
    N = 100  # t = step / total_steps (Language_Modeling/sigmascheduler.py)
    for r in (lin, cos):
        r.on_step(0, N)
        assert r.sigma == pytest.approx(3.0)
        r.on_step(N, N)
        assert r.sigma == pytest.approx(1.0)
        r.on_step(50, N)
        assert r.sigma == pytest.approx(2.0)
    lin.on_step(25, N)
    cos.on_step(25, N)
    assert lin.sigma == pytest.approx(2.5)
    assert cos.sigma == pytest.approx(1.0 + 0.5 * 2.0 * (1 + math.cos(math.pi / 4)))
    assert cos(torch.randn(2, 4), RouteContext()).stats["sigma"] == pytest.approx(cos.sigma)


# ---------------------------------------------------------------------------
# every router trains a toy model
# ---------------------------------------------------------------------------

TRAIN_CASES = [
    ("xmoe", 2, {}),
    ("stablemoe", 1, {"vocab_size": 32}),
    ("competesmoe", 2, {"competition_prob": 0.5}),
    ("competesmoe", 2, {"competition_prob": 0.5, "version": 1}),
    ("moge", 2, {}),
]


@pytest.mark.parametrize("name,k,kwargs", TRAIN_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(TRAIN_CASES)])
def test_router_trains_toy_model(name, k, kwargs):
    """Residual regression x -> x + MoE(x) onto arbitrary per-token targets.

    Only the MoE layer (experts + router) is trainable, and 32 points in 16 dims
    cannot be fitted by any affine map, so ending below the best affine fit shows
    that routing and experts learned together, not just that some loss fell.
    """
    torch.manual_seed(0)
    V, d, N = 32, 16, 40
    table, target = torch.randn(V, d), torch.randn(V, d)  # token id -> input, token id -> target
    A = torch.cat([table, torch.ones(V, 1)], 1)
    affine_best = F.mse_loss(A @ torch.linalg.lstsq(A, target - table).solution + table, target).item()
    ffn = build_ffn(name, d_model=d, d_ff=32, num_experts=4, top_k=k, router_kwargs=kwargs)
    opt = torch.optim.AdamW(ffn.parameters(), lr=1e-2, weight_decay=0.01)
    losses, competed = [], 0.0
    for s in range(N):
        ffn.router.on_step(s, N)
        ids = torch.randint(0, V, (64,))
        x = table[ids]
        y, routing = ffn(x, training=True, step=s, total_steps=N, token_ids=ids)
        task = F.mse_loss(x + y, target[ids])
        loss = task + sum(routing.aux_losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(task.item())
        competed += routing.stats.get("competed", 0.0)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert last < affine_best, (last, affine_best)
    if name == "competesmoe":
        assert competed > 5  # competition steps happened and did not break training
    if name == "stablemoe":
        assert ffn.router.in_stage2


# ---------------------------------------------------------------------------
# hyper-parameter domains
# ---------------------------------------------------------------------------

BAD = [
    ("xmoe", {"routing_dim": 0}, "routing_dim"),
    ("xmoe", {"temperature": -1.0}, "temperature"),
    ("xmoe", {"balance_weight": -0.1}, "balance_weight"),
    ("xmoe", {"learnable_temperature": "yes"}, "learnable_temperature"),
    ("stablemoe", {"stage1_fraction": 1.5}, "stage1_fraction"),
    ("stablemoe", {"distill_dim": 0}, "distill_dim"),
    ("stablemoe", {"vocab_size": 0}, "vocab_size"),
    ("stablemoe", {"distill_weight": -1.0}, "distill_weight"),
    ("stablemoe", {"loss_reduction": "max"}, "loss_reduction"),
    ("stablemoe", {"distill_input": "pixels"}, "distill_input"),
    ("stablemoe", {"patch_dim": -1}, "patch_dim"),
    ("competesmoe", {"competition_prob": 1.5}, "competition_prob"),
    ("competesmoe", {"warmup_fraction": -0.1}, "warmup_fraction"),
    ("competesmoe", {"version": 3}, "version"),
    ("competesmoe", {"max_competing_layers": 0}, "max_competing_layers"),
    ("competesmoe", {"router_loss_weight": -0.01}, "router_loss_weight"),
    ("competesmoe", {"diversity_weight": -0.01}, "diversity_weight"),
    ("moge", {"group_weight": -1.0}, "group_weight"),
    ("moge", {"kernel_size": 3}, "kernel_size"),  # 4 experts: a 2x2 map, a 3x3 window does not fit (valid)
    ("moge", {"kernel_size": 0}, "kernel_size"),
    ("moge", {"padding": "reflect"}, "padding"),
    ("moge", {"reduction": "max"}, "reduction"),
    ("moge", {"sigma_power": 0.0}, "sigma_power"),
    ("smoe", {"second_expert": "random"}, "second_expert"),
    ("xmoe", {"temperature_param": "exp"}, "temperature_param"),
    ("xmoe", {"balance_temperature": 0.0}, "balance_temperature"),
    ("xmoe", {"rescale_embeddings": -1.0}, "rescale_embeddings"),
    ("competesmoe", {"diversity_average": "all"}, "diversity_average"),
    ("competesmoe", {"router_loss": "kl"}, "router_loss"),
    ("competesmoe", {"balance_loss": "aux"}, "balance_loss"),
    ("moge", {"sigma_min": 0.0}, "sigma_min"),
    ("moge", {"sigma_max": 0.5, "sigma_min": 1.0}, "sigma_max"),
    ("moge", {"sigma_schedule": "step"}, "sigma_schedule"),
    ("moge", {"penalize": "weights"}, "penalize"),
]


@pytest.mark.parametrize("name,kwargs,key", BAD, ids=[f"{n}-{k}" for n, _, k in BAD])
def test_bad_hparams_raise_naming_router_and_key(name, kwargs, key):
    k = 1 if name == "stablemoe" else 2
    with pytest.raises(ValueError) as info:
        create_router(name, 8, 4, k, **kwargs)
    msg = str(info.value)
    assert repr(name) in msg and key in msg


def test_defaults_are_the_papers():
    assert XMoERouter.hparam_defaults()["routing_dim"] == 16
    assert XMoERouter.hparam_defaults()["balance_weight"] == 0.01
    d = StableMoERouter.hparam_defaults()
    assert (d["distill_dim"], d["balance_weight"], d["distill_weight"], d["stage1_fraction"]) == (50, 0.3, 0.3, 0.1)
    d = CompeteSMoERouter.hparam_defaults()
    assert (d["version"], d["warmup_fraction"], d["competition_prob"], d["max_competing_layers"]) == (2, 0.05, 0.05, 3)
    assert CompeteSMoERouter(8, 4, 2).diversity_weight == 0.01 and CompeteSMoERouter(8, 4, 2, version=1).diversity_weight == 0.0
    d = MoGERouter.hparam_defaults()  # wangyuankl123/MoGE Language_Modeling/ (see tests/test_router_reference.py)
    assert (d["group_weight"], d["keep_balance_loss"], d["penalize"]) == (1e-7, False, "probs")
