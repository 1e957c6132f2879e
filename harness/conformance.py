"""Conformance checks every router must pass (the harness's tests run them on every registered router).

Plugin authors can run the same checks in their own test suite::

    from harness.conformance import check_router
    def test_my_router():
        check_router("myrouter")
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from .moe import MoELayer, build_ffn
from .registry import create_router, get_router
from .router import RouteContext, Routing

D_MODEL, D_FF, NUM_EXPERTS, T = 16, 32, 4, 24


def pick_top_k(name: str) -> int:
    cls = get_router(name)
    if cls.supports_top_k:
        return max(cls.supports_top_k)
    return 2


def make_ctx(T: int, step: int = 0, total: int = 100, training: bool = True, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 256, (T,), generator=g)
    return dict(training=training, step=step, total_steps=total, token_ids=ids,
                positions=torch.arange(T), embeddings=torch.randn(T, D_MODEL, generator=g))


def build_layer(name: str, seed: int = 0, **hparams: Any):
    torch.manual_seed(seed)
    return build_ffn(name, D_MODEL, D_FF, NUM_EXPERTS, pick_top_k(name), router_kwargs=hparams)


def run_layer(layer, x: torch.Tensor, **ctx_kw: Any) -> tuple[torch.Tensor, Routing | None]:
    ctx = RouteContext(**{**make_ctx(x.shape[0]), **ctx_kw})
    return layer(x, ctx)


def check_routing(name: str, routing: Routing, T: int, k: int, E: int) -> None:
    assert routing.indices.shape == (T, k), f"{name}: indices {tuple(routing.indices.shape)} != {(T, k)}"
    assert routing.weights.shape == (T, k), f"{name}: weights {tuple(routing.weights.shape)} != {(T, k)}"
    assert routing.indices.dtype == torch.long, f"{name}: indices must be long"
    assert int(routing.indices.min()) >= 0 and int(routing.indices.max()) < E, f"{name}: expert index out of range"
    w = routing.weights.detach()
    assert torch.isfinite(w).all(), f"{name}: non-finite weights"
    assert (w >= 0).all(), f"{name}: negative weights"
    if k > 1:  # a token must not pick the same expert twice
        s = routing.indices.sort(-1).values
        assert (s[:, 1:] != s[:, :-1]).all(), f"{name}: duplicate experts for one token"
    if routing.logits is not None:
        assert routing.logits.shape == (T, E), f"{name}: logits {tuple(routing.logits.shape)} != {(T, E)}"
    for key, v in routing.aux_losses.items():
        assert v.dim() == 0 and torch.isfinite(v), f"{name}: aux loss {key} must be a finite scalar"
    for key, v in routing.stats.items():
        assert isinstance(v, (int, float)), f"{name}: stat {key} must be a float"


def check_router(name: str) -> None:
    """All conformance checks for one registered router; raises AssertionError on the first failure."""
    cls = get_router(name)
    k = pick_top_k(name)
    E = NUM_EXPERTS
    # construction by name, unknown keyword rejected
    create_router(name, D_MODEL, E, k)
    try:
        create_router(name, D_MODEL, E, k, definitely_not_a_hparam=1)
    except TypeError as exc:
        assert name in str(exc), "unknown-key error must name the router"
    else:
        raise AssertionError(f"{name}: unknown hyper-parameter accepted silently")

    x = torch.randn(T, D_MODEL, generator=torch.Generator().manual_seed(0), requires_grad=True)
    layer = build_layer(name)
    y, routing = run_layer(layer, x)
    assert y.shape == x.shape and torch.isfinite(y).all(), f"{name}: bad layer output"
    if cls.is_dense:
        check_routing(name, layer.router(x, RouteContext(**make_ctx(T))), T, k, E)
        return
    assert routing is not None
    check_routing(name, routing, T, k, E)

    # gradients reach router and expert parameters
    loss = y.square().mean() + sum(routing.aux_losses.values(), torch.zeros(()))
    loss.backward()
    assert layer.experts.w1.grad is not None and layer.experts.w1.grad.abs().sum() > 0, f"{name}: no expert gradient"
    router_params = [p for p in layer.router.parameters() if p.requires_grad]
    if router_params:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in router_params), \
            f"{name}: no gradient reaches the router's parameters"
    assert x.grad is not None and torch.isfinite(x.grad).all()

    # same seed -> same output
    y1, _ = run_layer(build_layer(name, seed=3), x.detach())
    y2, _ = run_layer(build_layer(name, seed=3), x.detach())
    torch.testing.assert_close(y1, y2, msg=f"{name}: same seed gave different outputs")

    # state_dict round-trip (eval mode: no training-time noise)
    a, b = build_layer(name, seed=4), build_layer(name, seed=5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.eval(), b.eval()
    ya, _ = run_layer(a, x.detach(), training=False)
    yb, _ = run_layer(b, x.detach(), training=False)
    torch.testing.assert_close(ya, yb, msg=f"{name}: state_dict round-trip changed the output")

    # on_step over a whole schedule, with training steps in between
    layer = build_layer(name, seed=6)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    total = 40
    for step in range(total):
        layer.router.on_step(step, total)
        yy, rr = run_layer(layer, x.detach(), step=step, total_steps=total)
        check_routing(name, rr, T, k, E)
        loss = yy.square().mean() + sum(rr.aux_losses.values(), torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(yy).all(), f"{name}: non-finite output at step {step}"

    # bf16 through the layer
    lb = build_layer(name, seed=7).to(torch.bfloat16)
    yb16, rb16 = run_layer(lb, x.detach().to(torch.bfloat16))
    assert yb16.dtype == torch.bfloat16 and torch.isfinite(yb16.float()).all(), f"{name}: bf16 failed"
    assert isinstance(lb, MoELayer)
