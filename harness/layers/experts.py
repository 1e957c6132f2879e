"""The expert kernels every router runs on: E two-layer FFNs stored as stacked parameters.

How the E experts run on their segments is the bank's ``experts_impl`` (``model.experts_impl``):
one of :data:`harness.layers.kernels.EXPERTS_IMPLS`, default ``loop`` (:meth:`ExpertBank.forward_segments`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels
from .ffn import activation_fn, ffn_init_


class ExpertBank(nn.Module):
    """E two-layer FFN experts stored as stacked parameters ([E, d, f] and [E, f, d])."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu",
                 experts_impl: str = kernels.DEFAULT_IMPL) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.experts_impl = kernels.check_impl(experts_impl)  # not state: checkpoints load under any kernel
        self.act = activation_fn(activation)
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b1 = nn.Parameter(torch.empty(num_experts, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the dense FFN's rule (ffn_init_), per expert, in the dense order: w1, b1, w2, b2
        ffn_init_(self.w1, self.b1, self.d_model)
        ffn_init_(self.w2, self.b2, self.d_ff)

    @staticmethod
    def no_weight_decay() -> set[str]:
        """The stacked biases are 2-D but are biases: not decayed, like the dense FFN's (see make_optimizer)."""
        return {"b1", "b2"}

    def expert(self, e: int, x: Tensor) -> Tensor:
        h = self.act(torch.addmm(self.b1[e], x, self.w1[e]))
        return torch.addmm(self.b2[e], h, self.w2[e])

    def forward_sorted(self, x_sorted: Tensor, counts: Tensor | list[int], source: kernels.Source = None) -> Tensor:
        """Expert e on the e-th contiguous segment of ``x_sorted`` ([S, d] -> [S, d]), ``counts[e]`` rows each,
        with the kernel ``self.experts_impl`` names (:mod:`harness.layers.kernels`). ``source = (x, token)``
        says ``x_sorted == x[token]`` (a kernel that keeps less for backward re-gathers from it)."""
        # getattr: a whole bank pickled before the switch existed has no such attribute (it ran the loop)
        return kernels.run(getattr(self, "experts_impl", kernels.DEFAULT_IMPL), self, x_sorted, counts, source)

    def extra_repr(self) -> str:
        impl = getattr(self, "experts_impl", kernels.DEFAULT_IMPL)
        return "" if impl == kernels.DEFAULT_IMPL else f"experts_impl={impl}"

    def forward_segments(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """Run expert e on the e-th contiguous segment of ``x_sorted``.

        The stacked weights are unbound once: indexing ``self.w1[e]`` per expert
        would make autograd allocate and fill a full [E, d, f] gradient for every
        expert in backward (E times the memory traffic); unbind's backward stacks
        the E slices once.
        """
        w1, b1, w2, b2 = self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0)
        outs = []
        for e, seg in enumerate(torch.split(x_sorted, counts)):
            if seg.shape[0]:
                h = self.act(torch.addmm(b1[e], seg, w1[e]))
                outs.append(torch.addmm(b2[e], h, w2[e]))
        if not outs:
            return x_sorted.new_zeros(0, self.d_model)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward_all(self, x: Tensor) -> Tensor:
        """Every expert on every token: [T, d] -> [T, E, d] (a transposed view of [E, T, d]).

        Two batched ``baddbmm`` in expert-major layout: measured 0.90x the einsum
        version's time on 1 CPU thread (0.79x on 2), CompeteSMoE's competition path.
        """
        E = self.num_experts
        h = self.act(torch.baddbmm(self.b1.unsqueeze(1), x.unsqueeze(0).expand(E, -1, -1), self.w1))
        return torch.baddbmm(self.b2.unsqueeze(1), h, self.w2).transpose(0, 1)
