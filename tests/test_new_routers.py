"""Issue 31's routers on tiny hand-computed inputs: topp (Huang et al. 2024), remoe (Wang et al. 2024) and
smoe_global (SMoE with global-batch balancing, Qiu et al. 2025)."""
from __future__ import annotations

import math

import pytest
import torch

from harness.layers.moe import MoELayer, build_ffn
from harness.routing.registry import create_router
from harness.routing.router import RouteContext

from baselines.remoe import next_l1_coeff, remoe_l1
from baselines.topp import top_p_select

# three tokens' softmax probabilities over E = 4 experts
PROBS = [[0.5, 0.3, 0.15, 0.05],    # p = 0.4: expert 0 alone (0.5 > 0.4)
         [0.1, 0.35, 0.3, 0.25],    # experts 1, 2 (0.35 <= 0.4 < 0.65)
         [0.25, 0.25, 0.25, 0.25]]  # experts 0, 1 (ties: lower expert first)


def _reference_top_p(probs, top_p):
    """ZhenweiAn/Dynamic_MoE modeling/modeling_moe.py top_p_sampling_batched_all_sequence, restated: keep the
    sorted experts up to and including the first whose cumulative probability exceeds top_p."""
    sorted_probs, sorted_indices = torch.sort(probs, descending=True, stable=True)
    mask = torch.cumsum(sorted_probs, dim=-1) > top_p
    threshold = torch.nn.functional.one_hot(mask.long().argmax(dim=-1), num_classes=probs.shape[-1]).bool()
    mask = mask & ~threshold
    return torch.where(mask, 0.0, sorted_probs), torch.where(mask, -1, sorted_indices)


def _identity_router(name, E=4, k=2, **kw):
    """A router whose gate is the identity: the logits are the input rows."""
    r = create_router(name, E, E, k, **kw)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E))
    return r


# -- topp ---------------------------------------------------------------------------------------------------------

def test_topp_selection_by_hand():
    idx, w, used = top_p_select(torch.tensor(PROBS), 0.4)
    assert used.sum(1).tolist() == [1, 2, 2]
    assert idx[0, 0] == 0 and idx[1, :2].tolist() == [1, 2] and idx[2, :2].tolist() == [0, 1]
    assert w[0].tolist() == pytest.approx([0.5, 0, 0, 0])
    assert w[1].tolist() == pytest.approx([0.35, 0.3, 0, 0])  # raw probabilities, not renormalised
    assert w[2].tolist() == pytest.approx([0.25, 0.25, 0, 0])
    _, _, used = top_p_select(torch.tensor(PROBS), 0.7)  # 0.5+0.3 > 0.7; 0.35+0.3+0.25 > 0.7; 3 x 0.25 > 0.7
    assert used.sum(1).tolist() == [2, 3, 3]


def test_topp_matches_the_reference_rule_on_random_probabilities():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(200, 8, generator=g).mul(2).softmax(-1)
    for p in (0.1, 0.4, 0.7, 0.95):
        ref_w, ref_i = _reference_top_p(probs, p)
        idx, w, used = top_p_select(probs, p)
        assert torch.equal(used, ref_i >= 0), p
        assert torch.equal(idx[used], ref_i[ref_i >= 0]) and torch.allclose(w, ref_w)


def test_topp_router_losses_and_stat_by_hand():
    r = _identity_router("topp")
    x = torch.tensor(PROBS).log()  # logits = log p: the softmax gives PROBS back
    out = r(x, RouteContext(training=True))
    assert out.stats["experts_per_token"] == pytest.approx(5 / 3)
    ent = [-sum(p * math.log(p) for p in row) for row in PROBS]
    assert float(out.aux_losses["dynamic"].detach()) == pytest.approx(1e-4 * sum(ent) / 3, rel=1e-5)
    # balance over the 5 used slots: counts [2, 2, 1, 0] -> f = [.4, .4, .2, 0]; P = column means
    P = [sum(row[i] for row in PROBS) / 3 for i in range(4)]
    want = 4 * (0.4 * P[0] + 0.4 * P[1] + 0.2 * P[2])
    assert want == pytest.approx(1.12)
    assert float(out.aux_losses["balance"].detach()) == pytest.approx(0.01 * want, rel=1e-5)


def test_topp_layer_dispatches_used_slots_only_and_is_causal():
    torch.manual_seed(0)
    layer = MoELayer(4, 8, _identity_router("topp"))
    x = torch.tensor(PROBS).log()
    y, _ = layer(x, training=True)
    assert layer.last_counts.tolist() == [2, 2, 1, 0]
    # a token's experts depend on that token only: shuffling the others changes nothing for it
    x2 = torch.cat([x[:1], torch.randn(5, 4)])
    y2, r2 = layer(x2, training=True)
    assert torch.allclose(y2[0], y[0], atol=1e-6)


def test_topp_bad_hyper_parameters():
    for bad in ({"top_p": 1.0}, {"top_p": 0.0}, {"balance_fraction": "k_slots"}, {"max_experts": 5}):
        with pytest.raises(ValueError, match="router 'topp'"):
            create_router("topp", 4, 4, 2, **bad)
    r = create_router("topp", 4, 4, 2, max_experts=2)
    assert r.num_slots == 2


