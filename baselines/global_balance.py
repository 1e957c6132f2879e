"""SMoE with global-batch load balancing (Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873).

``smoe_global`` is ``smoe`` -- same gate, top-k, combine weights, balance weight 0.01 and z-loss -- whose MoE
layer computes the Switch balance loss's f_i over the global batch instead of the micro-batch
(:class:`harness.routing.losses.GlobalBalance`: counts all-reduced over the data-parallel ranks, accumulated
over the optimiser step, plus a buffer of the ``balance_window`` = 15 previous steps). It exists so that the
claims table (``tasks/claims/papers.yaml``, which compares routers within one preset) can judge global- against
micro-batch balancing on the same runs as every other router: ``--set model.balance_scope=global`` does the
same for any aux-loss router, but its runs carry the router's own name.

Why 15: the LM default trains 32 sequences per step; 16 steps are 512 sequences, the global balance batch of
the paper's comparison (balance batch 4 vs 512 sequences, its Table 1 as quoted in issue 31 -- the paper text
was not read here). In a single process without the buffer the global batch *is* the micro-batch and
``smoe_global`` would be ``smoe`` with another router-init stream (an A/A control, like ``smoe@aa``).
"""
from __future__ import annotations

from typing import Any, ClassVar

from harness.routing.registry import register_router

from .smoe import SMoERouter


@register_router("smoe_global")
class SMoEGlobalRouter(SMoERouter):
    """SMoE whose balance loss counts expert loads over the global batch (and the 15 steps before it)."""

    description = ("SMoE with global-batch balancing (Qiu et al. 2025): f_i over the DP ranks, the step and "
                   "a buffer of the 15 previous steps (512 sequences at the LM default)")
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    balance_scope: ClassVar[str] = "global"   # read by harness.layers.moe_layer.MoELayer.route
    balance_window: ClassVar[int] = 15
