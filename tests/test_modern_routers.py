"""Formula tests for today's routers (issue 18): auxfree (DeepSeek-V3), hash (Roller et al.), sigmoid_smoe.

Hand-computed values on tiny inputs; the bias update, its checkpointing and exact resume;
hyper-parameter domain checks. Conformance comes from tests/test_conformance.py.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from baselines.auxfree import AuxFreeRouter, group_limited_mask, sequence_balance_loss, sequence_ids
from baselines.hash import HashRouter, balanced_hash_table
from baselines.sigmoid_smoe import SigmoidSMoERouter
from harness.layers.moe import build_ffn
from harness.routing.registry import create_router, get_router
from harness.routing.router import RouteContext

pytestmark = [pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar"),
              pytest.mark.usefixtures("one_thread")]


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _identity_gate(r, d: int, E: int) -> None:
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E, d))


# ---------------------------------------------------------------------------
# auxfree
# ---------------------------------------------------------------------------


def test_auxfree_defaults_name_their_sources():
    d = AuxFreeRouter.hparam_defaults()
    assert d["bias_update_rate"] == 1e-3        # DeepSeek-V3 gamma; Megatron-Core update rate; torchtitan coeff
    assert d["bias_update"] == "sign"           # the report / Megatron-Core (torchtitan: "centered")
    assert d["normalize"] is True               # DeepSeek-V3 eq. 13
    assert d["route_scale"] == 1.0              # torchtitan MoEArgs.route_scale (DeepSeek-V3 config: 2.5)
    assert d["seq_balance_weight"] == 1e-4      # DeepSeek-V3 alpha
    assert (d["n_groups"], d["topk_groups"]) == (1, 1)
    assert get_router("auxfree@torchtitan")(4, 4, 2).bias_update == "centered"
    assert get_router("auxfree@deepseek_v3")(4, 4, 2).route_scale == 2.5


def test_auxfree_bias_selects_but_does_not_weight():
    r = AuxFreeRouter(4, 4, 2, route_scale=2.0, seq_balance_weight=0.0)
    _identity_gate(r, 4, 4)
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    out = r(x, RouteContext(training=False))
    assert out.indices.tolist() == [[0, 1]]
    torch.testing.assert_close(out.weights, 2.0 * torch.tensor([[sig(2), sig(1)]]) / (sig(2) + sig(1)))
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    out = r(x, RouteContext(training=False))
    # biased scores: sig(2), sig(1), sig(0) + 1 = 1.5, sig(-1) -> experts 2 then 0
    assert out.indices.tolist() == [[2, 0]]
    torch.testing.assert_close(out.weights, 2.0 * torch.tensor([[sig(0), sig(2)]]) / (sig(0) + sig(2)))
    torch.testing.assert_close(out.logits, x)  # the gate logits, no bias
    assert out.logits.dtype == torch.float32
    # unnormalised: the raw affinities of the chosen experts
    r2 = AuxFreeRouter(4, 4, 2, normalize=False, seq_balance_weight=0.0)
    _identity_gate(r2, 4, 4)
    r2.expert_bias.copy_(r.expert_bias)
    torch.testing.assert_close(r2(x, RouteContext()).weights, torch.tensor([[sig(0), sig(2)]]))


def test_auxfree_bias_update_sign_and_centered_by_hand():
    r = AuxFreeRouter(4, 4, 1, bias_update_rate=0.01)
    r.tokens_per_expert.copy_(torch.tensor([3, 0, 0, 1]))  # mean 1: over, under, under, balanced
    r.on_step(1, 10)
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.0]))
    assert int(r.tokens_per_expert.sum()) == 0
    r.on_step(2, 10)  # nothing recorded since: no update
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.0]))
    c = AuxFreeRouter(4, 4, 1, bias_update_rate=0.01, bias_update="centered")
    c.tokens_per_expert.copy_(torch.tensor([3, 0, 0, 1]))
    c.on_step(1, 10)  # delta [-1, 1, 1, 0] * 0.01 minus its mean 0.0025 (torchtitan)
    torch.testing.assert_close(c.expert_bias, torch.tensor([-0.0125, 0.0075, 0.0075, -0.0025]))


def test_auxfree_records_training_loads_only():
    r = AuxFreeRouter(4, 4, 2)
    _identity_gate(r, 4, 4)
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0], [-1.0, 0.0, 3.0, 1.0]])
    r(x, RouteContext(training=False))
    assert r.tokens_per_expert.tolist() == [0, 0, 0, 0]
    r(x, RouteContext(training=True))
    assert r.tokens_per_expert.tolist() == [1, 1, 1, 1]  # token 0 -> {0, 1}, token 1 -> {2, 3}
    r(x[:1], RouteContext(training=True))  # accumulates (gradient accumulation) until on_step
    assert r.tokens_per_expert.tolist() == [2, 2, 1, 1]
    assert "tokens_per_expert" in r.state_dict() and "expert_bias" in r.state_dict()
    assert not any(p is r.expert_bias for p in r.parameters())


def test_auxfree_sequence_balance_loss_by_hand():
    # two sequences of two tokens (positions 0, 1, 0, 1), E = 2, k = 1
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, -1.0]])
    s = torch.sigmoid(logits)
    seq = sequence_ids(torch.tensor([0, 1, 0, 1]), 4, torch.device("cpu"))
    assert seq.tolist() == [0, 0, 1, 1]
    idx = torch.tensor([[0], [1], [0], [0]])
    sn = [[sig(a) / (sig(a) + sig(b)), sig(b) / (sig(a) + sig(b))] for a, b in logits.tolist()]
    # seq 0: f = E/(kT) * counts = (1, 1); P = mean of sn over its 2 tokens
    l0 = 1 * (sn[0][0] + sn[1][0]) / 2 + 1 * (sn[0][1] + sn[1][1]) / 2
    # seq 1: counts (2, 0) -> f = (2, 0)
    l1 = 2 * (sn[2][0] + sn[3][0]) / 2
    assert float(sequence_balance_loss(s, idx, seq)) == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # through the router: alpha = 1e-4, sequences from ctx.positions
    r = AuxFreeRouter(2, 2, 1)
    _identity_gate(r, 2, 2)
    out = r(logits, RouteContext(training=True, positions=torch.tensor([0, 1, 0, 1])))
    assert out.indices.tolist() == idx.tolist()
    assert float(out.aux_losses["seq_balance"]) == pytest.approx(1e-4 * (l0 + l1) / 2, rel=1e-6)
    # without positions: the whole batch is one sequence, counts (3, 1) -> f = (1.5, 0.5)
    one = 1.5 * sum(v[0] for v in sn) / 4 + 0.5 * sum(v[1] for v in sn) / 4
    out = r(logits, RouteContext(training=True))
    assert float(out.aux_losses["seq_balance"]) == pytest.approx(1e-4 * one, rel=1e-6)
    # gradient reaches the gate through P_i
    out.aux_losses["seq_balance"].backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0
    # T = 0
    assert float(sequence_balance_loss(torch.zeros(0, 2), torch.zeros(0, 1, dtype=torch.long),
                                       torch.zeros(0, dtype=torch.long))) == 0.0


def test_auxfree_group_limited_topk_by_hand():
    # groups {0, 1} and {2, 3}; group score = sum of its two largest scores
    logits = torch.tensor([[3.0, -3.0, 1.5, 1.0]])
    flat = AuxFreeRouter(4, 4, 1, seq_balance_weight=0.0)
    grouped = AuxFreeRouter(4, 4, 1, seq_balance_weight=0.0, n_groups=2, topk_groups=1)
    for r in (flat, grouped):
        _identity_gate(r, 4, 4)
    assert flat(logits, RouteContext()).indices.tolist() == [[0]]
    # sig(3) + sig(-3) = 1.0 < sig(1.5) + sig(1) = 1.549: only group 1 is eligible
    assert grouped(logits, RouteContext()).indices.tolist() == [[2]]
    assert group_limited_mask(torch.sigmoid(logits), 2, 1).tolist() == [[False, False, True, True]]
    # the mask sees the bias: lift expert 1 so that group 0 wins
    grouped.expert_bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # biased group 0: sig(3) = 0.953, sig(-3) + 1 = 1.047 (sum 2.0 > 1.549) -> its best is expert 1
    assert grouped(logits, RouteContext()).indices.tolist() == [[1]]


def test_auxfree_bias_balances_a_skewed_gate():
    torch.manual_seed(0)
    r = AuxFreeRouter(8, 4, 1, bias_update_rate=0.01, seq_balance_weight=0.0)
    with torch.no_grad():
        r.gate.weight.normal_()
        r.gate.weight[0] += 1.0  # expert 0 favoured
    x = torch.randn(256, 8) + 1.0
    def spread():
        counts = torch.bincount(r(x, RouteContext()).indices[:, 0], minlength=4)
        return int(counts.max() - counts.min())
    before = spread()
    for step in range(300):
        r.on_step(step, 300)
        r(x, RouteContext(training=True))
    assert spread() < before / 4


def test_auxfree_checkpoint_resume_continues_identically():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    pos = torch.arange(8).repeat(4)

    def make():
        torch.manual_seed(1)
        layer = build_ffn("auxfree", 16, 32, 4, 2, router_kwargs={"bias_update_rate": 0.05})
        return layer, torch.optim.AdamW(layer.parameters(), lr=1e-2)

    def train(layer, opt, steps):
        for step in steps:
            layer.router.on_step(step, 8)
            y, r = layer(x, RouteContext(training=True, step=step, total_steps=8, positions=pos))
            loss = y.square().mean() + sum(r.aux_losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return y.detach()

    a, oa = make()
    ya = train(a, oa, range(8))
    b, ob = make()
    train(b, ob, range(4))
    ckpt = copy.deepcopy({"model": b.state_dict(), "opt": ob.state_dict()})
    assert int(ckpt["model"]["router.tokens_per_expert"].sum()) > 0  # the pending load travels with it
    c, oc = make()
    c.load_state_dict(ckpt["model"])
    oc.load_state_dict(ckpt["opt"])
    yc = train(c, oc, range(4, 8))
    assert torch.equal(a.router.expert_bias, c.router.expert_bias)
    assert a.router.expert_bias.abs().sum() > 0
    assert torch.equal(ya, yc)


def test_auxfree_hparam_domain():
    for kw in ({"bias_update_rate": -1.0}, {"bias_update": "mean"}, {"normalize": "yes"}, {"route_scale": -1.0},
               {"seq_balance_weight": -1.0}, {"n_groups": 3}, {"n_groups": 2, "topk_groups": 3},
               {"n_groups": 0}, {"n_groups": 4, "topk_groups": 1}):
        with pytest.raises(ValueError, match="auxfree"):
            create_router("auxfree", 8, 8, 4 if kw.get("n_groups") == 4 else 2, **kw)


# ---------------------------------------------------------------------------
# hash
# ---------------------------------------------------------------------------


def test_hash_table_is_a_balanced_seeded_permutation():
    t = balanced_hash_table(10, 4, 1, seed=0)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert t[:, 0].tolist() == (perm % 4).tolist()
    counts = torch.bincount(t[:, 0], minlength=4)
    assert sorted(counts.tolist()) == [2, 2, 3, 3]
    # k hashes: distinct experts per token, the first hash still balanced
    t3 = balanced_hash_table(256, 8, 3, seed=5)
    assert (t3.sort(-1).values.diff(dim=-1) != 0).all()
    assert torch.bincount(t3[:, 0], minlength=8).tolist() == [32] * 8
    # fixed: independent of the global RNG
    torch.manual_seed(123)
    a = HashRouter(8, 8, 2).table
    torch.manual_seed(456)
    assert torch.equal(a, HashRouter(8, 8, 2).table)
    assert not torch.equal(a, HashRouter(8, 8, 2, hash_seed=1).table)


def test_hash_routes_token_ids_with_weight_one_and_one_hot_logits():
    r = HashRouter(4, 4, 2, vocab_size=16)
    assert list(r.parameters()) == []
    ids = torch.tensor([3, 3, 7, 15])
    out = r(torch.randn(4, 4), RouteContext(token_ids=ids))
    assert torch.equal(out.indices, r.table[ids])
    assert out.indices[0].tolist() == out.indices[1].tolist()  # same token, same experts
    torch.testing.assert_close(out.weights, torch.ones(4, 2))
    assert out.logits.dtype == torch.float32 and out.logits.sum(-1).tolist() == [2.0] * 4
    assert torch.equal(out.logits.topk(2, -1).indices.sort(-1).values, out.indices.sort(-1).values)
    assert out.aux_losses == {}
    mean = HashRouter(4, 4, 2, vocab_size=16, weight="mean")(torch.randn(4, 4), RouteContext(token_ids=ids))
    torch.testing.assert_close(mean.weights, torch.full((4, 2), 0.5))
    # vision: patch positions when there are no token ids
    pos = torch.tensor([0, 1, 2, 3])
    assert torch.equal(r(torch.randn(4, 4), RouteContext(positions=pos)).indices, r.table[pos])
    with pytest.raises(ValueError, match="vocab_size"):
        r(torch.randn(1, 4), RouteContext(token_ids=torch.tensor([16])))
    with pytest.raises(ValueError, match="needs token ids"):
        r(torch.randn(1, 4), RouteContext())


def test_hash_k2_weight_one_is_the_sum_of_both_experts():
    torch.manual_seed(0)
    layer = build_ffn("hash", 8, 16, 4, 2, router_kwargs={"vocab_size": 8})
    x = torch.randn(5, 8)
    ids = torch.tensor([0, 1, 2, 3, 7])
    y, routing = layer(x, RouteContext(token_ids=ids))
    ref = torch.stack([sum(layer.experts.expert(int(e), x[t:t + 1])[0] for e in routing.indices[t]) for t in range(5)])
    torch.testing.assert_close(y, ref)


def test_hash_hparam_domain():
    for kw in ({"vocab_size": 0}, {"vocab_size": 2.5}, {"hash_seed": -1}, {"weight": "softmax"}):
        with pytest.raises(ValueError, match="hash"):
            create_router("hash", 8, 4, 2, **kw)


# ---------------------------------------------------------------------------
# sigmoid_smoe
# ---------------------------------------------------------------------------


def test_sigmoid_smoe_scores_weights_and_balance_by_hand():
    r = SigmoidSMoERouter(4, 4, 2)
    _identity_gate(r, 4, 4)
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    out = r(x, RouteContext(training=True))
    assert out.indices.tolist() == [[0, 1]]
    torch.testing.assert_close(out.weights, torch.tensor([[sig(2), sig(1)]]))  # unnormalised (torchtitan)
    total = sig(2) + sig(1) + sig(0) + sig(-1)
    # Switch eq. 4 on the normalised scores: E * f_0 * P_0 with f = first choice = (1, 0, 0, 0)
    assert float(out.aux_losses["balance"]) == pytest.approx(0.01 * 4 * sig(2) / total, rel=1e-6)
    assert set(out.aux_losses) == {"balance"}
    n = get_router("sigmoid_smoe@normalized")(4, 4, 2)
    _identity_gate(n, 4, 4)
    torch.testing.assert_close(n(x, RouteContext()).weights, torch.tensor([[sig(2), sig(1)]]) / (sig(2) + sig(1)))
    z = SigmoidSMoERouter(4, 4, 2, z_loss_weight=1e-3)
    _identity_gate(z, 4, 4)
    assert float(z(x, RouteContext()).aux_losses["z_loss"]) == pytest.approx(
        1e-3 * math.log(sum(math.exp(v) for v in (2, 1, 0, -1))) ** 2, rel=1e-6)


def test_sigmoid_smoe_hparam_domain():
    for kw in ({"normalize": 1}, {"route_scale": -1.0}, {"balance_weight": -0.1}, {"balance_fraction": "x"},
               {"z_loss_weight": -1.0}):
        with pytest.raises(ValueError, match="sigmoid_smoe"):
            create_router("sigmoid_smoe", 8, 4, 2, **kw)


def test_lm_passes_token_positions_so_the_seq_loss_is_per_sequence():
    from harness.models.lm import MoEDecoderLM

    torch.manual_seed(0)
    model = MoEDecoderLM("auxfree", vocab_size=256, d_model=16, n_layers=1, n_heads=2, d_ff=32, num_experts=4,
                         top_k=2, context=8)
    seen = []
    router = model.moe_layers()[0].router
    orig = router.forward
    router.forward = lambda x, ctx: (seen.append(ctx.positions), orig(x, ctx))[1]
    model(torch.randint(0, 256, (3, 5)))
    assert seen[0].tolist() == list(range(5)) * 3
    assert sequence_ids(seen[0], 15, torch.device("cpu")).tolist() == [0] * 5 + [1] * 5 + [2] * 5


# ---------------------------------------------------------------------------
# shared experts (DeepSeekMoE), a layer option for any router
# ---------------------------------------------------------------------------


def test_shared_experts_add_an_always_on_ffn_of_width_d_ff_times_n():
    from harness.layers.dense import DenseFFN
    from harness.layers.moe import MoELayer
    from harness.routing.router import Routing

    torch.manual_seed(0)
    layer = build_ffn("smoe", 8, 16, 4, 2, shared_experts=2)
    assert isinstance(layer, MoELayer) and layer.num_shared_experts == 2
    assert tuple(layer.shared_expert.w1.shape) == (1, 8, 32)  # N experts of width d_ff = one FFN of width d_ff * N
    x = torch.randn(6, 8)
    y, _ = layer(x, RouteContext())
    # the routed part is the plain layer's; the shared part is added on top
    plain = MoELayer(8, 16, layer.router, experts=layer.experts)
    y_plain, _ = plain(x, RouteContext())
    torch.testing.assert_close(y, y_plain + layer.shared_expert.expert(0, x))

    # with a router path of zero weight, the layer is exactly a dense FFN of width d_ff * N
    zero = build_ffn("smoe", 8, 16, 4, 2, shared_experts=1)
    orig = zero.router.forward
    zero.router.forward = lambda x_, ctx: (lambda r: Routing(indices=r.indices, weights=r.weights * 0.0))(orig(x_, ctx))
    dense = DenseFFN(8, 16)
    with torch.no_grad():
        dense.fc1.weight.copy_(zero.shared_expert.w1[0].t())
        dense.fc1.bias.copy_(zero.shared_expert.b1[0])
        dense.fc2.weight.copy_(zero.shared_expert.w2[0].t())
        dense.fc2.bias.copy_(zero.shared_expert.b2[0])
    torch.testing.assert_close(zero(x, RouteContext())[0], dense(x)[0])
    # gradients reach the shared expert; biases stay out of weight decay like the experts'
    y.square().mean().backward()
    assert layer.shared_expert.w1.grad.abs().sum() > 0
    assert layer.shared_expert.no_weight_decay() == {"b1", "b2"}


def test_shared_experts_keep_the_dense_baseline_at_equal_active_flops():
    dense = build_ffn("dense", 8, 16, 4, 2, shared_experts=1)
    assert dense.fc1.out_features == 16 * (2 + 1)
    assert build_ffn("dense", 8, 16, 4, 2).fc1.out_features == 32
    # every router takes the option; 0 is the old layer (no shared module)
    for name in ("auxfree", "hash", "sigmoid_smoe", "stablemoe"):
        k = get_router(name).effective_top_k(2)
        assert build_ffn(name, 8, 16, 4, k, shared_experts=1).shared_expert is not None
    assert build_ffn("smoe", 8, 16, 4, 2).shared_expert is None
    with pytest.raises(ValueError, match="shared_experts"):
        build_ffn("smoe", 8, 16, 4, 2, shared_experts=-1)


def test_shared_experts_spec_field_hash_and_models():
    import dataclasses

    from harness.suites.lm import build_lm
    from harness.spec import ModelSpec, SpecError, load_suite

    spec = load_suite("lm", preset="tiny", routers=["smoe", "dense"])
    run, dense_run = spec.runs()
    assert ModelSpec().shared_experts == 0
    shared = dataclasses.replace(run, suite_spec=dataclasses.replace(
        spec, model=dataclasses.replace(spec.model, shared_experts=1)))
    assert shared.spec_hash != run.spec_hash  # 0 is left out of the hash (old hashes unchanged), 1 re-keys
    assert build_lm(shared).moe_layers()[0].num_shared_experts == 1
    assert build_lm(run).moe_layers()[0].shared_expert is None
    dense_shared = dataclasses.replace(shared, router="dense")
    m = spec.model
    assert build_lm(dense_shared).blocks[-1].ffn.fc1.out_features == m.d_ff * (m.top_k + 1)
    with pytest.raises(SpecError, match="shared_experts"):
        load_suite("lm", preset="tiny", overrides=["model.shared_experts=-1"])
    with pytest.raises(SpecError, match="expert_parallel"):  # the expert-parallel layer does not carry them
        load_suite("lm", preset="tiny", overrides=["model.shared_experts=1", "model.expert_parallel=true"])
