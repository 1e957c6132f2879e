"""Dense baseline: one FFN with hidden size ``d_ff * k``.

That is the fair dense comparison for a top-k MoE: the same *active* FLOPs per
token (k experts of width d_ff) without any routing or dispatch.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from harness.layers.moe import activation_fn, ffn_init_
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


class DenseFFN(nn.Module):
    """``Linear(d, d_hidden) -> act -> Linear(d_hidden, d)``, returning ``(y, routing)`` like an MoE layer."""

    def __init__(self, d_model: int, d_hidden: int, router: DenseRouter | None = None, activation: str = "gelu") -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # Linear's own init is discarded: reset_parameters draws
            self.fc1 = nn.Linear(d_model, d_hidden)
            self.fc2 = nn.Linear(d_hidden, d_model)
        self.reset_parameters()
        self.act = activation_fn(activation)
        self.router = router
        self.num_experts, self.top_k = 1, 1
        self.last_routing: Routing | None = None
        self.last_counts: Tensor | None = None

    def reset_parameters(self) -> None:
        # the experts' rule (harness.layers.moe.ffn_init_): a one-expert MoE layer starts where this FFN does
        ffn_init_(self.fc1.weight, self.fc1.bias, self.fc1.in_features)
        ffn_init_(self.fc2.weight, self.fc2.bias, self.fc2.in_features)

    def forward(self, x: Tensor, ctx: RouteContext | None = None, **_: object) -> tuple[Tensor, Routing | None]:
        return self.fc2(self.act(self.fc1(x))), None
