"""Auxiliary routing losses shared by several routers (unweighted; routers apply their weights).

Every loss here returns an exact 0 (not NaN) for an empty batch (T = 0): an
expert-parallel rank or a capacity edge case can route no tokens at all.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# f_i conventions of the Switch balance loss for k > 1 (see docs/routers.md):
#   "first":   share of tokens whose FIRST choice is expert i. fairseq ``moe/top2gate.py`` /
#              torchscale ``component/xmoe/routing.py`` ``top2gating`` (``ce = mean(mask1)``), DeepSpeed
#              ``deepspeed/moe/sharded_moe.py`` ``top2gating``, GShard's pseudo-code; also X-MoE's
#              MoEc_model ``top1gate.py`` and CompeteSMoE's ``moe_model/model/moe/moe.py`` ``balanceloss``
#              (``one_hot(...)[0]``).
#   "slots":   share of all T*k routing slots that go to expert i (sums to 1). Megatron-Core
#              ``switch_load_balancing_loss_func``; DeepSpeed ``topkgating`` for k > 2 (``/ k``).
#   "k_slots": k times "slots" (sums to k). Hugging Face ``MixtralSparseMoeBlock``'s
#              ``load_balancing_loss_func`` (mean over tokens of the [T, k, E] one-hot, summed over k).
BALANCE_FRACTIONS = ("first", "slots", "k_slots")


def expert_fractions(indices: Tensor, num_experts: int, mode: str = "first") -> Tensor:
    """f_i of the Switch balance loss from the [T, k] chosen experts (conventions above).

    An empty batch gives all zeros.
    """
    if mode not in BALANCE_FRACTIONS:
        raise ValueError(f"balance fraction mode must be one of {', '.join(BALANCE_FRACTIONS)}, got {mode!r}")
    chosen = indices[:, 0] if mode == "first" else indices.reshape(-1)
    counts = torch.bincount(chosen, minlength=num_experts).to(torch.float32)
    if chosen.numel() == 0:
        return counts
    f = counts / chosen.numel()
    if mode == "k_slots":
        f = f * indices.shape[1]
    return f


def switch_balance_loss(probs: Tensor, indices: Tensor, mode: str = "first") -> Tensor:
    """Switch Transformer eq. (4): ``E * sum_i f_i * P_i`` with P_i = mean_t p_i(x_t).

    Equals 1 when routing is perfectly uniform (k under "k_slots"); the caller
    multiplies by alpha. f_i is a count (no gradient); the gradient flows
    through P_i. 0 for an empty batch.
    """
    num_experts = probs.shape[-1]
    if probs.shape[0] == 0:
        return probs.float().sum() * 0.0
    f = expert_fractions(indices, num_experts, mode).to(probs.device)
    p = probs.float().mean(0)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE eq. (5): ``mean_t (logsumexp_i logits_ti)^2``; keeps router logits small. 0 for T = 0."""
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def marginal_entropy_loss(probs: Tensor) -> Tensor:
    """``log E - H(mean_t p_t)``: the entropy ("perplexity") balance regulariser of sigma-MoE.

    Csordas et al. 2023 maximise the entropy of the batch-averaged router
    distribution (``moe.perplexity_reg`` in the CompeteSMoE LM-pretraining sweeps);
    the constant ``log E`` makes it 0 at perfect balance without changing the gradient.
    0 for an empty batch.
    """
    if probs.shape[0] == 0:
        return probs.float().sum() * 0.0
    p = probs.float().mean(0)
    h = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return math.log(probs.shape[-1]) - h


def load_importance_loss(probs: Tensor, topk_logits: Tensor, gate_noise: float) -> Tensor:
    """Tutel's ``load_importance_loss`` (``tutel/impls/losses.py``; Shazeer et al. 2017 Sec. 4 / App. A).

    ``(CV^2(Importance) + CV^2(Load)) / 2`` with Importance_i = sum_t p_ti (``probs``, the
    noise-free softmax), Load_i = sum_t Phi((p_ti - threshold_t) / (gate_noise / E)),
    threshold_t = the k-th selected *noisy logit* of token t (``topk_logits[:, -1]``, as
    Tutel passes it), CV^2 = var / (mean^2 + 1e-10) with the unbiased variance over
    experts. Needs ``gate_noise > 0``. 0 for an empty batch.
    """
    if probs.shape[0] == 0:
        return probs.float().sum() * 0.0
    num_experts = probs.shape[-1]
    p = probs.float()
    imp = p.sum(0)
    l_imp = imp.var() / (imp.mean() ** 2 + 1e-10)
    std = gate_noise / num_experts
    diff = p - topk_logits[:, -1:].float()
    load = (0.5 * (1.0 + torch.erf(diff / (std * math.sqrt(2.0))))).sum(0)  # Normal(0, std).cdf
    l_load = load.var() / (load.mean() ** 2 + 1e-10)
    return (l_imp + l_load) / 2.0
