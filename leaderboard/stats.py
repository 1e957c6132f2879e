"""The board's statistics.

A router's score is the mean over seeds of its finished runs, one per spec hash and seed (the latest:
:func:`distinct_seeds`; a re-run copy is not another seed), with a 95% confidence interval from Student's t
(``mean ± t(0.975, n-1) * s / sqrt(n)``).

How a verdict ("better than SMoE", "the claim holds") is made (issue 27), in :func:`compare` and :func:`holm`:

* **Paired over seeds where the runs pair.** Two routers' runs at the same seed see the same batches and
  start from the same weights outside the router (a controlled experiment), so most of the seed-to-seed
  noise cancels in the per-seed difference. When both sides' runs share one spec outside the router
  (:func:`leaderboard.verdicts.pairing_key`) and at least two seeds are common, the test is the paired
  t-test on those differences (``scipy.stats.ttest_rel``; Student 1908), with the Wilcoxon signed-rank p
  beside it from six pairs on (below that its smallest two-sided p, 2 / 2^n, cannot reach 0.05).
* **Welch otherwise.** Runs whose specs differ outside the router, or that share fewer than two seeds, are
  independent samples: Welch's unequal-variance t-test (:func:`welch`), its CI from the Welch-Satterthwaite
  degrees of freedom. The output always says which test was used.
* **Holm over the comparisons a table shows.** A table that marks k routers at alpha = 0.05 each calls
  some of them significant by chance with probability up to k * 0.05 (1 - 0.95^k = 0.34 for 8 independent
  tests); the labels are decided on the Holm-Bonferroni adjusted p (Holm 1979: step-down, controls the
  family-wise error at alpha for any dependence between the tests, never less powerful than Bonferroni).
  Raw and adjusted p are shown.
* **What it could have detected.** "within noise" at n = 3 is not "no difference": each comparison
  carries its minimum detectable effect (MDE), the smallest true mean difference the test finds with 80%
  power at alpha = 0.05 two-sided for its n and the observed SD, computed exactly from the noncentral t
  distribution (Cohen 1988, ch. 2; the normal approximation understates it badly at n = 2-5), and
  :meth:`Comparison.n_for` says how many seeds a given effect would need.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

import polars as pl
from scipy import optimize, stats

ALPHA = 0.05
CONFIDENCE = 0.95
POWER = 0.80      # the power an MDE is quoted at (the usual 80%: Cohen 1988)
N_MAX = 10_000    # n_for searches no further: beyond it the answer is "not with seeds"


def finite(values: Iterable[float | None]) -> list[float]:
    """The values that are numbers and finite, as floats (None, NaN and inf left out)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> tuple[float | None, float | None, int]:
    """(mean, half-width of the Student-t confidence interval, n) over the finite values.
    The half-width is None when n < 2."""
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return None, None, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, None, n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n), n


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """Welch's t-test: (t, two-sided p) of a vs b, or None when either side has n < 2."""
    a, b = finite(a), finite(b)
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if max(a) == min(a) and max(b) == min(b):  # both constant: Welch is undefined
        return (0.0, 1.0) if ma == mb else (math.copysign(math.inf, ma - mb), 0.0)
    with warnings.catch_warnings():  # one constant sample: scipy warns about precision, the test is fine
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def significance(a: Sequence[float], b: Sequence[float], higher_better: bool,
                 alpha: float = ALPHA) -> tuple[str, float | None]:
    """Label for router samples ``a`` against baseline samples ``b``:
    'better' / 'worse' (Welch p < alpha), 'within noise', or 'n<2'."""
    res = welch(a, b)
    if res is None:
        return "n<2", None
    t, p = res
    if p >= alpha:
        return "within noise", p
    better = (t > 0) == higher_better
    return ("better" if better else "worse"), p


# -- comparisons: paired where runs pair, Welch otherwise; Holm; the minimum detectable effect --------------

def power(effect: float, sd: float, n: int, alpha: float = ALPHA, paired: bool = True) -> float:
    """Power of the two-sided t-test to detect a true mean difference ``effect`` (Cohen 1988, ch. 2).

    Paired (one-sample t on n differences of SD ``sd``): df = n - 1, noncentrality effect * sqrt(n) / sd.
    Two independent samples of n each with common SD ``sd``: df = 2n - 2, noncentrality effect /
    (sd * sqrt(2 / n)) (Student's equal-n form: Welch's df is at most 2n - 2, so for Welch with unequal
    variances this is slightly hopeful). Power = P(T' > t_crit) + P(T' < -t_crit), T' noncentral t (``scipy.stats.nct``)."""
    if n < 2 or not sd > 0:
        return math.nan
    df = n - 1 if paired else 2 * n - 2
    nc = abs(effect) * (math.sqrt(n) / sd if paired else 1.0 / (sd * math.sqrt(2.0 / n)))
    nc = min(nc, 1e8)  # scipy's nct returns NaN past ~1e10; at 1e8 the power is 1 to 1e-7 for every df >= 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    upper = float(stats.nct.sf(crit, df, nc))
    # the far tail: nct.cdf(-crit, df, nc) returns NaN once it is below ~1e-16; sf with -nc is the same
    # probability (T'(-nc) = -T'(nc)) and underflows to 0 instead; whatever is left non-finite is that tail
    lower = float(stats.nct.sf(crit, df, -nc))
    return upper + (lower if math.isfinite(lower) else 0.0)


