"""Top-p dynamic routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models",
arXiv 2403.07652).

Reference code: ``ZhenweiAn/Dynamic_MoE`` ``modeling/modeling_moe.py`` (``top_p_sampling_batched_all_sequence``
and ``SwitchMLP.forward``; ``modeling/configuration_moe.py`` for the defaults). That repository is inference
code: it holds the routing rule, not the training losses.

* Gate: P = softmax(x W_r), W_r in R^{d x E}, no bias (``SwitchMLP.router = nn.Linear(hidden, num_experts,
  bias=False)``, ``softmax(route, dim=2)``), computed in fp32 with autocast off (``fp32_linear``).
* Selection (the reference's rule, verbatim in meaning): sort P_t descending, take the cumulative sums c_j;
  ``mask = c > p``; the first index where it holds (``threshold_indices = mask.argmax``) is *kept*, everything
  after it dropped. So a token takes experts in descending probability until their mass *exceeds* p,
  including the expert that crosses p: between 1 and E experts, ``t_p = min{k : sum_{j<=k} P_(j) > p}``.
  Here: keep slot j iff the mass before it, c_{j-1} (c_0 = 0), is <= p -- the same set.
  ``p`` = ``top_p`` (``top_p_threshold``; the reference config's default is 0.4; 0 < p < 1 here: at
  p >= 1 the reference's argmax over an all-false mask would keep one expert).
* Combine weights: the kept probabilities themselves, *not* renormalised (``sorted_probs`` with the dropped
  ones set to 0, multiplied straight into the expert outputs). ``renormalize=True`` divides by their sum.
* Dynamic loss, to keep the number of experts down (the paper's; the reference code has no training code):
  L_d = -(1/T) sum_t sum_i P_ti log P_ti, the mean entropy of the routing distribution -- a peaked
  distribution crosses p with fewer experts. Weight ``dynamic_weight`` β = 1e-4.
* Balance loss: the Switch loss ``α E sum_i f_i P_i`` with f_i the share of the *used* slots that go to
  expert i (``balance_fraction="slots"``; "first": first choices) through ``harness.routing.losses``, so
  ``model.balance_scope`` applies; α = ``balance_weight`` = 0.01.
  The paper text (its loss equations and the values of α and β) could not be read here: the paper was not in
  the search corpus, so the loss form and both weights come from secondary summaries -- UNVERIFIED; the
  selection rule and p = 0.4 were read in the reference code.
* Causal: a token's experts depend on its own probabilities only (no look at other tokens), so the same
  rule holds in the causal LM and in vision.

Variable k (``Router.variable_k``): the S = E slots hold the token's experts by decreasing probability, the
unused ones with weight exactly 0 (``harness.routing.router.Routing``); ``max_experts`` caps a token's
experts (``num_slots``; None = E). ``top_k`` is the compute budget the suite names, not a per-token count:
top-p's expected experts per token is logged as the router stat ``experts_per_token`` (mean over the
batch's tokens) -- the number to set beside a top-k router's k.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from harness.routing.losses import switch_balance_loss
from harness.routing.registry import register_router
from harness.routing.router import RouteContext, Router, Routing, check_choice, check_range, fp32_linear

_NAME = "topp"


def top_p_select(probs: Tensor, top_p: float, max_experts: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(indices, weights, used)`` [T, S]: every token's experts by decreasing probability, kept until their
    mass exceeds ``top_p`` (the crossing expert included); unused slots have weight exactly 0."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_p.detach().cumsum(-1) - sorted_p.detach()  # mass of the experts ranked above
    used = before <= top_p
    used[:, 0] = True  # the strongest expert always (also when p rounds below its mass)
    S = probs.shape[-1] if max_experts is None else max_experts
    order, sorted_p, used = order[:, :S], sorted_p[:, :S], used[:, :S]
    weights = torch.where(used, sorted_p, torch.zeros((), dtype=sorted_p.dtype, device=sorted_p.device))
    return order, weights, used


@register_router(_NAME)
class TopPRouter(Router):
    """Softmax gate; each token takes experts in descending probability until their mass exceeds p."""

    description = ("Top-p dynamic routing (Huang et al. 2024): experts until their softmax mass exceeds p=0.4, "
                   "raw probabilities as weights, entropy (dynamic) loss 1e-4 + balance 0.01, variable k")
    variable_k = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        top_p: float = 0.4,
        dynamic_weight: float = 1e-4,
        balance_weight: float = 0.01,
        balance_fraction: str = "slots",
        renormalize: bool = False,
        max_experts: int | None = None,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        check_range(_NAME, "top_p", top_p, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range(_NAME, "dynamic_weight", dynamic_weight, 0)
        check_range(_NAME, "balance_weight", balance_weight, 0)
        check_choice(_NAME, "balance_fraction", balance_fraction, ("slots", "first"))
        check_choice(_NAME, "renormalize", renormalize, (True, False))
        check_range(_NAME, "max_experts", max_experts, 1, num_experts, integer=True, optional=True)
        self.top_p = top_p
        self.dynamic_weight = dynamic_weight
        self.balance_weight = balance_weight
        self.balance_fraction = balance_fraction
        self.renormalize = renormalize
        self.max_experts = max_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    @property
    def num_slots(self) -> int:
        return self.num_experts if self.max_experts is None else self.max_experts

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        logits = fp32_linear(x, self.gate.weight)
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs = logits.softmax(-1)
            idx, w, used = top_p_select(probs, self.top_p, self.max_experts)
            if self.renormalize:
                w = w / w.sum(-1, keepdim=True).clamp_min(1e-9)
            aux: dict[str, Tensor] = {}
            if self.dynamic_weight:
                ent = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)
                aux["dynamic"] = self.dynamic_weight * (ent.mean() if ent.numel() else probs.sum() * 0.0)
            if self.balance_weight:
                aux["balance"] = self.balance_weight * switch_balance_loss(probs, idx, self.balance_fraction, used)
        n = used.sum(-1).float()
        stats = {"experts_per_token": float(n.mean()) if n.numel() else 0.0}
        return Routing(indices=idx, weights=w, logits=logits, aux_losses=aux, stats=stats)
