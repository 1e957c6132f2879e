"""SMoE: softmax top-k routing (Shazeer et al. 2017; GShard; Switch Transformer; ST-MoE).

Equations (numbers from the cited papers):

* Gate (Switch eq. 1 / Shazeer eq. 3):  p(x) = softmax(x W_r),  W_r in R^{d x E}, no bias.
  Computed in fp32 from fp32 weights with autocast off, as DeepSpeed's
  ``deepspeed/moe/sharded_moe.py`` ``TopKGate.forward`` does (``input.float()``,
  ``wg.weight.float()``) and ST-MoE Sec. 3.2 recommends ("selective precision").
* Noisy top-k (Shazeer et al. 2017, eq. 4), optional (``noisy=True``):
  H(x)_i = (x W_r)_i + N(0,1) * softplus((x W_noise)_i), during training only.
* Second expert (k >= 2), ``second_expert``:
  "topk" (default): the k largest probabilities;
  "gumbel": the first expert is the argmax, the others are the top-(k-1) of
  ``logits + Gumbel(0, 1)`` among the remaining experts — GShard's sampled second
  expert, fairseq/torchscale ``top2gating(second_expert_policy='sampling')``
  (``logits_w_noise = logits + gumbel_rsample(...)``) and DeepSpeed
  ``top2gating(top2_2nd_expert_sampling=True)``. Training only here (the code also
  samples in evaluation; we keep evaluation deterministic). The combine weights
  are the noise-free probabilities of the chosen experts, renormalised.
* Top-k and combine: y = sum_{i in TopK} g_i E_i(x). With k > 1 the k gates are
  renormalised to sum to 1 (GShard, Mixtral; torchscale ``gates1_s /= denom_s``);
  with k = 1 the raw probability is the gate (Switch eq. 2), otherwise the router
  would receive no gradient from the task loss. ``renormalize="auto"`` (default)
  does exactly that; True/False force it.
* Balance loss (Switch eq. 4): alpha * E * sum_i f_i P_i, alpha = 0.01, with
  P_i = mean_t p_i(x_t). For k > 1 the f_i convention is ``balance_fraction``
  (see ``harness.routing.losses``): "first" (default) — the share of first choices, as in
  fairseq/torchscale ``top2gating`` (``ce = torch.mean(mask1)``) and DeepSpeed
  ``top2gating``; "slots" — the share of the T*k slots (Megatron-Core, DeepSpeed
  ``topkgating`` for k > 2); "k_slots" — k times that (Hugging Face Mixtral). The
  three agree for k = 1.
* Router z-loss (ST-MoE eq. 5): 1e-3 * mean_t (logsumexp_i (x W_r)_ti)^2.
* An empty batch (T = 0) gives zero aux losses (``harness.routing.losses``).

The softmax, top-k, combine weights and both losses run as one fused C++ call each way where they can
(fp32 CPU; ``harness.routing.router_tail``: the same equations, ties resolved as ``torch.topk`` does,
values within a few ulp); the ATen composite (``composite_softmax_topk``) everywhere else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.routing.losses import router_z_loss, switch_balance_loss
from harness.routing.registry import register_router
from harness.routing.router_tail import router_tail
from harness.routing.router import RouteContext, Router, Routing, check_choice, check_gate_options, check_range, fp32_linear


def renormalizes(renormalize: bool | str, top_k: int) -> bool:
    """Whether the k gates are renormalised to sum to 1 ("auto": when k > 1)."""
    return (top_k > 1) if renormalize == "auto" else bool(renormalize)


def gate_weights(probs_topk: Tensor, renormalize: bool | str, top_k: int) -> Tensor:
    """The k combine weights from the k selected probabilities."""
    if renormalizes(renormalize, top_k):
        return probs_topk / probs_topk.sum(-1, keepdim=True).clamp_min(1e-9)
    return probs_topk


_GATE_WEIGHTS = gate_weights  # the fused tail computes these weights; a replaced gate_weights runs the composite


def gumbel_topk(logits: Tensor, top_k: int) -> Tensor:
    """[T, k] experts: the argmax of ``logits``, then the top-(k-1) of logits + Gumbel noise among the rest."""
    first = logits.argmax(-1, keepdim=True)
    if top_k == 1:
        return first
    u = torch.rand_like(logits).clamp(1e-20, 1.0 - 1e-7)
    noisy = logits - torch.log(-torch.log(u))  # + Gumbel(0, 1)
    noisy = noisy.scatter(1, first, float("-inf"))
    rest = noisy.topk(top_k - 1, dim=-1).indices
    return torch.cat([first, rest], dim=1)


def softmax_topk(
    probs: Tensor, logits: Tensor, top_k: int, renormalize: bool | str, balance_weight: float,
    balance_fraction: str, z_loss_weight: float, indices: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Top-k of ``probs`` (or the given ``indices``), the combine weights, and the weighted balance and z losses.

    The shared tail of every softmax-top-k router (smoe, xmoe, moge, competesmoe's
    normal steps); a zero weight leaves that loss out. Where it applies (fp32 CPU, T > 0,
    the top-k experts, micro-batch balance scope: :mod:`harness.routing.router_tail`) one
    fused C++ call each way computes the same equations, the same experts and values within
    a few ulp (~0.3 ms less per layer fwd+bwd at T = 1,024, E = 8); elsewhere
    :func:`composite_softmax_topk` runs.
    """
    fused = _fused_tail(probs, logits, False, top_k, renormalize, balance_weight, balance_fraction,
                        z_loss_weight, indices)
    if fused is not None:
        return fused
    return composite_softmax_topk(probs, logits, top_k, renormalize, balance_weight, balance_fraction,
                                  z_loss_weight, indices)


