"""``build_ffn``: the FFN of one block for a router name, the one place models get their FFNs from;
``is_moe_block``: which blocks route, the one rule both models follow."""
from __future__ import annotations

import contextlib
from typing import Any

import torch.distributed as dist
from torch import nn

from ..routing.registry import create_router, get_router
from .dense import DenseFFN
from .expert_parallel import ExpertParallelMoELayer
from .kernels import DEFAULT_IMPL, check_impl
from .moe_layer import MoELayer
from .null_experts import NullMix, resolve_mix
from .streams import rng_stream


def is_moe_block(i: int, depth: int, moe_every: int = 1, moe_last: int = 0) -> bool:
    """Block ``i`` (0-based, of ``depth``) routes when it is a ``moe_every``-th block counted from the last
    (the last block always routes) and, with ``moe_last`` > 0, one of the last ``moe_last`` blocks (MoGE's
    and V-MoE's "Last2": ``moe_last=2``); every other block gets the equal-active-FLOP dense FFN."""
    from_last = depth - 1 - i
    return from_last % moe_every == 0 and (moe_last <= 0 or from_last < moe_last)


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
    experts_impl: str = DEFAULT_IMPL,
    init_stream: tuple | None = None,
    zero_experts: int = 0,
    copy_experts: int = 0,
    constant_experts: int = 0,
) -> nn.Module:
    """The FFN of one block: an :class:`MoELayer` for a router, or the equal-FLOP dense FFN for ``dense``.

    ``shared_experts`` N: N always-on experts of width d_ff in the MoE layer; the dense FFN is then
    ``d_ff * (top_k + N)`` wide, so the active FLOPs per token stay equal.

    ``experts_impl``: the MoE layer's expert kernel (:mod:`harness.layers.kernels`; ``loop`` is the
    bit-identical default); the dense FFN has none and ignores it.

    ``expert_parallel=True`` with torch.distributed initialised on more than one rank gives the
    :class:`harness.layers.expert_parallel.ExpertParallelMoELayer` (same initial weights, this rank's experts).
    The training loop instead converts whole models (``harness.layers.expert_parallel.shard_experts``), so
    model classes need no flag of their own.

    ``init_stream`` = (run seed, this FFN's path in the model): the FFN draws its weights from a stream of its
    own and the router from one keyed by its name (:mod:`.streams`), so the rest of the model, the expert
    bank and the dense baseline's shared parts start identical whatever the router. None: the caller's
    stream, in construction order (unit tests, benchmarks).

    ``zero_experts``, ``copy_experts``, ``constant_experts`` (``model.*``): MoE++'s zero-computation experts
    (:mod:`.null_experts`) beside the ``num_experts`` FFN experts: the router is built over ``num_experts`` +
    their number, the FFN experts stay ``num_experts`` (same bank, same init). A router class may pin its own mix
    (``null_experts`` class attribute: ``moepp``); setting the keys for it is an error. The dense FFN ignores them.
    """
    check_impl(experts_impl)  # a bad name fails for the dense FFN too, not only where a layer routes
    spec_mix = NullMix.from_keys(zero_experts, copy_experts, constant_experts)
    ffn_stream = rng_stream(*init_stream) if init_stream is not None else contextlib.nullcontext()
    with ffn_stream:
        return _build_ffn(router_name, d_model, d_ff, num_experts, top_k, router_kwargs, capacity_factor,
                          activation, expert_parallel, shared_experts, experts_impl, init_stream, spec_mix)


def _build_ffn(router_name: str, d_model: int, d_ff: int, num_experts: int, top_k: int,
               router_kwargs: dict[str, Any] | None, capacity_factor: float | None, activation: str,
               expert_parallel: bool, shared_experts: int, experts_impl: str, init_stream: tuple | None,
               spec_mix: NullMix) -> nn.Module:
    cls = get_router(router_name)
    mix = NullMix() if cls.is_dense else resolve_mix(cls, spec_mix, router_name)
    if mix.total and expert_parallel:
        raise ValueError(f"zero-computation experts ({mix.describe()}) with expert parallelism are not supported "
                         f"(the expert-parallel layer does not carry them); set model.expert_parallel=false")
    router_stream = (rng_stream(*init_stream, "router", router_name) if init_stream is not None
                     else contextlib.nullcontext())
    with router_stream:
        router = create_router(router_name, d_model, num_experts + mix.total, top_k, **(router_kwargs or {}))
    if cls.is_dense:
        return DenseFFN(d_model, d_ff * (top_k + shared_experts), router=router, activation=activation)
    layer = MoELayer(d_model, d_ff, router, capacity_factor=capacity_factor, activation=activation,
                     shared_experts=shared_experts, experts_impl=experts_impl, null_experts=mix if mix.total else None)
    if expert_parallel and shared_experts:
        raise ValueError("shared_experts with expert parallelism is not supported (the expert-parallel layer "
                         "does not carry the shared experts); set model.shared_experts=0 or model.expert_parallel=false")
    if expert_parallel and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ExpertParallelMoELayer.from_layer(layer)
    return layer
