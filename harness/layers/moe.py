"""The MoE layer: owns the experts, dispatches tokens, combines outputs.

Every router runs on exactly these kernels, so throughput differences between
routers are differences between *routing decisions*, not implementations.

Dispatch (megablocks-style, without custom kernels):
  1. flatten the [T, k] choices into T*k slots, first choices before second
     choices (so capacity drops the least-preferred slots first, as in GShard);
  2. stable-sort slots by expert -> every expert's tokens are one contiguous
     segment of the gathered input;
  3. run each non-empty segment through its expert (two addmm's);
  4. scale by the routing weight and scatter-add back (``index_add_``).

If the router already asked for every expert's output
(``ctx.all_expert_outputs()``, CompeteSMoE's competition steps) the layer
gathers from that tensor instead of running the experts a second time.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing.router import RouteContext, Router, Routing

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def activation_fn(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}") from None


def ffn_init_(weight: Tensor, bias: Tensor | None, fan_in: int) -> None:
    """THE initialisation of every FFN linear map: the dense baseline's and every expert's.

    ``nn.Linear``'s default: weight and bias uniform in +-1/sqrt(fan_in). The weight bound is
    computed exactly as ``nn.init.kaiming_uniform_(a=sqrt(5))`` computes it, so the dense
    baseline (draws in the order fc1.weight, fc1.bias, fc2.weight, fc2.bias) gets the same
    numbers as a plain ``nn.Linear`` pair. Layout-free: ``weight`` may be ``[out, in]`` (Linear)
    or ``[E, in, out]`` (an expert bank); only ``fan_in`` matters. Experts once had zero biases
    and so started (and, with the biases decayed, trained) worse than the dense FFN they
    generalise (issue 21); biases stay out of weight decay through ``no_weight_decay``.
    """
    std = nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in)
    w_bound = math.sqrt(3.0) * std
    b_bound = 1 / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-w_bound, w_bound)
        if bias is not None:
            bias.uniform_(-b_bound, b_bound)


class ExpertBank(nn.Module):
    """E two-layer FFN experts stored as stacked parameters ([E, d, f] and [E, f, d])."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu") -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
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


