"""One timed step of each kind: the real layer's forward + backward (plain, or with the phase clock
read between the layer's own steps), the naive per-expert loop, and the router alone."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..layers.kernels import DEFAULT_IMPL
from ..layers.moe_layer import MoELayer
from ..routing.router import RouteContext, Routing
from .candidates import Candidate, Inputs, positions, route_context
from .timing import Clock, PhaseClock

# the MoE layer's steps (``harness.layers.moe_layer.STEPS``) -> the phases they are reported as
PHASE_OF_STEP = {"route": "router", "permute": "dispatch", "run_experts": "experts", "combine": "combine"}


def aux_total(routing: Routing | None) -> Tensor | None:
    if routing is None or not routing.aux_losses:
        return None
    vals = list(routing.aux_losses.values())
    total = vals[0]
    for v in vals[1:]:
        total = total + v
    return total


def _backward(y: Tensor, aux: Tensor | None, inp: Inputs) -> None:
    outs, grads = [y], [inp.g]
    if aux is not None and aux.requires_grad:
        outs.append(aux)
        grads.append(inp.one.to(aux.dtype))
    torch.autograd.backward(outs, grads)


def clear_grads(c: Candidate, inp: Inputs) -> None:
    inp.x.grad = None
    for p in c.module.parameters():
        p.grad = None


def moe_forward_phased(layer: MoELayer, x: Tensor, ctx: RouteContext, ph: PhaseClock) -> tuple[Tensor, Routing]:
    """``layer(x, ctx)`` itself, with the phase clock read as each of the layer's steps ends.

    ``MoELayer.forward`` calls ``mark`` after ``route``, ``permute``, ``run_experts`` and ``combine``,
    and around the experts a router runs through ``ctx.all_expert_outputs()`` (CompeteSMoE's
    competition), so that time counts as ``experts``, not ``router``. There is one forward: the
    instrumented run computes exactly what the plain run computes.
    """
    return layer(x, ctx, mark=lambda step: ph.mark(PHASE_OF_STEP[step]))


def naive_forward(layer: nn.Module, x: Tensor, ctx: RouteContext, ph: PhaseClock | None = None) -> tuple[Tensor, Routing]:
    """The per-expert boolean-mask loop of most published MoE code, on the layer's own weights.

    ``for e in range(E): mask = (idx == e).any(-1); out[mask] += w[mask, slot] * expert_e(x[mask])``
    """
    routing = layer.router(x, ctx)
    if ph is not None:
        ph.mark("router")
    idx, w = routing.indices, routing.weights.to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(layer.num_experts):
        hit = idx == e                                  # [T, k]
        mask = hit.any(-1)                              # tokens that chose expert e
        w_e = (w * hit).sum(-1)[mask].unsqueeze(-1)     # = w[mask, slot of e]
        x_e = x[mask]
        if ph is not None:
            ph.mark("dispatch")
        y_e = layer.experts.expert(e, x_e)
        if ph is not None:
            ph.mark("experts")
        out[mask] += w_e * y_e
        if ph is not None:
            ph.mark("combine")
    return out, routing


def run_plain(c: Candidate, inp: Inputs, clock: Clock) -> float:
    """Seconds for one forward + backward through the real layer (or the naive loop)."""
    clear_grads(c, inp)
    ctx = route_context(c, inp)
    t0 = clock.now()
    if c.kind == "naive":
        y, routing = naive_forward(c.module, inp.x, ctx)
    else:
        y, routing = c.module(inp.x, ctx)
    _backward(y, aux_total(routing), inp)
    return clock.now() - t0


def run_phased(c: Candidate, inp: Inputs, clock: Clock) -> dict[str, float]:
    """Seconds per phase of one instrumented forward + backward (plus ``total``)."""
    clear_grads(c, inp)
    ctx = route_context(c, inp)
    ph = PhaseClock(clock)
    if c.kind == "dense":
        y, routing = c.module(inp.x, ctx)
        ph.mark("experts")
    elif c.kind == "naive":
        y, routing = naive_forward(c.module, inp.x, ctx, ph)
    else:
        y, routing = moe_forward_phased(c.module, inp.x, ctx, ph)
    aux = aux_total(routing)
    ph.mark("aux_loss")
    _backward(y, aux, inp)
    ph.mark("backward")
    return {**ph.times, "total": ph.total}


def router_forward_time(router: nn.Module, c: Candidate, inp: Inputs, clock: Clock, inner: int = 3) -> float:
    """Median seconds of ``router(x, ctx)`` alone (grad mode on, as in training)."""
    fn = (lambda: c.cached_all) if c.cached_all is not None else None
    ts = []
    for _ in range(inner):
        ctx = route_context(c, inp, expert_fn=fn)
        t0 = clock.now()
        router(inp.x, ctx)
        ts.append(clock.now() - t0)
    return float(np.median(ts))


def router_step_time(router: nn.Module, x: Tensor, token_ids: Tensor, clock: Clock, *, schedule: tuple[int, int],
                     grad_weights: Tensor, one: Tensor, cached_all: Tensor | None = None, inner: int = 1) -> float:
    """Median seconds of the router alone, forward + backward: ``router(x, ctx)``, then one backward
    of its routing weights (upstream gradient ``grad_weights``) and the sum of its aux losses.

    ``cached_all`` stands in for ``ctx.all_expert_outputs()`` (CompeteSMoE's competition),
    so that case measures the router-side work only, not running every expert.
    """
    ts, pos = [], positions(token_ids)
    for _ in range(inner):
        x.grad = None
        for p in router.parameters():
            p.grad = None
        fn = (lambda: cached_all) if cached_all is not None else None
        ctx = RouteContext(training=True, step=schedule[0], total_steps=schedule[1], token_ids=token_ids,
                           positions=pos, embeddings=x.detach(), shared={}, expert_fn=fn)
        t0 = clock.now()
        routing = router(x, ctx)
        outs, grads = [], []
        if routing.weights.requires_grad:
            g = grad_weights.to(routing.weights.dtype)
            if g.shape != routing.weights.shape:  # a variable-k router's [T, num_slots]: a view, no new work
                g = g[:, :1].expand_as(routing.weights)
            outs.append(routing.weights)
            grads.append(g)
        aux = aux_total(routing)
        if aux is not None and aux.requires_grad:
            outs.append(aux)
            grads.append(one.to(aux.dtype))
        if outs:
            torch.autograd.backward(outs, grads)
        ts.append(clock.now() - t0)
    if cached_all is not None:
        cached_all.grad = None
    return float(np.median(ts))



def verify_naive(c: Candidate, inp: Inputs) -> str | None:
    """None if the naive loop (an independent implementation) reproduces the real layer's output, else why not."""
    tol = dict(rtol=1e-4, atol=1e-5) if c.module.experts.w1.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    try:
        with torch.no_grad():
            ref, _ = c.module(inp.x, route_context(c, inp))
            got, _ = naive_forward(c.module, inp.x, route_context(c, inp))
    except Exception as exc:  # noqa: BLE001 - reported as a warning, the timing goes on
        return f"{type(exc).__name__}: {exc}"
    if got.shape != ref.shape or not torch.allclose(got.float(), ref.float(), **tol):
        err = (got.float() - ref.float()).abs().max().item() if got.shape == ref.shape else float("nan")
        return f"output differs from the layer's (max abs diff {err:.3g})"
    return None


def verify_impl(c: Candidate, inp: Inputs) -> str | None:
    """None if the candidate's expert kernel reproduces the default (``loop``) kernel on its own layer.

    The same module runs twice under the same RNG state, once with its kernel and once with
    ``loop``, so routers that draw random numbers decide the same both times.
    """
    bank = c.module.experts
    tol = dict(rtol=1e-4, atol=1e-5) if bank.w1.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    impl = bank.experts_impl
    outs = []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[inp.x.device] if inp.x.device.type == "cuda" else []):
            for name in (impl, DEFAULT_IMPL):
                bank.experts_impl = name
                torch.manual_seed(0)
                outs.append(c.module(inp.x, route_context(c, inp))[0])
    except Exception as exc:  # noqa: BLE001 - reported as a warning, the timing goes on
        return f"{type(exc).__name__}: {exc}"
    finally:
        bank.experts_impl = impl
    got, ref = outs
    if not torch.allclose(got.float(), ref.float(), **tol):
        return f"output differs (max abs diff {(got.float() - ref.float()).abs().max().item():.3g})"
    return None


