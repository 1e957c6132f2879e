"""The MoE layer: owns the experts, dispatches tokens, combines outputs.

Every router runs on exactly these kernels, so throughput differences between
routers are differences between *routing decisions*, not implementations.

``forward`` is four named steps (megablocks-shaped, without custom kernels):

  1. :meth:`MoELayer.route` — the router decides (in fp32, by the router contract);
  2. :meth:`MoELayer.permute` — flatten the [T, k] choices into T*k slots, first
     choices before second choices (so capacity drops the least-preferred slots
     first, as in GShard); stable-sort slots by expert, so every expert's tokens are
     one contiguous segment; drop slots over capacity; gather the token rows.
     The plan is a :class:`Dispatch`;
  3. :meth:`MoELayer.run_experts` — expert e on its segment, with the kernel ``experts_impl``
     names (:mod:`.kernels`; default ``loop``: two addmm's per expert);
  4. :meth:`MoELayer.combine` — scale by the routing weight and scatter-add back
     (``index_add_``), then add the shared experts.

If the router already asked for every expert's output (``ctx.all_expert_outputs()``,
CompeteSMoE's competition steps) the layer combines from that tensor instead of
running the experts a second time: ``permute`` then plans no slots and ``combine``
gathers the chosen experts' rows.

Zero-computation experts (``null_experts``, MoE++: :mod:`.null_experts`): the router scores
E_ffn + n_null experts; ``permute`` leaves the slots that chose a null expert out of the FFN plan (as it
leaves out a variable-k router's unused slots) and ``combine`` adds their weighted outputs (zero: nothing,
copy: x, constant: a_1 x + a_2 v). The loads (``last_counts``) cover all E_ffn + n_null experts.

Expert parallelism (:mod:`.expert_parallel`) overrides :meth:`MoELayer.run_experts`
and :meth:`MoELayer.all_expert_outputs`, the two places where tokens meet experts.
``harness bench`` times these same steps through ``forward``'s ``mark`` hook.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..routing.losses import BALANCE_SCOPES, GlobalBalance, global_balance
from ..routing.router import RouteContext, Router, Routing
from . import dispatch_combine, fused_experts, kernels
from .experts import ExpertBank
from .kernels import DEFAULT_IMPL
from .null_experts import NullExperts, NullMix, ffn_flops

Mark = Callable[[str], None]
STEPS = ("route", "permute", "run_experts", "combine")  # the names ``mark`` is called with


def _no_mark(step: str) -> None:
    pass


@dataclass
class Dispatch:
    """Where every slot goes: what :meth:`MoELayer.permute` plans and :meth:`MoELayer.combine` undoes.

    Slot ``j * T + t`` is token t's j-th choice (k-major). ``order`` lists the kept slots sorted
    by expert (stable), so expert e's slots are the e-th contiguous segment, ``counts[e]`` long.
    ``order is None`` means the router already ran every expert (``ctx.all_expert_outputs()``):
    nothing is permuted and ``combine`` gathers from those outputs.
    """

    indices: Tensor                       # [T, k] long, the router's choices
    weights: Tensor                       # [T, k] combine weights, in the layer input's dtype
    counts: Tensor                        # [E_ffn] long, slots per FFN expert (after the capacity drop)
    dropped: int = 0                      # slots over capacity: their output is 0
    order: Tensor | None = None           # [S] kept slots, expert-sorted
    token: Tensor | None = None           # [S] the token of each kept slot
    slot_weights: Tensor | None = None    # [T*k] combine weights in slot order (``[order]`` picks the kept)
    x_sorted: Tensor | None = None        # [S, d] the kept slots' token rows: the experts' input (``rows()``)
    x: Tensor | None = None               # [T, d] the layer input they were gathered from (x_sorted == x[token])
    null_counts: Tensor | None = None     # [n_null] slots per zero-computation expert (None: the layer has none)
    null_slots: Tensor | None = None      # the slots (k-major ids) that chose a null expert; never dropped
    planned_in_cpp: bool = False          # planned by :mod:`.dispatch_combine` (so combine may use its C++ too)

    @property
    def from_all_outputs(self) -> bool:
        return self.order is None

    def rows(self) -> Tensor:
        """The experts' input ``x[token]`` ([S, d]), gathered on first use: the fused path
        (:meth:`MoELayer.fused_experts_and_combine`) gathers in C++ and never needs it."""
        if self.x_sorted is None:
            self.x_sorted = self.x.index_select(0, self.token)
        return self.x_sorted


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

    experts_impl: the expert kernel (:data:`harness.layers.kernels.EXPERTS_IMPLS`); only the
    default ``loop`` is bit-identical to earlier revisions. The shared experts always run as one addmm pair.

    null_experts: a :class:`~harness.layers.null_experts.NullMix` of zero-computation experts (MoE++); the router
    then routes over ``router.num_experts`` = E_ffn + n_null experts, the bank holds the E_ffn FFNs (experts
    ``0 .. E_ffn-1``), the null experts follow. ``num_experts`` is the router's count (the loads' length);
    ``num_ffn_experts`` the bank's. Capacity limits the FFN experts only, at ``ceil(c * T * k / num_experts)``
    slots each (null experts have no buffer to overflow). None or an empty mix: none (every earlier layer).
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
        experts_impl: str = DEFAULT_IMPL,
        null_experts: NullMix | None = None,
    ) -> None:
        super().__init__()
        if isinstance(shared_experts, bool) or not isinstance(shared_experts, int) or shared_experts < 0:
            raise ValueError(f"shared_experts must be an integer >= 0, got {shared_experts!r}")
        n_null = null_experts.total if null_experts is not None else 0
        if n_null >= router.num_experts:
            raise ValueError(f"the router routes over {router.num_experts} experts, not more than its {n_null} null "
                             f"experts ({null_experts.describe()}): no FFN expert is left")
        self.router = router
        self.num_experts, self.top_k = router.num_experts, router.top_k
        self.num_ffn_experts = router.num_experts - n_null
        # ``experts``: an existing bank to adopt (expert parallelism re-wraps a built layer without
        # drawing new initial weights from the RNG, and keeps its kernel); None builds a fresh one.
        if experts is not None and experts.num_experts != self.num_ffn_experts:
            raise ValueError(f"the router routes over {router.num_experts} experts but the expert bank holds "
                             f"{experts.num_experts} and the layer has {n_null} null experts (zero-computation experts "
                             f"are not carried over to an expert-parallel layer)")
        self.experts = (experts if experts is not None
                        else ExpertBank(self.num_ffn_experts, d_model, d_ff, activation, experts_impl=experts_impl))
        cf = capacity_factor if capacity_factor is not None else router.capacity_factor
        if cf is not None and cf <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {cf}")
        self.capacity_factor = cf
        self.num_shared_experts = shared_experts
        # N shared experts of width d_ff = one always-on FFN of width d_ff * N (a one-expert bank: same init rule)
        self.shared_expert = (ExpertBank(1, d_model, d_ff * shared_experts, activation) if shared_experts else None)
        # drawn after every FFN weight, so a layer with null experts starts its FFNs where one without does
        self.null_experts = NullExperts(d_model, null_experts) if n_null else None
        self.last_routing: Routing | None = None
        self.last_counts: Tensor | None = None  # [E] slots per expert in the last forward
        # model.balance_scope (set_balance_scope): "micro" -- the router's balance loss sees this batch only --
        # or "global": f_i over the optimiser step's global batch (harness.routing.losses.GlobalBalance).
        # A router class may pin its own (a class attribute ``balance_scope``).
        self.balance_scope = "micro"
        # its window: model.balance_window, or the router's pinned ``balance_window``
        self.global_balance = GlobalBalance(router.num_experts, int(getattr(router, "balance_window", 0) or 0))

    @classmethod
    def from_config(cls, config: Any, d_model: int, d_ff: int, router: Router,
                    null_experts: NullMix | None = None) -> "MoELayer":
        """The layer of a :class:`harness.layers.config.MoEConfig` (``build_ffn``'s door): its capacity factor,
        activation, shared experts, kernel and balance scope; ``router`` built over the FFN + null experts."""
        layer = cls(d_model, d_ff, router, capacity_factor=config.capacity_factor, activation=config.activation,
                    shared_experts=config.shared_experts, experts_impl=config.experts_impl,
                    null_experts=null_experts if null_experts is not None and null_experts.total else None)
        layer.set_balance_scope(config.balance_scope, config.balance_window)
        return layer

    def set_balance_scope(self, scope: str, window: int = 0) -> None:
        """``model.balance_scope`` / ``balance_window`` on this layer, unless its router pins its own."""
        if not getattr(self.router, "balance_scope", None):
            self.balance_scope = scope
            self.global_balance.set_window(window)

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: Tensor, ctx: RouteContext | None = None, *, mark: Mark | None = None,
                **ctx_fields: Any) -> tuple[Tensor, Routing]:
        """``route -> permute -> run_experts -> combine`` on ``x`` flattened to [T, d].

        ``mark(step)``, if given, is called as each step ends (names in ``STEPS``), and around the
        experts a router runs through ``ctx.all_expert_outputs()``: ``harness bench`` reads its
        phase clock there, so the profiler times this very code. ``ctx_fields`` build the
        :class:`RouteContext` when ``ctx`` is None.
        """
        mark = mark or _no_mark
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if ctx is None:
            ctx = RouteContext(**ctx_fields)
        routing = self.route(x, ctx, mark)
        mark("route")
        d = self.permute(x, routing, ctx)
        mark("permute")
        if self._runs_fused(d, x):  # run_experts and combine in one C++ call each way: the same bits
            y = self.fused_experts_and_combine(x, d)
            mark("run_experts")
        else:
            out = ctx.all_expert_outputs() if d.from_all_outputs else self.run_experts(d)
            mark("run_experts")
            y = self.combine(x, d, out)
        mark("combine")
        routing.stats = dict(routing.stats)
        routing.stats["dropped_tokens"] = float(d.dropped)
        counts = d.counts.detach()
        if d.null_counts is not None:  # loads over every expert the router scores; and the FFN share of the slots
            nulls = d.null_counts.detach()
            counts = torch.cat([counts, nulls])
            T, used = x.shape[0], float(counts.sum()) + d.dropped
            routing.stats["ffn_experts_per_token"] = float(d.counts.sum()) / T if T else 0.0
            routing.stats["null_share"] = float(nulls.sum()) / used if used else 0.0
        self.last_routing = routing
        self.last_counts = counts
        return y.reshape(shape), routing

    def expert_flops(self) -> int:
        """Forward FLOPs the experts spent in the last forward: 4 d d_ff per FFN slot run (after the capacity
        drop), ~7 d per constant-expert slot, 0 for copy and zero slots (the router and shared experts aside)."""
        if self.last_counts is None:
            return 0
        E = self.num_ffn_experts
        flops = ffn_flops(int(self.last_counts[:E].sum()), self.experts.d_model, self.experts.d_ff)
        if self.null_experts is not None:
            flops += self.null_experts.flops(self.last_counts[E:])
        return flops

    # -- the steps ---------------------------------------------------------------------------------
    def route(self, x: Tensor, ctx: RouteContext, mark: Mark = _no_mark) -> Routing:
        """The router's decision for [T, d] tokens, with this layer's experts attached to ``ctx``."""

        def every_expert() -> Tensor:
            mark("route")  # the router's time so far; running every expert is the experts' time
            out = self.all_expert_outputs(x)
            mark("run_experts")
            return out

        ctx.attach_experts(every_expert)
        scope = getattr(self.router, "balance_scope", None) or self.balance_scope
        if scope == "global" and ctx.training and torch.is_grad_enabled():
            with global_balance(self.global_balance, ctx.step):
                routing = self.router(x, ctx)
        else:
            routing = self.router(x, ctx)
        T, S = x.shape[0], self.router.num_slots  # S = top_k, or a variable-k router's slot count
        idx, w = routing.indices, routing.weights
        if idx.shape != (T, S) or w.shape != (T, S):
            raise RuntimeError(
                f"router {getattr(self.router, 'router_name', type(self.router).__name__)!r} returned "
                f"indices {tuple(idx.shape)} / weights {tuple(w.shape)}; expected ({T}, {S})"
            )
        return routing

    def permute(self, x: Tensor, routing: Routing, ctx: RouteContext) -> Dispatch:
        """k-major slots, stable-sorted by expert, capacity applied, token rows gathered.

        For a variable-k router (``router.variable_k``) the slots whose weight is exactly 0 are
        unused: they are left out of the plan and of ``counts`` (the expert loads). With null experts the
        slots that chose one are left out of the FFN plan too (``null_slots``, counted in ``null_counts``).
        """
        idx, w = routing.indices, routing.weights.to(x.dtype)
        used = (routing.weights != 0).t().reshape(-1) if self.router.variable_k else None  # [T*S], k-major
        flat = idx.t().reshape(-1)  # k-major slot order: all first choices, then all second choices, ...
        counts = torch.bincount(flat if used is None else flat[used], minlength=self.num_experts)
        null_counts = None
        if self.null_experts is not None:
            E = self.num_ffn_experts
            counts, null_counts = counts[:E], counts[E:]
            to_ffn = flat < E
            to_null = ~to_ffn if used is None else used & ~to_ffn
            used = to_ffn if used is None else used & to_ffn  # the slots the FFN plan takes
        if ctx.has_all_expert_outputs:  # unused slots have weight 0: combine's gather adds nothing for them
            return Dispatch(idx, w, counts, null_counts=null_counts)
        T, k = idx.shape
        if null_counts is None and dispatch_combine.applies(x):  # the same plan in one C++ call
            order, token, counts, dropped = dispatch_combine.plan(flat, used, T, self.num_experts, self.capacity(T))
            return Dispatch(idx, w, counts, dropped, order, token, w.t().reshape(-1), None, x, planned_in_cpp=True)
        slot_expert = flat
        slot_token = torch.arange(T, device=x.device).repeat(k)
        slot_weights = w.t().reshape(-1)
        if used is None:
            order = torch.argsort(slot_expert, stable=True)
        else:
            kept = used.nonzero().squeeze(1)
            order = kept[torch.argsort(slot_expert[kept], stable=True)]
        dropped = 0
        cap = self.capacity(T)
        if cap is not None and int(counts.max()) > cap:
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(order.numel(), device=x.device) - starts[slot_expert[order]]
            keep = pos < cap
            dropped = int((~keep).sum())
            order = order[keep]
            counts = counts.clamp(max=cap)
        token = slot_token[order]
        null_slots = to_null.nonzero().squeeze(1) if null_counts is not None else None
        return Dispatch(idx, w, counts, dropped, order, token, slot_weights, x.index_select(0, token), x,
                        null_counts, null_slots)

    def run_experts(self, d: Dispatch) -> Tensor:
        """Expert e on the e-th contiguous segment of the expert-sorted rows ([S, d] -> [S, d])."""
        return self.experts.forward_sorted(d.rows(), d.counts, source=(d.x, d.token))

    def _runs_fused(self, d: Dispatch, x: Tensor) -> bool:
        """Whether :meth:`fused_experts_and_combine` replaces :meth:`run_experts` + :meth:`combine`: a C++ plan,
        the bank's kernel resolving to ``fused`` here, and not a subclass that runs its experts elsewhere
        (expert parallelism)."""
        # no slot at all: the Python path, whose experts then get no gradient (None, not zeros: AdamW skips them)
        return (d.planned_in_cpp and d.order.numel() > 0 and type(self).run_experts is MoELayer.run_experts
                and kernels.resolve(getattr(self.experts, "experts_impl", DEFAULT_IMPL), self.experts, x) == "fused"
                and fused_experts.moe_applies(self.experts, x))

    def fused_experts_and_combine(self, x: Tensor, d: Dispatch) -> Tensor:
        """:meth:`run_experts` then :meth:`combine` (without the null experts, which a C++ plan never has) as
        one autograd node: gather, the ``fused`` kernel's expert loop, the weighted scatter-add; then the shared
        experts. ``harness bench`` counts the combine in ``run_experts`` on this path."""
        y = fused_experts.fused_moe(self.experts, x, d.slot_weights, d.order, d.token, d.counts.tolist())
        if self.shared_expert is not None:
            y = y + self.shared_expert.expert(0, x)
        return y

    def all_expert_outputs(self, x: Tensor) -> Tensor:
        """Every expert on every token, [T, d] -> [T, E, d] (what ``ctx.all_expert_outputs()`` returns);
        with null experts their outputs are the last n_null columns."""
        out = self.experts.forward_all(x)
        if self.null_experts is not None:
            out = torch.cat([out, self.null_experts.forward_all(x)], dim=1)
        return out

    def combine(self, x: Tensor, d: Dispatch, out: Tensor) -> Tensor:
        """Weight each slot's output and add it to its token's row; then the shared experts.

        ``out``: [S, d] from :meth:`run_experts`, or [T, E, d] every expert's output when
        ``d.from_all_outputs``.
        """
        if d.from_all_outputs:
            T, k = d.indices.shape
            chosen = out.gather(1, d.indices.unsqueeze(-1).expand(T, k, out.shape[-1]))
            y = (chosen * d.weights.unsqueeze(-1)).sum(1)
        elif d.planned_in_cpp and out.dtype == torch.float32 and d.slot_weights.dtype == torch.float32:
            y = dispatch_combine.combine(out, d.slot_weights, d.order, d.token, x.shape[0])  # the same bits
        else:
            out = out * d.slot_weights[d.order].unsqueeze(-1)
            y = torch.zeros_like(x).index_add_(0, d.token, out)
            if d.null_slots is not None and d.null_slots.numel():
                y = y.index_add(0, *self._null_outputs(x, d))
        if self.shared_expert is not None:
            y = y + self.shared_expert.expert(0, x)
        return y


    def _null_outputs(self, x: Tensor, d: Dispatch) -> tuple[Tensor, Tensor]:
        """(tokens, weighted outputs) of the slots that chose a null expert."""
        T = x.shape[0]
        token = d.null_slots % T  # slot j * T + t is token t's j-th choice
        local = d.indices.t().reshape(-1)[d.null_slots] - self.num_ffn_experts
        out = self.null_experts.outputs(x.index_select(0, token), local)
        return token, out * d.slot_weights[d.null_slots].unsqueeze(-1)


def set_balance_scope(model: nn.Module, scope: str, window: int = 0) -> None:
    """``model.balance_scope`` (:data:`harness.routing.losses.BALANCE_SCOPES`) and ``model.balance_window``
    (earlier steps in the global f_i: :class:`harness.routing.losses.GlobalBalance`) on every MoE layer.

    Called where a model is readied for training (``harness.training.distributed.wrap_model``), so a
    cooldown branch and a data-parallel rank get it too; evaluation forwards never accumulate.
    """
    if scope not in BALANCE_SCOPES:
        raise ValueError(f"balance_scope must be one of {', '.join(BALANCE_SCOPES)}, got {scope!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"balance_window must be an integer >= 0, got {window!r}")
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.set_balance_scope(scope, window)  # a pinned router keeps its own
