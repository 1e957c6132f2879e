"""The ``loop_recompute`` expert kernel: the per-expert loop, keeping less for backward.

What autograd keeps for backward in the ``loop`` kernel (``ExpertBank.forward_segments``), per
MoE layer of S = T*k slots: the gathered expert input rows [S, d] (a copy of the layer input,
k times over), the pre-activation [S, d_ff] and the activation output [S, d_ff]. The equal-FLOP
dense FFN keeps [T, d] + 2 x [T, k*d_ff]: the same hidden activations, but its input once.

This kernel runs the same arithmetic inside one :class:`torch.autograd.Function` and keeps only
the pre-activation:

* the activation output is recomputed from it in backward, expert by expert (an elementwise op,
  as megablocks' ``memory_optimized_mlp`` does);
* the gathered rows are re-gathered from the layer input in backward when the layer says where
  they came from (``source = (x, token)``: ``x_sorted = x[token]``); the layer input is kept for
  the router's backward anyway, so nothing new is stored. Without a source they are kept.

Every value is computed by the same kernel on the same operands in the same order as
``forward_segments`` and autograd's ``AddmmBackward0`` / activation backward would, and a
recomputed elementwise op or gather gives the same bits, so outputs and gradients are
bit-identical to ``loop`` (``tests/test_segment_mlp.py`` checks torch.equal for every activation,
empty experts and ragged loads). The price is the recomputation: one activation and one gather
per layer and backward. Under autocast ``loop`` runs instead (autocast does not cast into the
preallocated ``out=`` buffers used here).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .ffn import activation_fn

SUPPORTED_ACTIVATIONS = ("gelu", "relu", "silu")


def _act_backward(name: str, grad: Tensor, pre: Tensor, out: Tensor) -> Tensor:
    """What autograd's ``GeluBackward0`` / ``ReluBackward0`` / ``SiluBackward0`` compute."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, out, 0)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, pre)
    raise ValueError(f"segment_mlp: no backward for activation {name!r}; one of {', '.join(SUPPORTED_ACTIVATIONS)}")


def save_for_backward(ctx: Any, x: Tensor, src_x: Tensor | None, src_token: Tensor | None, pre: Tensor,
                      w1: Tensor, w2: Tensor) -> None:
    """What a segment-MLP node keeps: the pre-activation and weights, and the rows -- or, given their source
    (``x == src_x[src_token]``), the source, which the layer keeps for the router anyway."""
    ctx.regather = src_x is not None
    if ctx.regather:
        ctx.save_for_backward(src_x, src_token, pre, w1, w2)
    else:
        ctx.save_for_backward(x, pre, w1, w2)


def saved_for_backward(ctx: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, pre, w1, w2)`` of :func:`save_for_backward`, the rows re-gathered where only their source was kept."""
    if ctx.regather:
        src_x, src_token, pre, w1, w2 = ctx.saved_tensors
        return src_x.index_select(0, src_token), pre, w1, w2  # the forward's rows, bit for bit
    return ctx.saved_tensors


class SegmentMLP(torch.autograd.Function):
    """``y[seg_e] = act(x[seg_e] @ w1[e] + b1[e]) @ w2[e] + b2[e]`` for the E contiguous segments."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, counts: list[int], act: str, src_x: Tensor | None, src_token: Tensor | None,
                w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        S = x.shape[0]
        live = [e for e, n in enumerate(counts) if n]
        W1, B1, W2, B2 = w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0)
        pre = x.new_empty(S, w1.shape[2])
        out = x.new_empty(S, w2.shape[2])
        xs, pres, outs = x.split(counts), pre.split(counts), out.split(counts)
        fn = activation_fn(act)  # the experts' own activation (harness.layers.ffn)
        for e in live:  # expert by expert: the activation reads rows the GEMM has just written (cache-hot)
            torch.addmm(B1[e], xs[e], W1[e], out=pres[e])
            torch.addmm(B2[e], fn(pres[e]), W2[e], out=outs[e])
        ctx.counts, ctx.act, ctx.live = counts, act, live
        save_for_backward(ctx, x, src_x, src_token, pre, w1, w2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, pre, w1, w2 = saved_for_backward(ctx)
        counts, live, act = ctx.counts, ctx.live, ctx.act
        fn = activation_fn(act)
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[5:])
        # every expert's slice of the stacked gradients is written below; an expert without rows gets 0
        new = torch.empty_like if len(live) == len(counts) else torch.zeros_like
        gw1, gb1, gw2, gb2 = new(w1), new(w1[:, 0]), new(w2), new(w2[:, 0])
        GW1, GB1, GW2, GB2 = gw1.unbind(0), gb1.unbind(0), gw2.unbind(0), gb2.unbind(0)
        W1t, W2t = w1.transpose(1, 2).unbind(0), w2.transpose(1, 2).unbind(0)
        grad = grad.contiguous()
        gs, xs, pres = grad.split(counts), x.split(counts), pre.split(counts)
        gx = torch.empty_like(x) if need_x else None
        gxs = gx.split(counts) if gx is not None else None
        for e in live:  # expert by expert, each product as AddmmBackward0 / the activation's backward forms it
            h = fn(pres[e])  # recomputed: the same bits as the forward's
            gpre = _act_backward(act, torch.mm(gs[e], W2t[e]), pres[e], h)
            if need_w:
                torch.mm(h.t(), gs[e], out=GW2[e])
                torch.sum(gs[e], 0, out=GB2[e])
                torch.mm(xs[e].t(), gpre, out=GW1[e])
                torch.sum(gpre, 0, out=GB1[e])
            if gxs is not None:
                torch.mm(gpre, W1t[e], out=gxs[e])
        if not need_w:
            gw1 = gb1 = gw2 = gb2 = None
        return gx, None, None, None, None, gw1, gb1, gw2, gb2


def segment_mlp(x: Tensor, counts: list[int], act: str, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                source: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """[S, d] expert-sorted rows -> [S, d], expert e on its ``counts[e]`` rows (one autograd node).

    ``source = (x_in, token)`` with ``x == x_in[token]``: backward re-gathers the rows instead of keeping them.
    """
    src_x, src_token = (source[0].detach(), source[1]) if source is not None else (None, None)
    return SegmentMLP.apply(x, counts, act, src_x, src_token, w1, b1, w2, b2)
