"""The papers' claims beside the harness' verdict: the data behind ``harness claims`` and the Claims tab.

The shipped table (``tasks/claims/papers.yaml``) lists each paper's directional claim ("CompeteSMoE
beats SMoE", ...) with its setting, its figure and the suite its evidence belongs to: ``suite`` (lm |
vision; required in the file) and optionally ``preset``. A claim is only as good as the experiment that
judges it: MoGE's evidence is ImageNet classification, so judging it on a byte-level LM would test a
claim the paper never made. :func:`claims_table` therefore judges each claim on the runs of its own
suite (the claim's preset, else the suite's preset with most runs, as
:func:`leaderboard.runs.suite_preset_runs` picks), or, given ``suite``, every claim on that one suite
(``harness claims --suite lm``: how does MoGE's claim fare in the LM?). A suite with no finished runs
is never swapped for another: its claims get ``n<2`` and a note naming the command that would fill it.

Each claim is read on its suite's primary metric (lm ``val_bpb``, lower is better; vision ``val_top1``,
higher is better: :func:`leaderboard.suites.suite_meta`) over *distinct* seeds (one finished run per spec
hash and seed, the latest: :func:`leaderboard.stats.distinct_seeds`), compared as
:func:`leaderboard.verdicts.judge` does: the paired t-test over the seeds both ran where the runs are a
controlled experiment (same spec outside the router), else Welch's unequal-variance t-test; the p-values
Holm-adjusted over all the claims the table tests, across suites (one family: testing more claims must
cost the same whatever suite each is on), and the label decided on the adjusted p at alpha = 0.05:

* ``holds (paired p=…, Holm p=…)``: the router is significantly better than the baseline;
* ``reversed (Welch p=…, Holm p=…)``: significantly worse;
* ``within noise (paired p=…, Holm p=…, n=…)``: no significant difference with these many seeds; the row's
  ``resolution`` says which effects the test could not have seen and how many seeds 0.01 would need;
* ``n<2``: no test (fewer than two seeds on a side, or two pairs when pairing; ``note`` says when the
  claim's suite has no runs at all).

Every row carries what judged it (``suite``, ``preset``, ``metric``, ``higher_better``, ``n_runs``), so a
row is formatted with its own suite's units (:func:`claim_meta`: vision's top-1 shown x 100). The page and
the command call this one function, so on the same runs they agree.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from harness.spec import SpecError
from leaderboard.formatting import fmt_ci, fmt_p, kind_name
from leaderboard.runs import suite_preset_runs
from leaderboard.stats import ALPHA, distinct_seeds, finite, mean_ci
from leaderboard.suites import SuiteMeta, suite_meta
from leaderboard.verdicts import TARGET_EFFECT, Sample, Verdict, judge, resolution, samples

CLAIM_KEYS = ("id", "router", "baseline", "claim", "suite", "preset", "router_in", "paper", "arxiv", "setting",
              "figure")
REQUIRED = ("id", "router", "baseline", "claim", "suite")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a suite or preset name as the task files spell them


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
    suite: str = "lm"          # the suite whose runs judge it (the file must say; lm here only for code)
    preset: str | None = None  # that suite's preset; None: the one with most runs
    # the router's name in a suite where its authors' code for that setting is a named variant (MoGE in
    # vision: moge@vit, the Image_Classification/ reading); elsewhere ``router``
    router_in: dict[str, str] = field(default_factory=dict)

    def router_for(self, suite: str) -> str:
        return self.router_in.get(suite, self.router)


class ClaimsError(SpecError):
    """The claims table cannot be read (a user error: ``harness: error: ...``, exit 2)."""


def claims_path() -> Path:
    return Path(str(resources.files("harness.tasks").joinpath("claims", "papers.yaml")))


def _name(p: Path, i: int, key: str, v: Any, required: bool) -> str | None:
    """``suite`` / ``preset``: a name (a suite or preset that has no runs is a verdict, not an error here)."""
    if v is None and not required:
        return None
    if not isinstance(v, str) or not NAME.fullmatch(v.strip()):
        raise ClaimsError(f"{p}: claims[{i}]: {key!r} must be a {key} name such as "
                          f"{'lm or vision' if key == 'suite' else 'default'}, got {v!r}".replace("\n", " "))
    return v.strip()


def load_claims(path: str | Path | None = None) -> list[Claim]:
    """The claims of ``path`` (default: the shipped table). Every claim must name its ``suite``: without it a
    claim would silently be judged on whatever suite came first, which is how MoGE's image-classification
    claim once got an LM verdict."""
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
        unknown = sorted(map(str, set(item) - set(CLAIM_KEYS)))
        missing = [k for k in REQUIRED if not item.get(k)]
        if unknown or missing:
            what = f"unknown key {unknown[0]!r}" if unknown else f"missing {missing[0]!r}"
            raise ClaimsError(f"{p}: claims[{i}]: {what} (keys: {', '.join(CLAIM_KEYS)}; required: "
                              f"{', '.join(REQUIRED)})")
        suite = _name(p, i, "suite", item["suite"], required=True)
        preset = _name(p, i, "preset", item.get("preset"), required=False)
        router_in = item.get("router_in") or {}
        if not isinstance(router_in, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in router_in.items()):
            raise ClaimsError(f"{p}: claims[{i}]: 'router_in' must map a suite to a router name, e.g. "
                              f"{{vision: moge@vit}}, got {router_in!r}".replace("\n", " "))
        text = {k: str(v).strip() for k, v in item.items()
                if k not in ("suite", "preset", "router_in") and v is not None}
        out.append(Claim(**text, suite=suite, preset=preset,
                         router_in={k.strip(): v.strip() for k, v in router_in.items()}))
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
    "suite": pl.Utf8, "preset": pl.Utf8, "metric": pl.Utf8, "higher_better": pl.Boolean, "n_runs": pl.Int64,
    "n_dupes": pl.Int64, "other_presets": pl.Utf8,
    "paper": pl.Utf8, "arxiv": pl.Utf8, "setting": pl.Utf8, "figure": pl.Utf8, "id": pl.Utf8,
}

STORE_SCOPE = "in this store"  # where a claim's missing runs are missing from (the board: the runs selected)


@dataclass(frozen=True)
class Judging:
    """The runs that judge a group of claims: one suite, one preset, and what they measure."""
    suite: str
    preset: str | None      # None: the suite has no runs with a preset
    runs: pl.DataFrame      # that suite's runs of that preset (every status; the statistics count distinct seeds)
    meta: SuiteMeta
    n_runs: int             # distinct finished runs
    n_dupes: int            # finished copies set aside
    other_presets: tuple[str, ...]
    note: str = ""          # why there is nothing to judge on, and the command that would fill it


def judging(runs: pl.DataFrame, metrics: pl.DataFrame, suite: str, preset: str | None = None,
            scope: str = STORE_SCOPE) -> Judging:
    """The runs of ``suite`` and ``preset`` (None: the suite's preset with most runs) among ``runs``."""
    group, chosen, presets = suite_preset_runs(runs, suite, preset)
    names = metrics.filter(pl.col("run_id").is_in(group["run_id"].to_list()))["name"].unique().to_list()
    _, dupes = distinct_seeds(group)
    n = group.filter(pl.col("status") == "finished").height - dupes
    note = ""
    if n == 0:
        what = f"suite {suite}" + (f", preset {chosen}" if chosen else "")
        cmd = f"harness run --suite {suite}" + (f" --preset {chosen}" if chosen else "")
        have = f"no runs of {what} {scope}" if group.height == 0 else \
            f"no finished runs of {what} {scope} ({group.height} unfinished)"
        note = f"{have}: {cmd}"
    return Judging(suite, chosen, group, suite_meta(suite, names), n, dupes,
                   tuple(p for p in presets if p != chosen), note)


def _oriented(v: Verdict, higher_better: bool) -> Verdict:
    """``judge`` ran the whole family as higher-is-better (one Holm family, whatever each claim's suite); a
    claim on a lower-is-better metric swaps better and worse (the two-sided p does not change)."""
    if higher_better or v.direction not in ("better", "worse"):
        return v
    return dataclasses.replace(v, direction="worse" if v.direction == "better" else "better")


def claims_table(runs: pl.DataFrame, metrics: pl.DataFrame, claims: list[Claim] | None = None,
                 alpha: float = ALPHA, suite: str | None = None, preset: str | None = None,
                 scope: str = STORE_SCOPE) -> pl.DataFrame:
    """One row per claim: the harness' verdict on ``runs`` (runs of any suites; ``metrics`` theirs).

    Each claim is judged on its own ``suite`` and ``preset`` (:func:`judging`); given ``suite``, every claim
    is judged on that suite and ``preset`` instead. The claims tested form one Holm family. ``scope`` says
    where a suite's runs were looked for, in the note of a claim with nothing to judge on."""
    claims = load_claims() if claims is None else claims
    groups: dict[tuple[str, str | None], Judging] = {}
    by: dict[tuple[str, str | None], dict[str, Sample]] = {}
    keys = []
    for c in claims:
        key = (suite, preset) if suite is not None else (c.suite, c.preset)
        if key not in groups:
            groups[key] = judging(runs, metrics, *key, scope=scope)
            by[key] = samples(groups[key].runs, metrics, groups[key].meta.quality)
        keys.append(key)
    none = Sample({})
    pairs = [(by[k].get(c.router_for(k[0]), none), by[k].get(c.baseline, none)) for c, k in zip(claims, keys)]
    verdicts = judge(pairs, True, alpha)
    rows = []
    for c, k, (a, b), v in zip(claims, keys, pairs, verdicts):
        g = groups[k]
        v = _oriented(v, g.meta.higher_better)
        ra, rb = mean_ci(a.values.values()), mean_ci(b.values.values())
        res = resolution(v.comparison, g.meta, "within noise" if v.direction == "within noise" else "")
        out = {"claim": c.claim, "router": c.router_for(g.suite), "baseline": c.baseline, **judged(v), "resolution": res,
               "router_mean": ra[0], "router_ci": ra[1], "baseline_mean": rb[0], "baseline_ci": rb[1],
               "suite": g.suite, "preset": g.preset, "metric": g.meta.quality, "higher_better": g.meta.higher_better,
               "n_runs": g.n_runs, "n_dupes": g.n_dupes, "other_presets": ", ".join(g.other_presets),
               "paper": c.paper, "arxiv": c.arxiv, "setting": c.setting, "figure": c.figure, "id": c.id}
        if g.note:
            out["note"] = g.note
        rows.append(out)
    if not rows:
        return pl.DataFrame(schema=CLAIMS_SCHEMA)
    return pl.DataFrame([{k: r[k] for k in CLAIMS_SCHEMA} for r in rows], schema=CLAIMS_SCHEMA)


def claim_meta(row: dict[str, Any]) -> SuiteMeta:
    """The :class:`SuiteMeta` a row of :func:`claims_table` was judged with (its units, its direction)."""
    return suite_meta(row["suite"], [row["metric"]])


def judged_on(row: dict[str, Any], short: bool = False) -> str:
    """What judged a claim: ``suite vision, preset default (12 distinct finished runs)`` or ``suite vision (no
    finished runs)``; ``short``: ``vision · default``, the board's column (``(no runs)`` when there were none)."""
    s, p, n = row["suite"], row["preset"], row["n_runs"]
    if short:
        return f"{s}{f' · {p}' if p else ''}{' (no runs)' if not n else ''}"
    runs = f"{n} distinct finished run{'s' if n != 1 else ''}" if n else "no finished runs"
    return f"suite {s}{f', preset {p}' if p else ''} ({runs})"


def fmt_side(router: str, mean: float | None, ci: float | None, n: int, meta: SuiteMeta,
             percent_sign: bool = True) -> str:
    """One side of a claim: ``competesmoe 1.05 ± 0.64 (n=2)`` (a percentage metric shown x 100, with a
    ``%`` after it when ``percent_sign``)."""
    m, h = meta.shown(mean), meta.shown(ci)
    return f"{router} {fmt_ci(m, h)}{'%' if percent_sign and meta.percent and m is not None else ''} (n={n})"