class MoELayer(nn.Module):
    """A token-choice MoE FFN: ``y, routing = layer(x, **ctx_fields)``.

    capacity_factor: None keeps every token; c > 0 lets each expert take at most
    ``ceil(c * T * k / E)`` slots and drops the rest (their output is 0, the
    residual stream carries them); the dropped count is in ``routing.stats``.

    shared_experts: N >= 1 adds DeepSeekMoE's always-on shared experts (Dai et al. 2024,
    arXiv 2401.06066 eq. 9: h = sum_{i<=N_s} FFN_i(u) + sum_i g_i FFN_i(u)): N experts of
    width d_ff that every token uses with weight 1, i.e. one FFN of width ``d_ff * N``
    (torchtitan ``MoE.shared_experts = FeedForward(hidden_dim * num_shared_experts)``), added to
    the routed output whatever the router decided. Its init is the experts' (``ffn_init_``).
    The equal-FLOP dense baseline is then ``d_ff * (top_k + N)`` wide (``build_ffn``).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        router: Router,
        capacity_factor: float | None = None,
        activation: str = "gelu",
        experts: ExpertBank | None = None,
        shared_experts: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(shared_experts, bool) or not isinstance(shared_experts, int) or shared_experts < 0:
            raise ValueError(f"shared_experts must be an integer >= 0, got {shared_experts!r}")
        self.router = router
        self.num_experts, self.top_k = router.num_experts, router.top_k
        # ``experts``: an existing bank to adopt (expert parallelism re-wraps a built layer without
        # drawing new initial weights from the RNG); None builds a fresh one.
        self.experts = experts if experts is not None else ExpertBank(router.num_experts, d_model, d_ff, activation)
        cf = capacity_factor if capacity_factor is not None else router.capacity_factor
        if cf is not None and cf <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {cf}")
        self.capacity_factor = cf
        self.num_shared_experts = shared_experts
        # N shared experts of width d_ff = one always-on FFN of width d_ff * N (a one-expert bank: same init rule)
        self.shared_expert = (ExpertBank(1, d_model, d_ff * shared_experts, activation) if shared_experts else None)
        self.last_routing: Routing | None = None
        self.last_counts: Tensor | None = None  # [E] slots per expert in the last forward

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: Tensor, ctx: RouteContext | None = None, **ctx_fields: Any) -> tuple[Tensor, Routing]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        T = x2.shape[0]
        if ctx is None:
            ctx = RouteContext(**ctx_fields)
        ctx._expert_fn = lambda: self._all_expert_outputs(x2)
        routing = self.router(x2, ctx)
        idx, w = routing.indices, routing.weights.to(x2.dtype)
        if idx.shape != (T, self.top_k) or w.shape != (T, self.top_k):
            raise RuntimeError(
                f"router {getattr(self.router, 'router_name', type(self.router).__name__)!r} returned "
                f"indices {tuple(idx.shape)} / weights {tuple(w.shape)}; expected ({T}, {self.top_k})"
            )
        counts_t = torch.bincount(idx.reshape(-1), minlength=self.num_experts)

        if ctx.has_all_expert_outputs:
            all_out = ctx.all_expert_outputs()  # [T, E, d]
            chosen = all_out.gather(1, idx.unsqueeze(-1).expand(T, self.top_k, all_out.shape[-1]))
            y = (chosen * w.unsqueeze(-1)).sum(1)
            dropped = 0
        else:
            y, counts_t, dropped = self._dispatch(x2, idx, w, counts_t)
        if self.shared_expert is not None:
            y = y + self.shared_expert.expert(0, x2)

        routing.stats = dict(routing.stats)
        routing.stats["dropped_tokens"] = float(dropped)
        self.last_routing = routing
        self.last_counts = counts_t.detach()
        return y.reshape(shape), routing

    def _dispatch(self, x: Tensor, idx: Tensor, w: Tensor, counts_t: Tensor) -> tuple[Tensor, Tensor, int]:
        T, k = idx.shape
        # k-major slot order: all first choices, then all second choices, ...
        slot_expert = idx.t().reshape(-1)
        slot_token = torch.arange(T, device=x.device).repeat(k)
        slot_weight = w.t().reshape(-1)
        order = torch.argsort(slot_expert, stable=True)
        dropped = 0
        cap = self.capacity(T)
        if cap is not None and int(counts_t.max()) > cap:
            starts = torch.cumsum(counts_t, 0) - counts_t
            pos = torch.arange(order.numel(), device=x.device) - starts[slot_expert[order]]
            keep = pos < cap
            dropped = int((~keep).sum())
            order = order[keep]
            counts_t = counts_t.clamp(max=cap)
        tok = slot_token[order]
        out = self._run_experts(x.index_select(0, tok), counts_t)
        out = out * slot_weight[order].unsqueeze(-1)
        y = torch.zeros_like(x).index_add_(0, tok, out)
        return y, counts_t, dropped


    # -- the two places where tokens meet experts (overridden by harness.layers.expert_parallel) --------
    def _run_experts(self, x_sorted: Tensor, counts_t: Tensor) -> Tensor:
        """Expert e on the e-th contiguous segment of the expert-sorted slots ([S, d] -> [S, d])."""
        return self.experts.forward_segments(x_sorted, counts_t.tolist())

    def _all_expert_outputs(self, x: Tensor) -> Tensor:
        """Every expert on every token, [T, d] -> [T, E, d] (``ctx.all_expert_outputs()``)."""
        return self.experts.forward_all(x)


def build_ffn(
    router_name: str,
    d_model: int,
    d_ff: int,
    num_experts: int,
    top_k: int,
    router_kwargs: dict[str, Any] | None = None,
    capacity_factor: float | None = None,
    activation: str = "gelu",
    expert_parallel: bool = False,
    shared_experts: int = 0,
) -> nn.Module:
    """The FFN of one block: an :class:`MoELayer` for a router, or the equal-FLOP dense FFN for ``dense``.

    ``shared_experts`` N: N always-on experts of width d_ff in the MoE layer; the dense FFN is then
    ``d_ff * (top_k + N)`` wide, so the active FLOPs per token stay equal.

    ``expert_parallel=True`` with torch.distributed initialised on more than one rank gives the
    :class:`harness.layers.expert_parallel.ExpertParallelMoELayer` (same initial weights, this rank's experts).
    The training loop instead converts whole models (``harness.layers.expert_parallel.shard_experts``), so
    model classes need no flag of their own.
    """
    from ..routing.registry import create_router, get_router

    cls = get_router(router_name)
    if cls.is_dense:
        from baselines.dense import DenseFFN

        router = create_router(router_name, d_model, num_experts, top_k, **(router_kwargs or {}))
        return DenseFFN(d_model, d_ff * (top_k + shared_experts), router=router, activation=activation)
    router = create_router(router_name, d_model, num_experts, top_k, **(router_kwargs or {}))
    layer = MoELayer(d_model, d_ff, router, capacity_factor=capacity_factor, activation=activation,
                     shared_experts=shared_experts)
    if expert_parallel and shared_experts:
        raise ValueError("shared_experts with expert parallelism is not supported (the expert-parallel layer "
                         "does not carry the shared experts); set model.shared_experts=0 or model.expert_parallel=false")
    if expert_parallel:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from .expert_parallel import ExpertParallelMoELayer

            return ExpertParallelMoELayer.from_layer(layer)
    return layer
