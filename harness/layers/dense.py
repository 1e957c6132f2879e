"""The equal-active-FLOP dense baseline: one FFN of width ``d_ff * k``.

That is the fair dense comparison for a top-k MoE: the same *active* FLOPs per token
(k experts of width d_ff) without any routing or dispatch. Its router (``baselines/dense.py``,
registered as ``dense``) only marks the choice; :func:`harness.layers.build.build_ffn` builds this.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..routing.router import RouteContext, Router, Routing
from .ffn import activation_fn, ffn_init_


class DenseFFN(nn.Module):
    """``Linear(d, d_hidden) -> act -> Linear(d_hidden, d)``, returning ``(y, routing)`` like an MoE layer."""

    def __init__(self, d_model: int, d_hidden: int, router: Router | None = None, activation: str = "gelu") -> None:
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
        # the experts' rule (harness.layers.ffn.ffn_init_): a one-expert MoE layer starts where this FFN does
        ffn_init_(self.fc1.weight, self.fc1.bias, self.fc1.in_features)
        ffn_init_(self.fc2.weight, self.fc2.bias, self.fc2.in_features)

    def forward(self, x: Tensor, ctx: RouteContext | None = None, **_: object) -> tuple[Tensor, Routing | None]:
        return self.fc2(self.act(self.fc1(x))), None
