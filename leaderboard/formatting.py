"""Numbers, p-values, times and runs as the board and ``harness claims`` print them."""
from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import polars as pl

from harness.metrics import Metric
from leaderboard.runs import parse_json


def decimals_for(ci: float | None, value: float | None = None, default: int = 3) -> int:
    """Decimals that show the CI to two significant digits (within 1..5)."""
    if ci is not None and ci > 0 and math.isfinite(ci):
        return int(min(5, max(1, 1 - math.floor(math.log10(ci)))))
    if value is not None and math.isfinite(value) and abs(value) >= 100:
        return 1
    return default


def fmt_ci(mean: float | None, ci: float | None, n: int | None = None, digits: int | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    d = decimals_for(ci, mean) if digits is None else digits
    if ci is None or (isinstance(ci, float) and math.isnan(ci)):
        return f"{mean:.{d}f}" + (f" (n={n})" if n is not None and n < 2 else "")
    return f"{mean:.{d}f} ± {ci:.{d}f}"


def fmt_num(v: float | None, digits: int = 0, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:,.{digits}f}{suffix}"


def fmt_si(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    for div, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{s}"
    return f"{v:.3g}"


def fmt_metric(m: Metric, v: float | None) -> str:
    """A declared metric's cell: its format spec, ``si`` (1.2k, 3.4M) or ``pct`` (x 100); ``—`` when missing."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if m.fmt == "si":
        return fmt_si(v)
    return f"{v * 100 if m.percent else v:{'.1f' if m.percent else m.fmt}}"


def fmt_perf(v: float | None, spread: float | None) -> str:
    """A bench median with its IQR spread: ``1.234 (IQR 0.100)``."""
    if v is None:
        return "—"
    d = 3 if abs(v) < 10 else 1 if abs(v) < 1000 else 0
    return f"{v:,.{d}f}" + (f" (IQR {spread:,.{d}f})" if spread is not None else "")


def fmt_p(p: float | None) -> str:
    """A claim verdict's p-value: ``p<0.001`` or ``p=0.012``."""
    if p is None:
        return "p=?"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _p_short(p: float | None) -> str:
    """The overview's p: two decimals, three below 0.1 (0.049 must not read 0.05), ``<0.001`` below that."""
    if p is None:
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


def sig_text(label: str, p: float | None, p_holm: float | None = None, test: str | None = None) -> str:
    """The overview's *vs SMoE* cell: ``▲ better (paired p=0.004, Holm p=0.012)``, ``≈ within noise (p=0.31)``,
    ``— baseline``. The label is decided on the Holm-adjusted p, so both are shown."""
    if label == "baseline":
        return "— baseline"
    if label in ("n<2", "no SMoE"):
        return label
    glyph = {"better": "▲ better", "worse": "▼ worse", "within noise": "≈ within noise"}.get(label, label)
    if p is None:
        return glyph
    raw = f"{kind_name(test) + ' ' if test else ''}p{'' if p < 0.001 else '='}{_p_short(p)}"
    adj = f", Holm p{'' if p_holm < 0.001 else '='}{_p_short(p_holm)}" if p_holm is not None else ""
    return f"{glyph} ({raw}{adj})"


def kind_name(kind: str | None) -> str:
    """A :class:`leaderboard.stats.Comparison` kind as prose: ``paired``, ``Welch``, ``n<2``."""
    return {"welch": "Welch"}.get(kind or "", kind or "")


def fmt_diff(diff: float | None, ci: float | None, digits: int | None = None) -> str:
    """A signed difference with its 95% CI half-width: ``-0.052 ± 0.010`` (``+0.3`` without a CI)."""
    if diff is None or not math.isfinite(diff):
        return "—"
    d = decimals_for(ci, diff) if digits is None else digits
    return f"{diff:+.{d}f}" + (f" ± {ci:.{d}f}" if ci is not None and math.isfinite(ci) else "")


def fmt_resolution(mde: float | None, n: int, unit: str = "", target: float | None = None,
                   n_target: int | None = None, cap: int | None = None, label: str = "") -> str:
    """What a comparison could have detected: ``within noise: effects under 0.041 bpb undetectable at n = 3;
    0.01 bpb needs ≈ 30 seeds``. ``mde``: the minimum detectable effect at n; ``n_target``: seeds that
    ``target`` would need (None with ``cap``: more than cap); "" when there is no MDE (n < 2, no spread)."""
    if mde is None or not math.isfinite(mde):
        return ""
    u = f" {unit}" if unit else ""
    out = f"effects under {mde:.{decimals_for(mde)}f}{u} undetectable at n = {n}"
    if target is not None and n_target is not None:
        out += f"; {target:g}{u} needs ≈ {n_target:,} seeds"
    elif target is not None and cap is not None:
        out += f"; {target:g}{u} needs more than {cap:,} seeds"
    return f"{label}: {out}" if label else out


def fmt_dt(v: Any) -> str:
    return v.strftime("%Y-%m-%d %H:%M:%S") if isinstance(v, datetime) else ("—" if v is None else str(v))


def duration(a: Any, b: Any) -> str:
    if not isinstance(a, datetime) or not isinstance(b, datetime):
        return "—"
    s = (b - a).total_seconds()
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def run_label(r: dict[str, Any]) -> str:
    started = r.get("started_at")
    when = started.strftime("%Y-%m-%d %H:%M") if isinstance(started, datetime) else "?"
    return f"{r['router']} · seed {r['seed']} · {str(r.get('status')).upper()} · {when} · {r['run_id']}"


def setup_summary(runs: pl.DataFrame) -> str:
    """One line describing the model/training setup of the shown runs (from their resolved spec)."""
    fin = runs.filter(pl.col("status") == "finished")
    src = fin if fin.height else runs
    if src.height == 0:
        return ""
    cfg = parse_json(src["config"][0])
    m, t, d = cfg.get("model", {}), cfg.get("train", {}), cfg.get("data", {})
    parts = []
    if d.get("corpus") or d.get("dataset"):
        parts.append(str(d.get("corpus") or d.get("dataset")))
    if m:
        parts.append(f"d_model {m.get('d_model')}, {m.get('n_layers')} layers, "
                     f"{m.get('num_experts')} experts top-{m.get('top_k')}")
    if t:
        parts.append(f"{t.get('steps')} steps × batch {t.get('batch_size')}")
    return " · ".join(str(p) for p in parts)
