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

from .layers.moe import MoELayer, build_ffn
from .models import lm as lm_model  # looked up at call time: a test swaps in a model that re-initialises
from .routing.registry import create_router, get_router, register_router, unregister_router
from .routing.router import RouteContext, Router, Routing

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


def num_slots(name: str, k: int, E: int) -> int:
    """Slots per token the router must return: k, or for a variable-k router its declared ``num_slots``."""
    cls = get_router(name)
    if not cls.variable_k:
        return k
    with torch.random.fork_rng(devices=[]):  # building a router draws its init: leave the caller's RNG alone
        return create_router(name, D_MODEL, E, k).num_slots


def check_routing(name: str, routing: Routing, T: int, k: int, E: int) -> None:
    """Shapes [T, S] (S = k; a variable-k router's ``num_slots``), long indices in range, finite weights >= 0,
    distinct experts among a token's used slots (for a variable-k router, weight exactly 0 = unused)."""
    variable = get_router(name).variable_k
    S = num_slots(name, k, E)
    assert routing.indices.shape == (T, S), f"{name}: indices {tuple(routing.indices.shape)} != {(T, S)}"
    assert routing.weights.shape == (T, S), f"{name}: weights {tuple(routing.weights.shape)} != {(T, S)}"
    assert routing.indices.dtype == torch.long, f"{name}: indices must be long"
    if T:
        assert int(routing.indices.min()) >= 0 and int(routing.indices.max()) < E, f"{name}: expert index out of range"
    w = routing.weights.detach()
    assert torch.isfinite(w).all(), f"{name}: non-finite weights"
    assert (w >= 0).all(), f"{name}: negative weights"
    if S > 1:  # a token must not pick the same expert twice (unused slots of a variable-k router aside)
        idx = routing.indices
        if variable:  # unused slots get distinct negative stand-ins
            idx = torch.where(w != 0, idx, -1 - torch.arange(S, device=idx.device).expand_as(idx))
        s = idx.sort(-1).values
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
    if cls.is_dense:  # the dense FFN: its marker routing, and the models' contract (no MoE layers, no routings)
        check_routing(name, layer.router(x, RouteContext(**make_ctx(T))), T, k, E)
        check_moe_model(name)
        return
    assert routing is not None
    E = layer.num_experts  # what the router scores: NUM_EXPERTS FFNs + a router's pinned null experts (moepp)
    check_routing(name, routing, T, k, E)
    check_layer_counts(name, layer, routing)

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

    check_fp32_routing(name)
    check_empty_batch(name)
    check_model_keeps_router_init(name)
    check_moe_model(name)


def check_layer_counts(name: str, layer: Any, routing: Routing) -> None:
    """The layer's expert loads (``last_counts``) count the used slots: all of them, or for a variable-k
    router those with a non-zero weight (the layer drops the others before dispatch)."""
    idx = routing.indices
    if get_router(name).variable_k:
        idx = idx[routing.weights.detach() != 0]
    want = torch.bincount(idx.reshape(-1), minlength=layer.num_experts)
    got = layer.last_counts
    if layer.capacity_factor is None:
        assert torch.equal(got.cpu(), want.cpu()), f"{name}: layer counts {got.tolist()} != used slots {want.tolist()}"
    else:  # capacity may drop slots
        assert bool((got.cpu() <= want.cpu()).all()), f"{name}: layer counts {got.tolist()} exceed used slots {want.tolist()}"


def check_fp32_routing(name: str, T_: int = 64, d: int = 64, E: int = 16) -> None:
    """Routers decide in fp32: under bf16 autocast, fp32 logits equal to the fp32 run's, and the same decisions.

    An ``nn.Linear`` gate under autocast runs its matmul in bf16 (logit errors ~1e-2);
    compute the scores with ``harness.routing.router.fp32_linear`` (autocast off, fp32 operands).
    Evaluation mode, so that training-time noise does not enter the comparison.
    """
    cls = get_router(name)
    if cls.is_dense:
        return
    k = min(pick_top_k(name), E)
    torch.manual_seed(11)
    router = create_router(name, d, E, k).eval()
    g = torch.Generator().manual_seed(12)
    x = torch.randn(T_, d, generator=g)
    ctx_kw = {**make_ctx(T_, training=False), "embeddings": torch.randn(T_, d, generator=g)}
    with torch.no_grad():
        ref = router(x, RouteContext(**ctx_kw))
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            amp = router(x, RouteContext(**ctx_kw))
    if ref.logits is not None:
        assert amp.logits is not None and amp.logits.dtype == torch.float32, \
            f"{name}: routing logits under bf16 autocast are {amp.logits.dtype if amp.logits is not None else None}, " \
            f"not float32 (compute them with harness.routing.router.fp32_linear)"
        torch.testing.assert_close(amp.logits, ref.logits, rtol=1e-5, atol=1e-5,
                                   msg=f"{name}: routing logits under bf16 autocast differ from fp32 (route in fp32)")
    assert torch.equal(amp.indices, ref.indices), f"{name}: bf16 autocast changed the routing decisions"


