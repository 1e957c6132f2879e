"""The papers' claims beside the harness' verdict: the data behind ``harness claims`` and the Claims tab.

The shipped table (``tasks/claims/papers.yaml``) lists each paper's directional claim ("CompeteSMoE
beats SMoE", ...) with its setting and figure. :func:`claims_table` judges each claim on stored runs:
the suite's primary metric (lm ``val_bpb``, lower is better; vision ``val_top1``, higher is better)
over *distinct* seeds (one finished run per spec hash and seed, the latest:
:func:`leaderboard.stats.distinct_seeds`), Welch's unequal-variance t-test (scipy) at alpha = 0.05:

* ``holds (p=…)``: the router is significantly better than the baseline;
* ``reversed (p=…)``: significantly worse;
* ``within noise (p=…, n=…)``: no significant difference with these many seeds;
* ``n<2``: either side has fewer than two seeds (no test).

The page and the command call this one function, so they always agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from harness.spec import SpecError
from leaderboard.formatting import fmt_ci, fmt_p
from leaderboard.stats import ALPHA, finite, distinct_seeds, mean_ci, welch
from leaderboard.suites import SuiteMeta

CLAIM_KEYS = ("id", "router", "baseline", "claim", "paper", "arxiv", "setting", "figure")


@dataclass(frozen=True)
class Claim:
    id: str
    router: str
    baseline: str
    claim: str
    paper: str = ""
    arxiv: str = ""
    setting: str = ""
    figure: str = "figure/table not verified"


class ClaimsError(SpecError):
    """The claims table cannot be read (a user error: ``harness: error: ...``, exit 2)."""


def claims_path() -> Path:
    return Path(str(resources.files("harness.tasks").joinpath("claims", "papers.yaml")))


def load_claims(path: str | Path | None = None) -> list[Claim]:
    p = Path(path) if path is not None else claims_path()
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ClaimsError(f"{p}: cannot read the claims table: {exc}".replace("\n", " ")) from exc
    items = raw.get("claims") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise ClaimsError(f"{p}: expected a top-level 'claims:' list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ClaimsError(f"{p}: claims[{i}] must be a mapping")
        unknown = sorted(set(item) - set(CLAIM_KEYS))
        missing = [k for k in ("id", "router", "baseline", "claim") if not item.get(k)]
        if unknown or missing:
            what = f"unknown key {unknown[0]!r}" if unknown else f"missing {missing[0]!r}"
            raise ClaimsError(f"{p}: claims[{i}]: {what} (keys: {', '.join(CLAIM_KEYS)})")
        out.append(Claim(**{k: str(v).strip() for k, v in item.items()}))
    return out


# -- the verdict ------------------------------------------------------------------------------------

def verdict(router_vals: list[float], base_vals: list[float], higher_better: bool,
            alpha: float = ALPHA) -> dict[str, Any]:
    """label ('holds' | 'reversed' | 'within noise' | 'n<2'), p, t, the two n and the display text."""
    a, b = finite(router_vals), finite(base_vals)
    res = welch(a, b)
    if res is None:
        return {"label": "n<2", "p": None, "t": None, "n_router": len(a), "n_baseline": len(b),
                "verdict": f"n<2 (n={len(a)} vs {len(b)})"}
    t, p = res
    if p < alpha:
        label = "holds" if (t > 0) == higher_better else "reversed"
        text = f"{label} ({fmt_p(p)})"
    else:
        label = "within noise"
        n = f"{len(a)}" if len(a) == len(b) else f"{len(a)} vs {len(b)}"
        text = f"within noise ({fmt_p(p)}, n={n})"
    return {"label": label, "p": p, "t": t, "n_router": len(a), "n_baseline": len(b), "verdict": text}


CLAIMS_SCHEMA = {
    "claim": pl.Utf8, "router": pl.Utf8, "baseline": pl.Utf8, "verdict": pl.Utf8, "label": pl.Utf8,
    "p": pl.Float64, "n_router": pl.Int64, "n_baseline": pl.Int64,
    "router_mean": pl.Float64, "router_ci": pl.Float64, "baseline_mean": pl.Float64, "baseline_ci": pl.Float64,
    "paper": pl.Utf8, "arxiv": pl.Utf8, "setting": pl.Utf8, "figure": pl.Utf8, "id": pl.Utf8,
}


def claims_table(runs: pl.DataFrame, metrics: pl.DataFrame, meta: SuiteMeta, claims: list[Claim] | None = None,
                 alpha: float = ALPHA) -> pl.DataFrame:
    """One row per claim: the harness' verdict on ``runs`` (the filtered runs of ONE suite and preset);
    ``meta`` says which metric and which direction."""
    claims = load_claims() if claims is None else claims
    runs, _ = distinct_seeds(runs)
    fin = runs.filter(pl.col("status") == "finished").select("run_id", "router")
    vals = metrics.filter(pl.col("name") == meta.quality).join(fin, on="run_id") \
        .group_by("run_id", "router").agg(pl.col("value").last())
    by_router: dict[str, list[float]] = {}
    for router, v in vals.select("router", "value").iter_rows():
        by_router.setdefault(router, []).append(v)
    rows = []
    for c in claims:
        a, b = by_router.get(c.router, []), by_router.get(c.baseline, [])
        v = verdict(a, b, meta.higher_better, alpha)
        ra, rb = mean_ci(a), mean_ci(b)
        rows.append({"claim": c.claim, "router": c.router, "baseline": c.baseline, "verdict": v["verdict"],
                     "label": v["label"], "p": v["p"], "n_router": v["n_router"], "n_baseline": v["n_baseline"],
                     "router_mean": ra[0], "router_ci": ra[1], "baseline_mean": rb[0], "baseline_ci": rb[1],
                     "paper": c.paper, "arxiv": c.arxiv, "setting": c.setting, "figure": c.figure, "id": c.id})
    return pl.DataFrame(rows, schema=CLAIMS_SCHEMA) if rows else pl.DataFrame(schema=CLAIMS_SCHEMA)


def fmt_side(router: str, mean: float | None, ci: float | None, n: int, meta: SuiteMeta,
             percent_sign: bool = True) -> str:
    """One side of a claim: ``competesmoe 1.05 ± 0.64 (n=2)`` (a percentage metric shown x 100, with a
    ``%`` after it when ``percent_sign``)."""
    m, h = meta.shown(mean), meta.shown(ci)
    return f"{router} {fmt_ci(m, h)}{'%' if percent_sign and meta.percent and m is not None else ''} (n={n})"
