"""The C++ permute plan and weighted combine (harness/layers/dispatch_combine.py, csrc/dispatch_combine.cpp)
compute the Python steps' bits: the same kept slots in the same order, the same layer output, the same
gradients of the input, the router and the experts (``torch.equal``), with and without a capacity drop, for
a variable-k router's unused slots, for an empty batch, and at one and two threads of the experts' GEMMs
(the plan and combine themselves are serial)."""
from __future__ import annotations

import os

import pytest
import torch

from harness.layers import dispatch_combine
from harness.layers.moe_layer import MoELayer
from harness.routing.registry import create_router
from harness.routing.router import RouteContext


pytestmark = pytest.mark.usefixtures("one_thread")  # the bit-for-bit claims hold at one thread (conftest.py)


def test_the_extension_builds_here():
    if os.environ.get("HARNESS_NO_CPP"):
        assert not dispatch_combine.available()
    else:
        assert dispatch_combine.available(), ("the permute/combine C++ kernel did not build: is a C++ compiler "
                                              "installed? (HARNESS_NO_CPP=1 runs the Python steps instead)")


def _run(router: str, T: int, capacity: float | None, cpp: bool, monkeypatch, **router_kw):
    monkeypatch.setattr(dispatch_combine, "applies", lambda x: cpp and dispatch_combine.available())
    torch.manual_seed(0)
    layer = MoELayer(16, 24, create_router(router, 16, 8, 2, **router_kw), capacity_factor=capacity)
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ids = torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(2))
    y, routing = layer(x, RouteContext(training=True, token_ids=ids))
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + sum(routing.aux_losses.values())
    if loss.requires_grad:  # hash routing on an empty batch has nothing to differentiate
        loss.backward()
    d = layer.last_counts
    grads = [p.grad for p in layer.parameters()]
    return [y.detach(), x.grad, d, torch.tensor(routing.stats["dropped_tokens"]), *grads]


@pytest.mark.skipif(not dispatch_combine.available(), reason="no C++ compiler here (HARNESS_NO_CPP)")
@pytest.mark.parametrize("router,capacity", [("smoe", None), ("smoe", 0.5), ("smoe", 1.0), ("hash", 0.75),
                                             ("topp", None), ("topp", 0.6), ("xmoe", None)])
@pytest.mark.parametrize("T", [0, 1, 37, 256])
def test_the_cpp_steps_give_the_python_steps_bits(router, capacity, T, monkeypatch):
    a = _run(router, T, capacity, False, monkeypatch)
    b = _run(router, T, capacity, True, monkeypatch)
    for u, v in zip(a, b):
        assert (u is None and v is None) or torch.equal(u, v)


@pytest.mark.skipif(not dispatch_combine.available(), reason="no C++ compiler here (HARNESS_NO_CPP)")
def test_the_plan_is_the_stable_sort_with_the_capacity_drop():
    # token t's j-th choice is slot j*T + t; expert 0 is chosen by slots 0, 2, 3, 5; capacity 2 keeps 0 and 2
    flat = torch.tensor([0, 1, 0, 0, 2, 0])
    order, token, counts, dropped = dispatch_combine.plan(flat, None, 3, 3, 2)
    assert order.tolist() == [0, 2, 1, 4] and token.tolist() == [0, 2, 1, 1]
    assert counts.tolist() == [2, 1, 1] and dropped == 2
    used = torch.tensor([True, True, False, True, True, False])
    order, token, counts, dropped = dispatch_combine.plan(flat, used, 3, 3, None)
    assert order.tolist() == [0, 3, 1, 4] and counts.tolist() == [2, 1, 1] and dropped == 0


@pytest.mark.skipif(not dispatch_combine.available(), reason="no C++ compiler here (HARNESS_NO_CPP)")
def test_an_expert_outside_the_router_range_is_one_clear_error():
    with pytest.raises(RuntimeError, match="chose expert 5, outside 0..3"):
        dispatch_combine.plan(torch.tensor([0, 5]), None, 2, 4, None)


@pytest.mark.skipif(not dispatch_combine.available(), reason="no C++ compiler here (HARNESS_NO_CPP)")
def test_the_combine_gradient_matches_finite_differences_in_float64_terms():
    # the op is float32-only; check its gradient against autograd of the composite on the same float32 inputs
    g = torch.Generator().manual_seed(3)
    out = torch.randn(10, 5, generator=g, requires_grad=True)
    w = torch.rand(12, generator=g, requires_grad=True)
    order = torch.tensor([0, 3, 5, 6, 7, 8, 9, 10, 11, 1])
    token = order % 6
    gy = torch.randn(6, 5, generator=g)
    y = dispatch_combine.combine(out, w, order, token, 6)
    y.backward(gy)
    ref_out, ref_w = out.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.zeros(6, 5).index_add_(0, token, ref_out * ref_w[order].unsqueeze(-1))
    ref.backward(gy)
    assert torch.equal(y, ref) and torch.equal(out.grad, ref_out.grad) and torch.equal(w.grad, ref_w.grad)
    assert w.grad[[2, 4]].eq(0).all()  # slots not in the plan get no gradient
