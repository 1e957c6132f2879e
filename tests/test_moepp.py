"""The moepp router (MoE++, Jin et al. 2024, arXiv 2410.07348) on hand-computed inputs: zero-expert gates and
renormalisation, the gating residual through ctx.shared, the heterogeneous balance loss, conformance, causality
in the LM, the suites' tiny presets."""
from __future__ import annotations

import pytest
import torch

from harness.cli import main
from harness.conformance import check_router
from harness.layers.moe import build_ffn
from harness.models.lm import MoEDecoderLM
from harness.routing.registry import create_router, describe_routers
from harness.routing.router import RouteContext

from baselines.moepp import SHARED_KEY, MoEPPRouter

E_FFN = 2
E = E_FFN + 4  # FFN 0, 1; constant 2, 3; copy 4; zero 5


def _linear_router(logits_by_row, residual=False, **kw):
    """A linear-gate moepp whose logits are the input rows (d_model = E, gate = identity)."""
    r = create_router("moepp", E, E, 2, gate="linear", gating_residual=residual, **kw)
    with torch.no_grad():
        r.gate_in.weight.copy_(torch.eye(E))
    return r, torch.tensor(logits_by_row)


def test_pinned_mix_and_layer_shape():
    assert MoEPPRouter.null_experts == {"constant": 2, "copy": 1, "zero": 1}
    layer = build_ffn("moepp", 8, 16, 4, 2)
    assert layer.num_experts == 8 and layer.num_ffn_experts == 4 and layer.router.num_experts == 8
    assert layer.null_experts.mix.kinds() == ("constant", "constant", "copy", "zero")
    r = layer.router
    assert r.gate_in.weight.shape == (64, 8) and r.gate_out.weight.shape == (8, 64) and r.gate_map.weight.shape == (8, 8)
    assert r.gate_in.bias is None and r.gate_out.bias is None and r.gate_map.bias is None
    assert "moepp" in {row["name"] for row in describe_routers()}


def test_zero_expert_gate_is_zero_and_the_other_takes_all():
    r, x = _linear_router([[0.0, 1.0, 0.0, 0.0, 0.0, 3.0],    # top-2: zero expert (5), FFN 1
                           [2.0, 1.0, 0.0, 0.0, 0.0, -1.0],   # top-2: FFN 0, FFN 1 (no zero expert)
                           [0.0, 0.0, 0.0, 0.0, 2.0, 2.5]])   # top-2: zero, copy
    out = r(x, RouteContext())
    assert out.indices.tolist() == [[5, 1], [0, 1], [5, 4]]
    assert out.weights.tolist() == [[0.0, 1.0], [pytest.approx(torch.e / (torch.e + 1)), pytest.approx(1 / (torch.e + 1))],
                                    [0.0, 1.0]]
    # zero_gate=False: the plain renormalised top-2 probabilities
    r2, _ = _linear_router([[0.0] * E], zero_gate=False)
    p = torch.softmax(x[0], 0)
    w = r2(x[:1], RouteContext()).weights[0]
    assert torch.allclose(w, torch.stack([p[5], p[1]]) / (p[5] + p[1]))
    # top-1 on the zero expert: weight 0, no NaN
    r1 = create_router("moepp", E, E, 1, gate="linear", gating_residual=False)
    with torch.no_grad():
        r1.gate_in.weight.copy_(torch.eye(E))
    assert r1(x[:1], RouteContext()).weights.tolist() == [[0.0]]


def test_gating_residual_through_ctx_shared():
    torch.manual_seed(0)
    a, b = create_router("moepp", 4, E, 2), create_router("moepp", 4, E, 2)
    x = torch.randn(3, 4)
    ctx = RouteContext(shared={})
    la = a(x, ctx).logits
    assert torch.equal(ctx.shared[SHARED_KEY], la)
    lb = b(x, ctx).logits
    own = torch.tanh(x @ b.gate_in.weight.t()) @ b.gate_out.weight.t()
    assert torch.allclose(lb, own + la @ b.gate_map.weight.t(), atol=1e-6)  # logits += gate_map(previous logits)
    assert torch.equal(ctx.shared[SHARED_KEY], lb)  # handed on, residual included
    # the first layer (an empty dict) has no residual
    assert torch.allclose(a(x, RouteContext()).logits, torch.tanh(x @ a.gate_in.weight.t()) @ a.gate_out.weight.t())


def test_heterogeneous_balance_loss_by_hand():
    r, x = _linear_router([[0.0, 1.0, 0.0, 0.0, 0.0, 3.0],
                           [2.0, 1.0, 0.0, 0.0, 0.0, -1.0]], null_tau=0.5)
    out = r(x, RouteContext())
    p = torch.softmax(x, -1).mean(0)
    # k_slots f_i: chosen slots per expert / T: expert 0: 1/2, expert 1: 2/2, expert 5: 1/2
    f = torch.tensor([0.5, 1.0, 0.0, 0.0, 0.0, 0.5])
    eta = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    want = 0.01 * E * float((eta * f * p).sum())
    assert float(out.aux_losses["balance"].detach()) == pytest.approx(want, rel=1e-6)
    assert set(out.aux_losses) == {"balance"}
    # T = 0: zero, not NaN
    empty = r(torch.zeros(0, E), RouteContext())
    assert float(empty.aux_losses["balance"]) == 0.0


def test_layer_stats_and_loads_count_null_experts():
    torch.manual_seed(0)
    layer = build_ffn("moepp", 8, 16, 4, 2)
    y, r = layer(torch.randn(32, 8), RouteContext(training=True))
    counts = layer.last_counts
    assert counts.numel() == 8 and int(counts.sum()) == 64
    assert r.stats["ffn_experts_per_token"] == pytest.approx(float(counts[:4].sum()) / 32)
    assert r.stats["null_share"] == pytest.approx(float(counts[4:].sum()) / 64)
    assert layer.expert_flops() == 4 * int(counts[:4].sum()) * 8 * 16 + 7 * 8 * int(counts[4:6].sum())


def test_conformance():
    check_router("moepp")


def test_causal_in_the_lm():
    """A token's routing (gate + residual chain) uses nothing from later tokens."""
    torch.manual_seed(0)
    model = MoEDecoderLM("moepp", d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, top_k=2, context=12)
    model.eval()
    idx = torch.randint(0, 256, (1, 12))
    idx2 = idx.clone()
    idx2[0, 6:] = (idx2[0, 6:] + 17) % 256
    with torch.no_grad():
        l1, r1 = model(idx)
        l2, r2 = model(idx2)
    assert torch.allclose(l1[0, :6], l2[0, :6], atol=1e-5)
    for a, b in zip(r1, r2):
        assert torch.equal(a.indices[:6], b.indices[:6]) and torch.allclose(a.logits[:6], b.logits[:6], atol=1e-5)
    assert not torch.allclose(r1[1].logits[6:], r2[1].logits[6:])


@pytest.mark.parametrize("suite", ["lm", "vision"])
def test_tiny_preset_runs(suite, tmp_path, capsys):
    rc = main(["run", "--suite", suite, "--preset", "tiny", "--routers", "moepp", "--no-eval", "--quiet",
               "--store", str(tmp_path / "s.duckdb"), "--runs-dir", str(tmp_path / "runs"), "--jobs", "1"])
    assert rc == 0, capsys.readouterr().err[-2000:]
