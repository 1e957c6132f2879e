"""Auxiliary routing losses shared by several routers (unweighted; routers apply their weights)."""
from __future__ import annotations

import torch
from torch import Tensor


def expert_fractions(indices: Tensor, num_experts: int, mode: str = "slots") -> Tensor:
    """f_i: share of routing slots that go to expert i (sums to 1).

    mode="slots": over all T*k slots (DeepSpeed / Mixtral style);
    mode="first": over each token's first choice only (GShard eq. in Sec. 2.2).
    """
    if mode == "first":
        chosen = indices[:, 0]
    elif mode == "slots":
        chosen = indices.reshape(-1)
    else:
        raise ValueError(f"balance fraction mode must be 'slots' or 'first', got {mode!r}")
    counts = torch.bincount(chosen, minlength=num_experts).to(torch.float32)
    return counts / chosen.numel()


def switch_balance_loss(probs: Tensor, indices: Tensor, mode: str = "slots") -> Tensor:
    """Switch Transformer eq. (4): ``E * sum_i f_i * P_i`` with P_i = mean_t p_i(x_t).

    Equals 1 when routing is perfectly uniform; the caller multiplies by alpha.
    f_i is a count (no gradient); the gradient flows through P_i.
    """
    num_experts = probs.shape[-1]
    f = expert_fractions(indices, num_experts, mode)
    p = probs.float().mean(0)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE eq. (5): ``mean_t (logsumexp_i logits_ti)^2``; keeps router logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
