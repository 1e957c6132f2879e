"""X-MoE: routing on a low-dimensional hypersphere (Chi et al. 2022, arXiv 2204.09179).

Equations (numbering of arXiv v3 as we read it; the search corpus available when
this was written returned only the abstract, so a reviewer should re-check the
numbers against the PDF — the formulas themselves are the paper's):

* SMoE background (eq. 1-3): y = h + sum_{k in TopK} g(s_k) FFN_k(h), with
  s_k = h . e_k and g = softmax over the experts.
* Dimension reduction (Sec. 3, "routing algorithm"): the token is first projected
  to a routing space of dimension d_e << d: h' = W_p h, W_p in R^{d_e x d}.
* L2 normalisation: s_k = cos(W_p h, e_k) = (W_p h) . e_k / (||W_p h|| ||e_k||),
  expert embeddings e_k in R^{d_e} — tokens and experts live on the unit sphere.
* Gating with a learnable temperature: g(s_k) = exp(s_k / tau) / sum_j exp(s_j / tau).
  Since |cos| <= 1, every score s_k / tau is bounded by 1 / tau.
* Load balance: the Switch loss (Switch eq. 4), alpha = 0.01, exactly as ``smoe``.

Defaults follow the code the torchscale maintainers point to for the learnable
temperature (torchscale issue #63: torchscale defines ``TEMPERATURE_FOR_L_UAX = 0.07``
but never uses it), ``xy980523/MoEc_model`` ``unilm/modules/tmoe/top1gate.py``:

* Both the projected token and the expert embedding are L2-normalised (``_cosine``
  normalises ``mat1`` and ``mat2``, eps 1e-4): ``normalize_tokens=True``. torchscale
  ``torchscale/component/xmoe/routing.py`` comments the token normalisation out
  (``normalize_tokens=False``).
* Temperature: a learnable raw parameter ``gating_t`` initialised at 0.07; when it
  falls below 1e-4 the constant 1e-4 is used instead (``_get_gating_temperature``):
  ``temperature=0.07, learnable_temperature=True, temperature_param="raw"``.
  ``temperature_param="log"`` parameterises tau = exp(log_tau) instead (always
  positive, the earlier reading); ``learnable_temperature=False`` fixes it.
* Balance-loss softmax: a *fixed* 0.07 (``TEMPERATURE_FOR_L_UAX``:
  ``gates = F.softmax(gates / temperature)`` with the constant, not the learnable
  tau): P_i = mean_t softmax(cos / 0.07) (``balance_temperature=0.07``; None uses the
  routing temperature). MoEc_model sums P over tokens (``me = torch.sum(gates, 0)``)
  where torchscale and Switch average; we average (the weight 0.01 is Switch's for
  the mean) — see docs/routers.md. f_i: first choice (``balance_fraction="first"``;
  MoEc_model is top-1, torchscale ``top2gating`` uses ``mask1``).
* Expert embeddings: orthogonal init with gain 0.1 (MoEc_model
  ``torch.nn.init.orthogonal_(self.wg.weight, gain=0.1)``; torchscale: 0.32,
  ``embedding_init_gain``). torchscale also rescales them in place to norm 1.5 on
  every forward (``self.wg.mul_(1.5 / wg_norm)`` under no_grad), which matters under
  weight decay: ``rescale_embeddings=1.5`` (default None: off, as MoEc_model).
* Routing dimension d_e = 16 (torchscale ``wg_reduction = Linear(model_dim, 16)``;
  MoEc_model reads ``cfg.tmoe_routing_dim``); a widely used reimplementation
  (CompeteSMoE v1's / MoGE's ``custom_gates.py``) uses 8 with a fixed tau = 0.3 in
  the balance loss — ``routing_dim`` and ``temperature`` cover it.
* ``xmoe@torchscale`` reproduces torchscale's scores: no token normalisation, no
  temperature, gain 0.32, rescale to 1.5, balance softmax without temperature.

MoEc_model gates its top-1 expert with sigmoid(cos / tau); torchscale with the
softmax probability. We keep the softmax (works for any k).

Combine weights: softmax probabilities of the k chosen experts, renormalised for
k > 1 (``renormalize="auto"``, same as ``smoe``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.routing.losses import switch_balance_loss
from harness.routing.registry import register_router
from harness.routing.router import RouteContext, Router, Routing, check_choice, check_gate_options, check_range

from .smoe import softmax_topk

_NAME = "xmoe"


@register_router(_NAME)
class XMoERouter(Router):
    """Cosine routing in a low-dimensional space with a (learnable) temperature."""

    description = ("X-MoE (MoEc_model code): project to d_e=16, cosine(token, expert)/tau, learnable tau 0.07 "
                   "(clamp 1e-4), Switch balance 0.01 at fixed tau 0.07")
    variants = {
        "torchscale": {  # torchscale/component/xmoe/routing.py
            "normalize_tokens": False, "temperature": 1.0, "learnable_temperature": False,
            "balance_temperature": None, "embedding_init_gain": 0.32, "rescale_embeddings": 1.5,
        },
        "paper": {  # this harness's earlier reading of the paper (tau = exp(log_tau) also in the balance softmax)
            "temperature_param": "log", "balance_temperature": None, "embedding_init_gain": 0.32,
            "balance_fraction": "slots",
        },
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        routing_dim: int = 16,
        temperature: float = 0.07,
        learnable_temperature: bool = True,
        temperature_param: str = "raw",
        balance_temperature: float | None = 0.07,
        normalize_tokens: bool = True,
        embedding_init_gain: float = 0.1,
        rescale_embeddings: float | None = None,
        balance_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        balance_fraction: str = "first",
        renormalize: bool | str = "auto",
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        check_range(_NAME, "routing_dim", routing_dim, 1, integer=True)
        check_range(_NAME, "temperature", temperature, 0, lo_open=True)
        check_range(_NAME, "balance_temperature", balance_temperature, 0, lo_open=True, optional=True)
        check_choice(_NAME, "learnable_temperature", learnable_temperature, (True, False))
        check_choice(_NAME, "normalize_tokens", normalize_tokens, (True, False))
        check_choice(_NAME, "temperature_param", temperature_param, ("raw", "log"))
        check_range(_NAME, "embedding_init_gain", embedding_init_gain, 0)
        check_range(_NAME, "rescale_embeddings", rescale_embeddings, 0, lo_open=True, optional=True)
        check_range(_NAME, "balance_weight", balance_weight, 0)
        check_range(_NAME, "z_loss_weight", z_loss_weight, 0)
        check_gate_options(_NAME, balance_fraction, renormalize)
        self.routing_dim = routing_dim
        self.normalize_tokens = normalize_tokens
        self.temperature_param = temperature_param
        self.balance_temperature = balance_temperature
        self.rescale_embeddings = rescale_embeddings
        self.balance_weight = balance_weight
        self.z_loss_weight = z_loss_weight
        self.balance_fraction = balance_fraction
        self.renormalize = renormalize
        self.proj = nn.Linear(d_model, routing_dim, bias=False)  # W_p
        emb = torch.empty(num_experts, routing_dim)
        nn.init.orthogonal_(emb, gain=embedding_init_gain)
        self.expert_embeddings = nn.Parameter(emb)
        init = math.log(temperature) if temperature_param == "log" else float(temperature)
        tau = torch.tensor(init, dtype=torch.float32)
        if learnable_temperature:
            self.raw_temperature = nn.Parameter(tau)
        else:
            self.register_buffer("raw_temperature", tau)

    TAU_MIN = 1e-4  # MoEc_model top1gate.py _get_gating_temperature(eps=1e-4)

    @property
    def temperature(self) -> Tensor:
        """tau: exp(log_tau), or the raw parameter with values below 1e-4 replaced by 1e-4 (no gradient there)."""
        t = self.raw_temperature.float()
        if self.temperature_param == "log":
            return t.exp()
        if float(t.detach()) < self.TAU_MIN:
            return t.new_tensor(self.TAU_MIN)
        return t

    def cosine(self, x: Tensor) -> Tensor:
        """[T, d] -> [T, E] cos(W_p h, e_k) (or (W_p h) . e_k / |e_k| without token normalisation), fp32."""
        if self.rescale_embeddings is not None and self.training:
            with torch.no_grad():  # torchscale: self.wg.mul_(1.5 / wg_norm) on every forward
                norm = self.expert_embeddings.norm(p=2.0, dim=1, keepdim=True).clamp_min(1e-12)
                self.expert_embeddings.mul_(self.rescale_embeddings / norm)
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = F.linear(x.float(), self.proj.weight.float())
            if self.normalize_tokens:
                h = F.normalize(h, p=2.0, dim=-1, eps=1e-4)
            e = F.normalize(self.expert_embeddings.float(), p=2.0, dim=-1, eps=1e-4)
            return h @ e.t()

    def scores(self, x: Tensor) -> Tensor:
        """[T, d] -> [T, E] routing logits cosine / tau, in fp32."""
        return self.cosine(x) / self.temperature

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        cos = self.cosine(x)
        logits = cos / self.temperature
        probs = logits.softmax(-1)
        idx, weights, aux = softmax_topk(probs, logits, self.top_k, self.renormalize, 0.0,
                                         self.balance_fraction, self.z_loss_weight)
        if self.balance_weight:
            bal_probs = probs if self.balance_temperature is None else (cos / self.balance_temperature).softmax(-1)
            aux["balance"] = self.balance_weight * switch_balance_loss(bal_probs, idx, self.balance_fraction)
        return Routing(
            indices=idx,
            weights=weights,
            logits=logits,
            aux_losses=aux,
            stats={"temperature": float(self.temperature.detach())},
        )
