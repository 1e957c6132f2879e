"""The ``loop_recompute`` expert kernel (harness/layers/segment_mlp.py), and ``fused``, its C++ twin, are the ``loop`` kernel bit for bit,
keeping exactly S * (d + d_ff) fewer floats for backward; the model-level step benchmark runs."""
from __future__ import annotations

import pytest
import torch

from harness.bench.memory import SavedBytes
from harness.layers.build import build_ffn
from harness.layers.experts import ExpertBank
from harness.layers.segment_mlp import SUPPORTED_ACTIVATIONS, segment_mlp
from harness.routing.router import RouteContext

ROUTERS = ("smoe", "xmoe", "stablemoe", "competesmoe", "moge", "auxfree", "hash", "sigmoid_smoe", "expert_choice")


def _layer_run(router: str, impl: str, act: str, capacity: float | None, shared: int):
    torch.manual_seed(0)
    k = 1 if router == "stablemoe" else 2
    layer = build_ffn(router, 16, 24, 4, k, activation=act, experts_impl=impl, capacity_factor=capacity,
                      shared_experts=shared)
    layer.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 16, generator=g).requires_grad_()
    ids = torch.randint(0, 256, (37,), generator=g)
    y, r = layer(x, RouteContext(training=True, token_ids=ids, step=5, total_steps=10))
    loss = (y * torch.linspace(-1, 1, 16)).sum() + sum(r.aux_losses.values(), torch.zeros(()))
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros(()) for p in layer.parameters()]
    return [y.detach(), x.grad, *grads]


@pytest.mark.parametrize("impl", ["loop_recompute", "fused"])  # fused: the same arithmetic in C++ (fused_experts.py)
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("act,capacity,shared", [("gelu", None, 0), ("relu", 1.0, 0), ("silu", None, 1)])
def test_recomputing_kernels_are_loop_bit_for_bit(impl, router, act, capacity, shared):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # fused runs its experts in parallel above one thread, whose GEMM bits may differ
    try:
        a = _layer_run(router, "loop", act, capacity, shared)
        b = _layer_run(router, impl, act, capacity, shared)
    finally:
        torch.set_num_threads(before)
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"tensor {i} differs ({impl}, {router}, {act})"


@pytest.mark.parametrize("act", SUPPORTED_ACTIVATIONS)
@pytest.mark.parametrize("counts", [[7, 0, 5, 1], [0, 0, 3, 0], [4, 4, 4, 4]])
def test_segment_mlp_matches_forward_segments(act, counts):
    torch.manual_seed(0)
    bank = ExpertBank(4, 8, 12, act)
    S = sum(counts)
    x = torch.randn(S, 8, requires_grad=True)
    up = torch.randn(S, 8)
    bank.forward_segments(x, counts).backward(up)
    ref = [x.grad.clone()] + [p.grad.clone() for p in bank.parameters()]
    x.grad = None
    bank.zero_grad(set_to_none=True)
    y = segment_mlp(x, counts, act, bank.w1, bank.b1, bank.w2, bank.b2)
    assert torch.equal(y, bank.forward_segments(x, counts))
    y.backward(up)
    got = [x.grad] + [p.grad for p in bank.parameters()]
    for u, v in zip(ref, got):
        assert torch.equal(u, v)
    if 0 in counts:  # an expert without rows gets an exact zero gradient
        e = counts.index(0)
        assert not bank.w1.grad[e].any() and not bank.b2.grad[e].any()


def test_segment_mlp_regathers_from_its_source():
    torch.manual_seed(0)
    bank = ExpertBank(3, 8, 12)
    x_in = torch.randn(10, 8, requires_grad=True)
    token = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    counts = [3, 0, 5]
    up = torch.randn(8, 8)
    bank.forward_segments(x_in.index_select(0, token), counts).backward(up)
    ref = [x_in.grad.clone()] + [p.grad.clone() for p in bank.parameters()]
    x_in.grad = None
    bank.zero_grad(set_to_none=True)
    segment_mlp(x_in.index_select(0, token), counts, "gelu", bank.w1, bank.b1, bank.w2, bank.b2,
                source=(x_in, token)).backward(up)
    for u, v in zip(ref, [x_in.grad] + [p.grad for p in bank.parameters()]):
        assert torch.equal(u, v)


def test_segment_mlp_frozen_weights_and_input():
    bank = ExpertBank(2, 4, 6)
    for p in bank.parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 4, requires_grad=True)
    segment_mlp(x, [2, 3], "gelu", bank.w1, bank.b1, bank.w2, bank.b2).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in bank.parameters())
    bank.w1.requires_grad_(True)
    x2 = torch.randn(5, 4)  # no grad for the rows: only the weight gradient is formed
    segment_mlp(x2, [2, 3], "gelu", bank.w1, bank.b1, bank.w2, bank.b2).sum().backward()
    assert bank.w1.grad is not None and bank.w1.grad.abs().sum() > 0


def _saved_bytes(impl: str, T: int = 37, d: int = 16, f: int = 24) -> int:
    torch.manual_seed(0)
    layer = build_ffn("smoe", d, f, 4, 2, experts_impl=impl)
    layer.train()
    x = torch.randn(T, d, requires_grad=True)
    sb = SavedBytes(layer.parameters())
    with torch.autograd.graph.saved_tensors_hooks(sb.pack, sb.unpack):
        layer(x, RouteContext(training=True))
    return sb.bytes


def test_loop_recompute_keeps_s_times_d_plus_dff_fewer_floats():
    T, d, f, k = 37, 16, 24, 2
    assert _saved_bytes("loop", T, d, f) - _saved_bytes("loop_recompute", T, d, f) == 4 * T * k * (d + f)


def test_loop_recompute_under_autocast_runs_the_loop():
    a, b = [], []
    for impl, out in (("loop", a), ("loop_recompute", b)):
        torch.manual_seed(0)
        layer = build_ffn("smoe", 16, 24, 4, 2, experts_impl=impl)
        x = torch.randn(20, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = layer(x, RouteContext(training=True))
        y.float().sum().backward()
        out.extend([y.detach().float(), x.grad, layer.experts.w1.grad])
    for u, v in zip(a, b):
        assert torch.equal(u, v)
