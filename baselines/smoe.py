"""SMoE: softmax top-k routing (Shazeer et al. 2017; GShard; Switch Transformer; ST-MoE).

Equations (numbers from the cited papers):

* Gate (Switch eq. 1 / Shazeer eq. 3):  p(x) = softmax(x W_r),  W_r in R^{d x E}.
* Noisy top-k (Shazeer et al. 2017, eq. 4), optional (``noisy=True``):
  H(x)_i = (x W_r)_i + N(0,1) * softplus((x W_noise)_i), during training only.
* Top-k and combine: y = sum_{i in TopK} g_i E_i(x). With k > 1 the k gates are
  renormalised to sum to 1 (GShard, Mixtral); with k = 1 the raw probability is
  the gate (Switch eq. 2), otherwise the router would receive no gradient from
  the task loss. ``renormalize="auto"`` (default) does exactly that; True/False force it.
* Balance loss (Switch eq. 4): alpha * E * sum_i f_i P_i, alpha = 0.01, with
  P_i = mean_t p_i(x_t). For k > 1, f_i is either the share of all T*k slots
  routed to expert i (``balance_fraction="slots"``, default, as in DeepSpeed and
  Mixtral) or the share of first choices (``"first"``, GShard).
* Router z-loss (ST-MoE eq. 5): 1e-3 * mean_t (logsumexp_i (x W_r)_ti)^2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.losses import router_z_loss, switch_balance_loss
from harness.registry import register_router
from harness.router import RouteContext, Router, Routing, check_gate_options, check_range


def gate_weights(probs_topk: Tensor, renormalize: bool | str, top_k: int) -> Tensor:
    """The k combine weights from the k selected probabilities."""
    renorm = (top_k > 1) if renormalize == "auto" else bool(renormalize)
    if renorm:
        return probs_topk / probs_topk.sum(-1, keepdim=True).clamp_min(1e-9)
    return probs_topk


def softmax_topk(
    probs: Tensor, logits: Tensor, top_k: int, renormalize: bool | str, balance_weight: float,
    balance_fraction: str, z_loss_weight: float,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Top-k of ``probs``, the combine weights, and the weighted Switch balance and z losses.

    The shared tail of every softmax-top-k router (smoe, xmoe, moge, competesmoe's
    normal steps); a zero weight leaves that loss out.
    """
    top_p, idx = probs.topk(top_k, dim=-1)
    weights = gate_weights(top_p, renormalize, top_k)
    aux: dict[str, Tensor] = {}
    if balance_weight:
        aux["balance"] = balance_weight * switch_balance_loss(probs, idx, balance_fraction)
    if z_loss_weight:
        aux["z_loss"] = z_loss_weight * router_z_loss(logits)
    return idx, weights, aux


@register_router("smoe")
class SMoERouter(Router):
    """Softmax top-k router with Switch balance loss and ST-MoE z-loss."""

    description = "Softmax top-k (Switch/GShard), balance loss 0.01 + z-loss 1e-3, optional noisy top-k"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        balance_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
        balance_fraction: str = "slots",
        noisy: bool = False,
        renormalize: bool | str = "auto",
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        check_range("smoe", "balance_weight", balance_weight, 0)
        check_range("smoe", "z_loss_weight", z_loss_weight, 0)
        check_gate_options("smoe", balance_fraction, renormalize)
        self.balance_weight = balance_weight
        self.z_loss_weight = z_loss_weight
        self.balance_fraction = balance_fraction
        self.renormalize = renormalize
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.noise = nn.Linear(d_model, num_experts, bias=False) if noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)  # Shazeer et al.: start with little noise

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        logits = self.gate(x).float()  # routing in fp32 even under bf16 autocast (ST-MoE Sec. 3.2)
        scores = logits
        if self.noise is not None and ctx.training:
            scores = logits + torch.randn_like(logits) * F.softplus(self.noise(x).float())
        probs = scores.softmax(-1)
        idx, weights, aux = softmax_topk(probs, logits, self.top_k, self.renormalize, self.balance_weight,
                                         self.balance_fraction, self.z_loss_weight)
        return Routing(indices=idx, weights=weights, logits=logits, aux_losses=aux)
