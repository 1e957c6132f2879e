"""``MoEConfig``: the FFN side of a model in one frozen value, built once from the spec and passed whole.

``harness.suites.lm.build_lm`` / ``harness.suites.vision.build_vit`` build it from the run's ``model`` section
(:meth:`MoEConfig.from_spec`, where the defaults of keys older stored runs lack live), hand it to
``MoEDecoderLM`` / ``MoEVisionTransformer``, which ask it which blocks route (:meth:`MoEConfig.is_moe_block`)
and give it to :func:`harness.layers.build.build_ffn` for each block, which builds the router and the
``MoELayer`` (or the dense FFN) from it. Before issue 32 the same ~15 keyword arguments were re-listed at
each of those five steps, the ``moe_every`` rule sat in both models and the rules below were checked in
``spec.py`` and again at build time.

The rules (:meth:`MoEConfig.check`, run when a config is made) are checked here only; ``spec.py`` runs
the same check on a suite's model section for each of its routers and puts the file in front of the line.
Each message names the spec key (``model.top_k=9 must be ...``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..routing.losses import BALANCE_SCOPES
from ..routing.registry import get_router
from .kernels import DEFAULT_IMPL, EXPERTS_IMPLS
from .null_experts import NULL_EXPERT_KEYS, NullMix, pinned_mix, resolve_mix


class ConfigError(ValueError):
    """A rule of :class:`MoEConfig` broken; the message names the ``model.*`` key."""


@dataclass(frozen=True)
class MoEConfig:
    """What a model's FFNs are: the router, the experts, which blocks route, the layer's options.

    router:            registered router name (``dense``: the equal-active-FLOP baseline).
    num_experts, top_k: FFN experts per layer and choices per token.
    d_ff:              width of ONE expert; None: the block's own MLP width (timm's ``embed_dim * mlp_ratio``).
    moe_every, moe_last: which blocks route (:meth:`is_moe_block`); the others get the dense FFN.
    capacity_factor:   None: the router's default (StableMoE 2.0), else ``ceil(c * T * k / E)`` slots per expert.
    activation:        the experts' activation (``harness.layers.ffn.activation_fn``).
    router_kwargs:     the router's hyper-parameters (``router_args`` of the spec).
    shared_experts:    DeepSeekMoE always-on experts of width d_ff; the dense FFN is then d_ff * (k + N) wide.
    experts_impl:      the expert kernel (``harness.layers.kernels``); the dense FFN has none.
    expert_parallel:   the model will be trained with its experts sharded over ranks; the layers are built
                       single-process either way (the ``ExpertParallel`` strategy shards the whole model).
    zero_experts, copy_experts, constant_experts: MoE++'s zero-computation experts (``.null_experts``).
    balance_scope, balance_window: the routers' balance-loss f_i over the micro-batch or the global batch
                       (``harness.routing.losses.GlobalBalance``).
    """

    router: str = "smoe"
    num_experts: int = 8
    top_k: int = 2
    d_ff: int | None = None
    moe_every: int = 1
    moe_last: int = 0
    capacity_factor: float | None = None
    activation: str = "gelu"
    router_kwargs: Mapping[str, Any] = field(default_factory=dict)
    shared_experts: int = 0
    experts_impl: str = DEFAULT_IMPL
    expert_parallel: bool = False
    zero_experts: int = 0
    copy_experts: int = 0
    constant_experts: int = 0
    balance_scope: str = "micro"
    balance_window: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "router_kwargs", dict(self.router_kwargs or {}))
        self.check()

    # -- from the spec --------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | Any, **changes: Any) -> "MoEConfig":
        """From a RunSpec or its stored ``to_dict()``: the router, its arguments and the ``model`` section.

        Keys that runs stored before they existed lack take their default here (the one place): ``moe_last``
        (issue 26), ``shared_experts`` (18), ``experts_impl`` (17), ``balance_scope`` / ``balance_window`` and the
        null experts (31), ``expert_parallel``."""
        d = spec if isinstance(spec, Mapping) else spec.to_dict()
        m = d["model"]
        defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                    for f in dataclasses.fields(cls)}
        keys = {f.name for f in dataclasses.fields(cls)} - {"router", "router_kwargs"}
        values = {k: m.get(k, defaults[k]) for k in keys}
        return cls(router=d["router"], router_kwargs=d.get("router_args") or {}, **{**values, **changes})

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    # -- the rules --------------------------------------------------------------------------------------
    def check(self) -> None:
        """Every rule on these keys, in one place (ConfigError naming the ``model.*`` key)."""
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"model.top_k={self.top_k} must be between 1 and model.num_experts={self.num_experts}")
        if self.moe_every < 1:
            raise ConfigError(f"model.moe_every={self.moe_every} must be positive")
        for key in ("moe_last", "shared_experts", "balance_window"):
            val = getattr(self, key)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ConfigError(f"model.{key}={val!r} must be an integer >= 0")
        if self.experts_impl not in EXPERTS_IMPLS:
            raise ConfigError(f"model.experts_impl={self.experts_impl!r} must be one of {', '.join(EXPERTS_IMPLS)}")
        if self.shared_experts and self.expert_parallel:
            raise ConfigError(f"model.shared_experts={self.shared_experts} with model.expert_parallel=true is not "
                              f"supported (the expert-parallel layer does not carry shared experts); set one of them off")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ConfigError(f"model.balance_scope={self.balance_scope!r} must be one of {', '.join(BALANCE_SCOPES)}")
        if self.balance_window and self.balance_scope != "global":
            raise ConfigError(f"model.balance_window={self.balance_window} needs model.balance_scope=global")
        self._check_null_experts()

    def _check_null_experts(self) -> None:
        """Integers >= 0; not for a router that pins its own mix (moepp); none with expert parallelism."""
        for key in NULL_EXPERT_KEYS:
            val = getattr(self, key)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ConfigError(f"model.{key}={val!r} must be an integer >= 0")
        keys_set = [f"model.{k}={getattr(self, k)}" for k in NULL_EXPERT_KEYS if getattr(self, k)]
        pinned = pinned_mix(get_router(self.router))
        if pinned is not None and keys_set:
            raise ConfigError(f"router {self.router!r} pins its null experts ({pinned.describe()}); "
                              f"{', '.join(keys_set)} is for the other routers (run {self.router} in a spec without it)")
        if self.expert_parallel and (pinned is not None or keys_set):
            raise ConfigError(f"zero-computation experts ({', '.join(keys_set) or self.router}) with "
                              f"model.expert_parallel=true are not supported; set one of them off")

    # -- what the builders ask ----------------------------------------------------------------------------
    def is_moe_block(self, i: int, depth: int) -> bool:
        """Block ``i`` (0-based, of ``depth``) routes when it is a ``moe_every``-th block counted from the last
        (the last block always routes) and, with ``moe_last`` > 0, one of the last ``moe_last`` blocks (MoGE's
        and V-MoE's "Last2": ``moe_last=2``); every other block gets the equal-active-FLOP dense FFN."""
        return is_moe_block(i, depth, self.moe_every, self.moe_last)

    def for_block(self, i: int, depth: int) -> "MoEConfig":
        """This config for block ``i``: itself where the block routes, the dense FFN's otherwise."""
        return self if self.is_moe_block(i, depth) else self.replace(router="dense", router_kwargs={})

    @property
    def is_dense(self) -> bool:
        return bool(get_router(self.router).is_dense)

    def null_mix(self) -> NullMix:
        """The layer's zero-computation experts: the spec's keys, or the router's pinned mix (none for dense)."""
        if self.is_dense:
            return NullMix()
        spec_mix = NullMix.from_keys(self.zero_experts, self.copy_experts, self.constant_experts)
        return resolve_mix(get_router(self.router), spec_mix, self.router)


def is_moe_block(i: int, depth: int, moe_every: int = 1, moe_last: int = 0) -> bool:
    """The rule of :meth:`MoEConfig.is_moe_block`, for callers without a config."""
    from_last = depth - 1 - i
    return from_last % moe_every == 0 and (moe_last <= 0 or from_last < moe_last)


MOE_CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(MoEConfig)) - {"router"}  # the keyword form's names
