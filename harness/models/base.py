"""``MoEModel``: the contract both models keep (``MoEDecoderLM``, ``MoEVisionTransformer``) and every suite's
model must keep; ``harness.conformance.check_moe_model`` checks it for both.

* ``moe_config``: the :class:`~harness.layers.config.MoEConfig` its FFNs were built from;
* ``moe_layers()``: its FFNs that route, in block order -- the :class:`~harness.layers.moe_layer.MoELayer`
  instances (expert-parallel twins included), never the dense baseline's blocks (found by type:
  :func:`routing_layers`; before issue 32, by ``hasattr(ffn, "experts")``);
* ``on_step(step, total_steps)``: before each optimiser step, to every routing layer's router -- the one
  channel a router's schedule reads (``Router.on_step``);
* ``forward(inputs, step=0, total_steps=1) -> (output, routings)``: one :class:`~harness.routing.router.Routing`
  per routing layer, in ``moe_layers()`` order, for a forward in training or evaluation.
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

from torch import Tensor, nn

from ..layers.config import MoEConfig
from ..layers.moe_layer import MoELayer
from ..routing.router import Routing


@runtime_checkable
class MoEModel(Protocol):
    moe_config: MoEConfig

    def moe_layers(self) -> list[MoELayer]: ...

    def on_step(self, step: int, total_steps: int) -> None: ...

    def forward(self, inputs: Tensor, step: int = 0, total_steps: int = 1) -> tuple[Tensor, list[Routing]]: ...


def routing_layers(ffns: Iterable[nn.Module]) -> list[MoELayer]:
    """The FFNs among ``ffns`` that route (MoE layers; the dense baseline's FFN does not)."""
    return [f for f in ffns if isinstance(f, MoELayer)]


def step_routers(model: MoEModel, step: int, total_steps: int) -> None:
    """``on_step`` to the router of every routing layer of ``model`` (both models' ``on_step``)."""
    for layer in model.moe_layers():
        layer.router.on_step(step, total_steps)
