"""What ``harness bench`` prints and stores: the layer and phase tables, the issue's targets, the scaling
tables, and one store row per (candidate, metric)."""
from __future__ import annotations

import sys
import time
import uuid
from typing import Any

import polars as pl
import torch

from ..layers.kernels import pick
from ..store import Store, git_sha, machine_info
from .layer import LayerBench
from .scaling import ScalingBench
from .timing import PHASES, load_note


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
# Issue 17 (pluggable expert kernels): the smoe layer on each kernel benchmarked (``smoe`` = loop,
# ``smoe:<kernel>`` for every other ``--experts-impl``) within 1.05x the equal-FLOP dense FFN.
KERNEL_TARGET: tuple[str, str, float] = ("ratio_vs_dense", "<=", 1.05)
# Issue 17: at d_model >= 256 the smoe layer <= 1.0x the dense FFN and >= 80% of the same-run GEMM roofline.
WIDE_D = 256
WIDE_TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("ratio_vs_dense", "<=", 1.0, "issue 17: at d >= 256 the smoe layer ({kernel}) <= 1.0x the dense FFN"),
    ("roofline_frac", ">=", 0.80, "issue 17: at d >= 256 the smoe layer ({kernel}) >= 80% of the GEMM roofline"),
)


def layer_table(bench: LayerBench):
    """Polars frame: one row per candidate (and amortised router), the headline columns."""
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
            "roofline": med("roofline_frac"),
            "router_ms": med("router_fwd_bwd_ms"), "router_ovh_vs_smoe": med("router_overhead_vs_smoe"),
            "peak_mem_mb": med("peak_mem_mb"), "saved_act_mb": med("saved_act_mb"),
            "load_max/mean": med("load_imbalance"),
        })
    return pl.DataFrame(rows)


def phase_table(bench: LayerBench):
    """Polars frame: median ms per phase, their sum, the instrumented total and the plain total."""
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
        out.extend(_judge(bench, label, metric, op, thr, text))
    metric, op, thr = KERNEL_TARGET
    for label, kernel in _smoe_kernel_rows(bench):
        text = f"issue 17: smoe layer on the {kernel} kernel <= {thr}x the equal-FLOP dense FFN"
        out.extend(_judge(bench, label, metric, op, thr, text))
        if bench.cfg.d_model >= WIDE_D:
            for m, o, t, txt in WIDE_TARGETS:
                out.extend(_judge(bench, label, m, o, t, txt.format(kernel=kernel)))
    return out


def _smoe_kernel_rows(bench: LayerBench) -> list[tuple[str, str]]:
    """(label, expert kernel) of the smoe rows: ``smoe`` (the default kernel) and every ``smoe:<kernel>``."""
    return [(label, bench.info[label].get("experts_impl", "loop")) for label in bench.stats
            if label == "smoe" or label.startswith("smoe:")]


def kernel_crossover(bench: LayerBench) -> str | None:
    """With two or more smoe kernels timed: the fastest one here (median time ratio to the loop) and what
    ``auto`` picks at this size, so a sweep over ``--tokens`` / ``--d-model`` re-measures its crossover."""
    measured = {kernel: bench.stats[label]["ratio_vs_smoe"] for label, kernel in _smoe_kernel_rows(bench)
                if kernel != "auto" and "ratio_vs_smoe" in bench.stats[label]}
    if len(measured) < 2:
        return None
    best = min(measured, key=lambda k: measured[k].median)
    cfg = bench.cfg
    picked = pick(torch.device(cfg.device), cfg.torch_dtype, cfg.d_model, cfg.d_ff, cfg.tokens * cfg.top_k,
                  cfg.num_experts)
    ranked = ", ".join(f"{k} {v.median:.3f} [{v.q25:.3f}, {v.q75:.3f}]"
                       for k, v in sorted(measured.items(), key=lambda kv: kv[1].median))
    agree = "agrees" if picked == best else "differs (auto's table: harness/layers/kernels.py pick)"
    return f"time / loop: {ranked}; fastest here: {best}; auto picks {picked}: {agree}"


def _judge(bench: LayerBench, label: str, metric: str, op: str, thr: float, text: str) -> list[dict[str, Any]]:
    st = bench.stat(label, metric)
    if st is None:
        return []
    ok = st.median <= thr if op == "<=" else st.median >= thr
    firm = (st.q75 <= thr) if op == "<=" else (st.q25 >= thr)
    firm_fail = (st.q25 > thr) if op == "<=" else (st.q75 < thr)
    return [{"target": text, "candidate": label, "metric": metric, "median": st.median, "q25": st.q25,
             "q75": st.q75, "threshold": f"{op} {thr}", "met": ok,
             "verdict": ("met" if ok else "MISSED") + ("" if (firm if ok else firm_fail) else " (IQR straddles)")}]


def print_layer_report(bench: LayerBench, out=None) -> None:
    out = out or sys.stdout
    cfg = bench.cfg
    print(f"\nMoE layer fwd+bwd: T={cfg.tokens} d={cfg.d_model} d_ff={cfg.d_ff} E={cfg.num_experts} "
          f"k={cfg.top_k} {cfg.dtype} {cfg.device}, {torch.get_num_threads()} threads{load_note(bench.load)}; "
          f"median [IQR] of "
          f"{bench.repeats} interleaved repeats after {bench.warmup} warm-up; ratios are time ratios per repeat "
          f"(vs_*: t / t_ref; tput_*: t_ref / t; roofline: the layer's six GEMMs unsplit, timed in the same "
          f"rounds ({bench.roofline_gflops or 0:.1f} GFLOP/s), / t)", file=out)
    with pl.Config(tbl_rows=100, tbl_cols=30, float_precision=3, tbl_width_chars=250, fmt_str_lengths=40,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print(layer_table(bench), file=out)
        pt = phase_table(bench)
        if pt.height:
            print("\nphases (median ms; one instrumented run per repeat; see harness/bench/__init__.py for the decomposition):",
                  file=out)
            print(pt, file=out)
    notes = [f"  {lab}: {inf['note']}" for lab, inf in bench.info.items() if inf.get("note")]
    if notes:
        print("\nnotes:\n" + "\n".join(notes), file=out)
    verdict = kernel_crossover(bench)
    if verdict:
        print(f"\nexpert kernels: {verdict}", file=out)
    targets = check_targets(bench)
    if targets:
        print("\ntargets (median [q25, q75]):", file=out)
        for t in targets:
            print(f"  {t['verdict']:<24} {t['target']}: {t['metric']} = {t['median']:.3f} "
                  f"[{t['q25']:.3f}, {t['q75']:.3f}] ({t['threshold']})", file=out)



def scaling_table(bench: ScalingBench):
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
        if inf["kind"] != "dense":
            cfg["experts_impl"] = inf.get("experts_impl", "loop")
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
    store = Store(store_path)
    store.register_machine(machine)
    store.add_perf(rows)

