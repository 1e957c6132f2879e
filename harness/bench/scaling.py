"""The scaling benchmark: the router alone (forward + backward of its routing weights and aux losses)
over a grid of model widths, expert counts and tokens per batch, interleaved within each point."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..routing.registry import create_router, get_router
from .candidates import DTYPES, REFERENCE, Inputs, ref_label, resolve_routers, schedule_variants
from .steps import router_step_time
from .timing import Clock, Log, Stat, check_repeats, gc_paused, log_stderr, paired


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
                      max_cached_mb: float = 512.0, log: Log = log_stderr) -> ScalingBench:
    """Router-only fwd+bwd (routing weights + aux losses) over a grid; interleaved within each point.

    CompeteSMoE's competition variant is timed on precomputed all-expert outputs
    (a [T, E, d] leaf): this is its router-side cost only — running every expert,
    its real price, is in the layer mode. Points whose [T, E, d] tensor would exceed
    ``max_cached_mb`` skip that variant.
    """
    check_repeats(repeats, warmup)
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
        cands = _candidates(names, d, E, T, top_k, seed, dev, tdtype, max_cached_mb, skipped)
        _time_point(cands, d, E, T, seed, dev, tdtype, clock, repeats, warmup)
        points += _point_rows(cands, d, E, T, top_k, repeats)
        log(f"bench: scaling point d={d} E={E} T={T} done")
    for msg in skipped:
        log(f"bench: {msg}")
    return ScalingBench(points, repeats, warmup, top_k, dtype, device, skipped)



def _candidates(names: Sequence[str], d: int, E: int, T: int, top_k: int, seed: int, dev: torch.device,
                tdtype: torch.dtype, max_cached_mb: float, skipped: list[str]) -> list[dict[str, Any]]:
    """One point's routers (each schedule variant), plus the reference at every k a router forced."""
    cands: list[dict[str, Any]] = []
    for name in names:
        cls = get_router(name)
        k = top_k if cls.supports_top_k is None or top_k in cls.supports_top_k else cls.supports_top_k[0]
        for variant, kwargs, weight, schedule in schedule_variants(cls, cls.hparam_defaults()):
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
            cands.append({"label": ref_label(REFERENCE, k, top_k), "router": REFERENCE, "variant": "reference",
                          "k": k, "module": r, "weight": None, "schedule": (0, 1000), "t": []})
    return cands


def _time_point(cands: list[dict[str, Any]], d: int, E: int, T: int, seed: int, dev: torch.device,
                tdtype: torch.dtype, clock: Clock, repeats: int, warmup: int) -> None:
    """Each candidate's fwd+bwd times into ``c["t"]``, interleaved (rotating the order each repeat)."""
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
    with gc_paused():
        for r in range(warmup + repeats):
            for c in cands[r % n:] + cands[:r % n]:
                t = step(c)
                if r >= warmup:
                    c["t"].append(t)
    if cached is not None:
        cached.grad = None


def _point_rows(cands: list[dict[str, Any]], d: int, E: int, T: int, top_k: int,
                repeats: int) -> list[dict[str, Any]]:
    """The point's rows: each candidate and each amortised series, with ratios to the reference at its k."""
    by_label = {c["label"]: c for c in cands}
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in cands:
        if c["weight"] is not None:
            groups.setdefault(c["router"], []).append(c)
    for router, parts in groups.items():
        if len(parts) >= 2:
            by_label[f"{router} (amortised)"] = {
                "label": f"{router} (amortised)", "router": router, "variant": "amortised", "k": parts[0]["k"],
                "weight": None, "t": [sum(p["weight"] * p["t"][i] for p in parts) for i in range(repeats)]}
    rows = []
    for label, c in by_label.items():
        ref = by_label.get(ref_label(REFERENCE, c["k"], top_k))
        st = {"router_fwd_bwd_ms": Stat.of(c["t"]).scaled(1e3),
              "router_us_per_token": Stat.of([t / T for t in c["t"]]).scaled(1e6)}
        if ref is not None:
            st["router_ratio_vs_smoe"] = Stat.of(paired(c["t"], ref["t"], lambda a, b: a / b))
            st["router_overhead_vs_smoe_ms"] = Stat.of(paired(c["t"], ref["t"], lambda a, b: a - b)).scaled(1e3)
        rows.append({"label": label, "router": c["router"], "variant": c["variant"], "k": c["k"],
                     "d": d, "E": E, "tokens": T, "stats": st})
    return rows
