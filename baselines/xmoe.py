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

Where the paper and the official code (unilm/torchscale ``xmoe/routing.py``) differ:

* The code does **not** normalise the projected token (the line is commented
  out): s_k = (W_p h) . e_k / ||e_k||, and it uses no temperature.
  ``normalize_tokens=True`` (default) is the paper; ``False`` is the code. Set
  ``normalize_tokens=False, temperature=1.0, learnable_temperature=False`` to
  reproduce the code's scores exactly.
* Routing dimension: the paper and the official code use d_e = 16 (default); a
  widely used reimplementation (CompeteSMoE v1's code) uses 8 or E/2 with a fixed
  tau = 0.3 — ``routing_dim`` and ``temperature``/``learnable_temperature`` cover it.
* Temperature init 0.07: the official code's temperature constant
  (``TEMPERATURE_FOR_L_UAX = 0.07``); the paper calls tau learnable (default).
  tau is parameterised as exp(log_tau) so it stays positive under any optimiser
  step (the official code clamps a raw parameter at 1e-4 instead).
* Expert embeddings are initialised orthogonally with gain 0.32, as in the code.

Combine weights: softmax probabilities of the k chosen experts, renormalised for
k > 1 (``renormalize="auto"``, same as ``smoe``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.registry import register_router
from harness.router import RouteContext, Router, Routing, check_gate_options, check_range

from .smoe import softmax_topk

_NAME = "xmoe"


@register_router(_NAME)
class XMoERouter(Router):
    """Cosine routing in a low-dimensional space with a (learnable) temperature."""

    description = "X-MoE: project to d_e=16, cosine(token, expert)/tau with learnable tau, Switch balance loss 0.01"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        routing_dim: int = 16,
        temperature: float = 0.07,
        learnable_temperature: bool = True,
        normalize_tokens: bool = True,
        balance_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        balance_fraction: str = "slots",
        renormalize: bool | str = "auto",
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        if isinstance(routing_dim, bool) or not isinstance(routing_dim, int):
            raise ValueError(f"router {_NAME!r}: hyper-parameter routing_dim={routing_dim!r} must be an integer >= 1")
        check_range(_NAME, "routing_dim", routing_dim, 1)
        if not temperature > 0:  # also rejects NaN
            raise ValueError(f"router {_NAME!r}: hyper-parameter temperature={temperature!r} must be > 0")
        if not isinstance(learnable_temperature, bool):
            raise ValueError(f"router {_NAME!r}: hyper-parameter learnable_temperature={learnable_temperature!r} must be true or false")
        if not isinstance(normalize_tokens, bool):
            raise ValueError(f"router {_NAME!r}: hyper-parameter normalize_tokens={normalize_tokens!r} must be true or false")
        check_range(_NAME, "balance_weight", balance_weight, 0)
        check_range(_NAME, "z_loss_weight", z_loss_weight, 0)
        check_gate_options(_NAME, balance_fraction, renormalize)
        self.routing_dim = routing_dim
        self.normalize_tokens = normalize_tokens
        self.balance_weight = balance_weight
        self.z_loss_weight = z_loss_weight
        self.balance_fraction = balance_fraction
        self.renormalize = renormalize
        self.proj = nn.Linear(d_model, routing_dim, bias=False)  # W_p
        emb = torch.empty(num_experts, routing_dim)
        nn.init.orthogonal_(emb, gain=0.32)  # official code's init
        self.expert_embeddings = nn.Parameter(emb)
        log_tau = torch.tensor(math.log(temperature), dtype=torch.float32)
        if learnable_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.float().exp()

    def scores(self, x: Tensor) -> Tensor:
        """[T, d] -> [T, E] routing logits cos(W_p h, e_k) / tau, in fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = F.linear(x.float(), self.proj.weight.float())
            if self.normalize_tokens:
                h = F.normalize(h, p=2.0, dim=-1, eps=1e-4)
            e = F.normalize(self.expert_embeddings.float(), p=2.0, dim=-1, eps=1e-4)
            return h @ e.t() / self.temperature

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        logits = self.scores(x)
        probs = logits.softmax(-1)
        idx, weights, aux = softmax_topk(probs, logits, self.top_k, self.renormalize, self.balance_weight,
                                         self.balance_fraction, self.z_loss_weight)
        return Routing(
            indices=idx,
            weights=weights,
            logits=logits,
            aux_losses=aux,
            stats={"temperature": float(self.temperature.detach())},
        )
