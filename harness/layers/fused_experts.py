"""The ``fused`` expert kernel: the per-expert loop in one C++ call forward and one backward.

``experts_impl=fused`` runs the arithmetic of ``loop_recompute`` (:mod:`.segment_mlp`: the loop's
``addmm``s, keeping only the pre-activation for backward) in a small C++ extension,
``csrc/segment_mlp.cpp``: the same ATen ops on the same operands in the same order, so outputs and
gradients equal the ``loop`` kernel's bit for bit at one thread (``tests/test_fused_experts.py``).
It removes the Python and autograd bookkeeping around the ~8 small ops each expert costs per step
(one autograd node per layer instead of ~4 per expert). With more than one intra-op thread the
experts run in parallel (``at::parallel_for``), each expert's GEMMs on one thread; the bits can then
differ from ``loop``'s multi-threaded GEMMs.

The extension is built and loaded by :mod:`.cpp` (on first use, about a minute, or at install by
``scripts/install.sh``; cached per checkout under torch's extension root; where it cannot be built the
kernel logs one line and runs ``loop_recompute``, which computes the same bits; a build killed half-way:
see :mod:`.cpp`). CPU tensors only: on CUDA, or under autocast, it runs ``loop_recompute`` too.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import native
from .segment_mlp import save_for_backward, saved_for_backward

CSRC = Path(__file__).with_name("csrc")
ACT_CODES = {"gelu": 0, "relu": 1, "silu": 2}  # csrc/segment_mlp.cpp ``enum Act``


@functools.lru_cache(maxsize=1)
def extension() -> Any | None:
    """The compiled extension module, or None (logged once) where it cannot be built."""
    if os.environ.get("HARNESS_NO_FUSED_EXPERTS"):
        return None
    return native.load("harness_segment_mlp", CSRC / "segment_mlp.cpp", "experts_impl=fused",
                       "loop_recompute, the same numbers")


def available() -> bool:
    return extension() is not None


class FusedSegmentMLP(torch.autograd.Function):
    """``y[seg_e] = act(x[seg_e] @ w1[e] + b1[e]) @ w2[e] + b2[e]``, one C++ call each way."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, counts: list[int], act: str, src_x: Tensor | None, src_token: Tensor | None,
                w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        out, pre = extension().forward(x, counts, ACT_CODES[act], w1, b1, w2, b2)
        ctx.counts, ctx.act = counts, act
        save_for_backward(ctx, x, src_x, src_token, pre, w1, w2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, pre, w1, w2 = saved_for_backward(ctx)
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[5:])
        gx, gw1, gb1, gw2, gb2 = extension().backward(grad, x, pre, ctx.counts, ACT_CODES[ctx.act], w1, w2,
                                                       need_x, need_w)
        return (gx if need_x else None, None, None, None, None,
                *((gw1, gb1, gw2, gb2) if need_w else (None,) * 4))


def fused_segment_mlp(x: Tensor, counts: list[int], act: str, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                      source: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """[S, d] expert-sorted rows -> [S, d] (as :func:`harness.layers.segment_mlp.segment_mlp`)."""
    src_x, src_token = (source[0].detach(), source[1]) if source is not None else (None, None)
    return FusedSegmentMLP.apply(x, counts, act, src_x, src_token, w1, b1, w2, b2)


class FusedMoE(torch.autograd.Function):
    """The MoE FFN after the plan, one C++ call each way: gather the slots' rows of ``x``, expert e on its
    segment, ``y[token[p]] += out[p] * slot_weights[order[p]]`` (``csrc/segment_mlp.cpp`` ``moe_forward``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, slot_weights: Tensor, order: Tensor, token: Tensor, counts: list[int],
                act: str, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        y, xs, pre, h, out = extension().moe_forward(x, token, order, slot_weights, counts, ACT_CODES[act],
                                                     w1, b1, w2, b2)
        ctx.counts, ctx.act, ctx.num_tokens = counts, act, x.shape[0]
        # kept, not recomputed (unlike ``fused`` alone): at d 64 the activation is ~0.3 ms a layer, and the
        # gathered rows, pre-activation and activation of 2,048 slots are ~2.5 MB
        ctx.save_for_backward(xs, slot_weights, order, token, pre, h, out, w1, w2)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xs, w, order, token, pre, h, out, w1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_w = any(need[6:])
        gx, g_slot, gw1, gb1, gw2, gb2 = extension().moe_backward(
            grad, ctx.num_tokens, xs, token, order, w, pre, h, out, ctx.counts, ACT_CODES[ctx.act], w1, w2,
            need[0], need[1], need_w)
        return (gx if need[0] else None, g_slot if need[1] else None, None, None, None, None,
                *((gw1, gb1, gw2, gb2) if need_w else (None,) * 4))


def moe_applies(bank: Any, x: Tensor) -> bool:
    """Whether :func:`fused_moe` runs for this bank and layer input: CPU, float32 with autocast off, an
    activation the C++ knows, and the extension built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and bank.activation in ACT_CODES and available())


def fused_moe(bank: Any, x: Tensor, slot_weights: Tensor, order: Tensor, token: Tensor, counts: list[int]) -> Tensor:
    """[T, d] layer input -> [T, d] weighted sum of each token's experts' outputs (the plan: ``order``,
    ``token``, ``counts`` from :mod:`.dispatch_combine`); the ``loop`` kernel's bits with the Python steps."""
    return FusedMoE.apply(x, slot_weights, order, token, counts, bank.activation, bank.w1, bank.b1, bank.w2, bank.b2)
