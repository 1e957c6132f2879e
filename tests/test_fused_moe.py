"""``experts_impl=fused`` with the C++ plan runs gather -> experts -> weighted combine as one autograd node
(harness/layers/fused_experts.py ``fused_moe``, csrc/segment_mlp.cpp ``moe_forward``/``moe_backward``): the
layer's output and every gradient (input, router, experts, shared experts) equal the ``loop`` kernel's with
the Python steps bit for bit at one thread, and the whole LM's training step does too."""
from __future__ import annotations

import pytest
import torch

from harness.layers import dispatch_combine, fused_experts
from harness.layers.moe_layer import MoELayer
from harness.routing.registry import create_router
from harness.routing.router import RouteContext

pytestmark = [
    pytest.mark.skipif(not (fused_experts.available() and dispatch_combine.available()),
                       reason="no C++ compiler here (HARNESS_NO_CPP / HARNESS_NO_FUSED_EXPERTS)"),
    pytest.mark.usefixtures("one_thread"),  # the bit-for-bit claims hold at one thread (conftest.py)
]


def _layer_run(impl: str, cpp: bool, router: str, T: int, capacity, shared: int, need_x: bool, monkeypatch,
               activation: str = "gelu", d_ff: int = 24):
    monkeypatch.setattr(dispatch_combine, "applies", lambda x: cpp and dispatch_combine.available())
    torch.manual_seed(0)
    layer = MoELayer(16, d_ff, create_router(router, 16, 8, 2), capacity_factor=capacity, shared_experts=shared,
                     experts_impl=impl, activation=activation)
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(need_x)
    ids = torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(2))
    ran = []
    orig = fused_experts.fused_moe
    monkeypatch.setattr(fused_experts, "fused_moe", lambda *a: ran.append(1) or orig(*a))
    y, routing = layer(x, RouteContext(training=True, token_ids=ids))
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + sum(routing.aux_losses.values())
    if loss.requires_grad:
        loss.backward()
    return bool(ran), [y.detach(), x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("router,capacity,shared", [("smoe", None, 0), ("smoe", 0.5, 0), ("xmoe", None, 1),
                                                    ("topp", 0.75, 0), ("hash", None, 0)])
@pytest.mark.parametrize("T", [0, 1, 37, 300])
@pytest.mark.parametrize("need_x", [True, False])
def test_fused_moe_gives_the_loop_and_python_steps_bits(router, capacity, shared, T, need_x, monkeypatch):
    _, ref = _layer_run("loop", False, router, T, capacity, shared, need_x, monkeypatch)
    ran, got = _layer_run("fused", True, router, T, capacity, shared, need_x, monkeypatch)
    assert ran == (T > 0)  # an empty batch takes the Python path
    for u, v in zip(ref, got):
        assert (u is None and v is None) or torch.equal(u, v)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("d_ff", [24, 64, 128])  # per-expert activation calls, and one call over all rows
def test_every_activation_and_width(activation, d_ff, monkeypatch):
    _, ref = _layer_run("loop", False, "smoe", 301, None, 0, True, monkeypatch, activation, d_ff)
    ran, got = _layer_run("fused", True, "smoe", 301, None, 0, True, monkeypatch, activation, d_ff)
    assert ran and all(torch.equal(u, v) for u, v in zip(ref, got))


def test_without_the_cpp_plan_fused_runs_its_segment_kernel(monkeypatch):
    ran, got = _layer_run("fused", False, "smoe", 64, None, 0, True, monkeypatch)
    _, ref = _layer_run("loop", False, "smoe", 64, None, 0, True, monkeypatch)
    assert not ran and all(torch.equal(u, v) for u, v in zip(ref, got))


def test_a_whole_lm_training_step_is_the_loop_kernels(monkeypatch):
    from harness.spec import load_suite
    from harness.suites import get_adapter
    from harness.training.loop import make_optimizer, seed_everything

    res = {}
    for impl, cpp in (("loop", False), ("fused", True)):
        monkeypatch.setattr(dispatch_combine, "applies", lambda x, cpp=cpp: cpp and dispatch_combine.available())
        run = next(iter(load_suite("lm", "tiny", overrides=[f"model.experts_impl={impl}"], routers=["smoe"]).runs()))
        adapter = get_adapter("lm")
        adapter.prepare(run)
        seed_everything(run.seed)
        model = adapter.build_model(run)
        opt = make_optimizer(model, run)
        for step in range(3):
            x, y = adapter.train_batch(run, step, torch.device("cpu"))
            out, routings = model(x, step=step, total_steps=3)
            loss = adapter.loss(out, y) + sum(sum(r.aux_losses.values()) for r in routings)
            opt.zero_grad()
            loss.backward()
            opt.step()
        res[impl] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(u, v) for u, v in zip(res["loop"], res["fused"]))
