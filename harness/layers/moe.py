"""The MoE layer's public names, where they have always been imported from.

``harness.moe`` (kept for plugins) re-exports this module. The code lives in one module per concern:
:mod:`.ffn` (activation, the init rule), :mod:`.experts` (``ExpertBank``), :mod:`.moe_layer`
(``MoELayer`` and its steps), :mod:`.dense` (``DenseFFN``), :mod:`.expert_parallel`, :mod:`.config`
(``MoEConfig``, the FFN side of a model) and :mod:`.build` (``build_ffn``). Nothing in ``harness.layers``
imports this module, so it can import all of them.
"""
from __future__ import annotations

from .build import build_ffn, is_moe_block
from .config import MoEConfig
from .dense import DenseFFN
from .experts import ExpertBank
from .ffn import activation_fn, ffn_init_
from .moe_layer import STEPS, Dispatch, MoELayer

__all__ = ["STEPS", "DenseFFN", "Dispatch", "ExpertBank", "MoEConfig", "MoELayer", "activation_fn", "build_ffn",
           "ffn_init_", "is_moe_block"]
