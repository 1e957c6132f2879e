"""The expert kernels behind one switch, ``model.experts_impl``: how expert e runs on its segment.

Every kernel takes the expert-sorted rows ``x_sorted`` ([S, d]: expert e's slots are the e-th
contiguous segment, ``counts[e]`` long, as :meth:`harness.layers.moe_layer.MoELayer.permute`
plans them) and returns ``[S, d]`` in the same order. They compute the same function; they
differ in how the E small GEMMs are issued, so only ``loop`` reproduces the harness's numbers
bit for bit (it is the shipped default, and what the regression goldens were trained with).

``loop``
    :meth:`ExpertBank.forward_segments`: a Python loop over the experts, two ``addmm`` each
    (one host sync: ``counts.tolist()``). Bit-identical to every earlier revision.
``loop_recompute``
    The loop's arithmetic as one autograd node that keeps less for backward: the activation
    output is recomputed and the gathered rows are re-gathered from the layer input
    (:mod:`.segment_mlp`). Bit-identical to ``loop``; pays one activation and one gather per
    backward for ``S * (d_ff + d)`` fewer saved floats per layer.
``padded_bmm``
    Scatter the slots into a zero-padded ``[E, C_max, d]`` buffer (``C_max`` = the largest
    count: the one host sync), two ``torch.baddbmm`` over all experts, gather the real rows
    back. No per-expert Python loop; pays ``E * C_max / S - 1`` extra FLOPs for the padding
    (0 when the load is perfectly balanced). Padded rows receive a zero gradient, so the
    weight gradients are exact.
``fused``
    ``loop_recompute``'s arithmetic in a C++ extension (:mod:`.fused_experts`, ``csrc/segment_mlp.cpp``):
    one call forward and one backward per layer, experts in parallel when there is more than one
    intra-op thread. Bit-identical to ``loop`` at one thread; built on first use (or at install);
    where it cannot be built, on CUDA or under autocast it runs ``loop_recompute`` (the same numbers).
``grouped_mm``
    ``torch.nn.functional.grouped_mm`` with int32 cumulative offsets: one grouped GEMM per
    linear map, no padding and no host sync at all. The fast path on CUDA in bfloat16 (SM >= 80,
    ``d_model`` and ``d_ff`` multiples of 8); on CPU it is correct (fwd + bwd) but slow.
    Under autocast the inputs and weights are cast to the autocast dtype first
    (``grouped_mm`` is not on autocast's op lists).
``auto``
    On CPU in float32 ``fused`` where its extension is built (:func:`resolve`: measured fastest at the
    default LM preset, and the loop's bits); otherwise :func:`pick` per call, from the device, the compute
    dtype and the shapes (see there for the measured CPU crossover: grouped_mm for small experts, else loop).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..catalog import Registry
from . import fused_experts
from .segment_mlp import SUPPORTED_ACTIVATIONS, segment_mlp

# ``bank`` below is a :class:`harness.layers.experts.ExpertBank` (w1 [E, d, f], b1 [E, f], w2 [E, f, d],
# b2 [E, d], act, num_experts, d_model, d_ff); not imported here: experts.py imports this module.
Bank = nn.Module

KERNELS: Registry[Callable[..., Tensor]] = Registry("expert kernel", error=ValueError)  # filled below the kernels
EXPERTS_IMPLS: tuple[str, ...]  # ("auto", *KERNELS in order), set once the kernels are registered (below)
DEFAULT_IMPL = "loop"  # bit-identical to the per-expert loop the goldens were trained with

Counts = Tensor | list[int]
Source = tuple[Tensor, Tensor] | None  # (layer input [T, d], token [S]) with x_sorted == input[token], or None


def check_impl(name: str) -> str:
    if name not in EXPERTS_IMPLS:
        raise ValueError(f"experts_impl {name!r} is not one of {', '.join(EXPERTS_IMPLS)}")
    return name


def has_grouped_mm() -> bool:
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _grouped_mm_fn() -> Callable[..., Tensor]:
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise RuntimeError(f"experts_impl='grouped_mm' needs torch.nn.functional.grouped_mm "
                           f"(torch {torch.__version__} has none); use padded_bmm")
    return fn


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's where autocast is on for ``x``'s device, else ``x``'s."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


# The CPU crossover of ``auto`` (measured with ``harness bench`` and ``benchmarks/model_step.py``,
# docs/speed.md; see :func:`pick`): grouped_mm on CPU when one expert's GEMM work, mean rows per
# expert x d_ff, is at most this much, else loop.
CPU_GROUPED_MAX_WORK = 256 * 128


def pick(device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int, rows: int, num_experts: int) -> str:
    """The kernel ``auto`` runs for one call.

    CUDA: ``grouped_mm`` in bfloat16 where it exists and the shapes meet its 16-byte alignment
    (``d_model``, ``d_ff`` multiples of 8) on SM >= 80; otherwise ``padded_bmm`` (one batched
    GEMM instead of E small launches and no per-expert host work; float16 grouped_mm needs a
    cuBLASLt that torch 2.14's wheels may lack, so it is never picked). Not measured here (no GPU
    on the development machines): ``scripts/gpu_check.sh`` times all four in bf16.

    CPU: ``grouped_mm`` when the mean rows per expert times ``d_ff`` is at most
    ``CPU_GROUPED_MAX_WORK`` (256 x 128), else ``loop``. Measured on a 2-core AMD EPYC, 1 thread,
    float32, E=8, k=2, d_model 64, ``harness bench`` (21 interleaved repeats, random-init router),
    time relative to the loop kernel, median [IQR]:

    ======  =====  ==============  =================  =================
    d_ff    tokens rows x d_ff     grouped_mm / loop  padded_bmm / loop
    ======  =====  ==============  =================  =================
    128     512    128 x 128       0.84 [0.11]        0.81 [0.21]
    128     1024   256 x 128       0.95 [0.11]        0.96 [0.14]
    128     2048   512 x 128       1.04 [0.13]        1.14 [0.11]
    128     4096   1024 x 128      1.12 [0.11]        1.24 [0.20]
    512     512    128 x 512       1.07 [0.15]        1.09 [0.17]
    512     2048   512 x 512       1.18 [0.13]        1.41 [0.28]
    1024    8192   2048 x 1024     1.13-1.33          1.13-1.31 (d_model 64-256)
    ======  =====  ==============  =================  =================

    and at model level (``benchmarks/model_step.py``, the default LM preset: 256 rows x 128, a
    router that trains and so loads its experts unevenly; 21 rounds of 3 steps) every router's
    training step on grouped_mm took 0.79-0.94x its step on the loop (ratios of medians; smoe 0.79). padded_bmm is
    never picked on CPU: it pays for the fullest expert on every expert, and with a trained
    router's uneven loads each router's step took 1.0-1.7x (median 1.3) its loop step. With
    small experts the loop's per-expert op overhead dominates and one grouped GEMM per linear map
    wins; with larger ones the per-expert ``addmm`` is as fast as a grouped one and the loop's
    cache-hot activation between its two GEMMs wins. ``auto`` is not the spec default: only
    ``loop`` (and ``loop_recompute``) is bit-identical to earlier revisions.
    """
    if device.type == "cuda":
        if dtype == torch.bfloat16 and has_grouped_mm() and d_model % 8 == 0 and d_ff % 8 == 0:
            try:
                major, _ = torch.cuda.get_device_capability(device)
            except (RuntimeError, AssertionError):  # pragma: no cover - no driver
                major = 0
            if major >= 8:
                return "grouped_mm"
        return "padded_bmm"
    if has_grouped_mm() and 0 < rows and rows * d_ff <= CPU_GROUPED_MAX_WORK * num_experts:
        return "grouped_mm"
    return "loop"


def resolve(impl: str, bank: Bank, x_sorted: Tensor) -> str:
    """``impl`` itself, or for ``auto`` the kernel for this call: on CPU in float32 ``fused`` wherever its C++
    extension is built (with the C++ permute plan the MoE layer then runs gather, experts and combine as one
    node: ``MoELayer.fused_experts_and_combine``), else the kernel :func:`pick` chooses.

    Why ``fused`` on CPU (docs/speed.md, issue 33): at the default LM preset (1,024 tokens, d 64, d_ff 128,
    E 8, top-2; 1 thread, 2-core AMD EPYC, 40 interleaved rounds, ``benchmarks/step_breakdown.py``) the whole
    smoe training step took 22.30 ms on it against 22.89 on grouped_mm (dense 18.19), and the layer alone
    (``harness bench``-style A/B) 0.80x grouped_mm's time; its bits are the ``loop`` kernel's at one thread
    (grouped_mm's are not), whatever the loads."""
    if impl != "auto":
        return impl
    if (x_sorted.device.type == "cpu" and x_sorted.dtype == torch.float32 and compute_dtype(x_sorted) == torch.float32
            and bank.activation in SUPPORTED_ACTIVATIONS and fused_experts.available()):
        return "fused"
    return pick(x_sorted.device, compute_dtype(x_sorted), bank.d_model, bank.d_ff, x_sorted.shape[0],
                bank.num_experts)


# -- helpers -------------------------------------------------------------------------------------

def _counts_tensor(counts: Counts, device: torch.device) -> Tensor:
    if isinstance(counts, Tensor):
        return counts.to(device=device, dtype=torch.long)
    return torch.tensor(list(counts), dtype=torch.long, device=device)


def _expert_of_row(counts: Tensor, rows: int) -> Tensor:
    """[S] long: the expert of every expert-sorted row (``output_size`` given: no host sync)."""
    E = counts.shape[0]
    return torch.repeat_interleave(torch.arange(E, device=counts.device), counts, output_size=rows)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (``grouped_mm``'s backward needs one)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001, D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001, D102
        return grad.contiguous()


# -- the kernels ---------------------------------------------------------------------------------

def _counts_list(counts: Counts) -> list[int]:
    """The per-expert row counts as a list (the one host sync of the loop kernels)."""
    return counts.tolist() if isinstance(counts, Tensor) else list(counts)


def run_loop(bank: Bank, x_sorted: Tensor, counts: Counts, source: Source = None) -> Tensor:
    """Today's per-expert loop (:meth:`ExpertBank.forward_segments`), unchanged."""
    return bank.forward_segments(x_sorted, _counts_list(counts))


def run_padded_bmm(bank: Bank, x_sorted: Tensor, counts: Counts, source: Source = None) -> Tensor:
    """Zero-padded ``[E, C_max, d]`` buffer, two ``baddbmm``, the real rows gathered back.

    One host sync (``C_max``), none when ``counts`` is already a list (expert parallelism).
    """
    E, S, d = bank.num_experts, x_sorted.shape[0], bank.d_model
    cmax = max(counts) if isinstance(counts, list) else int(counts.max()) if S else 0
    if S == 0 or cmax == 0:
        return x_sorted.new_zeros(0, d)
    c = _counts_tensor(counts, x_sorted.device)
    eid = _expert_of_row(c, S)
    starts = torch.cumsum(c, 0) - c
    slot = eid * cmax + (torch.arange(S, device=x_sorted.device) - starts.index_select(0, eid))
    buf = x_sorted.new_zeros(E * cmax, d).index_copy(0, slot, x_sorted).view(E, cmax, d)
    h = bank.act(torch.baddbmm(bank.b1.unsqueeze(1), buf, bank.w1))
    y = torch.baddbmm(bank.b2.unsqueeze(1), h, bank.w2)
    return y.reshape(E * cmax, d).index_select(0, slot)


def run_grouped_mm(bank: Bank, x_sorted: Tensor, counts: Counts, source: Source = None) -> Tensor:
    """Two ``grouped_mm`` over the jagged segments (int32 cumulative offsets); biases by row expert."""
    S = x_sorted.shape[0]
    if S == 0:
        return x_sorted.new_zeros(0, bank.d_model)
    gmm = _grouped_mm_fn()
    dt = compute_dtype(x_sorted)
    if x_sorted.device.type == "cuda" and dt not in (torch.bfloat16, torch.float16):
        raise RuntimeError(f"experts_impl='grouped_mm' on CUDA needs bfloat16 (train.dtype=bfloat16), got {dt}; "
                           f"use padded_bmm or auto")
    c = _counts_tensor(counts, x_sorted.device)
    offs = torch.cumsum(c, 0, dtype=torch.int32)
    eid = _expert_of_row(c, S)
    with torch.autocast(x_sorted.device.type, enabled=False):
        a = x_sorted.to(dt)
        h = _ContiguousGrad.apply(gmm(a, bank.w1.to(dt), offs=offs))
        h = bank.act(h + bank.b1.to(dt).index_select(0, eid))
        y = _ContiguousGrad.apply(gmm(h.contiguous(), bank.w2.to(dt), offs=offs))
        return y + bank.b2.to(dt).index_select(0, eid)


def run_loop_recompute(bank: Bank, x_sorted: Tensor, counts: Counts, source: Source = None) -> Tensor:
    """The loop as one autograd node keeping only the pre-activation (:mod:`.segment_mlp`); the plain
    loop under autocast or for an activation it has no backward for."""
    c = _counts_list(counts)
    if bank.activation not in SUPPORTED_ACTIVATIONS or compute_dtype(x_sorted) != x_sorted.dtype:
        return bank.forward_segments(x_sorted, c)
    return segment_mlp(x_sorted, c, bank.activation, bank.w1, bank.b1, bank.w2, bank.b2, source=source)


def run_fused(bank: Bank, x_sorted: Tensor, counts: Counts, source: Source = None) -> Tensor:
    """``loop_recompute`` in one C++ call each way (:mod:`.fused_experts`); ``loop_recompute`` itself off CPU,
    under autocast, for an activation it has no backward for, or where the extension could not be built."""
    if (x_sorted.device.type != "cpu" or bank.activation not in SUPPORTED_ACTIVATIONS
            or compute_dtype(x_sorted) != x_sorted.dtype or not fused_experts.available()):
        return run_loop_recompute(bank, x_sorted, counts, source)
    if x_sorted.shape[0] == 0:  # no rows: the loop's empty output, so the experts get no gradient (as loop's)
        return run_loop(bank, x_sorted, counts, source)
    return fused_experts.fused_segment_mlp(x_sorted, _counts_list(counts), bank.activation, bank.w1, bank.b1,
                                           bank.w2, bank.b2, source=source)


# Every kernel takes ``(bank, x_sorted, counts, source=None)``; ``source`` is used by loop_recompute and fused.
# The order of addition is the order ``model.experts_impl`` lists them in (``EXPERTS_IMPLS``, after ``auto``).
for _name, _fn in (("loop", run_loop), ("loop_recompute", run_loop_recompute), ("fused", run_fused),
                   ("padded_bmm", run_padded_bmm), ("grouped_mm", run_grouped_mm)):
    KERNELS.add(_name, _fn)
EXPERTS_IMPLS = ("auto", *KERNELS.in_order())  # "auto" picks one of KERNELS per call (:func:`resolve`)


def run(impl: str, bank: Bank, x_sorted: Tensor, counts: Counts, source: Source = None) -> Tensor:
    """Expert e on the e-th segment of ``x_sorted`` with the kernel ``impl`` names (``auto`` resolved).

    ``source``: where the rows were gathered from (``MoELayer.permute``); only ``loop_recompute`` uses it."""
    return KERNELS[resolve(impl, bank, x_sorted)](bank, x_sorted, counts, source)
