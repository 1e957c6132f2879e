"""ReMoE: ReLU routing with an adaptively weighted L1 penalty (Wang, Chen & Zhu, "ReMoE: Fully Differentiable
Mixture-of-Experts with ReLU Routing", arXiv 2412.14711).

What could be checked, and against what:

* The official code (``thu-ml/ReMoE``, a Megatron-LM fork) is not in the code index under that name, and the
  paper text could not be read here (not in the search corpus). Read with the code-search tool instead:
  a Megatron-LM fork's ``megatron/core/transformer/moe/router.py`` ``ReLURouter`` (the tool did not name the
  repository): ``probs = relu(logits)``, ``routing_map = probs > 0``, and in training forwards
  (``self.training and torch.is_grad_enabled()``) ``l1_reg_load_balancing``: the L1 penalty through
  Megatron's ``switch_load_balancing_loss_func(probs, tokens_per_expert=routing_map.sum(0), total_num_tokens=T,
  topk=k, num_experts=E, moe_aux_loss_coeff=lambda)`` = lambda * E / (k T^2) * sum_e (sum_t R_te) n_e -- the
  load-balanced L1 below, term for term -- and the sparsity ``1 - routing_map.sum() / routing_map.numel()``
  added into ``config.moe_relu_sparsity`` for the coefficient update; the coefficient is one value,
  ``config.moe_relu_l1_reg_coeff``. The update itself lives in that fork's training loop, which is not in
  the corpus. Its constants were read in a ReMoE evaluation script of the fork (``--moe-relu-routing
  --moe-relu-l1-reg-coeff-init 1e-8 --moe-relu-l1-reg-coeff-multiplier 1.2
  --moe-router-load-balancing-type none``; 182M model, 8 experts). The update rule is our reading of the
  paper through secondary summaries and a sigma-MoE port of ReMoE (whose comment calls it "Eq. 7"):
  UNVERIFIED against the paper text, as are the equation numbers below.
* LibMoE's port (``moe_model/model/moe/remoe.py``) is not followed: it takes the top-k of the ReLU scores
  (a fixed k) and leaves the coefficient update commented out.

The router (equation numbers as we read them; a reviewer should re-check them in the paper):

* Gate: R(x) = ReLU(x W_r), W_r in R^{d x E}, no bias, in fp32 (``fp32_linear``). Expert e is active for a
  token iff R_e(x) > 0, and its output is weighted by R_e(x) itself (no softmax, no renormalisation):
  y = sum_e R_e(x) E_e(x). Fully differentiable: a token may have 0..E experts.
* Sparsity regulariser (L1, load-balanced): L_reg = sum_e f_e * (1/T) sum_t R_te with
  f_e = E / (k T) sum_t 1(R_te > 0) (no gradient through f_e), so a busy expert's scores are pushed down
  harder; ``balanced=False`` gives the plain L1 (1/T) sum_t sum_e R_te. The loss is lambda_i * L_reg.
* Adaptive coefficient (the paper's update; "Eq. 7" in the port): after each training forward,
  lambda_{i+1} = lambda_i * alpha^{sign((1 - k/E) - S_i)} with S_i the step's sparsity (the share of zero
  router outputs over the batch's tokens and experts, all-reduced over data-parallel ranks), target
  sparsity 1 - k/E (k = the suite's ``top_k``: the compute budget), lambda_0 = ``l1_coeff_init`` = 1e-8,
  alpha = ``l1_coeff_multiplier`` = 1.2. Sparsity below target (too many experts) multiplies lambda by
  alpha, above it divides. lambda is a persistent buffer (a checkpoint resumes it). Difference:
  the fork keeps ONE lambda for the model and sums the layers' sparsities for its update (how its training
  loop averages them was not seen); here each layer keeps its own lambda and updates it from its own
  sparsity -- the router contract gives a router no view of the other layers' state between steps.
  lambda never falls below the smallest normal float64 (~2.2e-308; our guard, not in the paper: below it the
  division would reach exactly 0, from which multiplying by alpha never recovers).
* No other balance loss (``--moe-router-load-balancing-type none`` in the script above).
* Causal: a token's experts depend on its own scores only; the batch enters through lambda's update (a
  training-time coefficient, as the paper's) and through f_e of the loss, not through the routing decision.

Variable k (``Router.variable_k``): S = E slots, the active experts by decreasing R, the rest weight exactly 0.
Router stats: ``experts_per_token`` (mean active experts), ``sparsity`` and ``l1_coeff`` (lambda).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.routing.registry import register_router
from harness.routing.router import (RouteContext, Router, Routing, check_choice, check_range, fp32_linear,
                                    slots_from_dense)

_NAME = "remoe"


def remoe_l1(relu: Tensor, top_k: int, balanced: bool = True) -> Tensor:
    """L_reg of ReLU router outputs [T, E]: load-balanced L1 (f_e = E/(kT) * #active tokens) or plain L1."""
    T, E = relu.shape
    if T == 0:
        return relu.sum() * 0.0
    if not balanced:
        return relu.sum(1).mean()
    f = (relu.detach() > 0).float().sum(0) * E / (top_k * T)
    return (f * relu.mean(0)).sum()


def next_l1_coeff(coeff: float, sparsity: float, target: float, multiplier: float) -> float:
    """lambda_{i+1} = lambda_i * alpha^{sign(target - S_i)} (unchanged when S_i equals the target)."""
    if sparsity < target:
        return coeff * multiplier
    if sparsity > target:
        # floored at the smallest normal float64: a run that stays sparser than the target for thousands of steps
        # would otherwise divide lambda down to exactly 0, from which the x alpha update never recovers
        return max(coeff / multiplier, sys.float_info.min)
    return coeff


@register_router(_NAME)
class ReMoERouter(Router):
    """ReLU gate: every expert with a positive score, weighted by it; adaptive L1 steers the sparsity to 1-k/E."""

    description = ("ReMoE (Wang et al. 2024): ReLU gate, variable k, load-balanced L1 with lambda x1.2 / /1.2 "
                   "per step toward sparsity 1-k/E (lambda_0 1e-8), fp32 gate")
    variable_k = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        l1_coeff_init: float = 1e-8,
        l1_coeff_multiplier: float = 1.2,
        balanced: bool = True,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        check_range(_NAME, "l1_coeff_init", l1_coeff_init, 0.0, lo_open=True)
        check_range(_NAME, "l1_coeff_multiplier", l1_coeff_multiplier, 1.0)
        check_choice(_NAME, "balanced", balanced, (True, False))
        self.l1_coeff_multiplier = l1_coeff_multiplier
        self.balanced = balanced
        self.target_sparsity = 1.0 - top_k / num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.register_buffer("l1_coeff", torch.tensor(float(l1_coeff_init), dtype=torch.float64))

    def _update_coeff(self, relu: Tensor) -> float:
        """The step's sparsity (all-reduced over ranks) and lambda's update; returns the sparsity."""
        with torch.no_grad():
            zero = torch.tensor([float((relu == 0).sum()), float(relu.numel())], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                zero = zero.to(relu.device)
                torch.distributed.all_reduce(zero)
            if float(zero[1]) == 0:
                return 0.0
            s = float(zero[0] / zero[1])
            self.l1_coeff.fill_(next_l1_coeff(float(self.l1_coeff), s, self.target_sparsity,
                                              self.l1_coeff_multiplier))
            return s

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        logits = fp32_linear(x, self.gate.weight)
        with torch.autocast(device_type=x.device.type, enabled=False):
            relu = F.relu(logits)
            active = relu > 0
            idx, w = slots_from_dense(relu, active)
            coeff = float(self.l1_coeff)
            aux = {"l1": coeff * remoe_l1(relu, self.top_k, self.balanced)}
        if ctx.training and torch.is_grad_enabled():
            sparsity = self._update_coeff(relu)  # lambda_i weighed this step's loss; lambda_{i+1} the next
        else:
            sparsity = float((~active).float().mean()) if active.numel() else 0.0
        n = active.sum(-1).float()
        stats = {"experts_per_token": float(n.mean()) if n.numel() else 0.0, "sparsity": sparsity,
                 "l1_coeff": coeff}
        return Routing(indices=idx, weights=w, logits=logits, aux_losses=aux, stats=stats)
