"""The papers' claims beside the harness' verdict: the data behind ``harness claims`` and the Claims tab.

The shipped table (``tasks/claims/papers.yaml``) lists each paper's directional claim ("CompeteSMoE
beats SMoE", ...) with its setting and figure. :func:`claims_table` judges each claim on stored runs:
the suite's primary metric (lm ``val_bpb``, lower is better; vision ``val_top1``, higher is better)
over *distinct* seeds (one finished run per spec hash and seed, the latest:
:func:`leaderboard.stats.distinct_seeds`), compared as :func:`leaderboard.verdicts.judge` does: the paired
t-test over the seeds both ran where the runs are a controlled experiment (same spec outside the router), else
Welch's unequal-variance t-test; the p-values Holm-adjusted over all the claims the table judges, and the label
decided on the adjusted p at alpha = 0.05:

* ``holds (paired p=…, Holm p=…)``: the router is significantly better than the baseline;
* ``reversed (Welch p=…, Holm p=…)``: significantly worse;
* ``within noise (paired p=…, Holm p=…, n=…)``: no significant difference with these many seeds; the row's
  ``resolution`` says which effects the test could not have seen and how many seeds 0.01 would need;
* ``n<2``: no test (fewer than two seeds on a side, or two pairs when pairing).

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
from leaderboard.formatting import fmt_ci, fmt_p, kind_name
from leaderboard.stats import ALPHA, finite, mean_ci
from leaderboard.suites import SuiteMeta
from leaderboard.verdicts import TARGET_EFFECT, Sample, Verdict, judge, resolution, samples

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

CLAIM_LABELS = {"better": "holds", "worse": "reversed", "within noise": "within noise", "n<2": "n<2"}


def judged(v: Verdict) -> dict[str, Any]:
    """A claim's verdict from its :class:`~leaderboard.verdicts.Verdict`: label ('holds' | 'reversed' |
    'within noise' | 'n<2', decided on the Holm-adjusted p), raw and adjusted p, the test, and the text."""
    c = v.comparison
    label = CLAIM_LABELS[v.direction]
    if label == "n<2":
        text = f"n<2 (n={c.n_a} vs {c.n_b})"
    else:
        ps = f"{kind_name(c.kind)} {fmt_p(c.p)}, Holm {fmt_p(v.p_holm)}"
        n = f"{c.n_a}" if c.n_a == c.n_b else f"{c.n_a} vs {c.n_b}"
        text = f"within noise ({ps}, n={n})" if label == "within noise" else f"{label} ({ps})"
    return {"label": label, "p": c.p, "p_holm": v.p_holm, "t": c.t, "test": c.kind, "n_router": c.n_a,
            "n_baseline": c.n_b, "n_pairs": c.n if c.paired else None, "diff": c.diff, "diff_ci": c.diff_ci,
            "p_wilcoxon": c.p_wilcoxon, "mde": c.mde, "n_needed": c.n_for(TARGET_EFFECT), "note": v.note,
            "verdict": text}


def verdict(router_vals: list[float], base_vals: list[float], higher_better: bool,
            alpha: float = ALPHA) -> dict[str, Any]:
    """One claim alone on two unpaired samples (Welch; a family of one, so Holm p = p): :func:`judged`'s dict."""
    a, b = finite(router_vals), finite(base_vals)
    v = judge([(Sample(dict(enumerate(a))), Sample(dict(enumerate(b))))], higher_better, alpha)[0]
    return judged(v)


CLAIMS_SCHEMA = {
    "claim": pl.Utf8, "router": pl.Utf8, "baseline": pl.Utf8, "verdict": pl.Utf8, "label": pl.Utf8,
    "p": pl.Float64, "p_holm": pl.Float64, "test": pl.Utf8, "n_router": pl.Int64, "n_baseline": pl.Int64,
    "n_pairs": pl.Int64, "diff": pl.Float64, "diff_ci": pl.Float64, "p_wilcoxon": pl.Float64, "mde": pl.Float64,
    "n_needed": pl.Int64, "note": pl.Utf8, "resolution": pl.Utf8,
    "router_mean": pl.Float64, "router_ci": pl.Float64, "baseline_mean": pl.Float64, "baseline_ci": pl.Float64,
    "paper": pl.Utf8, "arxiv": pl.Utf8, "setting": pl.Utf8, "figure": pl.Utf8, "id": pl.Utf8,
}


def claims_table(runs: pl.DataFrame, metrics: pl.DataFrame, meta: SuiteMeta, claims: list[Claim] | None = None,
                 alpha: float = ALPHA) -> pl.DataFrame:
    """One row per claim: the harness' verdict on ``runs`` (the filtered runs of ONE suite and preset);
    ``meta`` says which metric and which direction. The claims judged form one Holm family."""
    claims = load_claims() if claims is None else claims
    by = samples(runs, metrics, meta.quality)
    none = Sample({})
    verdicts = judge([(by.get(c.router, none), by.get(c.baseline, none)) for c in claims], meta.higher_better, alpha)
    rows = []
    for c, v in zip(claims, verdicts):
        ra = mean_ci(by.get(c.router, none).values.values())
        rb = mean_ci(by.get(c.baseline, none).values.values())
        res = resolution(v.comparison, meta, "within noise" if v.direction == "within noise" else "")
        rows.append({"claim": c.claim, "router": c.router, "baseline": c.baseline, **judged(v), "resolution": res,
                     "router_mean": ra[0], "router_ci": ra[1], "baseline_mean": rb[0], "baseline_ci": rb[1],
                     "paper": c.paper, "arxiv": c.arxiv, "setting": c.setting, "figure": c.figure, "id": c.id})
    if not rows:
        return pl.DataFrame(schema=CLAIMS_SCHEMA)
    return pl.DataFrame([{k: r[k] for k in CLAIMS_SCHEMA} for r in rows], schema=CLAIMS_SCHEMA)


def fmt_side(router: str, mean: float | None, ci: float | None, n: int, meta: SuiteMeta,
             percent_sign: bool = True) -> str:
    """One side of a claim: ``competesmoe 1.05 ± 0.64 (n=2)`` (a percentage metric shown x 100, with a
    ``%`` after it when ``percent_sign``)."""
    m, h = meta.shown(mean), meta.shown(ci)
    return f"{router} {fmt_ci(m, h)}{'%' if percent_sign and meta.percent and m is not None else ''} (n={n})"