def mde(sd: float | None, n: int, alpha: float = ALPHA, paired: bool = True, target: float = POWER) -> float | None:
    """The minimum detectable effect: the smallest |true mean difference| the test detects with probability
    ``target`` (80%) at ``alpha`` two-sided, for n and the SD; solved exactly (noncentral t, Brent's method).
    None when n < 2 or the SD is 0 or unknown (no spread seen: nothing to size an effect against)."""
    if n < 2 or sd is None or not sd > 0 or not math.isfinite(sd):
        return None
    hi = sd
    while power(hi, sd, n, alpha, paired) < target:  # power rises with the effect: bracket, then solve
        hi *= 2
    return float(optimize.brentq(lambda e: power(e, sd, n, alpha, paired) - target, 0.0, hi,
                                 xtol=1e-14 * sd, rtol=1e-12))


def n_needed(effect: float, sd: float | None, alpha: float = ALPHA, paired: bool = True, target: float = POWER,
             cap: int = N_MAX) -> int | None:
    """The smallest n (pairs, or seeds per side) with power >= ``target`` to detect ``effect``; None when the
    SD is unknown or 0, the effect is 0, or more than ``cap`` would be needed. Power rises with n: bisection."""
    if sd is None or not sd > 0 or not math.isfinite(sd) or not effect or not math.isfinite(effect):
        return None

    def enough(n: int) -> bool:  # a hair of slack: mde() solves power = target only to ~1e-12
        return power(effect, sd, n, alpha, paired) >= target - 1e-9

    if not enough(cap):
        return None
    lo, hi = 1, cap  # enough(hi); lo is not (n = 1 has no test)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class Comparison:
    """Router ``a`` against baseline ``b`` on one metric: which test, the difference a - b with its 95% CI
    half-width, the two-sided p, and what the test could have detected (:func:`compare` makes these)."""
    kind: str                   # "paired" | "welch" | "n<2"
    n: int                      # pairs (paired); the smaller side's n (welch)
    n_a: int                    # finite values on each side
    n_b: int
    diff: float | None          # mean(a - b) over the pairs (paired); mean(a) - mean(b) (welch)
    diff_ci: float | None       # 95% CI half-width of diff
    sd: float | None            # SD of the per-seed differences (paired); sqrt((s_a^2 + s_b^2) / 2) (welch)
    t: float | None
    p: float | None             # two-sided
    p_wilcoxon: float | None = None  # Wilcoxon signed-rank, two-sided: paired and n >= 6 only
    mde: float | None = None    # minimum detectable |difference| at POWER, alpha
    alpha: float = ALPHA

    @property
    def paired(self) -> bool:
        return self.kind == "paired"

    def n_for(self, effect: float) -> int | None:
        """Seeds (pairs when paired, per side for Welch) for 80% power to detect ``effect`` at the observed
        SD; None when the SD is unknown or 0, or beyond :data:`N_MAX`."""
        return n_needed(effect, self.sd, self.alpha, self.paired)


def _finite_map(x: Mapping[Hashable, float | None]) -> dict[Hashable, float]:
    return {k: float(v) for k, v in x.items() if v is not None and math.isfinite(float(v))}


