"""The layer benchmark: every candidate's forward + backward, interleaved round-robin, the router
alone, the instrumented per-phase run and memory; then medians, IQRs, paired ratios, amortised rows."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..layers.kernels import DEFAULT_IMPL
from .candidates import (DENSE, NAIVE, REFERENCE, Candidate, Inputs, LayerConfig, build_candidates, impl_label, ref_label,
                         resolve_routers)
from .memory import measure_memory
from .steps import (GemmRoofline, router_forward_time, router_step_time, run_phased, run_plain, verify_impl,
                    verify_naive)
from .timing import PHASES, Clock, Log, Stat, check_repeats, gc_paused, loadavg, log_stderr, paired


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
    experts_impl: str = DEFAULT_IMPL


@dataclass
class LayerBench:
    cfg: LayerConfig
    results: list[CandidateResult]
    repeats: int
    warmup: int
    skipped: list[str] = field(default_factory=list)
    load: tuple[float, float] | None = None                            # 1-min load average at start, end
    roofline: list[float] = field(default_factory=list)                # per repeat: the six GEMMs unsplit, s
    roofline_gflops: float | None = None                               # their FLOP rate (median)
    stats: dict[str, dict[str, Stat]] = field(default_factory=dict)   # label -> metric -> Stat
    info: dict[str, dict[str, Any]] = field(default_factory=dict)      # label -> row metadata

    def stat(self, label: str, metric: str) -> Stat | None:
        return self.stats.get(label, {}).get(metric)



def run_layer_bench(cfg: LayerConfig, routers: Sequence[str] | None = None, *, naive: bool = True,
                    repeats: int = 7, warmup: int = 2, phases: bool = True, mem_repeats: int = 3,
                    router_inner: int = 3, log: Log = log_stderr,
                    experts_impls: Sequence[str] | None = None) -> LayerBench:
    """Interleaved fwd+bwd timing of one layer per candidate; see the module docstring.

    ``experts_impls``: expert kernels to compare, one row each per MoE candidate
    (:func:`harness.bench.candidates.build_candidates`); None: the default kernel only.
    """
    check_repeats(repeats, warmup)
    names, skipped = resolve_routers(routers, log)
    if not names:
        raise ValueError("bench: no router to benchmark")
    device = torch.device(cfg.device)
    clock = Clock(device)
    cands = build_candidates(cfg, names, naive=naive, log=log, experts_impls=experts_impls)
    inp = Inputs.make(cfg.tokens, cfg.d_model, cfg.torch_dtype, device, cfg.seed)
    gws = {k: torch.randn(cfg.tokens, k, generator=torch.Generator().manual_seed(cfg.seed + 3)).to(device)
           for k in {c.top_k for c in cands}}

    _prepare(cands, inp, phases, log)
    roof = GemmRoofline(cfg.tokens * cfg.top_k, cfg.d_model, cfg.d_ff, cfg.torch_dtype, device, cfg.seed)
    roof_times: list[float] = []
    load0 = loadavg()
    results = {c.label: CandidateResult(c.label, c.router, c.variant, c.kind, c.top_k, c.note, c.weight,
                                        phases_ok=phases, experts_impl=c.experts_impl) for c in cands}
    n = len(cands)
    log(f"bench: {n} candidates x ({warmup} warm-up + {repeats}) rounds, T={cfg.tokens} d={cfg.d_model} "
        f"d_ff={cfg.d_ff} E={cfg.num_experts} k={cfg.top_k} {cfg.dtype} on {cfg.device}, "
        f"{torch.get_num_threads()} threads")
    with gc_paused():
        for r in range(warmup + repeats):
            t_round = time.perf_counter()
            order = cands[r % n:] + cands[:r % n]
            keep = r >= warmup
            t = _round(order, inp, clock, roof, gws, results, keep, phases, router_inner)
            if keep:
                roof_times.append(t)
            gc.collect()
            log(f"bench: round {r + 1}/{warmup + repeats}{' (warm-up)' if not keep else ''} "
                f"{time.perf_counter() - t_round:.1f}s")
    for c in cands:  # memory last: malloc_trim and the RSS reset must not disturb the timed rounds
        mems = [measure_memory(c, inp, clock) for _ in range(mem_repeats)]
        peaks = [m["peak_mem_mb"] for m in mems if m["peak_mem_mb"] is not None]
        results[c.label].memory = {**mems[0], "peak_mem_mb": float(np.median(peaks)) if peaks else None}
    bench = LayerBench(cfg, [results[c.label] for c in cands], repeats, warmup, skipped, load=(load0, loadavg()),
                       roofline=roof_times, roofline_gflops=roof.flops / float(np.median(roof_times)) / 1e9)
    summarise_layer(bench)
    return bench



def _prepare(cands: list[Candidate], inp: Inputs, phases: bool, log: Log) -> None:
    """Cached all-expert outputs for competition variants; the naive loop and other kernels checked against the
    layer before anything is timed."""
    for c in cands:
        if c.variant == "compete" and c.router_module is not None:
            with torch.no_grad():
                c.cached_all = c.module.all_expert_outputs(inp.x.detach())
            c.cached_all.requires_grad_()
        if phases and c.kind == "naive":  # an independent implementation of the layer: it must agree with it
            why = verify_naive(c, inp)
            if why is not None:
                log(f"bench: WARNING naive loop disagrees with the smoe layer: {why}")
        if c.kind == "moe" and c.experts_impl != DEFAULT_IMPL:  # another kernel: the same function
            why = verify_impl(c, inp)
            if why is not None:
                log(f"bench: WARNING {c.label} disagrees with the {DEFAULT_IMPL} kernel: {why}")


def _round(order: list[Candidate], inp: Inputs, clock: Clock, roof: GemmRoofline, gws: dict[int, torch.Tensor],
           results: dict[str, CandidateResult], keep: bool, phases: bool, router_inner: int) -> float:
    """One timed round in ``order``: every candidate's fwd+bwd, the roofline (returned), the routers alone and,
    with ``phases``, the phased run; samples recorded when ``keep`` (not a warm-up round)."""
    for c in order:
        t = run_plain(c, inp, clock)
        if keep:
            results[c.label].samples.setdefault("fwd_bwd", []).append(t)
    t_roof = roof.time(clock)  # in the same round as the candidates: the roofline of this round
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
            if results[c.label].phases_ok:
                _phased(c, inp, clock, results[c.label].samples, keep, router_inner)
    return t_roof


def _phased(c: Candidate, inp: Inputs, clock: Clock, res: dict[str, list[float]], keep: bool,
            router_inner: int) -> None:
    """One phased run of ``c``; the aux-loss share of the router's time moved to the aux_loss phase."""
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
        for p in (*PHASES, "total"):
            res.setdefault("phase_" + p if p != "total" else "phased_total", []).append(ph[p])
        res.setdefault("aux_share", []).append(share)

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
        ref = series.get(impl_label(ref_label(REFERENCE, res.top_k, main_k), res.experts_impl), {})
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
            groups.setdefault(_amortised_label(res), []).append(res)
    for label, parts in groups.items():
        if len(parts) >= 2:
            n = len(out[parts[0].label])
            out[label] = [sum(p.weight * out[p.label][i] for p in parts) for i in range(n)]
    return out


