"""Dense baseline: one FFN with hidden size ``d_ff * k``.

That is the fair dense comparison for a top-k MoE: the same *active* FLOPs per
token (k experts of width d_ff) without any routing or dispatch. This file holds
only the registered ``dense`` router; the FFN itself is
:class:`harness.layers.dense.DenseFFN`, which ``build_ffn`` builds for it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from harness.routing.registry import register_router
from harness.routing.router import RouteContext, Router, Routing


@register_router("dense")
class DenseRouter(Router):
    """Dense FFN with d_ff*k hidden units (equal active FLOPs); no routing."""

    description = "Dense FFN of width d_ff*k: the equal-active-FLOP baseline (no routing)"
    is_dense = True

    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__(d_model, num_experts, top_k)

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        # The d_ff*k FFN is k experts of width d_ff that are always all active:
        # every token "uses" experts 0..k-1 with weight 1/k. Keeps the Routing
        # contract meaningful for code that inspects it (e.g. conformance tests).
        T = x.shape[0]
        idx = torch.arange(self.top_k, device=x.device).expand(T, self.top_k).contiguous()
        w = torch.full((T, self.top_k), 1.0 / self.top_k, device=x.device, dtype=x.dtype)
        return Routing(indices=idx, weights=w, logits=None)
