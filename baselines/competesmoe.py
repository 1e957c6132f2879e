"""CompeteSMoE: route by the experts' own responses, and teach the router to imitate it.

Two papers, one router (``version=2`` is the default):

* v2 — Nguyen et al. 2025, "CompeteSMoE — Statistically Guaranteed Mixture of
  Experts Training via Competition", arXiv 2505.13380; maintained code
  ``Fsoft-AIC/CompeteSMoE`` (``moe_model/model/moe/competesmoe.py``).
* v1 — Pham et al. 2024, "CompeteSMoE — Effective Training of Sparse Mixture of
  Experts via Competition", arXiv 2402.02526; code ``giangdip2410/CompeteSMoE``
  (``custom_layers_opt.py``).

The equation numbers below are those of our reading of the papers; the search
corpus available when this was written returned only the abstracts, so the
formulas were checked against the public code and a reviewer should re-check the
numbers against the PDFs.

Normal (router) steps — plain SMoE (``smoe``): logits = x W_r, p = softmax(logits),
top-k of p, the k gates renormalised; Switch balance loss 0.01 (Switch eq. 4) and
router z-loss 1e-3 (ST-MoE eq. 5).

Competition steps (training only):

* Affinity (v2 eq. for the neural response): s_{t,i} = mean_d softplus(FFN_i(x_t))_d;
  v1: s_{t,i} = ||FFN_i(x_t)||_2.  Every expert runs on every token once
  (``ctx.all_expert_outputs()``); the layer combines from that same tensor.
* Competition routing: the k experts with the largest affinity.
  v2: weights = s_topk / sum(s_topk) (softplus > 0, so this is a distribution);
  v1: weights = softmax(s_topk).  The weights carry gradient into the experts.
* Router loss (v2): MSE(softmax(logits), softmax(s).detach()), mean over T x E,
  weight 0.01.  v1: the target is the softmax of the top-k affinities with the
  other experts at probability 0 (the v1 code's ``gate_score_optimal``).
* Router loss variant (``router_loss="hybrid"``, the LM-pretraining code's ``hybrid: 1``):
  MSE over all E experts plus ``router_theta`` (0.2) times the MSE restricted to
  the k experts the competition chose (``moe_model/model/moe/competesmoe.py``:
  ``router_loss(gate_softmax, affinity_softmax) + router_loss(gather(...)) * router_theta``).
* Diversity penalty (v2 only): cosine similarities between the k chosen experts'
  outputs, weight 0.01 (``diversity_weight``; default None = 0.01 for v2, 0 for v1,
  which has no such term). Default ``diversity_average="code"``: the v2 code's
  ``experts_diversity_loss`` — the [k, k] similarity matrix with the diagonal zeroed,
  averaged over all k^2 entries (= the mean over the k(k-1) ordered pairs times
  (k-1)/k, i.e. half of it for k = 2). ``"pairs"`` averages over the k(k-1) pairs.
* Balance term on competition steps (v2 code ``bal_comp_loss_coef``), weight 0.01:
  the Switch loss with P_i taken from softmax(s) (the affinity, as in the code)
  and f_i from the competition's first choices (``moe.py`` ``balanceloss``:
  ``one_hot(rearrange(selected_experts, '... k -> k ...'))[0]``; ``balance_fraction="first"``).
* Balance (``balance_loss``): "switch" (default; ``moe.py`` ``balanceloss``, first
  choice) or "entropy": log E - H(mean_t p_t), the sigma-MoE entropy balance that
  the LM-pretraining code (``moe_pretrain_model/layers/moe/competesmoe.py``,
  ``entropy_balance``) applies to the router on normal steps and to softmax(affinity)
  on competition steps. The constant log E only makes it 0 at balance (the code's
  ``entropy_balance`` body lives in its base class, which we did not open).
* Gate init: N(0, 0.02) (``moe.py`` ``init_gate_weights(std=0.02)``; the code also
  fixes that generator's seed to 42, we use the run's seed).

Schedule (v2, "scheduled competition"): no competition during the first
``warmup_fraction`` (5%) of the steps; afterwards each layer competes with
probability ``competition_prob`` (5%) per step, and at most
``max_competing_layers`` (3) layers per forward pass.  The v2 code precomputes
the per-layer schedule and *moves* a draw that would exceed the cap to a nearby
step; we draw online with ``torch.rand`` (the trainer's seeded global RNG) and
simply skip a draw that would exceed the cap, counting through ``ctx.shared``
(one dict per forward pass).  ``competition_prob=1.0`` forces competition (tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.routing.losses import marginal_entropy_loss, switch_balance_loss
from harness.routing.registry import register_router
from harness.routing.router import RouteContext, Router, Routing, check_choice, check_gate_options, check_range, fp32_linear

from .smoe import softmax_topk

_NAME = "competesmoe"
SHARED_COUNTER = "competesmoe_competing"  # key in ctx.shared: layers that competed in this forward pass


def competition_affinity(outputs: Tensor, version: int = 2) -> Tensor:
    """[T, E, d] expert outputs -> [T, E] affinity (v2: mean softplus; v1: L2 norm), fp32."""
    out = outputs.float()
    if version == 2:
        return F.softplus(out).mean(-1)
    return out.norm(p=2, dim=-1)


def mean_pairwise_cosine(chosen: Tensor) -> Tensor:
    """Mean cosine similarity over the k(k-1) ordered pairs of distinct experts: [T, k, d] -> scalar."""
    T, k, _ = chosen.shape
    if k < 2 or T == 0:
        return chosen.float().sum() * 0.0
    z = F.normalize(chosen.float(), p=2, dim=-1)
    sim = z @ z.transpose(1, 2)  # [T, k, k]
    off = ~torch.eye(k, dtype=torch.bool, device=chosen.device)
    return sim[:, off].mean()


def diversity_loss(chosen: Tensor, average: str = "code") -> Tensor:
    """CompeteSMoE v2 diversity penalty of [T, k, d] chosen outputs (0 for T = 0 or k = 1).

    "code": ``experts_diversity_loss`` of ``moe_model/model/moe/competesmoe.py`` —
    diagonal zeroed, mean over all k^2 entries; "pairs": mean over the k(k-1) ordered pairs.
    """
    k = chosen.shape[1]
    pairs = mean_pairwise_cosine(chosen)
    return pairs * (k - 1) / k if average == "code" and k > 1 else pairs


@register_router(_NAME)
class CompeteSMoERouter(Router):
    """SMoE router that, on scheduled competition steps, routes by expert affinity and learns to imitate it."""

    description = "CompeteSMoE (v2 default): SMoE routing; 5% of steps route by expert response, router learns by MSE"
    variants = {
        # moe_pretrain_model/sweeps/slimpajama_moe_no_attmoe_154M_competesmoe.yaml (warm_up 0.0, rate_flip 0.07,
        # router_loss_coef 0.001, hybrid 1, router_theta 0.2, balance_loss_coef 0.01, balance_loss_coef_comp 0.01,
        # balance_affinity 1) as moe_pretrain_model/layers/moe/competesmoe.py uses them: entropy balance on
        # normal steps (balance_loss_coef), diversity and entropy balance of the affinity at
        # balance_loss_coef_comp / 2 = 0.005 on competition steps
        "lm_pretrain": {
            "warmup_fraction": 0.0, "competition_prob": 0.07, "router_loss_weight": 0.001, "router_loss": "hybrid",
            "router_theta": 0.2, "balance_loss": "entropy", "diversity_weight": 0.005,
            "competition_balance_weight": 0.005,
        },
        "v1": {"version": 1},
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        version: int = 2,
        warmup_fraction: float = 0.05,
        competition_prob: float = 0.05,
        max_competing_layers: int | None = 3,
        router_loss_weight: float = 0.01,
        diversity_weight: float | None = None,
        competition_balance_weight: float = 0.01,
        balance_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
        balance_fraction: str = "first",
        renormalize: bool | str = "auto",
        diversity_average: str = "code",
        router_loss: str = "mse",
        router_theta: float = 0.2,
        balance_loss: str = "switch",
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        if version not in (1, 2) or isinstance(version, bool):
            raise ValueError(f"router {_NAME!r}: hyper-parameter version={version!r} must be 1 or 2")
        check_range(_NAME, "warmup_fraction", warmup_fraction, 0, 1)
        check_range(_NAME, "competition_prob", competition_prob, 0, 1)
        check_range(_NAME, "max_competing_layers", max_competing_layers, 1, integer=True, optional=True,
                    note="(null: no cap)")
        if diversity_weight is None:
            diversity_weight = 0.01 if version == 2 else 0.0
        for key, val in (
            ("router_loss_weight", router_loss_weight),
            ("diversity_weight", diversity_weight),
            ("competition_balance_weight", competition_balance_weight),
            ("balance_weight", balance_weight),
            ("z_loss_weight", z_loss_weight),
        ):
            check_range(_NAME, key, val, 0)
        check_gate_options(_NAME, balance_fraction, renormalize)
        check_choice(_NAME, "diversity_average", diversity_average, ("code", "pairs"))
        check_choice(_NAME, "router_loss", router_loss, ("mse", "hybrid"))
        check_range(_NAME, "router_theta", router_theta, 0)
        check_choice(_NAME, "balance_loss", balance_loss, ("switch", "entropy"))
        self.diversity_average = diversity_average
        self.router_loss = router_loss
        self.router_theta = router_theta
        self.balance_loss = balance_loss
        self.version = version
        self.warmup_fraction = warmup_fraction
        self.competition_prob = competition_prob
        self.max_competing_layers = max_competing_layers
        self.router_loss_weight = router_loss_weight
        self.diversity_weight = diversity_weight
        self.competition_balance_weight = competition_balance_weight
        self.balance_weight = balance_weight
        self.z_loss_weight = z_loss_weight
        self.balance_fraction = balance_fraction
        self.renormalize = renormalize
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, mean=0.0, std=0.02)  # moe.py init_gate_weights(std=0.02)
        self._step, self._total_steps = 0, 1  # Router.on_step: the one step channel (step 0 of 1 until told)

    def on_step(self, step: int, total_steps: int) -> None:
        self._step, self._total_steps = step, total_steps

    # -- schedule --------------------------------------------------------------
    def _competes(self, x: Tensor, ctx: RouteContext) -> bool:
        if not ctx.training or self.competition_prob <= 0:
            return False
        if self._step < self.warmup_fraction * self._total_steps:
            return False
        if self.competition_prob < 1.0:
            if not bool(torch.rand((), device=x.device) < self.competition_prob):
                return False
        used = int(ctx.shared.get(SHARED_COUNTER, 0))
        if self.max_competing_layers is not None and used >= self.max_competing_layers:
            return False
        ctx.shared[SHARED_COUNTER] = used + 1
        return True

    # -- routing ---------------------------------------------------------------
    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        logits = fp32_linear(x, self.gate.weight)
        probs = logits.softmax(-1)
        if x.shape[0] and self._competes(x, ctx):
            return self._compete(logits, probs, ctx)

        switch = self.balance_loss == "switch"
        idx, weights, aux = softmax_topk(probs, logits, self.top_k, self.renormalize,
                                         self.balance_weight if switch else 0.0,
                                         self.balance_fraction, self.z_loss_weight)
        if self.balance_weight and not switch:
            aux["balance"] = self.balance_weight * marginal_entropy_loss(probs)
        return Routing(indices=idx, weights=weights, logits=logits, aux_losses=aux, stats={"competed": 0.0})

    def _compete(self, logits: Tensor, probs: Tensor, ctx: RouteContext) -> Routing:
        outputs = ctx.all_expert_outputs()  # [T, E, d], experts in the model's precision (autocast on)
        k = self.top_k
        with torch.autocast(device_type=logits.device.type, enabled=False):
            aff = competition_affinity(outputs, self.version)  # [T, E]
            top_a, idx = aff.topk(k, dim=-1)
            if self.version == 2:
                weights = top_a / top_a.sum(-1, keepdim=True).clamp_min(1e-9)
                target = aff.softmax(-1)
            else:
                weights = top_a.softmax(-1)
                target = torch.zeros_like(aff).scatter(1, idx, weights)
            aux: dict[str, Tensor] = {}
            if self.router_loss_weight:
                mse = F.mse_loss(probs, target.detach())
                if self.router_loss == "hybrid":
                    mse = mse + self.router_theta * F.mse_loss(probs.gather(1, idx), target.detach().gather(1, idx))
                aux["router_mse"] = self.router_loss_weight * mse
            if self.diversity_weight and k > 1:
                chosen = outputs.gather(1, idx.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))
                aux["diversity"] = self.diversity_weight * diversity_loss(chosen, self.diversity_average)
            if self.competition_balance_weight:
                aff_p = aff.softmax(-1)
                bal = (switch_balance_loss(aff_p, idx, self.balance_fraction) if self.balance_loss == "switch"
                       else marginal_entropy_loss(aff_p))
                aux["balance"] = self.competition_balance_weight * bal
            router_idx = probs.detach().topk(k, dim=-1).indices
            same = (router_idx.sort(-1).values == idx.sort(-1).values).all(-1)
            agreement = float(same.float().mean()) if same.numel() else 1.0
        return Routing(
            indices=idx,
            weights=weights,
            logits=logits,
            aux_losses=aux,
            stats={"competed": 1.0, "competition_agreement": agreement},
        )