def _amortised_label(res: CandidateResult) -> str:
    """The row a weighted variant is amortised into: one per router and expert kernel."""
    return impl_label(f"{res.router} (amortised)", res.experts_impl)


def summarise_layer(bench: LayerBench) -> None:
    """Fill ``bench.stats``/``bench.info``: medians, IQRs, paired ratios, amortised rows."""
    cfg = bench.cfg
    main_k = cfg.top_k
    series: dict[str, dict[str, list[float]]] = {}
    info: dict[str, dict[str, Any]] = {}
    for res in bench.results:
        series[res.label] = dict(res.samples)
        info[res.label] = {"router": res.router, "variant": res.variant, "kind": res.kind, "k": res.top_k,
                           "note": res.note, "memory": dict(res.memory), "weight": res.weight,
                           "experts_impl": res.experts_impl}
    # amortised rows for routers measured in weighted variants
    by_router: dict[str, list[CandidateResult]] = {}
    for res in bench.results:
        if res.weight is not None and res.kind == "moe":
            by_router.setdefault(_amortised_label(res), []).append(res)
    for label, parts in by_router.items():
        if len(parts) < 2:
            continue
        router = parts[0].router
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
                       "weight": None, "amortise": {p.variant: p.weight for p in parts},
                       "experts_impl": parts[0].experts_impl}

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
        refs = {"smoe": ref_label(REFERENCE, k, main_k), "dense": ref_label(DENSE, k, main_k)}
        impl = info[label].get("experts_impl", DEFAULT_IMPL)
        t = s.get("fwd_bwd")
        if t:
            for name, ref in refs.items():
                rt = series.get(ref, {}).get("fwd_bwd")
                if rt:
                    st[f"ratio_vs_{name}"] = Stat.of(paired(t, rt, lambda a, b: a / b))
                    if name == "dense":
                        st["throughput_vs_dense"] = Stat.of(paired(t, rt, lambda a, b: b / a))
            if bench.roofline and len(bench.roofline) == len(t):
                st["roofline_frac"] = Stat.of(paired(bench.roofline, t, lambda r, c: r / c))
            nt = series.get(NAIVE, {}).get("fwd_bwd")
            if nt and kind == "moe" and k == main_k:
                st["ratio_vs_naive"] = Stat.of(paired(t, nt, lambda a, b: a / b))
                st["throughput_vs_naive"] = Stat.of(paired(t, nt, lambda a, b: b / a))
        if s.get("router_fwd_bwd"):
            st["router_fwd_bwd_ms"] = Stat.of(s["router_fwd_bwd"]).scaled(1e3)
        if label in resolved:  # the router's own cost: against smoe on the same kernel
            ref_t = series[impl_label(refs["smoe"], impl)]["fwd_bwd"]
            st["router_overhead_vs_smoe"] = Stat.of(paired(resolved[label], ref_t, lambda a, b: a / b))
        for m, v in info[label]["memory"].items():
            if v is not None:
                st[m] = Stat(float(v), float(v), float(v))
        stats[label] = st
    bench.stats = stats
    bench.info = info

