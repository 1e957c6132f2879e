"""Sigmoid-gated SMoE: top-k of per-expert sigmoid scores (torchtitan ``score_func="sigmoid"``; DeepSeek-V3 without its bias).

Equations:

* Scores: s_{i,t} = sigmoid((x_t W_r)_i), W_r in R^{d x E}, no bias, in fp32 with
  autocast off (``harness.routing.router.fp32_linear``; torchtitan ``torchtitan/models/moe.py``
  ``TokenChoiceTopKRouter.forward``: ``torch.sigmoid(scores.to(torch.float32))``). Unlike
  softmax, each expert's score is independent of the others (DeepSeek-V3 eq. 15).
* Top-k of s; combine weights: the selected scores, ``normalize=False`` (default:
  torchtitan ``MoEArgs.route_norm = False``) or divided by their sum
  (``normalize=True``, DeepSeek-V3 eq. 13; ``sigmoid_smoe@normalized``), times
  ``route_scale`` (torchtitan default 1.0). This is ``auxfree`` with its bias fixed at 0.
* Balance loss: as ``smoe`` (Switch eq. 4, alpha = 0.01, f_i convention
  ``balance_fraction``, default first choice), with P_i the mean of the *normalised*
  scores s_{i,t} / sum_j s_{j,t}: sigmoid scores do not sum to 1, and Megatron-Core
  normalises them the same way before its aux loss (``moe_router_score_function="sigmoid"``:
  ``scores / (scores.sum(-1) + 1e-20)``, ``megatron/core/transformer/moe/router.py``;
  DeepSeek-V3 eq. 19 s'_{i,t}). Not verified line by line in this session.
* z-loss: off by default (``z_loss_weight=0``): ST-MoE eq. 5 penalises the softmax
  normaliser logsumexp, which a sigmoid gate does not have; torchtitan has none.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from harness.routing.losses import BALANCE_FRACTIONS, router_z_loss, switch_balance_loss
from harness.routing.registry import register_router
from harness.routing.router import RouteContext, Router, Routing, check_choice, check_range, fp32_linear

_NAME = "sigmoid_smoe"


@register_router(_NAME)
class SigmoidSMoERouter(Router):
    """Top-k of per-expert sigmoid scores; Switch balance loss on the normalised scores."""

    description = "Sigmoid top-k (torchtitan score_func=sigmoid), unnormalised weights, balance 0.01 (first-choice f_i), fp32"
    variants = {"normalized": {"normalize": True}}  # DeepSeek-V3 eq. 13 / torchtitan route_norm=True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        normalize: bool = False,
        route_scale: float = 1.0,
        balance_weight: float = 0.01,
        balance_fraction: str = "first",
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        check_choice(_NAME, "normalize", normalize, (True, False))
        check_range(_NAME, "route_scale", route_scale, 0)
        check_range(_NAME, "balance_weight", balance_weight, 0)
        check_choice(_NAME, "balance_fraction", balance_fraction, BALANCE_FRACTIONS)
        check_range(_NAME, "z_loss_weight", z_loss_weight, 0)
        self.normalize = normalize
        self.route_scale = route_scale
        self.balance_weight = balance_weight
        self.balance_fraction = balance_fraction
        self.z_loss_weight = z_loss_weight
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        logits = fp32_linear(x, self.gate.weight)
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = torch.sigmoid(logits)
            top, idx = scores.topk(self.top_k, dim=-1)
            w = top / (top.sum(-1, keepdim=True) + 1e-20) if self.normalize else top
            w = w * self.route_scale
            aux: dict[str, Tensor] = {}
            if self.balance_weight:
                p = scores / (scores.sum(-1, keepdim=True) + 1e-20)
                aux["balance"] = self.balance_weight * switch_balance_loss(p, idx, self.balance_fraction)
            if self.z_loss_weight:
                aux["z_loss"] = self.z_loss_weight * router_z_loss(logits)
        return Routing(indices=idx, weights=w, logits=logits, aux_losses=aux)
