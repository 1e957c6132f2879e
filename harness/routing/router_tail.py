"""The fused router tail: softmax -> top-k -> combine weights -> balance loss -> z-loss in one C++ call each way.

What it computes is the composite of ``baselines/smoe.py`` (``softmax_topk``, ``gate_weights``) and
:mod:`harness.routing.losses`, equation for equation, on [T, E] fp32 router scores:

* ``p = softmax(s)`` over the experts (Switch eq. 1), unless the caller passes the probabilities;
* the k largest ``p`` per token, as ``torch.topk`` chooses them, ties included (below);
* combine weights ``g_j = p_j / max(sum_j p_j, 1e-9)`` over the k chosen, or ``p_j`` without renormalisation
  (GShard / Mixtral; Switch eq. 2 for k = 1);
* balance ``alpha * E * sum_i f_i P_i``, ``P_i = mean_t p_ti``, ``f_i`` the share of first choices, of all
  slots, or k times that (Switch eq. 4; the ``balance_fraction`` conventions of :mod:`.losses`);
* z-loss ``beta * mean_t (logsumexp_i l_ti)^2`` (ST-MoE eq. 5).

Backward is written by hand from the same equations: through the renormalisation (with ``clamp_min``'s rule:
the denominator passes gradient where the sum is >= 1e-9; ``d p_j = (g_j - sum_m g_m w_m) / S``), into the
chosen probabilities and, for the balance loss, every probability (``alpha E f_i / T``), then through the
softmax (``p_i (dp_i - sum_m dp_m p_m)``); the z-loss adds ``2 beta lse_t / T * softmax(l)_ti``. No double
backward (``create_graph=True`` is refused in one line; nothing in the harness differentiates twice).

**Why.** At the default LM size (T = 1,024 tokens, E = 8, k = 2) the composite is ~40 small ATen ops costing
~0.65-1.1 ms forward + backward per layer at one thread on the development VM (docs/speed.md, issue 33): ATen's
softmax over a last dimension of 8 alone takes its slow path (~150 us forward, ~65 us backward), ``topk``
~45 us, and the rest is per-op overhead of ``div``, ``sum``, ``pow``, ``logsumexp``, ``bincount`` and their
backward nodes. Measured (2026-12-03, 1 thread, load ~1, interleaved, median [IQR]): smoe's softmax + tail
755 [642, 933] us -> 195 [148, 233] us; the tail alone on given probabilities (xmoe, moge, competesmoe, whose
own softmax stays ATen's) 795 -> 505 us with that softmax; ``harness bench --routers smoe,xmoe,moge --tokens
1024 --d-model 64 --d-ff 128 --threads 1`` (5 runs each, median of the runs' medians): smoe's router alone
1.08 -> 0.35 ms fwd+bwd, the smoe layer 7.70 -> 6.41 ms, 1.58x -> 1.42x the dense FFN. The kernel itself is
~30 us forward and ~15 us backward of that (rows in blocks of 256, transposed so that the per-token
reductions and the top two run in vector lanes); the rest is autograd's and Python's bookkeeping.

**Where the bits differ.** The same operations, some in another order or form: ``exp`` is a branch-free
polynomial (Cephes' ``expf``, < 1 ulp) where ATen's softmax uses SLEEF's; the softmax is otherwise ordered as
ATen's last-dimension kernel orders it (max, ``exp(s - max)``, the sum over experts in order, the reciprocal
times each term), so the probabilities are within 4 ulp of ATen's (mostly equal); the column sums of the
probabilities, the counts and the two losses are summed in float64 and rounded once; the renormalisation's
gradient is factored as above (renormalised k = 1 weights, ``w = 1``, get exactly 0 where the composite
leaves rounding noise). Weights, losses and gradients agree with the composite to ~2e-7 of the largest value
in fp32, and are within 1e-6 of the float64 answer wherever the composite is (``tests/test_fast_router_tail.py``,
a sweep over T, E, k, renormalisation, f_i convention and loss weights). The chosen experts are
``torch.topk``'s on these probabilities: where a token's top k are strictly ordered and strictly above the
rest, any selection agrees; otherwise (equal probabilities, e.g. equal logits) the row goes through a copy of
ATen's CPU selection (``TopKImpl.h``: ``nth_element`` / ``partial_sort`` with its comparator), which does *not*
break ties by the lower index, so the same experts come out. A token can only be routed differently from the
composite where two of its probabilities are within a few ulp of each other and the two softmaxes round them
apart differently: none in 20 million random tokens (E 8-64, k 1-4, logit scales 0.1-10).

**When.** ``baselines.smoe.softmax_topk`` and ``softmax_gate`` use it for fp32 CPU tensors with T > 0, outside
autocast, with the top-k experts (no given ``indices``: gumbel second expert), and, when there is a balance
loss, the micro-batch balance scope (the global scope's counts live in :class:`~.losses.GlobalBalance`). All
else -- CUDA, bf16/fp16, float64, T = 0, non-finite scores, a replaced ``gate_weights`` -- runs the composite
unchanged. The extension is compiled by the project's one loader (:mod:`harness.native`) on first use (a minute;
``scripts/install.sh`` builds it at install) and cached under torch's extension root as
``harness_router_tail-<key>``, one per checkout; without a compiler (or with ``HARNESS_NO_FUSED_ROUTER=1``, or
``HARNESS_NO_CPP=1`` for every extension) it logs one line and every router runs the composite. The forward
and backward are the same bits at any thread count.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import native
from .losses import _ACTIVE_SCOPE, BALANCE_FRACTIONS

SOURCE = Path(__file__).with_name("csrc") / "router_tail.cpp"
BALANCE_CODES = {None: 0, "first": 1, "slots": 2, "k_slots": 3}  # csrc/router_tail.cpp ``enum Balance``


@functools.lru_cache(maxsize=1)
def extension() -> Any | None:
    """The compiled extension module, or None (logged once) where it cannot be built."""
    if os.environ.get("HARNESS_NO_FUSED_ROUTER"):
        return None
    # -fno-trapping-math lets the branch-free exp vectorise (no value changes); the loader adds
    # -ffp-contract=off, so every build and both clones of the row loops (AVX2 or not) give the same bits
    return native.load("harness_router_tail", SOURCE, "router tail", "the composite ATen ops",
                       extra_cflags=("-fno-trapping-math",))


def available() -> bool:
    return extension() is not None


def fused_tail(x: Tensor, logits: Tensor | None, *, softmax_inside: bool, top_k: int, renorm: bool,
               balance_weight: float, balance_fraction: str, z_loss_weight: float
               ) -> tuple[Tensor, Tensor, dict[str, Tensor]] | None:
    """(indices, weights, aux) of the tail on [T, E] ``x`` -- scores when ``softmax_inside``, else the
    probabilities -- with the z-loss of ``logits`` (``x`` itself when ``logits is x``). None when the
    extension is missing or a value is not finite (then the caller runs the composite). No eligibility
    checks beyond the kernel's own (fp32 or fp64 CPU, T > 0): :func:`router_tail` makes them."""
    ext = extension()
    if ext is None:
        return None
    z_on_x = softmax_inside and logits is x
    zl = None if (z_on_x or not z_loss_weight) else logits.contiguous()
    out = ext.tail(x.contiguous(), zl, softmax_inside, z_on_x, int(top_k), bool(renorm),
                   BALANCE_CODES[balance_fraction if balance_weight else None], float(balance_weight),
                   float(z_loss_weight))
    if not out:  # a NaN or infinite score: the composite decides (its NaN / inf rules are ATen's)
        return None
    weights, balance, z, idx = out
    aux: dict[str, Tensor] = {}
    if balance_weight:
        aux["balance"] = balance
    if z_loss_weight:
        aux["z_loss"] = z
    return idx, weights, aux


def router_tail(x: Tensor, logits: Tensor, *, softmax_inside: bool, top_k: int, renorm: bool,
                balance_weight: float, balance_fraction: str, z_loss_weight: float
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]] | None:
    """:func:`fused_tail` where it computes what the composite would (module docstring, "When"), else None."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] > 0
            and 1 <= top_k <= x.shape[1] and logits.dtype == torch.float32 and logits.shape == x.shape
            and logits.device.type == "cpu" and not torch.is_autocast_enabled("cpu")):
        return None
    if balance_weight and (balance_fraction not in BALANCE_FRACTIONS or _ACTIVE_SCOPE.get() is not None):
        return None  # an unknown convention raises in the composite; the global scope counts there
    return fused_tail(x, logits, softmax_inside=softmax_inside, top_k=top_k, renorm=renorm,
                      balance_weight=balance_weight, balance_fraction=balance_fraction,
                      z_loss_weight=z_loss_weight)