def check_empty_batch(name: str) -> None:
    """T = 0 (an expert-parallel rank or a capacity edge case can route no tokens): shapes [0, S], aux losses 0."""
    cls = get_router(name)
    if cls.is_dense:
        return
    k = pick_top_k(name)
    torch.manual_seed(13)
    router = create_router(name, D_MODEL, NUM_EXPERTS, k)
    x = torch.zeros(0, D_MODEL, requires_grad=True)
    ctx = RouteContext(training=True, step=50, total_steps=100, token_ids=torch.zeros(0, dtype=torch.long),
                       positions=torch.zeros(0, dtype=torch.long), embeddings=torch.zeros(0, D_MODEL),
                       expert_fn=lambda: torch.zeros(0, NUM_EXPERTS, D_MODEL))
    router.on_step(50, 100)
    out = router(x, ctx)
    S = router.num_slots
    assert out.indices.shape == (0, S) and out.weights.shape == (0, S), f"{name}: T=0 gave indices {tuple(out.indices.shape)}"
    for key, v in out.aux_losses.items():
        v = v.detach()
        assert v.dim() == 0 and torch.isfinite(v) and float(v) == 0.0, f"{name}: aux loss {key} is {float(v)} for T=0, not 0"


def check_model_keeps_router_init(name: str) -> None:
    """The harness models build routers and must not re-initialise their parameters afterwards."""

    cls = get_router(name)
    if cls.is_dense:
        return
    probe_name = f"__init_probe__{name.replace('@', '__')}"

    class Probe(cls):  # type: ignore[misc, valid-type]
        snapshots: list[dict[str, torch.Tensor]] = []

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            Probe.snapshots.append({n: p.detach().clone() for n, p in self.named_parameters()})

    Probe.__name__ = Probe.__qualname__ = f"Probe_{cls.__name__}"
    register_router(probe_name)(Probe)
    try:
        torch.manual_seed(14)
        k = pick_top_k(name)
        models = [("LM", lambda: lm_model.MoEDecoderLM(probe_name, vocab_size=256, d_model=D_MODEL, n_layers=1, n_heads=2,
                                               d_ff=D_FF, num_experts=NUM_EXPERTS, top_k=k, context=8))]
        try:
            from .models.vit import MoEVisionTransformer
        except ImportError:  # timm missing: the LM check still runs
            MoEVisionTransformer = None  # noqa: N806
        if MoEVisionTransformer is not None:
            models.append(("ViT", lambda: MoEVisionTransformer(
                router=probe_name, num_experts=NUM_EXPERTS, top_k=k, d_ff=D_FF, depth=1, img_size=8, patch_size=4,
                embed_dim=D_MODEL, num_heads=2, num_classes=3)))
        for label, make in models:
            Probe.snapshots.clear()
            model = make()
            routers = [m for m in model.modules() if isinstance(m, Router) and not m.is_dense]
            assert len(routers) == len(Probe.snapshots) == 1
            for pname, p in routers[0].named_parameters():
                assert torch.equal(p.detach(), Probe.snapshots[0][pname]), \
                    f"{name}: the {label} model re-initialised router parameter {pname!r} after the router built it"
    finally:
        unregister_router(probe_name)


def _models(name: str, k: int, n_layers: int = 1, moe_every: int = 1) -> list[tuple[str, Any, Any]]:
    """(label, model, inputs) of both models with ``name``'s FFNs (the ViT where timm is installed)."""
    out = [("LM", lm_model.MoEDecoderLM(name, vocab_size=256, d_model=D_MODEL, n_layers=n_layers, n_heads=2, d_ff=D_FF,
                                        num_experts=NUM_EXPERTS, top_k=k, moe_every=moe_every, context=8),
            torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3)))]
    try:
        from .models.vit import MoEVisionTransformer
    except ImportError:  # timm missing: the LM check still runs
        return out
    out.append(("ViT", MoEVisionTransformer(router=name, num_experts=NUM_EXPERTS, top_k=k, d_ff=D_FF, depth=n_layers,
                                            moe_every=moe_every, img_size=8, patch_size=4, embed_dim=D_MODEL,
                                            num_heads=2, num_classes=3),
                torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))))
    return out


def check_moe_model(name: str) -> None:
    """Both models keep the :class:`harness.models.base.MoEModel` contract with this router: ``moe_layers()`` are
    the MoE layers of the blocks ``moe_config.is_moe_block`` names (none for dense), ``forward(x, step, total)``
    returns the output and one Routing per MoE layer, ``on_step`` reaches every one of their routers."""
    from .models.base import MoEModel

    torch.manual_seed(21)
    for label, model, inputs in _models(name, pick_top_k(name), n_layers=2, moe_every=2):
        assert isinstance(model, MoEModel), f"{name}: the {label} model does not keep the MoEModel protocol"
        layers = model.moe_layers()
        want = 0 if get_router(name).is_dense else sum(model.moe_config.is_moe_block(i, 2) for i in range(2))
        assert len(layers) == want and all(isinstance(m, MoELayer) for m in layers), \
            f"{name}: the {label} model's moe_layers() are {len(layers)}, its config routes {want} blocks"
        seen: list[tuple[int, int]] = []
        for layer in layers:
            layer.router.on_step = lambda step, total, _seen=seen: _seen.append((step, total))  # type: ignore[method-assign]
        model.on_step(5, 10)
        assert seen == [(5, 10)] * len(layers), f"{name}: the {label} model's on_step reached {seen}"
        for layer in layers:
            del layer.router.on_step  # the class's again
        model.train()
        out, routings = model(inputs, step=5, total_steps=10)
        assert torch.is_tensor(out) and torch.isfinite(out).all(), f"{name}: the {label} model's output"
        assert len(routings) == len(layers) and all(isinstance(r, Routing) for r in routings), \
            f"{name}: the {label} model returned {len(routings)} routings for {len(layers)} MoE layers"
