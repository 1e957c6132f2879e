"""Defaults taken from the routers' public reference code, pinned by hand-computed values on tiny inputs.

Sources (read with the project's code-search tool; see docs/routers.md):
MoGE  wangyuankl123/MoGE Language_Modeling/{loss_group_sparsity,custom_gates,sigmascheduler,trainer}.py,
      scripts/smoe-*.sh; Image_Classification/tutel/impls/loss_group_sparsity.py, configs/vitmoe/*moge*.
SMoE  torchscale/component/xmoe/routing.py top2gating (fairseq mirror), deepspeed/moe/sharded_moe.py.
X-MoE xy980523/MoEc_model unilm/modules/tmoe/top1gate.py; microsoft/torchscale xmoe/routing.py.
CompeteSMoE Fsoft-AIC/CompeteSMoE moe_model/model/moe/{competesmoe,moe}.py, moe_pretrain_model/sweeps/.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.competesmoe import CompeteSMoERouter, diversity_loss
from baselines.moge import MoGERouter, default_window, gaussian_kernel, group_sparsity_penalty
from baselines.xmoe import XMoERouter
from harness.routing.losses import expert_fractions, marginal_entropy_loss, router_z_loss, switch_balance_loss
from harness.routing.registry import create_router, get_router
from harness.routing.router import RouteContext

pytestmark = [pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar"),
              pytest.mark.usefixtures("one_thread")]

W0, W1, W2 = 1.0, math.exp(-0.5), math.exp(-1.0)  # 3x3 Gaussian at sigma = 1: centre, edge, corner
S3 = W0 + 4 * W1 + 4 * W2



# ---------------------------------------------------------------------------
# MoGE
# ---------------------------------------------------------------------------


def test_moge_defaults_are_the_lm_code():
    d = MoGERouter.hparam_defaults()
    assert d["penalize"] == "probs"          # custom_gates.py: score = F.softmax(gate)
    assert d["padding"] == "valid"           # loss_group_sparsity.py: F.conv2d(..., padding=0)
    assert d["reduction"] == "sum"           # sqrt_sum.sum() / sum_weighted.size(1)
    assert d["eps"] == 1e-8                  # torch.sqrt(sum_weighted + 1e-8)
    assert (d["sigma_max"], d["sigma_min"], d["sigma_power"], d["sigma_schedule"]) == (10.0, 1.0, 0.2, "power")
    assert d["group_weight"] == pytest.approx(1e-5 * 0.01)  # GROUP_SPARSE_LOSS_WEIGHT x --load_balance
    assert d["keep_balance_loss"] is False and d["z_loss_weight"] == 0.0
    assert d["gate_bias"] is True            # nn.Linear(d_model, tot_expert)


def test_moge_4x4_valid_window_single_score_by_hand():
    sigma = 1.0
    torch.testing.assert_close(gaussian_kernel(sigma, 3), torch.tensor([[W2, W1, W2], [W1, W0, W1], [W2, W1, W2]]) / S3)
    # one token, one non-zero score at map position (1, 1) = expert 5; a = z^2
    z = torch.zeros(2, 16)
    z[0, 5] = 0.5
    z[1, 15] = 2.0  # second token: a corner expert (3, 3), seen only by the window centred at (2, 2)
    a0, a1 = 0.25, 4.0
    eps = 1e-8
    # valid 3x3 windows on a 4x4 map: 2x2 = 4 positions, centred at (1,1), (1,2), (2,1), (2,2)
    tok0 = math.sqrt(W0 * a0 / S3 + eps) + 2 * math.sqrt(W1 * a0 / S3 + eps) + math.sqrt(W2 * a0 / S3 + eps)
    tok1 = 3 * math.sqrt(eps) + math.sqrt(W2 * a1 / S3 + eps)
    summed = (tok0 + tok1) / 4  # summed over tokens and positions, divided by the 4 positions
    got = group_sparsity_penalty(z, 4, 4, sigma, kernel_size=3, eps=eps)
    assert float(got) == pytest.approx(summed, rel=1e-6)
    assert float(group_sparsity_penalty(z, 4, 4, sigma, 3, eps, reduction="sum_window")) == pytest.approx(summed / 9, rel=1e-6)
    assert float(group_sparsity_penalty(z, 4, 4, sigma, 3, eps, reduction="mean")) == pytest.approx(summed / 2, rel=1e-6)
    # 'same' zero padding keeps 16 positions and differs
    same = group_sparsity_penalty(z, 4, 4, sigma, 3, eps, padding="same")
    assert abs(float(same) - summed) > 0.05 * summed


def test_moge_router_penalises_softmax_over_all_experts_by_hand():
    r = MoGERouter(4, 16, 2)  # window 3 on the 4x4 map
    assert r.kernel_size == 3 and (r.map_rows, r.map_cols) == (4, 4)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.bias.zero_()  # uniform probabilities 1/16
    r.on_step(0, 100)
    T = 5
    out = r(torch.randn(T, 4), RouteContext(training=True))
    assert set(out.aux_losses) == {"group_sparsity"}  # replaces the balance loss
    # every valid window sees 9 weights summing to 1 times p^2 = 1/256: sqrt(1/256 + 1e-8) per position
    per_token = math.sqrt(1 / 256 + 1e-8)
    assert float(out.aux_losses["group_sparsity"]) == pytest.approx(1e-7 * T * per_token, rel=1e-6)
    vit = create_router("moge@vit", 4, 16, 2)
    assert vit.gate.bias is None  # Tutel gates/top.py: Linear(..., bias=False)
    with torch.no_grad():
        vit.gate.weight.zero_()
    outv = vit(torch.randn(T, 4), RouteContext(training=False))  # evaluation: no gate noise
    assert float(outv.aux_losses["group_sparsity"]) == pytest.approx(3e-5 * T * per_token / 9, rel=1e-6)
    assert "balance" in outv.aux_losses


def test_moge_sigma_power_schedule_at_t_0_01_1():
    r = MoGERouter(4, 16, 2)
    expected = {0: 10.0, 10: 10.0 - 9.0 * 0.1 ** 0.2, 100: 1.0}  # sigma_max - (sigma_max - sigma_min) t^0.2
    assert expected[10] == pytest.approx(4.321388, abs=1e-5)
    for step, sigma in expected.items():
        r.on_step(step, 100)
        assert r.sigma == pytest.approx(sigma, rel=1e-9)
    r.on_step(250, 100)
    assert r.sigma == 1.0  # clamped past the end


def test_moge_eight_experts_use_a_2x2_window_with_the_codes_offsets():
    assert default_window(2, 4) == 2 and default_window(4, 4) == 3 and default_window(1, 7) == 1
    r = MoGERouter(4, 8, 2)
    assert (r.map_rows, r.map_cols, r.kernel_size) == (2, 4, 2)
    # offsets arange(2) - 1 = (-1, 0): squared distances [[2, 1], [1, 0]]
    k = gaussian_kernel(1.0, 2)
    S2 = W2 + 2 * W1 + W0
    torch.testing.assert_close(k, torch.tensor([[W2, W1], [W1, W0]]) / S2)
    # a single score at map (0, 0): only the first of the 1x3 valid positions sees it, with weight W2
    z = torch.zeros(1, 8)
    z[0, 0] = 1.0
    eps = 1e-8
    expected = (math.sqrt(W2 / S2 + eps) + 2 * math.sqrt(eps)) / 3
    assert float(group_sparsity_penalty(z, 2, 4, 1.0, kernel_size=2, eps=eps)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="kernel_size"):
        MoGERouter(4, 8, 2, kernel_size=3)  # does not fit a 2x4 map with valid padding
    MoGERouter(4, 8, 2, kernel_size=3, padding="same")  # fits with padding


def test_moge_paper_variant_is_the_earlier_reading():
    p = get_router("moge@paper").hparam_defaults()
    assert (p["penalize"], p["padding"], p["reduction"], p["sigma_schedule"], p["group_weight"]) == \
        ("logits", "same", "mean", "cosine", 3e-3)


# ---------------------------------------------------------------------------
# SMoE: fp32 gate, first-choice balance, Gumbel second expert
# ---------------------------------------------------------------------------


def test_smoe_gate_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    r = create_router("smoe", 64, 64, 2)
    x = torch.randn(256, 64)
    ref = r(x, RouteContext())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        amp = r(x, RouteContext())
    assert amp.logits.dtype == torch.float32
    torch.testing.assert_close(amp.logits, ref.logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(amp.indices, ref.indices)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        bf16 = r.gate(x).float()  # what an nn.Linear gate would compute
    assert (bf16 - ref.logits).abs().max() > 1e-3


def test_balance_fraction_conventions_by_hand():
    idx = torch.tensor([[0, 1], [1, 2], [2, 1], [0, 2]])  # first choices 0, 1, 2, 0
    torch.testing.assert_close(expert_fractions(idx, 3, "first"), torch.tensor([2 / 4, 1 / 4, 1 / 4]))
    torch.testing.assert_close(expert_fractions(idx, 3, "slots"), torch.tensor([2 / 8, 3 / 8, 3 / 8]))
    torch.testing.assert_close(expert_fractions(idx, 3, "k_slots"), torch.tensor([4 / 8, 6 / 8, 6 / 8]))
    assert create_router("smoe", 4, 4, 2).balance_fraction == "first"  # torchscale/fairseq/DeepSpeed top2gating
    probs = torch.tensor([[0.5, 0.3, 0.2]] * 4)
    # E * sum_i f_i P_i with first choices: 3 * (0.5*0.5 + 0.25*0.3 + 0.25*0.2) = 1.125
    assert float(switch_balance_loss(probs, idx, "first")) == pytest.approx(1.125)
    assert float(switch_balance_loss(probs, idx, "k_slots")) == pytest.approx(2 * 3 * (0.25 * 0.5 + 0.375 * 0.5))


def test_empty_batch_losses_are_zero():
    empty_p, empty_i = torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long)
    for mode in ("first", "slots", "k_slots"):
        assert float(switch_balance_loss(empty_p, empty_i, mode)) == 0.0
        assert expert_fractions(empty_i, 4, mode).tolist() == [0.0] * 4
    assert float(router_z_loss(empty_p)) == 0.0
    assert float(marginal_entropy_loss(empty_p)) == 0.0
    assert float(group_sparsity_penalty(torch.zeros(0, 16), 4, 4, 1.0)) == 0.0


def test_smoe_gumbel_second_expert_samples_from_the_remaining_softmax():
    r = create_router("smoe", 3, 3, 2, second_expert="gumbel")
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(3))
    x = torch.tensor([[2.0, 1.0, 0.0]]).repeat(4000, 1)
    torch.manual_seed(0)
    out = r(x, RouteContext(training=True))
    assert (out.indices[:, 0] == 0).all()  # the first expert is the argmax
    share = float((out.indices[:, 1] == 1).float().mean())
    assert share == pytest.approx(math.e / (math.e + 1), abs=0.03)  # Gumbel-max: softmax over the rest
    p = torch.tensor([2.0, 1.0, 0.0]).softmax(-1)
    row = out.indices[:, 1] == 2
    torch.testing.assert_close(out.weights[row][0], torch.stack([p[0], p[2]]) / (p[0] + p[2]))
    ev = r(x[:3], RouteContext(training=False))  # evaluation stays deterministic top-k
    assert ev.indices.tolist() == [[0, 1]] * 3
    assert get_router("smoe@gshard").hparam_defaults()["second_expert"] == "gumbel"


# ---------------------------------------------------------------------------
# X-MoE (MoEc_model top1gate.py)
# ---------------------------------------------------------------------------


def test_xmoe_learnable_tau_clamped_and_fixed_balance_temperature_by_hand():
    r = XMoERouter(3, 2, 1, routing_dim=2)
    assert float(r.temperature) == pytest.approx(0.07) and r.raw_temperature.requires_grad
    with torch.no_grad():
        r.proj.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
        r.expert_embeddings.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    x = torch.tensor([[3.0, 4.0, 7.0], [1.0, 0.0, 0.0]])
    cos = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # token and expert both normalised
    out = r(x, RouteContext(training=True))
    torch.testing.assert_close(out.logits, cos / 0.07)
    # balance: P from softmax(cos / 0.07) (TEMPERATURE_FOR_L_UAX), f from the first choices (1, 0)
    P = (cos / 0.07).softmax(-1).mean(0)
    assert float(out.aux_losses["balance"]) == pytest.approx(0.01 * 2 * float(0.5 * P[0] + 0.5 * P[1]), rel=1e-5)
    with torch.no_grad():
        r.raw_temperature.fill_(1e-6)  # below 1e-4: the constant 1e-4 (_get_gating_temperature)
    out2 = r(x, RouteContext(training=True))
    torch.testing.assert_close(out2.logits, cos / 1e-4)
    assert out2.stats["temperature"] == pytest.approx(1e-4)
    # the balance softmax keeps its fixed 0.07
    assert float(out2.aux_losses["balance"]) == pytest.approx(float(out.aux_losses["balance"]), rel=1e-6)


def test_xmoe_torchscale_variant_rescales_expert_embeddings_to_1_5():
    torch.manual_seed(0)
    r = create_router("xmoe@torchscale", 8, 4, 2)
    assert not r.normalize_tokens and float(r.temperature) == 1.0
    x = torch.randn(6, 8)
    out = r.train()(x, RouteContext(training=True))
    torch.testing.assert_close(r.expert_embeddings.norm(dim=1), torch.full((4,), 1.5))
    h = x @ r.proj.weight.t()
    torch.testing.assert_close(out.logits, (h @ F.normalize(r.expert_embeddings, dim=-1).t()).detach())
    assert XMoERouter.hparam_defaults()["rescale_embeddings"] is None  # MoEc_model does not rescale


# ---------------------------------------------------------------------------
# CompeteSMoE
# ---------------------------------------------------------------------------


def test_competesmoe_diversity_code_average_by_hand():
    chosen = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # k = 3: cos(0,1)=1, cos(0,2)=cos(1,2)=0
    # code: [3, 3] matrix with a zeroed diagonal, off-diagonal sum 2, averaged over 9 entries
    assert float(diversity_loss(chosen, "code")) == pytest.approx(2 / 9)
    assert float(diversity_loss(chosen, "pairs")) == pytest.approx(2 / 6)
    assert CompeteSMoERouter.hparam_defaults()["diversity_average"] == "code"


def test_competesmoe_hybrid_router_loss_and_entropy_balance_by_hand():
    out_e = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [-2.0, -2.0]]])  # T=1, E=3
    r = create_router("competesmoe@lm_pretrain", 2, 3, 2, competition_prob=1.0)
    assert (r.warmup_fraction, r.router_loss_weight, r.router_theta, r.diversity_weight) == (0.0, 0.001, 0.2, 0.005)
    x = torch.randn(1, 2)
    out = r(x, RouteContext(training=True, step=0, total_steps=10, expert_fn=lambda: out_e.clone()))
    probs = (x @ r.gate.weight.t()).softmax(-1)[0]
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    target = torch.tensor([sp(1), sp(3), sp(-2)]).softmax(-1)
    chosen = [1, 0]
    full = float(((probs - target) ** 2).mean())
    topk = float(((probs[chosen] - target[chosen]) ** 2).mean())
    assert float(out.aux_losses["router_mse"]) == pytest.approx(0.001 * (full + 0.2 * topk), rel=1e-5)
    # competition steps: entropy balance of softmax(affinity) at balance_loss_coef_comp / 2 = 0.005
    assert float(out.aux_losses["balance"]) == pytest.approx(
        0.005 * (math.log(3) + float((target * target.log()).sum())), rel=1e-5)
    # normal steps: entropy balance log E - H(mean p)
    normal = create_router("competesmoe@lm_pretrain", 2, 3, 2, competition_prob=0.0)
    xb = torch.randn(4, 2)
    ob = normal(xb, RouteContext(training=True))
    pm = (xb @ normal.gate.weight.t()).softmax(-1).mean(0)
    expected = math.log(3) + float((pm * pm.log()).sum())
    assert float(ob.aux_losses["balance"]) == pytest.approx(0.01 * expected, rel=1e-5, abs=1e-9)


def test_competesmoe_gate_init_is_normal_002():
    torch.manual_seed(0)
    w = CompeteSMoERouter(256, 64, 2).gate.weight
    assert float(w.std()) == pytest.approx(0.02, rel=0.05)


# ---------------------------------------------------------------------------
# StableMoE: the LM model keeps the distilled embedding's own init
# ---------------------------------------------------------------------------


def test_lm_model_keeps_stablemoe_distilled_embedding_init():
    from harness.models.lm import MoEDecoderLM

    torch.manual_seed(0)
    m = MoEDecoderLM("stablemoe", d_model=32, n_layers=1, n_heads=2, d_ff=32, num_experts=4, top_k=1, context=16)
    router = m.moe_layers()[0].router
    assert float(router.distill_embedding.weight.std()) == pytest.approx(1.0, rel=0.1)  # N(0, 1), not N(0, 0.02)
    assert float(m.tok_emb.weight.std()) == pytest.approx(0.02, rel=0.1)


def test_tutel_load_importance_loss_by_hand():
    from harness.routing.losses import load_importance_loss

    Phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    topk_noisy_logits = torch.tensor([[1.0], [0.5]])  # k = 1: the threshold is the chosen noisy logit
    std = 1.0 / 2  # gate_noise / E
    l_imp = ((1.1 - 1.0) ** 2 + (0.9 - 1.0) ** 2) / 1 / 1.0 ** 2  # unbiased var / mean^2 of (1.1, 0.9)
    L0 = Phi((0.7 - 1.0) / std) + Phi((0.4 - 0.5) / std)
    L1 = Phi((0.3 - 1.0) / std) + Phi((0.6 - 0.5) / std)
    l_load = ((L0 - L1) ** 2 / 2) / ((L0 + L1) / 2) ** 2
    got = load_importance_loss(probs, topk_noisy_logits, gate_noise=1.0)
    assert float(got) == pytest.approx((l_imp + l_load) / 2, rel=1e-5)
    assert float(load_importance_loss(torch.zeros(0, 2), torch.zeros(0, 1), 1.0)) == 0.0


def test_moge_vit_variant_is_the_tutel_reading():
    d = get_router("moge@vit").hparam_defaults()
    assert (d["reduction"], d["group_weight"], d["balance_loss"], d["gate_noise"], d["gate_bias"]) == \
        ("sum_window", 3e-5, "load_importance", 1.0, False)
    r = create_router("moge@vit", 4, 16, 1)
    x = torch.randn(6, 4)
    ev = r(x, RouteContext(training=False))  # no gate noise in evaluation: top-1 of the clean softmax
    assert torch.equal(ev.indices[:, 0], (x @ r.gate.weight.t()).argmax(-1))
    torch.manual_seed(0)
    tr = r(x, RouteContext(training=True))
    assert {"group_sparsity", "balance"} == set(tr.aux_losses)
    with pytest.raises(ValueError, match="gate_noise"):
        create_router("moge@vit", 4, 16, 1, gate_noise=0.0)


def test_xmoe_paper_variant_is_the_earlier_reading():
    torch.manual_seed(0)
    r = create_router("xmoe@paper", 8, 4, 2)
    assert r.temperature_param == "log" and float(r.temperature) == pytest.approx(0.07)
    x = torch.randn(16, 8)
    out = r(x, RouteContext(training=True))
    probs = out.logits.softmax(-1)  # the balance softmax is the routing one (tau = exp(log_tau))
    expected = 0.01 * switch_balance_loss(probs, out.indices, "slots")
    assert float(out.aux_losses["balance"]) == pytest.approx(float(expected), rel=1e-6)
