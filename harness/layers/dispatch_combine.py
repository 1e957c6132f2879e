"""The MoE layer's permute plan and weighted combine in one C++ call each (``csrc/dispatch_combine.cpp``).

Why: at the default LM preset's size (1,024 tokens, d 64, E 8, top-2, one thread) the Python permute
(bincount, a stable argsort, arange/repeat, two index ops, the capacity mask) and combine (weight gather,
multiply, ``index_add_`` and their autograd nodes) are ~20 small ATen ops per layer forward + backward;
:class:`~harness.layers.moe_layer.MoELayer` calls these instead where they apply (CPU, float32, no
zero-computation experts), and its Python steps elsewhere. Both compute the same bits (the plan is
integer; the combine's float operations are the composite's, in its order: ``tests/test_dispatch_combine.py``
checks outputs and gradients with ``torch.equal``), so no recorded number depends on which ran.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import native


@functools.lru_cache(maxsize=1)
def extension() -> Any | None:
    return native.load("harness_dispatch_combine", Path(__file__).with_name("csrc") / "dispatch_combine.cpp",
                       "the MoE permute/combine")


def available() -> bool:
    return extension() is not None


def applies(x: Tensor) -> bool:
    """Whether the C++ plan and combine run for a layer input ``x`` (else the Python steps do)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


def plan(flat: Tensor, used: Tensor | None, num_tokens: int, num_experts: int,
         capacity: int | None) -> tuple[Tensor, Tensor, Tensor, int]:
    """(order, token, counts, dropped) of :meth:`MoELayer.permute`: the kept k-major slots stable-sorted by
    expert, each one's token, the slots per expert after the capacity drop, and how many were dropped."""
    order, token, counts, dropped = extension().plan(
        flat.contiguous(), used.contiguous() if used is not None else None, num_tokens, num_experts,
        -1 if capacity is None else capacity)
    return order, token, counts, int(dropped)


class WeightedCombine(torch.autograd.Function):
    """``y[token[p]] += out[p] * slot_weights[order[p]]`` into zeros [T, d]; one C++ call each way."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, slot_weights: Tensor, order: Tensor, token: Tensor, num_tokens: int) -> Tensor:
        ctx.save_for_backward(out, slot_weights, order, token)
        return extension().combine_forward(out, slot_weights, order, token, num_tokens)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out, w, order, token = ctx.saved_tensors
        g_out, g_w = extension().combine_backward(grad, out, w, order, token, ctx.needs_input_grad[0],
                                                  ctx.needs_input_grad[1])
        return (g_out if ctx.needs_input_grad[0] else None, g_w if ctx.needs_input_grad[1] else None,
                None, None, None)


def combine(out: Tensor, slot_weights: Tensor, order: Tensor, token: Tensor, num_tokens: int) -> Tensor:
    """[S, d] expert outputs in plan order -> [T, d], each weighted by its slot's combine weight."""
    return WeightedCombine.apply(out, slot_weights, order, token, num_tokens)