def softmax_gate(
    scores: Tensor, logits: Tensor, top_k: int, renormalize: bool | str, balance_weight: float,
    balance_fraction: str, z_loss_weight: float, indices: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """:func:`softmax_topk` of ``probs = scores.softmax(-1)``, the softmax inside the fused call where it applies.

    The z-loss is of ``logits`` (``scores`` may be ``logits`` plus noise). Fused, smoe's softmax + tail
    costs ~0.2 ms instead of ~0.75 ms fwd+bwd at T = 1,024, E = 8, k = 2, one thread (ATen's softmax over
    a last dimension of 8 is a slow path): :mod:`harness.routing.router_tail`.
    """
    fused = _fused_tail(scores, logits, True, top_k, renormalize, balance_weight, balance_fraction,
                        z_loss_weight, indices)
    if fused is not None:
        return fused
    return composite_softmax_topk(scores.softmax(-1), logits, top_k, renormalize, balance_weight,
                                  balance_fraction, z_loss_weight, indices)


def _fused_tail(
    x: Tensor, logits: Tensor, softmax_inside: bool, top_k: int, renormalize: bool | str, balance_weight: float,
    balance_fraction: str, z_loss_weight: float, indices: Tensor | None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]] | None:
    """The fused tail's answer, or None where the composite must run: given ``indices`` (gumbel second
    expert), a replaced :func:`gate_weights`, or wherever :func:`~harness.routing.router_tail.router_tail`
    declines (not fp32 CPU, global balance scope, no extension, a non-finite score)."""
    if indices is not None or gate_weights is not _GATE_WEIGHTS:
        return None
    return router_tail(x, logits, softmax_inside=softmax_inside, top_k=top_k,
                       renorm=renormalizes(renormalize, top_k), balance_weight=balance_weight,
                       balance_fraction=balance_fraction, z_loss_weight=z_loss_weight)


def composite_softmax_topk(
    probs: Tensor, logits: Tensor, top_k: int, renormalize: bool | str, balance_weight: float,
    balance_fraction: str, z_loss_weight: float, indices: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """:func:`softmax_topk` as ATen ops: ``topk`` (or ``gather``), :func:`gate_weights`,
    :func:`~harness.routing.losses.switch_balance_loss`, :func:`~harness.routing.losses.router_z_loss`."""
    if indices is None:
        top_p, idx = probs.topk(top_k, dim=-1)
    else:
        idx, top_p = indices, probs.gather(1, indices)
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

    description = "Softmax top-k (Switch/GShard), balance loss 0.01 (first-choice f_i) + z-loss 1e-3, fp32 gate"
    variants = {
        "gshard": {"second_expert": "gumbel"},       # fairseq/torchscale/DeepSpeed top2gating default
        "megatron": {"balance_fraction": "slots"},   # Megatron-Core switch_load_balancing_loss_func
        "mixtral": {"balance_fraction": "k_slots"},  # HF MixtralSparseMoeBlock load_balancing_loss_func
        # SMoE itself under another name: the A/A control of docs/benchmark.md. Its router draws its initial
        # weights from its own stream (keyed by the name: harness.layers.streams), everything else is smoe's,
        # so smoe vs smoe@aa measures how often the procedure calls a non-difference significant.
        "aa": {},
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        balance_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
        balance_fraction: str = "first",
        noisy: bool = False,
        renormalize: bool | str = "auto",
        second_expert: str = "topk",
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        check_range("smoe", "balance_weight", balance_weight, 0)
        check_range("smoe", "z_loss_weight", z_loss_weight, 0)
        check_gate_options("smoe", balance_fraction, renormalize)
        check_choice("smoe", "second_expert", second_expert, ("topk", "gumbel"))
        self.balance_weight = balance_weight
        self.z_loss_weight = z_loss_weight
        self.balance_fraction = balance_fraction
        self.renormalize = renormalize
        self.second_expert = second_expert
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.noise = nn.Linear(d_model, num_experts, bias=False) if noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)  # Shazeer et al.: start with little noise

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        logits = fp32_linear(x, self.gate.weight)  # fp32 even under bf16 autocast (DeepSpeed TopKGate)
        scores = logits
        if self.noise is not None and ctx.training:
            scores = logits + torch.randn_like(logits) * F.softplus(fp32_linear(x, self.noise.weight))
        idx = None
        if self.second_expert == "gumbel" and ctx.training and self.top_k > 1:
            idx = gumbel_topk(scores.detach(), self.top_k)
        # probs = softmax(scores), top-k, weights, losses (fused where it applies: harness.routing.router_tail)
        idx, weights, aux = softmax_gate(scores, logits, self.top_k, self.renormalize, self.balance_weight,
                                         self.balance_fraction, self.z_loss_weight, indices=idx)
        return Routing(indices=idx, weights=weights, logits=logits, aux_losses=aux)
