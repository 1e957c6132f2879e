"""``harness bench``: speed, phase breakdown, peak memory and router overhead of ONE MoE layer.

Two modes:

* ``--mode layer`` (default; also ``harness bench layer``): forward + backward of
  one FFN layer per candidate — each router's :class:`~harness.layers.moe.MoELayer`, the
  equal-active-FLOP dense FFN (router ``dense``: width ``d_ff * k``) and the naive
  per-expert boolean-mask loop most published MoE code uses — with time per phase,
  tokens/s, peak memory, and ratios to ``smoe`` and to ``dense``.
* ``--mode scaling`` (``harness bench scaling``): the router alone (forward +
  backward of its routing weights and aux losses) over a grid of expert counts,
  tokens per batch and model widths, to show what a router's overhead scales
  with (e.g. MoGE's extra cost grows with E and T, not with d_model).

How the numbers are made (DESIGN.md, "Measuring speed honestly")
----------------------------------------------------------------
* One process, interleaved: every repeat runs every candidate once, round-robin,
  the order rotated by one each repeat; ``warmup`` rounds are thrown away. We
  report the median over the repeats and the IQR (75th - 25th percentile) as the
  spread. Ratios are formed *per repeat* (the candidates of one round ran seconds
  apart) and then summarised, which cancels most of a shared machine's drift.
* The layer is exactly the harness layer, built by :func:`harness.layers.moe.build_ffn`.
  The headline ``fwd_bwd_ms`` times ``y, routing = layer(x, ctx)`` followed by ONE
  backward of ``y`` (fixed random upstream gradient ``g``) together with the sum of
  ``routing.aux_losses`` — nothing else (parameter grads are reset to None outside
  the timed region, as ``zero_grad(set_to_none=True)`` does). ``x`` requires grad:
  inside a network the layer also returns dL/dx. No optimiser step is taken, so
  every repeat routes the same way (a random-init router on Gaussian inputs);
  ``load_imbalance`` (max/mean slots per expert) says how balanced that was.
* Routers run in training mode with a :class:`~harness.routing.router.RouteContext`
  carrying random ``token_ids`` in [0, 256) (StableMoE routes on them).
* Routers with schedules are measured per variant and amortised:
  CompeteSMoE (any router with a ``competition_prob`` hyper-parameter) once
  forced to compete every step (``competition_prob=1.0, warmup_fraction=0``, and
  ``on_step`` past warm-up) and once never (``competition_prob=0``);
  ``amortised = p * t_compete + (1 - p) * t_plain`` per repeat with p its configured
  rate (default 0.05). This ignores the "at most 3 competing layers per step" cap,
  which can only lower the real cost. StableMoE (``stage1_fraction``): stage 1 and
  stage 2, amortised with the stage-1 fraction (default 0.1).
* Threads: on a shared CPU with more runnable processes than cores, an OpenMP
  parallel region waits at its barrier whenever a sibling thread is descheduled.
  The MoE layer issues ~200 mostly small ops per fwd+bwd, the dense FFN ~10 big
  GEMMs, so oversubscription inflates the MoE/dense ratio far beyond what either
  costs (measured here: 2.3-2.6x at 2 threads under load ~6-12 vs 0.89-0.96x at 1
  thread). The report prints the load average; ``--threads 1`` gives ratios that
  survive a busy machine, and the rows record the thread count.
* A router that does not support the requested top-k (StableMoE is top-1) runs at
  the k it supports and is compared with ``smoe[k=1]`` and ``dense[k=1]`` references
  built at that same k, so every ratio compares equal active FLOPs.

Router overhead
---------------
``ratio_vs_smoe`` divides two whole-layer times; both are dominated by the same
expert GEMMs, so on a noisy machine its IQR is wider than the few ms a router
adds. Each round therefore also times every router ALONE (forward + backward of
its routing weights and aux losses, ``router_fwd_bwd_ms``, median of 3 calls), and
``router_overhead_vs_smoe`` = per repeat ``(t_smoe_layer + t_router - t_smoe_router)
/ t_smoe_layer``: the router's own cost on top of the smoe layer, valid because the
experts and the dispatch are the same kernels for every router. It leaves out the
routing decision's effect on the expert kernels (load imbalance; see
``load_imbalance`` and ``ratio_vs_smoe``). A competition step runs every expert, so
for that variant the layer time itself enters; amortised rows weight the variants.

Phases (``phase_*_ms``), a second, instrumented run per candidate and repeat
---------------------------------------------------------------------------
:func:`moe_forward_phased` re-runs ``MoELayer.forward`` step by step from the layer's
own pieces (its router, ``capacity()``, ``ExpertBank.forward_segments`` /
``forward_all``) with a clock read between the steps; at start-up its output is
checked against ``layer(x)`` and the phases are dropped, with a warning, if
``harness/moe.py`` changed so that they no longer agree (``fwd_bwd_ms`` always
calls the real layer, so it stays honest either way).

  router    ``router(x, ctx)``, minus its aux-loss share (below), minus time spent in
            ``ctx.all_expert_outputs()`` (moved to ``experts``: CompeteSMoE's
            competition runs every expert there).
  dispatch  bincount, k-major slot order, stable argsort by expert, capacity drop,
            ``counts.tolist()`` (a host sync), gathering the token rows.
  experts   ``ExpertBank.forward_segments`` (or ``forward_all`` for competition).
  combine   scaling by the routing weights and ``index_add_`` back to token order
            (or the gather from the all-expert outputs).
  aux_loss  forward of the router's aux losses (estimated, below) + summing them.
  backward  the whole backward pass — autograd runs it as one graph, so it is not
            split further.

The aux-loss share: routers compute their losses inside ``forward``. In each repeat
we also time ``router(x, ctx)`` alone, as configured and as a copy with every
``*_weight`` hyper-parameter set to 0 (which switches the losses off in all the
built-in routers), and move ``(t_with - t_without) / t_with`` (clipped to [0, 1]) of
that repeat's router phase to ``aux_loss``. Because every phase is a difference of
consecutive clock reads of ONE run, the phases of a repeat sum exactly to that
repeat's instrumented total. The reported ``phase_*_ms`` split the median
instrumented total (``phased_total_ms``) by the median share of each phase
(renormalised), so they add up exactly; raw per-phase medians would not, since
noise bursts land in different phases in different repeats.
The naive loop accumulates its per-expert dispatch/expert/combine steps the same
way; the dense FFN is all ``experts``. On CUDA each clock read synchronises, so the
instrumented run is slower than ``fwd_bwd_ms``; on CPU they agree within noise.

Memory, untimed passes per candidate after the timed rounds
-----------------------------------------------------------
* ``peak_mem_mb``: CUDA — ``torch.cuda.max_memory_allocated()`` during the step minus
  the allocation before it. CPU — peak resident set during the step minus the RSS
  before it: ``malloc_trim(0)`` hands freed heap pages back, writing "5" to
  ``/proc/self/clear_refs`` resets the high-water mark, and ``VmHWM`` is read from
  ``/proc/self/status`` afterwards. Allocator-dependent, so approximate; the
  median of ``mem_repeats`` (3) passes.
* ``saved_act_mb``: deterministic — the bytes of the distinct non-parameter storages
  autograd saved for backward (``torch.autograd.graph.saved_tensors_hooks``).

Store rows (``Store.add_perf``): one per (candidate, metric); ``router`` is the
registry name (``naive`` for the loop), ``config`` holds E/k/d/d_ff/tokens/dtype/
mode/variant/device/threads/repeats, ``value`` the median, ``spread`` the IQR.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..routing.router import RouteContext, Routing

PHASES = ("router", "dispatch", "experts", "combine", "aux_loss", "backward")
MIN_REPEATS = 5
REFERENCE = "smoe"
DENSE = "dense"
NAIVE = "naive"
VOCAB = 256  # random token ids for routers that route on them (StableMoE's default vocab_size)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The targets. ">= 1.15x the dense FFN" is read as: the MoE layer's fwd+bwd
# time is at most 1.15x the equal-FLOP dense FFN's.
TARGETS: tuple[tuple[str, str, str, float, str], ...] = (
    ("smoe", "ratio_vs_dense", "<=", 1.15, "MoE layer (smoe) time <= 1.15x the equal-FLOP dense FFN"),
    ("smoe", "throughput_vs_naive", ">=", 1.0, "MoE layer (smoe) throughput >= 1.0x the naive loop"),
    ("xmoe", "ratio_vs_smoe", "<=", 1.05, "xmoe layer time <= 1.05x smoe"),
    ("moge", "ratio_vs_smoe", "<=", 1.05, "moge layer time <= 1.05x smoe"),
    ("competesmoe", "ratio_vs_smoe", "<=", 1.10, "competesmoe amortised layer time <= 1.10x smoe"),
    ("xmoe", "router_overhead_vs_smoe", "<=", 1.05, "xmoe router-resolved overhead <= 1.05x smoe"),
    ("moge", "router_overhead_vs_smoe", "<=", 1.05, "moge router-resolved overhead <= 1.05x smoe"),
    ("competesmoe", "router_overhead_vs_smoe", "<=", 1.10, "competesmoe amortised router-resolved <= 1.10x smoe"),
)

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    pass


# -- clocks, statistics -------------------------------------------------------------------

class Clock:
    """``perf_counter`` that first waits for the device (CUDA work is asynchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class PhaseClock:
    """Attributes the time since the previous mark to a phase; phases sum exactly to ``total``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.times = dict.fromkeys(PHASES, 0.0)
        self.start = self._last = clock.now()

    def mark(self, phase: str) -> None:
        now = self.clock.now()
        self.times[phase] += now - self._last
        self._last = now

    def move(self, src: str, dst: str, seconds: float) -> None:
        self.times[src] -= seconds
        self.times[dst] += seconds

    @property
    def total(self) -> float:
        return self._last - self.start


@dataclass(frozen=True)
class Stat:
    """Median and quartiles of a per-repeat sample; ``spread`` is the IQR."""

    median: float
    q25: float
    q75: float

    @property
    def spread(self) -> float:
        return self.q75 - self.q25

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        a = np.asarray(values, dtype=float)
        q25, med, q75 = np.percentile(a, [25, 50, 75])
        return cls(float(med), float(q25), float(q75))

    def scaled(self, f: float) -> "Stat":
        lo, hi = sorted((self.q25 * f, self.q75 * f))
        return Stat(self.median * f, lo, hi)


# -- configuration and candidates -----------------------------------------------------------

@dataclass(frozen=True)
class LayerConfig:
    tokens: int = 8192
    d_model: int = 256
    d_ff: int = 1024
    num_experts: int = 8
    top_k: int = 2
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("tokens", "d_model", "d_ff", "num_experts", "top_k"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"bench: {key} must be positive, got {getattr(self, key)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"bench: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench: dtype {self.dtype!r} not one of {sorted(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict[str, Any]:
        return {"E": self.num_experts, "k": self.top_k, "d": self.d_model, "d_ff": self.d_ff,
                "tokens": self.tokens, "dtype": self.dtype, "device": self.device, "seed": self.seed}


@dataclass
class Candidate:
    """One thing to time: a router's layer (one variant), the dense FFN, or the naive loop."""

    label: str                  # unique: "smoe", "competesmoe@compete", "smoe[k=1]", "naive"
    router: str                 # registry name ("naive" for the loop)
    variant: str                # "default", "compete", "plain", "stage1", "stage2", "naive_loop", "reference"
    kind: str                   # "moe" | "dense" | "naive"
    top_k: int
    module: nn.Module
    schedule: tuple[int, int] = (0, 1)   # (step, total_steps) given to on_step and the context
    weight: float | None = None          # share of training steps spent in this variant (amortisation)
    note: str = ""
    router_noaux: nn.Module | None = None
    aux_gates: tuple[str, ...] = ()
    cached_all: Tensor | None = None     # all-expert outputs for router-only timing of competition
    phases_ok: bool = True

    @property
    def router_module(self) -> nn.Module | None:
        return getattr(self.module, "router", None) if self.kind != "dense" else None


@dataclass
class Inputs:
    x: Tensor          # [T, d], requires grad
    g: Tensor          # [T, d] upstream gradient of the layer output
    token_ids: Tensor  # [T] long in [0, VOCAB)
    one: Tensor        # scalar 1 (gradient of the summed aux loss)

    @classmethod
    def make(cls, tokens: int, d_model: int, dtype: torch.dtype, device: torch.device, seed: int) -> "Inputs":
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(tokens, d_model, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        g = torch.randn(tokens, d_model, generator=gen).to(device=device, dtype=dtype)
        ids = torch.randint(0, VOCAB, (tokens,), generator=gen).to(device)
        return cls(x, g, ids, torch.ones((), device=device))


def _context(c: Candidate, inp: Inputs, expert_fn: Callable[[], Tensor] | None = None) -> RouteContext:
    step, total = c.schedule
    return RouteContext(training=True, step=step, total_steps=total, token_ids=inp.token_ids,
                        embeddings=inp.x.detach(), shared={}, expert_fn=expert_fn)


def _variants(cls: type, defaults: dict[str, Any]) -> list[tuple[str, dict[str, Any], float | None, tuple[int, int]]]:
    """(variant, router kwargs, amortisation weight, (step, total)) for one router class."""
    names = set(cls.hparam_names())
    total = 1000
    if "competition_prob" in names:
        p = float(defaults["competition_prob"])
        forced: dict[str, Any] = {"competition_prob": 1.0}
        if "warmup_fraction" in names:
            forced["warmup_fraction"] = 0.0
        return [("compete", forced, p, (total // 2, total)),
                ("plain", {"competition_prob": 0.0}, 1.0 - p, (total // 2, total))]
    if "stage1_fraction" in names:
        f = float(defaults["stage1_fraction"])
        return [("stage1", {}, f, (0, total)), ("stage2", {}, 1.0 - f, (total, total))]
    return [("default", {}, None, (0, total))]


def _without_aux_losses(router: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """A copy of ``router`` with every numeric ``*_weight`` hyper-parameter set to 0 (aux losses off)."""
    r = copy.deepcopy(router)
    gates = []
    for name in type(router).hparam_names():
        v = getattr(r, name, None)
        if name.endswith("_weight") and isinstance(v, (int, float)) and not isinstance(v, bool):
            setattr(r, name, 0.0)
            gates.append(name)
    return r, tuple(gates)


def _ref_label(base: str, k: int, main_k: int) -> str:
    return base if k == main_k else f"{base}[k={k}]"


def resolve_routers(requested: Sequence[str] | None, log: Log = _stderr) -> tuple[list[str], list[str]]:
    """Registered names to run (smoe and dense always, as references) and messages for the skipped ones."""
    from ..routing.registry import PluginLoadError, UnknownRouterError, get_router, router_names

    known = router_names()
    wanted = list(requested) if requested else list(known)
    for ref in (DENSE, REFERENCE):
        if ref in known and ref not in wanted:
            wanted.insert(0, ref)
    out, skipped = [], []
    for name in dict.fromkeys(wanted):
        try:
            get_router(name)
        except (UnknownRouterError, PluginLoadError) as exc:
            skipped.append(f"{name}: skipped ({exc})")
            continue
        out.append(name)
    # references first, then the rest in the given order
    out.sort(key=lambda n: (n != DENSE, n != REFERENCE))
    for msg in skipped:
        log(f"bench: {msg}")
    return out, skipped


def build_candidates(cfg: LayerConfig, routers: Sequence[str], naive: bool = True,
                     log: Log = _stderr) -> list[Candidate]:
    """Build every candidate's layer with ``harness.layers.moe.build_ffn`` (seeded, training mode)."""
    from ..layers.moe import build_ffn
    from ..routing.registry import get_router

    device = torch.device(cfg.device)
    cands: list[Candidate] = []

    def build(name: str, k: int, kwargs: dict[str, Any], schedule: tuple[int, int]) -> nn.Module:
        torch.manual_seed(cfg.seed)
        mod = build_ffn(name, cfg.d_model, cfg.d_ff, cfg.num_experts, k, router_kwargs=kwargs or None)
        mod = mod.to(device=device, dtype=cfg.torch_dtype).train()
        router = getattr(mod, "router", None)
        if router is not None:
            router.on_step(*schedule)
        return mod

    extra_k: set[int] = set()
    for name in routers:
        cls = get_router(name)
        k = cfg.top_k
        note = ""
        if cls.supports_top_k is not None and k not in cls.supports_top_k:
            k = cls.supports_top_k[0]
            note = f"supports top_k {list(cls.supports_top_k)} only: run at k={k}, compared with k={k} references"
            log(f"bench: {name}: {note}")
            extra_k.add(k)
        if cls.is_dense:
            cands.append(Candidate(name if k == cfg.top_k else _ref_label(name, k, cfg.top_k), name,
                                   "reference", "dense", k, build(name, k, {}, (0, 1)), note=note))
            continue
        defaults = cls.hparam_defaults()
        try:
            variants = _variants(cls, defaults)
        except (KeyError, TypeError, ValueError):
            variants = [("default", {}, None, (0, 1000))]
        for variant, kwargs, weight, schedule in variants:
            label = name if variant == "default" else f"{name}@{variant}"
            try:
                mod = build(name, k, kwargs, schedule)
            except Exception as exc:  # noqa: BLE001 - a broken router must not stop the others
                log(f"bench: {label}: skipped, could not build it ({type(exc).__name__}: {exc})")
                continue
            cands.append(Candidate(label, name, "reference" if name == REFERENCE and variant == "default" else variant,
                                   "moe", k, mod, schedule=schedule, weight=weight, note=note))
    have = {c.label for c in cands}
    for k in sorted(extra_k):
        for base, kind in ((REFERENCE, "moe"), (DENSE, "dense")):
            label = _ref_label(base, k, cfg.top_k)
            if base in routers and label not in have:
                cands.append(Candidate(label, base, "reference", kind, k, build(base, k, {}, (0, 1000))))
    if naive:
        smoe = next((c for c in cands if c.label == REFERENCE), None)
        if smoe is None:
            log("bench: naive loop skipped (it reuses the smoe layer, which is not available)")
        else:
            # the same module: same router, same stacked expert weights; only the dispatch differs
            cands.append(Candidate(NAIVE, NAIVE, "naive_loop", "naive", smoe.top_k, smoe.module,
                                   schedule=smoe.schedule))
    for c in cands:
        if c.router_module is not None:
            c.router_noaux, c.aux_gates = _without_aux_losses(c.router_module)
    return cands


# -- one step of each kind ---------------------------------------------------------------------

def _aux_total(routing: Routing | None) -> Tensor | None:
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


def _clear_grads(c: Candidate, inp: Inputs) -> None:
    inp.x.grad = None
    for p in c.module.parameters():
        p.grad = None


def moe_forward_phased(layer: nn.Module, x: Tensor, ctx: RouteContext, ph: PhaseClock) -> tuple[Tensor, Routing]:
    """``MoELayer.forward`` for a [T, d] input, step by step with phase marks.

    Mirrors ``harness/moe.py`` (MoELayer.forward + MoELayer._dispatch) using the
    layer's own router, ``capacity()`` and ExpertBank methods; :func:`verify_phased`
    checks at start-up that the output equals ``layer(x)``.
    """
    T = x.shape[0]
    in_experts = [0.0]

    def expert_fn() -> Tensor:
        t0 = ph.clock.now()
        out = layer.experts.forward_all(x)
        in_experts[0] += ph.clock.now() - t0
        return out

    ctx._expert_fn = expert_fn
    routing = layer.router(x, ctx)
    ph.mark("router")
    if in_experts[0]:
        ph.move("router", "experts", in_experts[0])
    idx, w = routing.indices, routing.weights.to(x.dtype)
    counts_t = torch.bincount(idx.reshape(-1), minlength=layer.num_experts)
    if ctx.has_all_expert_outputs:
        all_out = ctx.all_expert_outputs()
        ph.mark("dispatch")
        chosen = all_out.gather(1, idx.unsqueeze(-1).expand(T, idx.shape[1], all_out.shape[-1]))
        y = (chosen * w.unsqueeze(-1)).sum(1)
        ph.mark("combine")
        return y, routing
    k = idx.shape[1]
    slot_expert = idx.t().reshape(-1)
    slot_token = torch.arange(T, device=x.device).repeat(k)
    slot_weight = w.t().reshape(-1)
    order = torch.argsort(slot_expert, stable=True)
    cap = layer.capacity(T)
    if cap is not None and int(counts_t.max()) > cap:
        starts = torch.cumsum(counts_t, 0) - counts_t
        pos = torch.arange(order.numel(), device=x.device) - starts[slot_expert[order]]
        keep = pos < cap
        int((~keep).sum())  # the layer counts the dropped slots (a host sync)
        order = order[keep]
        counts_t = counts_t.clamp(max=cap)
    tok = slot_token[order]
    counts = counts_t.tolist()
    xs = x.index_select(0, tok)
    ph.mark("dispatch")
    out = layer.experts.forward_segments(xs, counts)
    ph.mark("experts")
    out = out * slot_weight[order].unsqueeze(-1)
    y = torch.zeros_like(x).index_add_(0, tok, out)
    ph.mark("combine")
    return y, routing


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
    _clear_grads(c, inp)
    ctx = _context(c, inp)
    t0 = clock.now()
    if c.kind == "naive":
        y, routing = naive_forward(c.module, inp.x, ctx)
    else:
        y, routing = c.module(inp.x, ctx)
    _backward(y, _aux_total(routing), inp)
    return clock.now() - t0


def run_phased(c: Candidate, inp: Inputs, clock: Clock) -> dict[str, float]:
    """Seconds per phase of one instrumented forward + backward (plus ``total``)."""
    _clear_grads(c, inp)
    ctx = _context(c, inp)
    ph = PhaseClock(clock)
    if c.kind == "dense":
        y, routing = c.module(inp.x, ctx)
        ph.mark("experts")
    elif c.kind == "naive":
        y, routing = naive_forward(c.module, inp.x, ctx, ph)
    else:
        y, routing = moe_forward_phased(c.module, inp.x, ctx, ph)
    aux = _aux_total(routing)
    ph.mark("aux_loss")
    _backward(y, aux, inp)
    ph.mark("backward")
    return {**ph.times, "total": ph.total}


def router_forward_time(router: nn.Module, c: Candidate, inp: Inputs, clock: Clock, inner: int = 3) -> float:
    """Median seconds of ``router(x, ctx)`` alone (grad mode on, as in training)."""
    fn = (lambda: c.cached_all) if c.cached_all is not None else None
    ts = []
    for _ in range(inner):
        ctx = _context(c, inp, expert_fn=fn)
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
    ts = []
    for _ in range(inner):
        x.grad = None
        for p in router.parameters():
            p.grad = None
        fn = (lambda: cached_all) if cached_all is not None else None
        ctx = RouteContext(training=True, step=schedule[0], total_steps=schedule[1], token_ids=token_ids,
                           embeddings=x.detach(), shared={}, expert_fn=fn)
        t0 = clock.now()
        routing = router(x, ctx)
        outs, grads = [], []
        if routing.weights.requires_grad:
            outs.append(routing.weights)
            grads.append(grad_weights.to(routing.weights.dtype))
        aux = _aux_total(routing)
        if aux is not None and aux.requires_grad:
            outs.append(aux)
            grads.append(one.to(aux.dtype))
        if outs:
            torch.autograd.backward(outs, grads)
        ts.append(clock.now() - t0)
    if cached_all is not None:
        cached_all.grad = None
    return float(np.median(ts))


# -- memory ------------------------------------------------------------------------------------

def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


_LIBC: Any = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


class SavedBytes:
    """Sums the distinct non-parameter storages autograd saves for backward."""

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: Tensor) -> Tensor:
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in self.skip and key not in self.seen:
                self.seen.add(key)
                self.bytes += st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t


def measure_memory(c: Candidate, inp: Inputs, clock: Clock) -> dict[str, float | None]:
    """Peak memory of one (untimed) step and the deterministic saved-activation bytes, in MB."""
    _clear_grads(c, inp)
    gc.collect()
    saved = SavedBytes(c.module.parameters())
    peak: float | None = None
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            run_plain(c, inp, clock)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        _malloc_trim()
        ok = _reset_rss_peak()
        base_kb = _proc_status_kb("VmRSS")
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            run_plain(c, inp, clock)
        hwm_kb = _proc_status_kb("VmHWM")
        if ok and base_kb is not None and hwm_kb is not None:
            peak = max(hwm_kb - base_kb, 0) / 1024
    layer_counts = getattr(c.module, "last_counts", None)
    imbalance = None
    if c.kind == "moe" and layer_counts is not None and layer_counts.numel():
        cnt = layer_counts.float()
        imbalance = float(cnt.max() / cnt.mean().clamp_min(1e-9))
    _clear_grads(c, inp)
    return {"peak_mem_mb": peak, "saved_act_mb": saved.bytes / 2**20, "load_imbalance": imbalance}


# -- verification of the instrumented re-implementation ----------------------------------------------

def verify_phased(c: Candidate, inp: Inputs, clock: Clock) -> str | None:
    """None if the instrumented forward reproduces the real layer's output, else why not."""
    if c.kind == "dense":
        return None
    tol = dict(rtol=1e-4, atol=1e-5) if c.module.experts.w1.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    try:
        with torch.no_grad():
            ref, _ = (c.module(inp.x, _context(c, inp)))
            if c.kind == "naive":
                got, _ = naive_forward(c.module, inp.x, _context(c, inp))
            else:
                got, _ = moe_forward_phased(c.module, inp.x, _context(c, inp), PhaseClock(clock))
    except Exception as exc:  # noqa: BLE001 - an API change in moe.py shows up here
        return f"{type(exc).__name__}: {exc}"
    if got.shape != ref.shape or not torch.allclose(got.float(), ref.float(), **tol):
        err = (got.float() - ref.float()).abs().max().item() if got.shape == ref.shape else float("nan")
        return f"output differs from the layer's (max abs diff {err:.3g})"
    return None


# -- the layer benchmark ----------------------------------------------------------------------------

@dataclass
class CandidateResult:
    label: str
    router: str
    variant: str
    kind: str
    top_k: int
    note: str = ""
    weight: float | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)   # per repeat, seconds
    memory: dict[str, float | None] = field(default_factory=dict)
    phases_ok: bool = True


@dataclass
class LayerBench:
    cfg: LayerConfig
    results: list[CandidateResult]
    repeats: int
    warmup: int
    skipped: list[str] = field(default_factory=list)
    load: tuple[float, float] | None = None                            # 1-min load average at start, end
    stats: dict[str, dict[str, Stat]] = field(default_factory=dict)   # label -> metric -> Stat
    info: dict[str, dict[str, Any]] = field(default_factory=dict)      # label -> row metadata

    def stat(self, label: str, metric: str) -> Stat | None:
        return self.stats.get(label, {}).get(metric)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _load_note(load: tuple[float | None, float | None] | None) -> str:
    if not load or load[0] is None or load[1] is None:
        return ""
    return f" on {os.cpu_count()} cores, load average {load[0]:.1f} -> {load[1]:.1f}"


def _check_repeats(repeats: int, warmup: int) -> None:
    if repeats < MIN_REPEATS:
        raise ValueError(f"bench: repeats must be >= {MIN_REPEATS} (a median of fewer is not a measurement), got {repeats}")
    if warmup < 0:
        raise ValueError(f"bench: warmup must be >= 0, got {warmup}")


@contextlib.contextmanager
def _gc_paused():
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def run_layer_bench(cfg: LayerConfig, routers: Sequence[str] | None = None, *, naive: bool = True,
                    repeats: int = 7, warmup: int = 2, phases: bool = True, mem_repeats: int = 3,
                    router_inner: int = 3, log: Log = _stderr) -> LayerBench:
    """Interleaved fwd+bwd timing of one layer per candidate; see the module docstring."""
    _check_repeats(repeats, warmup)
    names, skipped = resolve_routers(routers, log)
    if not names:
        raise ValueError("bench: no router to benchmark")
    device = torch.device(cfg.device)
    clock = Clock(device)
    cands = build_candidates(cfg, names, naive=naive, log=log)
    inp = Inputs.make(cfg.tokens, cfg.d_model, cfg.torch_dtype, device, cfg.seed)
    gws = {k: torch.randn(cfg.tokens, k, generator=torch.Generator().manual_seed(cfg.seed + 3)).to(device)
           for k in {c.top_k for c in cands}}

    for c in cands:
        if c.variant == "compete" and c.router_module is not None:
            with torch.no_grad():
                c.cached_all = c.module.experts.forward_all(inp.x.detach())
            c.cached_all.requires_grad_()
        if phases:
            why = verify_phased(c, inp, clock)
            if why is not None:
                if c.kind == "naive":
                    log(f"bench: WARNING naive loop disagrees with the smoe layer: {why}")
                else:
                    c.phases_ok = False
                    log(f"bench: WARNING {c.label}: the phase decomposition in harness/profile.py no longer matches "
                        f"harness/moe.py ({why}); phases dropped, fwd_bwd_ms still times the real layer")

    load0 = _loadavg()
    results = {c.label: CandidateResult(c.label, c.router, c.variant, c.kind, c.top_k, c.note, c.weight,
                                        phases_ok=phases and c.phases_ok) for c in cands}
    n = len(cands)
    log(f"bench: {n} candidates x ({warmup} warm-up + {repeats}) rounds, T={cfg.tokens} d={cfg.d_model} "
        f"d_ff={cfg.d_ff} E={cfg.num_experts} k={cfg.top_k} {cfg.dtype} on {cfg.device}, "
        f"{torch.get_num_threads()} threads")
    with _gc_paused():
        for r in range(warmup + repeats):
            t_round = time.perf_counter()
            order = cands[r % n:] + cands[:r % n]
            keep = r >= warmup
            for c in order:
                t = run_plain(c, inp, clock)
                if keep:
                    results[c.label].samples.setdefault("fwd_bwd", []).append(t)
            for c in order:  # the router alone (fwd+bwd), for the router-resolved overhead
                if c.kind != "moe":
                    continue
                t = router_step_time(c.router_module, inp.x, inp.token_ids, clock, schedule=c.schedule,
                                     grad_weights=gws[c.top_k], one=inp.one, cached_all=c.cached_all,
                                     inner=router_inner)
                if keep:
                    results[c.label].samples.setdefault("router_fwd_bwd", []).append(t)
            if phases:
                for c in order:
                    if not results[c.label].phases_ok:
                        continue
                    ph = run_phased(c, inp, clock)
                    share = 0.0
                    if c.router_module is not None and c.aux_gates:
                        t_with = router_forward_time(c.router_module, c, inp, clock, router_inner)
                        t_without = router_forward_time(c.router_noaux, c, inp, clock, router_inner)
                        share = min(max((t_with - t_without) / t_with, 0.0), 1.0) if t_with > 0 else 0.0
                    moved = ph["router"] * share
                    ph["router"] -= moved
                    ph["aux_loss"] += moved
                    if keep:
                        res = results[c.label].samples
                        for p in (*PHASES, "total"):
                            res.setdefault("phase_" + p if p != "total" else "phased_total", []).append(ph[p])
                        res.setdefault("aux_share", []).append(share)
            gc.collect()
            log(f"bench: round {r + 1}/{warmup + repeats}{' (warm-up)' if not keep else ''} "
                f"{time.perf_counter() - t_round:.1f}s")
    for c in cands:  # memory last: malloc_trim and the RSS reset must not disturb the timed rounds
        mems = [measure_memory(c, inp, clock) for _ in range(mem_repeats)]
        peaks = [m["peak_mem_mb"] for m in mems if m["peak_mem_mb"] is not None]
        results[c.label].memory = {**mems[0], "peak_mem_mb": float(np.median(peaks)) if peaks else None}
    bench = LayerBench(cfg, [results[c.label] for c in cands], repeats, warmup, skipped, load=(load0, _loadavg()))
    summarise_layer(bench)
    return bench


def _paired(a: Sequence[float], b: Sequence[float], fn: Callable[[float, float], float]) -> list[float]:
    return [fn(x, y) for x, y in zip(a, b)]


def _phase_stats(s: dict[str, list[float]]) -> dict[str, Stat]:
    """Phase figures that add up: the median instrumented total split by each phase's median share.

    Medians of the raw per-phase times need not add up to the median total (a
    noise burst lands in a different phase in each repeat); the shares
    ``phase_i / total_i`` are taken per repeat, their medians renormalised to sum
    to 1, and scaled by the median total. The spread is the IQR of the share
    times the same factor.
    """
    tot = s["phased_total"]
    med_tot = float(np.median(tot))
    shares = {p: [s["phase_" + p][i] / tot[i] if tot[i] > 0 else 0.0 for i in range(len(tot))] for p in PHASES}
    norm = sum(float(np.median(v)) for v in shares.values()) or 1.0
    out = {f"phase_{p}_ms": Stat.of(shares[p]).scaled(1e3 * med_tot / norm) for p in PHASES}
    out["phased_total_ms"] = Stat.of(tot).scaled(1e3)
    return out


def _resolved_layer_times(results: list[CandidateResult], series: dict[str, dict[str, list[float]]],
                          main_k: int) -> dict[str, list[float]]:
    """Per repeat, the smoe layer's time plus (this router alone - smoe's router alone), both fwd+bwd.

    The layer-vs-layer ratio of two routers is the ratio of two ~equal expert
    computations plus a few ms of routing: on a noisy machine its IQR is far wider
    than the routing difference. The experts and the dispatch are the same kernels
    for every router, so ``t_smoe_layer + t_router - t_smoe_router`` resolves the
    router's own cost. What it leaves out is only the routing *decision's* effect on
    the expert kernels (load imbalance), which the layer ratio still shows. A
    competition step runs every expert, so there the layer time itself is used.
    Amortised routers: the weighted sum of their variants.
    """
    out: dict[str, list[float]] = {}
    for res in results:
        if res.kind != "moe" or "router_fwd_bwd" not in res.samples:
            continue
        ref = series.get(_ref_label(REFERENCE, res.top_k, main_k), {})
        if "fwd_bwd" not in ref or "router_fwd_bwd" not in ref:
            continue
        if res.variant == "compete":
            out[res.label] = list(res.samples["fwd_bwd"])
        else:
            out[res.label] = [tl + tr - trs for tl, tr, trs in
                              zip(ref["fwd_bwd"], res.samples["router_fwd_bwd"], ref["router_fwd_bwd"])]
    groups: dict[str, list[CandidateResult]] = {}
    for res in results:
        if res.weight is not None and res.label in out:
            groups.setdefault(res.router, []).append(res)
    for router, parts in groups.items():
        if len(parts) >= 2:
            n = len(out[parts[0].label])
            out[f"{router} (amortised)"] = [sum(p.weight * out[p.label][i] for p in parts) for i in range(n)]
    return out


def summarise_layer(bench: LayerBench) -> None:
    """Fill ``bench.stats``/``bench.info``: medians, IQRs, paired ratios, amortised rows."""
    cfg = bench.cfg
    main_k = cfg.top_k
    series: dict[str, dict[str, list[float]]] = {}
    info: dict[str, dict[str, Any]] = {}
    for res in bench.results:
        series[res.label] = dict(res.samples)
        info[res.label] = {"router": res.router, "variant": res.variant, "kind": res.kind, "k": res.top_k,
                           "note": res.note, "memory": dict(res.memory), "weight": res.weight}
    # amortised rows for routers measured in weighted variants
    by_router: dict[str, list[CandidateResult]] = {}
    for res in bench.results:
        if res.weight is not None and res.kind == "moe":
            by_router.setdefault(res.router, []).append(res)
    for router, parts in by_router.items():
        if len(parts) < 2:
            continue
        label = f"{router} (amortised)"
        keys = set.intersection(*(set(p.samples) for p in parts))
        series[label] = {key: [sum(p.weight * p.samples[key][i] for p in parts)
                               for i in range(len(parts[0].samples[key]))] for key in keys}
        mem = {}
        for m in ("peak_mem_mb", "saved_act_mb"):
            vals = [p.memory.get(m) for p in parts if p.memory.get(m) is not None]
            mem[m] = max(vals) if vals else None
        mem["load_imbalance"] = None
        info[label] = {"router": router, "variant": "amortised", "kind": "moe", "k": parts[0].top_k,
                       "note": "; ".join(f"{p.variant} x {p.weight:g}" for p in parts), "memory": mem,
                       "weight": None, "amortise": {p.variant: p.weight for p in parts}}

    resolved = _resolved_layer_times(bench.results, series, main_k)
    stats: dict[str, dict[str, Stat]] = {}
    for label, s in series.items():
        st: dict[str, Stat] = {}
        if "fwd_bwd" in s:
            st["fwd_bwd_ms"] = Stat.of(s["fwd_bwd"]).scaled(1e3)
            st["tokens_per_s"] = Stat.of([cfg.tokens / t for t in s["fwd_bwd"]])
        if "phased_total" in s:
            st.update(_phase_stats(s))
        k = info[label]["k"]
        kind = info[label]["kind"]
        refs = {"smoe": _ref_label(REFERENCE, k, main_k), "dense": _ref_label(DENSE, k, main_k)}
        t = s.get("fwd_bwd")
        if t:
            for name, ref in refs.items():
                rt = series.get(ref, {}).get("fwd_bwd")
                if rt:
                    st[f"ratio_vs_{name}"] = Stat.of(_paired(t, rt, lambda a, b: a / b))
                    if name == "dense":
                        st["throughput_vs_dense"] = Stat.of(_paired(t, rt, lambda a, b: b / a))
            nt = series.get(NAIVE, {}).get("fwd_bwd")
            if nt and kind == "moe" and k == main_k:
                st["ratio_vs_naive"] = Stat.of(_paired(t, nt, lambda a, b: a / b))
                st["throughput_vs_naive"] = Stat.of(_paired(t, nt, lambda a, b: b / a))
        if s.get("router_fwd_bwd"):
            st["router_fwd_bwd_ms"] = Stat.of(s["router_fwd_bwd"]).scaled(1e3)
        if label in resolved:
            ref_t = series[refs["smoe"]]["fwd_bwd"]
            st["router_overhead_vs_smoe"] = Stat.of(_paired(resolved[label], ref_t, lambda a, b: a / b))
        for m, v in info[label]["memory"].items():
            if v is not None:
                st[m] = Stat(float(v), float(v), float(v))
        stats[label] = st
    bench.stats = stats
    bench.info = info


def layer_table(bench: LayerBench):
    """Polars frame: one row per candidate (and amortised router), the headline columns."""
    import polars as pl

    rows = []
    for label, st in bench.stats.items():
        inf = bench.info[label]

        def med(m: str) -> float | None:
            return st[m].median if m in st else None

        def iqr(m: str) -> float | None:
            return st[m].spread if m in st else None

        rows.append({
            "candidate": label, "k": inf["k"],
            "fwd_bwd_ms": med("fwd_bwd_ms"), "iqr_ms": iqr("fwd_bwd_ms"),
            "tokens_per_s": med("tokens_per_s"),
            "vs_smoe": med("ratio_vs_smoe"), "vs_smoe_iqr": iqr("ratio_vs_smoe"),
            "vs_dense": med("ratio_vs_dense"), "vs_dense_iqr": iqr("ratio_vs_dense"),
            "tput_vs_dense": med("throughput_vs_dense"),
            "tput_vs_naive": med("throughput_vs_naive"),
            "router_ms": med("router_fwd_bwd_ms"), "router_ovh_vs_smoe": med("router_overhead_vs_smoe"),
            "peak_mem_mb": med("peak_mem_mb"), "saved_act_mb": med("saved_act_mb"),
            "load_max/mean": med("load_imbalance"),
        })
    return pl.DataFrame(rows)


def phase_table(bench: LayerBench):
    """Polars frame: median ms per phase, their sum, the instrumented total and the plain total."""
    import polars as pl

    rows = []
    for label, st in bench.stats.items():
        if "phased_total_ms" not in st:
            continue
        row: dict[str, Any] = {"candidate": label}
        for p in PHASES:
            row[p] = st[f"phase_{p}_ms"].median
        row["sum_phases"] = sum(row[p] for p in PHASES)
        row["phased_total"] = st["phased_total_ms"].median
        row["fwd_bwd"] = st["fwd_bwd_ms"].median
        rows.append(row)
    return pl.DataFrame(rows)


def check_targets(bench: LayerBench) -> list[dict[str, Any]]:
    """The issue's targets, judged on the median; ``firm`` says whether the whole IQR agrees."""
    out = []
    for router, metric, op, thr, text in TARGETS:
        label = f"{router} (amortised)" if f"{router} (amortised)" in bench.stats else router
        st = bench.stat(label, metric)
        if st is None:
            continue
        ok = st.median <= thr if op == "<=" else st.median >= thr
        firm = (st.q75 <= thr) if op == "<=" else (st.q25 >= thr)
        firm_fail = (st.q25 > thr) if op == "<=" else (st.q75 < thr)
        out.append({"target": text, "candidate": label, "metric": metric, "median": st.median, "q25": st.q25,
                    "q75": st.q75, "threshold": f"{op} {thr}", "met": ok,
                    "verdict": ("met" if ok else "MISSED") + ("" if (firm if ok else firm_fail) else " (IQR straddles)")})
    return out


def print_layer_report(bench: LayerBench, out=None) -> None:
    import polars as pl

    out = out or sys.stdout
    cfg = bench.cfg
    print(f"\nMoE layer fwd+bwd: T={cfg.tokens} d={cfg.d_model} d_ff={cfg.d_ff} E={cfg.num_experts} "
          f"k={cfg.top_k} {cfg.dtype} {cfg.device}, {torch.get_num_threads()} threads{_load_note(bench.load)}; "
          f"median [IQR] of "
          f"{bench.repeats} interleaved repeats after {bench.warmup} warm-up; ratios are time ratios per repeat "
          f"(vs_*: t / t_ref; tput_*: t_ref / t)", file=out)
    with pl.Config(tbl_rows=100, tbl_cols=30, float_precision=3, tbl_width_chars=250, fmt_str_lengths=40,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print(layer_table(bench), file=out)
        pt = phase_table(bench)
        if pt.height:
            print("\nphases (median ms; one instrumented run per repeat; see harness/profile.py for the decomposition):",
                  file=out)
            print(pt, file=out)
    notes = [f"  {lab}: {inf['note']}" for lab, inf in bench.info.items() if inf.get("note")]
    if notes:
        print("\nnotes:\n" + "\n".join(notes), file=out)
    targets = check_targets(bench)
    if targets:
        print("\ntargets (median [q25, q75]):", file=out)
        for t in targets:
            print(f"  {t['verdict']:<24} {t['target']}: {t['metric']} = {t['median']:.3f} "
                  f"[{t['q25']:.3f}, {t['q75']:.3f}] ({t['threshold']})", file=out)


# -- the scaling benchmark (router alone) -------------------------------------------------------------

@dataclass
class ScalingBench:
    points: list[dict[str, Any]]   # one per (router label, d, E, T): stats
    repeats: int
    warmup: int
    top_k: int
    dtype: str
    device: str
    skipped: list[str] = field(default_factory=list)


def run_scaling_bench(experts: Sequence[int] = (8, 16, 32, 64), tokens: Sequence[int] = (2048, 8192),
                      d_models: Sequence[int] = (256, 1024), top_k: int = 2, routers: Sequence[str] | None = None, *,
                      repeats: int = 7, warmup: int = 2, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                      max_cached_mb: float = 512.0, log: Log = _stderr) -> ScalingBench:
    """Router-only fwd+bwd (routing weights + aux losses) over a grid; interleaved within each point.

    CompeteSMoE's competition variant is timed on precomputed all-expert outputs
    (a [T, E, d] leaf): this is its router-side cost only — running every expert,
    its real price, is in the layer mode. Points whose [T, E, d] tensor would exceed
    ``max_cached_mb`` skip that variant.
    """
    from ..routing.registry import create_router, get_router

    _check_repeats(repeats, warmup)
    names, skipped = resolve_routers(routers, log)
    names = [n for n in names if not get_router(n).is_dense]
    if REFERENCE not in names:
        raise ValueError("bench: scaling mode needs the smoe router as the reference")
    dev = torch.device(device)
    clock = Clock(dev)
    tdtype = DTYPES[dtype]
    points: list[dict[str, Any]] = []
    grid = [(d, E, T) for d in d_models for E in experts for T in tokens if top_k <= E]
    log(f"bench: scaling over {len(grid)} points (d x E x T), routers {', '.join(names)}")
    for d, E, T in grid:
        cands: list[dict[str, Any]] = []
        for name in names:
            cls = get_router(name)
            k = top_k if cls.supports_top_k is None or top_k in cls.supports_top_k else cls.supports_top_k[0]
            for variant, kwargs, weight, schedule in _variants(cls, cls.hparam_defaults()):
                if variant == "compete" and T * E * d * 4 / 2**20 > max_cached_mb:
                    skipped.append(f"{name}@compete at d={d} E={E} T={T}: [T,E,d] outputs exceed {max_cached_mb} MB")
                    continue
                torch.manual_seed(seed)
                try:
                    r = create_router(name, d, E, k, **kwargs).to(device=dev, dtype=tdtype).train()
                except Exception as exc:  # noqa: BLE001
                    skipped.append(f"{name}@{variant} at d={d} E={E}: {type(exc).__name__}: {exc}")
                    continue
                r.on_step(*schedule)
                label = name if variant == "default" else f"{name}@{variant}"
                cands.append({"label": label, "router": name, "variant": variant, "k": k, "module": r,
                              "weight": weight, "schedule": schedule, "t": []})
        if any(c["k"] != top_k for c in cands):
            for k in {c["k"] for c in cands} - {top_k}:
                torch.manual_seed(seed)
                r = create_router(REFERENCE, d, E, k).to(device=dev, dtype=tdtype).train()
                cands.append({"label": _ref_label(REFERENCE, k, top_k), "router": REFERENCE, "variant": "reference",
                              "k": k, "module": r, "weight": None, "schedule": (0, 1000), "t": []})
        inp = Inputs.make(T, d, tdtype, dev, seed)
        cached = None
        if any(c["variant"] == "compete" for c in cands):
            gen = torch.Generator().manual_seed(seed + 2)
            cached = torch.randn(T, E, d, generator=gen).to(device=dev, dtype=tdtype).requires_grad_()
        gws = {k: torch.randn(T, k, generator=torch.Generator().manual_seed(seed + 3)).to(dev)
               for k in {c["k"] for c in cands}}

        def step(c: dict[str, Any]) -> float:
            return router_step_time(c["module"], inp.x, inp.token_ids, clock, schedule=c["schedule"],
                                    grad_weights=gws[c["k"]], one=inp.one,
                                    cached_all=cached if c["variant"] == "compete" else None)

        n = len(cands)
        with _gc_paused():
            for r in range(warmup + repeats):
                for c in cands[r % n:] + cands[:r % n]:
                    t = step(c)
                    if r >= warmup:
                        c["t"].append(t)
        if cached is not None:
            cached.grad = None
        by_label = {c["label"]: c for c in cands}
        # amortised series
        groups: dict[str, list[dict[str, Any]]] = {}
        for c in cands:
            if c["weight"] is not None:
                groups.setdefault(c["router"], []).append(c)
        for router, parts in groups.items():
            if len(parts) >= 2:
                by_label[f"{router} (amortised)"] = {
                    "label": f"{router} (amortised)", "router": router, "variant": "amortised", "k": parts[0]["k"],
                    "weight": None, "t": [sum(p["weight"] * p["t"][i] for p in parts) for i in range(repeats)]}
        for label, c in by_label.items():
            ref = by_label.get(_ref_label(REFERENCE, c["k"], top_k))
            st = {"router_fwd_bwd_ms": Stat.of(c["t"]).scaled(1e3),
                  "router_us_per_token": Stat.of([t / T for t in c["t"]]).scaled(1e6)}
            if ref is not None:
                st["router_ratio_vs_smoe"] = Stat.of(_paired(c["t"], ref["t"], lambda a, b: a / b))
                st["router_overhead_vs_smoe_ms"] = Stat.of(_paired(c["t"], ref["t"], lambda a, b: a - b)).scaled(1e3)
            points.append({"label": label, "router": c["router"], "variant": c["variant"], "k": c["k"],
                           "d": d, "E": E, "tokens": T, "stats": st})
        log(f"bench: scaling point d={d} E={E} T={T} done")
    for msg in skipped:
        log(f"bench: {msg}")
    return ScalingBench(points, repeats, warmup, top_k, dtype, device, skipped)


def scaling_table(bench: ScalingBench):
    import polars as pl

    rows = []
    for p in bench.points:
        st = p["stats"]
        rows.append({"candidate": p["label"], "d": p["d"], "E": p["E"], "tokens": p["tokens"],
                     "router_ms": st["router_fwd_bwd_ms"].median, "iqr_ms": st["router_fwd_bwd_ms"].spread,
                     "vs_smoe": st["router_ratio_vs_smoe"].median if "router_ratio_vs_smoe" in st else None,
                     "extra_ms_vs_smoe": st["router_overhead_vs_smoe_ms"].median
                     if "router_overhead_vs_smoe_ms" in st else None})
    return pl.DataFrame(rows)


def print_scaling_report(bench: ScalingBench, out=None) -> None:
    import polars as pl

    out = out or sys.stdout
    df = scaling_table(bench)
    print(f"\nrouter alone, fwd+bwd (weights + aux losses), k={bench.top_k} {bench.dtype} {bench.device}; median of "
          f"{bench.repeats} interleaved repeats; extra_ms_vs_smoe = paired t - t_smoe", file=out)
    with pl.Config(tbl_rows=500, tbl_cols=30, float_precision=3, tbl_width_chars=250, fmt_str_lengths=40,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print(df.sort(["candidate", "d", "tokens", "E"]), file=out)
        if df.height:
            piv = df.pivot(on="E", index=["candidate", "d", "tokens"], values="extra_ms_vs_smoe",
                           aggregate_function="first").sort(["candidate", "tokens", "d"])
            print("\nextra ms over smoe's router (columns: number of experts E):", file=out)
            print(piv, file=out)


# -- store rows ------------------------------------------------------------------------------------------

def provenance() -> tuple[dict[str, Any], str]:
    from ..store import git_sha, machine_info

    return machine_info(), git_sha()


def _common_config(mode: str, repeats: int, warmup: int) -> dict[str, Any]:
    return {"mode": mode, "repeats": repeats, "warmup": warmup, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def layer_rows(bench: LayerBench, bench_id: str, machine_id: str | None, sha: str | None) -> list[dict[str, Any]]:
    rows = []
    base = {**bench.cfg.as_dict(), **_common_config("layer", bench.repeats, bench.warmup)}
    for label, st in bench.stats.items():
        inf = bench.info[label]
        cfg = {**base, "k": inf["k"], "variant": inf["variant"], "candidate": label}
        if inf.get("amortise"):
            cfg["amortise"] = inf["amortise"]
        if inf.get("weight") is not None:
            cfg["weight"] = inf["weight"]
        for metric, s in st.items():
            rows.append({"bench_id": bench_id, "machine_id": machine_id, "git_sha": sha, "router": inf["router"],
                         "config": cfg, "metric": metric, "value": s.median,
                         "spread": s.spread if metric not in ("peak_mem_mb", "saved_act_mb", "load_imbalance")
                         else None})
    return rows


def scaling_rows(bench: ScalingBench, bench_id: str, machine_id: str | None, sha: str | None) -> list[dict[str, Any]]:
    rows = []
    base = _common_config("scaling", bench.repeats, bench.warmup)
    for p in bench.points:
        cfg = {**base, "E": p["E"], "k": p["k"], "d": p["d"], "tokens": p["tokens"], "dtype": bench.dtype,
               "device": bench.device, "variant": p["variant"], "candidate": p["label"]}
        for metric, s in p["stats"].items():
            rows.append({"bench_id": bench_id, "machine_id": machine_id, "git_sha": sha, "router": p["router"],
                         "config": cfg, "metric": metric, "value": s.median, "spread": s.spread})
    return rows


def new_bench_id() -> str:
    return time.strftime("bench-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def write_rows(store_path: str, rows: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    from ..store import Store

    store = Store(store_path)
    store.register_machine(machine)
    store.add_perf(rows)


# -- CLI ---------------------------------------------------------------------------------------------------

def _int_list(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def _pos_int(s: str) -> int:
    v = _int_list(s)
    if len(v) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {s!r}")
    return v[0]


def _repeats(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < MIN_REPEATS:
        raise argparse.ArgumentTypeError(f"need at least {MIN_REPEATS} repeats for a median with a spread, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected >= 0, got {v}")
    return v


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def register_cli(sub: argparse._SubParsersAction, store_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "bench", help="time one MoE layer per router (phases, memory, ratios to smoe/dense/naive loop)",
        description="Interleaved, repeated fwd+bwd timing of one MoE layer per router, the equal-FLOP dense FFN "
                    "and the naive per-expert loop (layer mode), or of the routers alone over E/T/d (scaling "
                    "mode). Reports median and IQR; see harness/profile.py for the method.")
    p.add_argument("what", nargs="?", choices=("layer", "scaling"), default=None,
                   help="shortcut for --mode (harness bench layer | harness bench scaling)")
    p.add_argument("--mode", choices=("layer", "scaling"), default="layer")
    p.add_argument("--routers", default=None, help="comma-separated routers (default: all registered, dense "
                   "included; smoe and dense are always added as references)")
    p.add_argument("--experts", type=_int_list, default=None, help="number(s) of experts, comma-separated "
                   "(default 8; scaling: 8,16,32,64)")
    p.add_argument("--tokens", type=_int_list, default=None, help="tokens per batch, comma-separated "
                   "(default 8192; scaling: 2048,8192)")
    p.add_argument("--d-model", type=_int_list, default=None, help="model width(s) (default 256; scaling: 256,1024)")
    p.add_argument("--d-ff", type=_pos_int, default=1024, help="expert hidden width (dense: d_ff * k)")
    p.add_argument("--top-k", type=_pos_int, default=2)
    p.add_argument("--repeats", type=_repeats, default=7, help=f"timed rounds, >= {MIN_REPEATS} (default 7)")
    p.add_argument("--warmup", type=_nonneg_int, default=2, help="discarded rounds first (default 2)")
    p.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                   help="include the naive per-expert loop (layer mode; default on)")
    p.add_argument("--phases", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the instrumented per-phase pass (layer mode; default on)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_pos_int, default=None,
                   help="torch intra-op threads for the run (default: torch's current setting); recorded in the rows")
    p.add_argument("--no-store", action="store_true", help="print only; write nothing to the store")
    store_arg(p)
    p.set_defaults(fn=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..spec import SpecError

    mode = args.what or args.mode
    routers = [r.strip() for r in args.routers.split(",") if r.strip()] if args.routers else None
    # before any timing: every router asked for by name exists, and the store can be written
    from ..routing.registry import get_router

    for name in routers or ():
        get_router(name)  # UnknownRouterError / PluginLoadError: one line, exit 2
    if args.top_k > min(args.experts or [8]):
        raise SpecError(f"--top-k {args.top_k} exceeds --experts {min(args.experts or [8])}")
    if not args.no_store:
        from ..args import probe_dir
        from ..store import Store

        probe_dir(os.path.dirname(os.path.abspath(args.store)), "results store directory", "--store")
        Store(args.store).check_readable()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    try:
        if mode == "layer":
            benches = []
            for d in args.d_model or [256]:
                for E in args.experts or [8]:
                    for T in args.tokens or [8192]:
                        cfg = LayerConfig(tokens=T, d_model=d, d_ff=args.d_ff, num_experts=E, top_k=args.top_k,
                                          dtype=args.dtype, device=device, seed=args.seed)
                        b = run_layer_bench(cfg, routers, naive=args.naive, repeats=args.repeats,
                                            warmup=args.warmup, phases=args.phases)
                        print_layer_report(b)
                        benches.append(b)
        else:
            sb = run_scaling_bench(args.experts or (8, 16, 32, 64), args.tokens or (2048, 8192),
                                   args.d_model or (256, 1024), args.top_k, routers, repeats=args.repeats,
                                   warmup=args.warmup, dtype=args.dtype, device=device, seed=args.seed)
            print_scaling_report(sb)
    except ValueError as exc:
        raise SpecError(str(exc)) from exc
    if args.no_store:
        return 0
    machine, sha = provenance()
    bench_id = new_bench_id()
    if mode == "layer":
        rows = [r for b in benches for r in layer_rows(b, bench_id, machine["machine_id"], sha)]
    else:
        rows = scaling_rows(sb, bench_id, machine["machine_id"], sha)
    write_rows(args.store, rows, machine)
    print(f"wrote {len(rows)} perf rows to {args.store} (bench_id {bench_id})")
    return 0