def _sd(xs: Sequence[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _wilcoxon(d: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p of the differences (zeros dropped: Wilcoxon's own rule)."""
    if all(x == 0 for x in d):
        return 1.0
    with warnings.catch_warnings():  # ties/zeros switch scipy to the normal approximation, with a warning
        warnings.simplefilter("ignore")
        return float(stats.wilcoxon(d).pvalue)


def _paired(fa: dict[Hashable, float], fb: dict[Hashable, float], common: list[Hashable],
            alpha: float) -> Comparison:
    """The paired t-test on the per-seed differences a - b over the common seeds."""
    d = [fa[k] - fb[k] for k in common]
    n, diff = len(d), sum(d) / len(d)
    sd = _sd(d)
    if sd == 0:  # constant difference: the t statistic is 0/0 or ±x/0; decide as welch() does
        t, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
        half = 0.0
    else:
        res = stats.ttest_rel([fa[k] for k in common], [fb[k] for k in common])
        t, p = float(res.statistic), float(res.pvalue)
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return Comparison("paired", n, len(fa), len(fb), diff, half, sd, t, p,
                      _wilcoxon(d) if n >= 6 else None, mde(sd, n, alpha, paired=True), alpha)


def _welch(fa: dict[Hashable, float], fb: dict[Hashable, float], alpha: float) -> Comparison:
    """Welch's test on all finite values; the CI from the Welch-Satterthwaite degrees of freedom."""
    a, b = list(fa.values()), list(fb.values())
    na, nb = len(a), len(b)
    va, vb = _sd(a) ** 2, _sd(b) ** 2
    diff = sum(a) / na - sum(b) / nb
    t, p = welch(a, b)  # type: ignore[misc] - both sides have n >= 2 here
    se2 = va / na + vb / nb
    if se2 > 0:
        df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * math.sqrt(se2)
    else:
        half = 0.0
    sd = math.sqrt((va + vb) / 2)
    n = min(na, nb)
    return Comparison("welch", n, na, nb, diff, half, sd, t, p, None, mde(sd, n, alpha, paired=False), alpha)


def compare(a: Mapping[Hashable, float | None], b: Mapping[Hashable, float | None], pairable: bool = True,
            alpha: float = ALPHA) -> Comparison:
    """Router ``a`` vs baseline ``b``, each seed -> value (non-finite values dropped).

    Paired t over the common seeds when ``pairable`` (the runs are a controlled experiment: see the module
    docstring) and at least two seeds are common; else Welch on all values when both sides have two; else
    kind "n<2" (the difference of the means, if any, but no test). ``alpha`` only sets the MDE's level."""
    fa, fb = _finite_map(a), _finite_map(b)
    common = sorted((k for k in fa if k in fb), key=repr)
    if pairable and len(common) >= 2:
        return _paired(fa, fb, common, alpha)
    if len(fa) >= 2 and len(fb) >= 2:
        return _welch(fa, fb, alpha)
    diff = sum(fa.values()) / len(fa) - sum(fb.values()) / len(fb) if fa and fb else None
    return Comparison("n<2", min(len(fa), len(fb)), len(fa), len(fb), diff, None, None, None, None, alpha=alpha)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the input order.

    Sorted ascending, the i-th smallest (0-based) of the m p-values becomes (m - i) * p, made monotone
    (an adjusted p is never below the one before it in that order) and capped at 1; a hypothesis is rejected
    at family-wise level alpha exactly when its adjusted p < alpha. None (no test) stays None and is not
    counted in m."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def distinct_seeds(runs: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """One finished run per (spec hash, seed), the latest finished; and how many finished copies were set aside.

    Re-running a finished (spec, seed) (``harness run --rerun``) measures the same thing again: the
    copy has the same numbers, and counting it as another seed shrinks the CI to 0 and invents
    significance (pseudo-replication, issue 21). Every statistic on the board goes through this;
    unfinished runs are kept (they are only counted)."""
    if runs.height == 0 or not {"status", "spec_hash", "seed"} <= set(runs.columns):
        return runs, 0
    fin = runs.filter(pl.col("status") == "finished")
    order = [c for c in ("finished_at", "started_at", "run_id") if c in runs.columns]
    keep = fin.sort(order, descending=True, nulls_last=True).unique(subset=["spec_hash", "seed"], keep="first")
    dropped = fin.height - keep.height
    if dropped == 0:
        return runs, 0
    kept = keep["run_id"].to_list()
    return runs.filter((pl.col("status") != "finished") | pl.col("run_id").is_in(kept)), dropped


def duplicate_counts(runs: pl.DataFrame) -> dict[str, int]:
    """Router -> finished copies :func:`distinct_seeds` sets aside."""
    if runs.height == 0:
        return {}
    fin = runs.filter(pl.col("status") == "finished")
    kept, _ = distinct_seeds(fin)
    a = dict(fin.group_by("router").len().iter_rows())
    b = dict(kept.group_by("router").len().iter_rows())
    return {r: int(a[r] - b.get(r, 0)) for r in a if a[r] - b.get(r, 0)}


def pareto_mask(xs: Sequence[float | None], ys: Sequence[float | None], higher_y_better: bool) -> list[bool]:
    """True for points not dominated by another (x = throughput, higher better; y = quality)."""
    pts = list(zip(xs, ys))
    out = []
    for i, (x, y) in enumerate(pts):
        if x is None or y is None:
            out.append(False)
            continue
        dominated = False
        for j, (x2, y2) in enumerate(pts):
            if i == j or x2 is None or y2 is None:
                continue
            y_ge = y2 >= y if higher_y_better else y2 <= y
            y_gt = y2 > y if higher_y_better else y2 < y
            if x2 >= x and y_ge and (x2 > x or y_gt):
                dominated = True
                break
        out.append(not dominated)
    return out