# -- remoe --------------------------------------------------------------------------------------------------------

LOGITS = [[1.0, -1.0, 0.5, 0.0],     # experts 0, 2 (a score of exactly 0 is inactive)
          [-1.0, -2.0, -3.0, -4.0],  # no expert at all
          [2.0, 1.0, 0.5, 0.25]]     # all four


def test_remoe_slots_and_l1_by_hand():
    relu = torch.tensor(LOGITS).relu()
    # active per expert [2, 1, 2, 1]; f = count * E / (k T) = count * 4/6; mean R = [1, 1/3, 1/3, 1/12]
    want = 4 / 3 * 1 + 2 / 3 * (1 / 3) + 4 / 3 * (1 / 3) + 2 / 3 * (1 / 12)
    assert float(remoe_l1(relu, 2)) == pytest.approx(want) == pytest.approx(2.0555556)
    assert float(remoe_l1(relu, 2, balanced=False)) == pytest.approx((1.5 + 0 + 3.75) / 3)
    r = _identity_router("remoe")
    out = r(torch.tensor(LOGITS), RouteContext(training=False))
    assert out.indices[0, :2].tolist() == [0, 2] and out.weights[0].tolist() == pytest.approx([1.0, 0.5, 0, 0])
    assert out.weights[1].tolist() == [0, 0, 0, 0]
    assert out.indices[2].tolist() == [0, 1, 2, 3] and out.weights[2].tolist() == pytest.approx([2, 1, .5, .25])
    assert out.stats["experts_per_token"] == pytest.approx(2.0) and out.stats["sparsity"] == pytest.approx(0.5)
    assert float(out.aux_losses["l1"].detach()) == pytest.approx(1e-8 * want)


def test_remoe_adaptive_coefficient():
    assert next_l1_coeff(1e-8, 0.5, 0.75, 1.2) == pytest.approx(1.2e-8)   # too dense: lambda up
    assert next_l1_coeff(1e-8, 0.9, 0.75, 1.2) == pytest.approx(1e-8 / 1.2)
    assert next_l1_coeff(1e-8, 0.75, 0.75, 1.2) == 1e-8
    tiny = 2.2250738585072014e-308
    assert next_l1_coeff(tiny, 0.9, 0.75, 1.2) == tiny and next_l1_coeff(tiny, 0.5, 0.75, 1.2) == tiny * 1.2
    x = torch.tensor(LOGITS)  # sparsity 6/12 = 0.5
    for k, after in ((1, 1.2e-8), (2, 1e-8), (3, 1e-8 / 1.2)):  # targets 0.75, 0.5, 0.25
        r = _identity_router("remoe", k=k)
        out = r(x, RouteContext(training=True))
        assert out.stats["l1_coeff"] == pytest.approx(1e-8)  # this step's loss used lambda_i
        assert float(r.l1_coeff) == pytest.approx(after), k
        r(x, RouteContext(training=False))  # evaluation leaves lambda alone
        assert float(r.l1_coeff) == pytest.approx(after)
    r = _identity_router("remoe", k=1)
    for _ in range(3):
        r(x, RouteContext(training=True))
    assert float(r.l1_coeff) == pytest.approx(1e-8 * 1.2 ** 3)
    assert "l1_coeff" in r.state_dict()  # a checkpoint resumes lambda


def test_remoe_token_without_experts_gets_zero_output():
    torch.manual_seed(0)
    layer = MoELayer(4, 8, _identity_router("remoe"))
    y, _ = layer(torch.tensor(LOGITS), training=True)
    assert torch.equal(y[1], torch.zeros(4))
    assert layer.last_counts.tolist() == [2, 1, 2, 1]


def test_remoe_bad_hyper_parameters():
    for bad in ({"l1_coeff_init": 0.0}, {"l1_coeff_multiplier": 0.9}, {"balanced": "yes"}):
        with pytest.raises(ValueError, match="router 'remoe'"):
            create_router("remoe", 4, 4, 2, **bad)


# -- smoe_global --------------------------------------------------------------------------------------------------

def test_smoe_global_is_smoe_with_a_global_f():
    torch.manual_seed(0)
    a = build_ffn("smoe", 8, 16, 4, 2)
    b = build_ffn("smoe_global", 8, 16, 4, 2)
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    assert sorted(missing) == ["global_balance.balance_counts", "global_balance.balance_step"] and not unexpected
    x0, x1 = torch.randn(10, 8), torch.randn(6, 8)
    _, ra = a(x0, training=True, step=0)
    _, rb = b(x0, training=True, step=0)
    assert torch.equal(ra.aux_losses["balance"], rb.aux_losses["balance"])  # nothing buffered yet: as smoe
    _, rb1 = b(x1, training=True, step=1)
    # step 1: f_i over both steps' first choices (the buffer holds step 0), P_i over step 1's tokens
    first = torch.cat([rb.indices[:, 0], rb1.indices[:, 0]])
    f = torch.bincount(first, minlength=4).float() / 16
    probs = torch.softmax(b.router.gate(x1).float(), -1)
    want = 0.01 * 4 * (f * probs.mean(0)).sum()
    assert float(rb1.aux_losses["balance"].detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert b.global_balance.window == 15
