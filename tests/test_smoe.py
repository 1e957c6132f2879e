"""SMoE formulas against hand-computed values on a 4-token example."""
import math

import pytest
import torch

from harness.routing.losses import expert_fractions, router_z_loss, switch_balance_loss
from harness.routing.registry import create_router
from harness.routing.router import RouteContext

X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [3.0, 0.0]])


def _router(**kw):
    r = create_router("smoe", 2, 2, 1, **kw)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(2))  # logits == x
    return r


def test_balance_and_z_loss_hand_computed():
    r = _router()
    out = r(X, RouteContext(training=True))
    # softmax over (a, 0) gives p0 = e^a / (e^a + 1)
    p0 = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1), math.exp(2) / (math.exp(2) + 1),
          math.exp(3) / (math.exp(3) + 1)]
    assert out.indices[:, 0].tolist() == [0, 1, 0, 0]
    f = [0.75, 0.25]
    P = [sum(p0) / 4, sum(1 - p for p in p0) / 4]
    balance = 2 * (f[0] * P[0] + f[1] * P[1])
    assert balance == pytest.approx(1.20835, abs=1e-4)
    assert float(out.aux_losses["balance"]) == pytest.approx(0.01 * balance, rel=1e-5)
    lse = [math.log(math.exp(1) + 1)] * 2 + [math.log(math.exp(2) + 1), math.log(math.exp(3) + 1)]
    z = sum(v * v for v in lse) / 4
    assert z == pytest.approx(4.31676, abs=1e-4)
    assert float(out.aux_losses["z_loss"]) == pytest.approx(1e-3 * z, rel=1e-5)
    # k = 1: Switch uses the raw probability as the gate (renormalize="auto")
    torch.testing.assert_close(out.weights[:, 0], torch.tensor([p0[0], 1 - p0[1], p0[2], p0[3]]))


def test_topk_renormalised_for_k2_and_fraction_modes():
    r = create_router("smoe", 3, 3, 2)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(3))
    x = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
    with torch.no_grad():
        out = r(x, RouteContext())
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(4))
    assert out.weights[0, 0] == pytest.approx(math.e / (math.e + 1), rel=1e-5)  # renormalised top-2 of (e^2, e^1)
    # slots: chosen experts {0,1},{1,2},{2,1},{0,2} -> counts 2,3,3 over 8 slots; first choices 0,1,2,0
    torch.testing.assert_close(expert_fractions(out.indices, 3, "slots"), torch.tensor([2 / 8, 3 / 8, 3 / 8]))
    torch.testing.assert_close(expert_fractions(out.indices, 3, "first"), torch.tensor([2 / 4, 1 / 4, 1 / 4]))
    probs = x.softmax(-1)
    manual = 3 * float((torch.tensor([0.5, 0.25, 0.25]) * probs.mean(0)).sum())
    assert float(switch_balance_loss(probs, out.indices, "first")) == pytest.approx(manual, rel=1e-6)


def test_uniform_routing_balance_is_one_and_z_loss_of_zero_logits():
    probs = torch.full((8, 4), 0.25)
    idx = torch.arange(8).remainder(4).unsqueeze(1)
    assert float(switch_balance_loss(probs, idx)) == pytest.approx(1.0)
    assert float(router_z_loss(torch.zeros(3, 4))) == pytest.approx(math.log(4) ** 2)


def test_noisy_topk_only_in_training_and_learns_noise_scale():
    torch.manual_seed(0)
    r = create_router("smoe", 8, 4, 2, noisy=True)
    with torch.no_grad():
        r.noise.weight.fill_(1.0)
    x = torch.randn(64, 8)
    a = r(x, RouteContext(training=False))
    b = r(x, RouteContext(training=False))
    torch.testing.assert_close(a.weights, b.weights)  # deterministic at eval
    c = r(x, RouteContext(training=True))
    assert not torch.equal(a.indices, c.indices) or not torch.allclose(a.weights, c.weights)
    (c.weights.sum() + sum(c.aux_losses.values())).backward()
    assert r.noise.weight.grad is not None and r.noise.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [dict(balance_weight=-1.0), dict(z_loss_weight=-0.1), dict(balance_fraction="x"),
                                 dict(renormalize="sometimes")])
def test_bad_hparams_name_router_and_key(bad):
    with pytest.raises(ValueError, match="smoe") as ei:
        create_router("smoe", 4, 4, 2, **bad)
    assert list(bad)[0] in str(ei.value)


def test_k_greater_than_e_rejected():
    with pytest.raises(ValueError, match="top_k=5"):
        create_router("smoe", 4, 4, 5)
