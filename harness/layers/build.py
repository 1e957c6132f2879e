"""``build_ffn``: the FFN of one block from the model's :class:`~.config.MoEConfig`, the one place models get
their FFNs from; ``is_moe_block``: which blocks route, the one rule both models follow (``.config``)."""
from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from ..routing.registry import create_router
from .config import MoEConfig, is_moe_block
from .dense import DenseFFN
from .kernels import DEFAULT_IMPL
from .moe_layer import MoELayer
from .streams import rng_stream

__all__ = ["build_ffn", "is_moe_block", "MoEConfig"]


def build_ffn(router: str | MoEConfig, d_model: int, d_ff: int | None = None, *args: Any,
              init_stream: tuple | None = None, **kwargs: Any) -> nn.Module:
    """The FFN of one block: an :class:`MoELayer` for a router, or the equal-FLOP dense FFN for ``dense``.

    ``build_ffn(config, d_model, d_ff, init_stream=...)``: from the model's :class:`MoEConfig` (the config of
    this block: ``config.for_block(i, depth)``); ``d_ff`` the width of one expert (default ``config.d_ff``).

    ``build_ffn(router_name, d_model, d_ff, num_experts, top_k, router_kwargs=None, capacity_factor=None,
    activation="gelu", expert_parallel=False, shared_experts=0, experts_impl="loop", zero_experts=0,
    copy_experts=0, constant_experts=0)``: the keyword form tests, benchmarks and plugins call; it makes the
    config (:func:`config_from_keywords`) and builds from it.

    ``shared_experts`` N: N always-on experts of width d_ff in the MoE layer; the dense FFN is then
    ``d_ff * (top_k + N)`` wide, so the active FLOPs per token stay equal. ``experts_impl``: the MoE layer's expert
    kernel; the dense FFN has none and ignores it. Null experts (``zero_experts`` ...): the router is built over
    ``num_experts`` + their number, the FFN experts stay ``num_experts`` (same bank, same init); the dense FFN
    ignores them. ``expert_parallel`` only selects the rules (no shared or null experts): the layer is built
    single-process and the training strategy shards whole models
    (:class:`harness.layers.expert_parallel.ExpertParallel`, ``shard_experts``).

    ``init_stream`` = (run seed, this FFN's path in the model): the FFN draws its weights from a stream of its
    own and the router from one keyed by its name (:mod:`.streams`), so the rest of the model, the expert
    bank and the dense baseline's shared parts start identical whatever the router. None: the caller's
    stream, in construction order (unit tests, benchmarks).
    """
    if isinstance(router, MoEConfig):
        if args or kwargs:
            raise TypeError("build_ffn(config, d_model, d_ff, init_stream=...): the config holds the other options")
        config = router
    else:
        config = config_from_keywords(router, d_ff, *args, **kwargs)
    width = d_ff if d_ff is not None else config.d_ff
    if width is None:
        raise ValueError("build_ffn: give d_ff (the width of one expert) or set it in the config")
    ffn_stream = rng_stream(*init_stream) if init_stream is not None else contextlib.nullcontext()
    with ffn_stream:
        return _build(config, d_model, width, init_stream)


def config_from_keywords(router_name: str, d_ff: int | None, num_experts: int, top_k: int,
                         router_kwargs: dict[str, Any] | None = None, capacity_factor: float | None = None,
                         activation: str = "gelu", expert_parallel: bool = False, shared_experts: int = 0,
                         experts_impl: str = DEFAULT_IMPL, zero_experts: int = 0, copy_experts: int = 0,
                         constant_experts: int = 0) -> MoEConfig:
    """The :class:`MoEConfig` of ``build_ffn``'s keyword form (its argument names and order)."""
    return MoEConfig(router=router_name, num_experts=num_experts, top_k=top_k, d_ff=d_ff,
                     router_kwargs=router_kwargs or {}, capacity_factor=capacity_factor, activation=activation,
                     expert_parallel=expert_parallel, shared_experts=shared_experts, experts_impl=experts_impl,
                     zero_experts=zero_experts, copy_experts=copy_experts, constant_experts=constant_experts)


def _build(config: MoEConfig, d_model: int, d_ff: int, init_stream: tuple | None) -> nn.Module:
    mix = config.null_mix()
    router_stream = (rng_stream(*init_stream, "router", config.router) if init_stream is not None
                     else contextlib.nullcontext())
    with router_stream:
        router = create_router(config.router, d_model, config.num_experts + mix.total, config.top_k,
                               **config.router_kwargs)
    if config.is_dense:
        return DenseFFN(d_model, d_ff * (config.top_k + config.shared_experts), router=router,
                        activation=config.activation)
    return MoELayer.from_config(config, d_model, d_ff, router, mix)