class GemmRoofline:
    """The layer's six GEMMs unsplit: the same-run roofline of ``roofline_frac``.

    Forward + backward of a two-layer FFN over S = T*k rows is six GEMMs: ``X W1``, ``H W2``
    (forward), ``G W2^T``, ``H^T G``, ``G' W1^T``, ``X^T G'`` (backward), 12 * S * d * d_ff FLOPs in
    all, whether they run as one GEMM each (here) or split over E experts (the MoE layer) or with
    the k slots folded into the width (the equal-FLOP dense FFN). Timing these six plain ``mm`` in
    the same rounds as the candidates gives the time the layer's FLOPs take at the rate this machine
    reaches on exactly these operand shapes; ``roofline_frac = t_gemms / t_candidate`` (1.0 would
    mean a layer that costs nothing beyond its GEMMs at full size).
    """

    def __init__(self, rows: int, d_model: int, d_ff: int, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed + 11)

        def mat(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        self.x, self.w1, self.w2 = mat(rows, d_model), mat(d_model, d_ff), mat(d_ff, d_model)
        self.h, self.g, self.gh = mat(rows, d_ff), mat(rows, d_model), mat(rows, d_ff)
        self.flops = 12 * rows * d_model * d_ff

    def time(self, clock: Clock) -> float:
        t0 = clock.now()
        torch.mm(self.x, self.w1)
        torch.mm(self.h, self.w2)
        torch.mm(self.g, self.w2.t())
        torch.mm(self.h.t(), self.g)
        torch.mm(self.gh, self.w1.t())
        torch.mm(self.x.t(), self.gh)
        return clock.now() - t0
