"""MoE++ (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation Experts",
arXiv 2410.07348; ICLR 2025).

Reference code: ``SkyworkAI/MoE-plus-plus`` ``MoE++/moe_plus_plus_layer.py`` (``Router``, ``gating``, ``Experts``,
``MOELayer``), read with the project's code-search tool; inference code: it holds the gate and the experts, not
the training losses. The paper's body was not in the search corpus (its abstract was): every point below marked
*not verified* comes from secondary summaries of the paper, not its text.

* Experts (``null_experts``, pinned by this class; the MoE layer reads it): beside the E FFN experts of the suite,
  MoE++'s mix of zero-computation experts -- 2 constant, 1 copy, 1 zero, the reference's last four experts
  (``Experts``: ``num_local_experts - 2 - Constant`` FFNs, ``Constant = 2`` ``ConstantExpert``s, ``CopyExpert``,
  ``ZeroExpert`` last). The router scores E + 4 experts: FFNs ``0..E-1``, constant ``E, E+1``, copy ``E+2``, zero
  ``E+3`` (:mod:`harness.layers.null_experts` runs them). The FFN experts stay the suite's E, so ``moepp`` against
  ``smoe`` compares the same FFN experts (same init from the same seed) with the null experts *added*; the
  reference instead replaces four of its ``num_experts`` by them (same total count). ``model.zero_experts`` etc.
  are for the other routers; with ``moepp`` they are an error.
* Gate (``Router``): fp32 scores from a two-layer gate by default (``moe_2layer_gate=True``: ``Linear(d, 8E)``,
  ``tanh``, ``Linear(8E, E)``, no biases; E here counts every expert, null ones included), ``gate="linear"``
  for ``Linear(d, E, bias=False)``; ``nn.Linear``'s default init (as the reference builds them). fp32 with
  autocast off (``input.float()``, ``.float()`` weights in the reference).
* Gating residual (``Router.forward(input, gate_residual)``): ``logits = W x + gate_map(logits of the previous
  layer)``, ``gate_map = Linear(E, E, bias=False)``, and the layer hands its logits (residual included) to the
  next layer. Here through ``ctx.shared`` (one dict per model forward, seen by every layer in order): key
  ``"moepp.logits"``. The first MoE layer (or a layer whose previous logits have another shape) has none.
  The gradient flows back through the residual into the earlier layers' gates, as in the reference (it does
  not detach). ``gating_residual=False`` turns it off.
* Gates (``gating`` without ``moe_use_mixtral_gating``): p = softmax(logits) over all experts, top-k of p
  (``MOE_TOP_K = 2``; the suite's k here), then a slot that chose the zero expert gets gate 0
  (``torch.where(indices == num_experts - 1, 0, gates)``) and the gates are renormalised to sum 1: a token
  whose top-2 holds the zero expert sends its whole weight to the other expert. ``zero_gate=False`` keeps the
  zero expert's probability as its gate (harmless: its output is 0; only the renormalisation changes).
  All gates zero (a top-1 pick of the zero expert, or k zero experts) -> weights 0, no NaN (the reference
  divides 0 by 0; it never meets this at k = 2 with one zero expert).
* Heterogeneous load-balance loss (the paper's; not in the reference file; *not verified*):
  L_b = α · E · Σ_i η_i f_i P_i, η_i = 1 for an FFN expert and τ for a zero-computation expert, f_i the share
  of the token's top-k choices that go to expert i (``balance_fraction``; default ``"k_slots"``: summed over the
  k choices per token, the summaries' "(1/T) Σ_t 1{token t selects expert i}"), P_i = mean_t p_i; τ = 0.75
  (``null_tau``), α = 0.01 (``balance_weight``). Through ``harness.routing.losses.switch_balance_loss`` (with
  p_i scaled by η_i), so ``model.balance_scope`` applies.
* Not reproduced: the reference multiplies the layer's *input* by top-k (x 2) before every expert unless
  ``moe_use_mixtral_gating`` or ``moe_feature_no_mul_topk`` -- the harness owns the experts and runs every router
  on the same ones; ``moe_use_logits_norm`` (off by default there); ``moe_use_mixtral_gating`` (softmax over the
  top-k logits, no zero gating).
* Causal: a token's decision depends on its own hidden state and its own previous-layer logits only.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harness.routing.losses import router_z_loss, switch_balance_loss
from harness.routing.registry import register_router
from harness.routing.router import RouteContext, Router, Routing, check_choice, check_range, fp32_linear

_NAME = "moepp"
SHARED_KEY = "moepp.logits"  # ctx.shared: the previous MoE++ layer's logits


@register_router(_NAME)
class MoEPPRouter(Router):
    """MoE++: 2-layer fp32 gate with gating residuals over FFN + zero/copy/constant experts; zero-expert gate 0."""

    description = ("MoE++ (Jin et al. 2024): + 2 constant, 1 copy, 1 zero expert beside the E FFNs, 2-layer gate "
                   "with gating residuals, top-k with the zero expert's gate 0 and renormalised, balance 0.01 with "
                   "tau 0.75 on the null experts")
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    # read by harness.layers.build (MoE++ Experts: Constant = 2, CopyExpert, ZeroExpert)
    null_experts: ClassVar[dict[str, int]] = {"constant": 2, "copy": 1, "zero": 1}

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        gate: str = "two_layer",
        gate_hidden_mult: int = 8,
        gating_residual: bool = True,
        zero_gate: bool = True,
        balance_weight: float = 0.01,
        null_tau: float = 0.75,
        balance_fraction: str = "k_slots",
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        check_choice(_NAME, "gate", gate, ("two_layer", "linear"))
        check_range(_NAME, "gate_hidden_mult", gate_hidden_mult, 1, integer=True)
        check_choice(_NAME, "gating_residual", gating_residual, (True, False))
        check_choice(_NAME, "zero_gate", zero_gate, (True, False))
        check_range(_NAME, "balance_weight", balance_weight, 0)
        check_range(_NAME, "null_tau", null_tau, 0)
        check_choice(_NAME, "balance_fraction", balance_fraction, ("k_slots", "slots", "first"))
        check_range(_NAME, "z_loss_weight", z_loss_weight, 0)
        self.gate_kind, self.gating_residual, self.zero_gate = gate, gating_residual, zero_gate
        self.balance_weight, self.null_tau = balance_weight, null_tau
        self.balance_fraction, self.z_loss_weight = balance_fraction, z_loss_weight
        E = num_experts
        if gate == "two_layer":
            self.gate_in = nn.Linear(d_model, gate_hidden_mult * E, bias=False)
            self.gate_out = nn.Linear(gate_hidden_mult * E, E, bias=False)
        else:
            self.gate_in, self.gate_out = nn.Linear(d_model, E, bias=False), None
        self.gate_map = nn.Linear(E, E, bias=False) if gating_residual else None
        # the router's own view of its experts: the last n_null are zero-computation, the zero experts last
        n_null = sum(self.null_experts.values())
        self.num_null = min(n_null, E)
        self.num_zero = min(self.null_experts.get("zero", 0), E)

    def scores(self, x: Tensor, ctx: RouteContext) -> Tensor:
        """[T, E] fp32 logits: the gate, plus gate_map(previous layer's logits) when there are any."""
        h = fp32_linear(x, self.gate_in.weight)
        logits = fp32_linear(torch.tanh(h), self.gate_out.weight) if self.gate_out is not None else h
        prev = ctx.shared.get(SHARED_KEY) if self.gating_residual else None
        if prev is not None and prev.shape == logits.shape:
            logits = logits + fp32_linear(prev, self.gate_map.weight)
        if self.gating_residual:
            ctx.shared[SHARED_KEY] = logits
        return logits

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        logits = self.scores(x, ctx)
        E = self.num_experts
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs = logits.softmax(-1)
            top_p, idx = probs.topk(self.top_k, dim=-1)
            gates = top_p
            if self.zero_gate and self.num_zero:
                gates = torch.where(idx >= E - self.num_zero, torch.zeros_like(top_p), top_p)
            weights = gates / gates.sum(-1, keepdim=True).clamp_min(1e-20)
            aux: dict[str, Tensor] = {}
            if self.balance_weight:
                eta = torch.ones(E, dtype=probs.dtype, device=probs.device)
                if self.num_null:
                    eta[E - self.num_null:] = self.null_tau
                aux["balance"] = self.balance_weight * switch_balance_loss(probs * eta, idx, self.balance_fraction)
            if self.z_loss_weight:
                aux["z_loss"] = self.z_loss_weight * router_z_loss(logits)
        return Routing(indices=idx, weights=weights, logits=logits, aux_losses=aux)

