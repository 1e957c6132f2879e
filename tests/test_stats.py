"""Verdicts as controlled experiments (issue 27): ``leaderboard.stats.compare`` (paired by seed, Welch as the
fallback), ``holm``, the minimum detectable effect, and which runs pair (``leaderboard.verdicts.pairing_key``),
against values computed by hand.

With n = 3 pairs the paired t has 2 degrees of freedom, where Student's t has a closed form: two-sided
p = 1 - |t| / sqrt(2 + t^2), and the quantile t(q, 2) = (2q - 1) / sqrt(2 q (1 - q)), so t(0.975, 2) = 4.3027.
"""
from __future__ import annotations

import json
import math
import warnings

import pytest
from scipy import stats

from harness.layers.kernels import DEFAULT_IMPL
from leaderboard.formatting import fmt_diff, fmt_resolution, sig_text
from leaderboard.stats import N_MAX, POWER, compare, holm, mde, n_needed, power
from leaderboard.verdicts import Sample, judge, pairing_key

T975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t(0.975, 2) = 4.302653
A = {0: 1.0, 1: 2.0, 2: 4.0}
B = {0: 0.5, 1: 1.0, 2: 2.5}  # differences 0.5, 1.0, 1.5: mean 1.0, sd 0.5


def test_paired_t_against_hand_computation():
    c = compare(A, B)
    assert c.kind == "paired" and c.paired and (c.n, c.n_a, c.n_b) == (3, 3, 3)
    assert c.diff == pytest.approx(1.0) and c.sd == pytest.approx(0.5)
    t = 1.0 / (0.5 / math.sqrt(3))
    assert t == pytest.approx(3.4641016, rel=1e-7) and c.t == pytest.approx(t, rel=1e-12)
    assert c.p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)  # df = 2 closed form: 0.0741799
    assert c.p == pytest.approx(0.0741799, abs=1e-7)
    assert c.p == pytest.approx(stats.ttest_rel(list(A.values()), list(B.values())).pvalue, rel=1e-12)
    assert T975_DF2 == pytest.approx(4.302653, abs=1e-6)
    assert c.diff_ci == pytest.approx(T975_DF2 * 0.5 / math.sqrt(3), rel=1e-9)  # 1.2420689
    assert c.p_wilcoxon is None  # n = 3 < 6
    # the same numbers unpaired: Welch sees the seed-to-seed spread and loses the effect in it
    w = compare(A, B, pairable=False)
    assert w.kind == "welch" and w.diff == pytest.approx(1.0)
    assert w.p == pytest.approx(stats.ttest_ind(list(A.values()), list(B.values()), equal_var=False).pvalue)
    assert w.p > 0.3 > c.p
    # b - a: the sign flips, p does not
    r = compare(B, A)
    assert r.diff == pytest.approx(-1.0) and r.t == pytest.approx(-t) and r.p == pytest.approx(c.p)


def test_paired_uses_only_the_common_seeds():
    c = compare({**A, 7: 100.0}, {**B, 9: -100.0})  # the unmatched seeds cannot enter a pair
    assert c.kind == "paired" and c.n == 3 and (c.n_a, c.n_b) == (4, 4)
    assert c.diff == pytest.approx(1.0) and c.p == pytest.approx(compare(A, B).p)


def test_welch_fallback_when_seeds_do_not_overlap():
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {3: 2.0, 4: 4.0}
    c = compare(a, b)
    assert c.kind == "welch" and (c.n, c.n_a, c.n_b) == (2, 3, 2)
    assert c.diff == pytest.approx(2.0 - 3.0)
    # Welch-Satterthwaite by hand: s_a^2 = 1, s_b^2 = 2; se^2 = 1/3 + 2/2; df = se^4 / ((1/3)^2/2 + 1^2/1)
    se2 = 1 / 3 + 1.0
    df = se2 ** 2 / ((1 / 3) ** 2 / 2 + 1.0 ** 2 / 1)
    assert df == pytest.approx(1.6842105, rel=1e-7)
    assert c.diff_ci == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(se2), rel=1e-9)
    assert c.t == pytest.approx(-1.0 / math.sqrt(se2)) and c.sd == pytest.approx(math.sqrt(1.5))
    # one common seed is not a pairing either
    assert compare({0: 1.0, 1: 2.0}, {1: 1.5, 2: 2.5}).kind == "welch"
    # nor are runs that are not a controlled experiment, whatever their seeds
    assert compare(A, B, pairable=False).kind == "welch"


def test_wilcoxon_only_from_six_pairs():
    a = {s: float(s) for s in range(6)}
    b = {s: s - 0.1 * (s + 1) for s in range(6)}  # six positive differences of distinct size
    c = compare(a, b)
    assert c.kind == "paired" and c.n == 6
    assert c.p_wilcoxon == pytest.approx(2 / 2 ** 6)  # exact: all ranks on one side, two-sided
    five = compare({s: a[s] for s in range(5)}, {s: b[s] for s in range(5)})
    assert five.kind == "paired" and five.p_wilcoxon is None
    assert compare(a, b, pairable=False).p_wilcoxon is None  # Welch: no signed ranks


def test_degenerate_inputs_neither_crash_nor_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = compare({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0})
        assert (same.kind, same.t, same.p, same.diff, same.diff_ci, same.mde) == ("paired", 0.0, 1.0, 0.0, 0.0, None)
        shift = compare({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})  # a constant nonzero difference
        assert shift.kind == "paired" and shift.p == 0.0 and shift.t == math.inf and shift.mde is None
        assert shift.n_for(0.01) is None  # no spread seen: nothing to size an effect against
        flat = compare({0: 1.0, 1: 1.0}, {2: 2.0, 3: 2.0})  # both constant, unpaired
        assert flat.kind == "welch" and flat.p == 0.0 and flat.diff_ci == 0.0 and flat.mde is None
        one = compare({0: 1.0, 1: 1.0}, {2: 2.0, 3: 2.5})  # one side constant
        assert one.kind == "welch" and 0 < one.p < 1 and one.diff_ci > 0
        six = compare({s: 1.0 for s in range(6)}, {s: 1.0 for s in range(6)})
        assert six.p_wilcoxon == 1.0
        # non-finite values are dropped before anything else
        c = compare({**A, 3: math.nan, 4: math.inf}, {**B, 3: 1.0, 4: None})
        assert c.kind == "paired" and c.n == 3 and c.p == pytest.approx(compare(A, B).p)
    for a, b in (({0: 1.0}, {0: 2.0, 1: 3.0}), ({}, {}), ({0: 1.0}, {1: 2.0})):
        c = compare(a, b)
        assert c.kind == "n<2" and c.p is None and c.t is None and c.mde is None and c.n_for(0.01) is None
    assert compare({0: 1.0}, {1: 2.0}).diff == pytest.approx(-1.0)  # the difference, but no test
    assert compare({}, {0: 1.0}).diff is None


def test_holm_against_hand_computation():
    # sorted: 0.01 x 4 = 0.04; 0.03 x 3 = 0.09; 0.04 x 2 = 0.08 -> 0.09 (monotone); 0.20 x 1 = 0.20
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([0.01, None, 0.04]) == [pytest.approx(0.02), None, pytest.approx(0.04)]  # m = 2, not 3
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.03]) == [0.03] and holm([]) == [] and holm([None]) == [None]
    # step-down: the smallest p faces the full family; a rejection at alpha needs adjusted p < alpha
    adj = holm([0.012, 0.02, 0.04])
    assert adj == pytest.approx([0.036, 0.04, 0.04])


def test_mde_is_the_effect_with_80_percent_power():
    for paired in (True, False):
        for n in (2, 3, 5, 10, 40):
            m = mde(0.7, n, paired=paired)
            assert power(m, 0.7, n, paired=paired) == pytest.approx(POWER, abs=1e-9)
            assert n_needed(m, 0.7, paired=paired) == n  # the inverse: that effect needs exactly n
            assert n_needed(m * 1.001, 0.7, paired=paired) == n and n_needed(m * 0.999, 0.7, paired=paired) > n
    # an effect of 0 is found at the false-positive rate alpha
    assert power(0.0, 1.0, 5) == pytest.approx(0.05)
    # published: one-sample t, n = 10, alpha .05 two-sided, power .8 -> d = 0.9960 (G*Power; Cohen 1988)
    assert mde(1.0, 10) == pytest.approx(0.9960, abs=1e-4)
    # exact at small n: far above the normal approximation (z.975 + z.8) sd / sqrt(n)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert mde(1.0, 3) > 2 * z / math.sqrt(3)
    c = compare(A, B)
    assert c.mde == pytest.approx(mde(0.5, 3)) and c.n_for(c.mde) == 3


def test_mde_shrinks_like_one_over_root_n():
    for paired, k in ((True, 1.0), (False, math.sqrt(2.0))):
        z = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * k
        prev = math.inf
        for n in (2, 4, 16, 64, 256, 1024):
            m = mde(1.0, n, paired=paired)
            assert m < prev
            prev = m
            assert m * math.sqrt(n) >= z  # the t distribution's heavier tails only ever add
        assert m * math.sqrt(1024) == pytest.approx(z, rel=0.01)  # and vanish as n grows
        assert mde(1.0, 1024, paired=paired) / mde(1.0, 256, paired=paired) == pytest.approx(0.5, rel=0.01)
    assert mde(2.0, 10) == pytest.approx(2 * mde(1.0, 10))  # and scales with the SD


def test_n_for_edges():
    assert n_needed(0.01, None) is None and n_needed(0.01, 0.0) is None and n_needed(0.0, 1.0) is None
    assert n_needed(0.001, 1.0) is None  # about 7.8 million pairs: beyond the cap
    assert n_needed(1e9, 1.0) == 2  # a huge effect still needs a test, so two
    assert N_MAX == 10_000
    assert n_needed(0.01, 0.3) == pytest.approx((0.3 / 0.01 * 2.8016) ** 2, rel=0.01)  # the normal limit


def test_resolution_sentence():
    assert fmt_resolution(0.0412, 3, "bpb", 0.01, 30, label="within noise") == \
        "within noise: effects under 0.041 bpb undetectable at n = 3; 0.01 bpb needs ≈ 30 seeds"
    assert fmt_resolution(0.0412, 3, "bpb", 0.01, None, cap=10_000) == \
        "effects under 0.041 bpb undetectable at n = 3; 0.01 bpb needs more than 10,000 seeds"
    assert fmt_resolution(None, 3) == ""
    assert fmt_diff(-0.05234, 0.01012) == "-0.052 ± 0.010" and fmt_diff(None, None) == "—"
    assert sig_text("better", 0.004, 0.012, "paired") == "▲ better (paired p=0.004, Holm p=0.012)"
    assert sig_text("within noise", 0.5, 1.0, "welch") == "≈ within noise (Welch p=0.50, Holm p=1.00)"


# -- which runs pair ------------------------------------------------------------------------------------

def config(router: str = "smoe", seed: int = 0, **train) -> str:
    """A run's stored config as `harness run` writes it (RunSpec.to_dict, as JSON)."""
    return json.dumps({
        "suite": "lm", "preset": "tiny", "router": router, "router_args": {"smoe": {}}.get(router, {"x": 1}),
        "seed": seed,
        "model": {"arch": "decoder", "d_model": 32, "n_layers": 2, "top_k": 2, "expert_parallel": False,
                  "shared_experts": 0, "experts_impl": "loop"},
        "data": {"corpus": "shakespeare", "path": None, "cache_dir": None, "workers": 0},
        "train": {"steps": 30, "lr": 0.003, "threads": 1, "final_eval_batches": 16, **train},
        "eval": {"enabled": False, "batch_size": 16, "tasks": ["shakespeare_ppl"], "limit": 8},
    }, sort_keys=True)


def test_pairing_key_ignores_the_router_and_the_seed_only():
    base = pairing_key(config("smoe", 0))
    assert base is not None and len(base) == 16
    assert pairing_key(config("xmoe", 3)) == base  # another router (and its args), another seed: a pair
    assert pairing_key(json.loads(config("dense", 1))) == base  # a parsed config works too
    assert pairing_key(config(steps=60)) != base  # another experiment
    assert pairing_key(config(lr=0.001)) != base
    assert pairing_key(config(threads=4)) == base  # how many threads does not change the experiment
    cfg = json.loads(config())
    cfg["model"]["top_k"] = 1  # a router that fixes its own k (StableMoE in a top-2 suite): same batches and
    assert pairing_key(json.dumps(cfg)) == base  # weights outside the router, so still a pair
    cfg["model"]["d_model"] = 64  # another model is another experiment
    assert pairing_key(json.dumps(cfg)) != base
    cfg = json.loads(config())
    cfg["preset"] = "renamed"
    cfg["data"]["workers"], cfg["data"]["cache_dir"] = 4, "/tmp/c"
    cfg["eval"]["enabled"], cfg["eval"]["batch_size"] = True, 64
    assert pairing_key(json.dumps(cfg)) == base
    old = json.loads(config())  # written before these fields existed: as if at their defaults (the spec hash's rule)
    del old["model"]["shared_experts"], old["model"]["expert_parallel"], old["model"]["experts_impl"]
    del old["train"]["final_eval_batches"]
    new = json.loads(config(final_eval_batches=None))
    new["model"]["experts_impl"] = DEFAULT_IMPL
    assert pairing_key(json.dumps(old)) == pairing_key(json.dumps(new)) != base
    new["model"]["experts_impl"] = "grouped_mm"  # another kernel, set: counted
    assert pairing_key(json.dumps(new)) != pairing_key(json.dumps(old))
    for missing in (None, "", "{}", "not json"):
        assert pairing_key(missing) is None


def test_judge_pairs_only_runs_that_share_a_pairing_key():
    a, b = Sample(A, "k"), Sample(B, "k")
    v = judge([(a, b)], higher_better=False)[0]
    assert v.test == "paired" and v.note == "" and v.family == 1 and v.p_holm == pytest.approx(v.comparison.p)
    v = judge([(Sample(A, "k"), Sample(B, "other"))], higher_better=False)[0]
    assert v.test == "welch" and v.note == "specs differ outside the router"
    v = judge([(Sample(A, None), Sample(B, None))], higher_better=False)[0]
    assert v.test == "welch" and v.note == "run configs unknown or mixed"
    # labels are decided on the Holm-adjusted p: 0.03 alone is significant, 0.03 among three is not
    big = {s: 10.0 + s for s in range(3)}
    near = {s: big[s] - d for s, d in enumerate((0.2, 0.3, 0.4))}  # t = 0.3 / (0.1 / sqrt 3), p = 0.0351
    one = judge([(Sample(near, "k"), Sample(big, "k"))], higher_better=False)[0]
    assert one.comparison.p == pytest.approx(1 - 27 ** 0.5 / 29 ** 0.5) and one.direction == "better"
    same = {s: big[s] + d for s, d in enumerate((0.1, -0.1, 0.0))}  # p = 1
    three = judge([(Sample(near, "k"), Sample(big, "k")), (Sample(same, "k"), Sample(big, "k")),
                   (Sample(near, "k"), Sample(big, "k"))], higher_better=False)
    assert three[0].comparison.p == pytest.approx(one.comparison.p)
    assert three[0].p_holm == pytest.approx(min(1.0, 3 * one.comparison.p)) and three[0].p_holm > 0.05
    assert [v.direction for v in three] == ["within noise"] * 3 and three[0].family == 3
    assert judge([(Sample(near, "k"), Sample(big, "k"))], higher_better=True)[0].direction == "worse"
    assert judge([(Sample({}), Sample(big, "k"))], higher_better=True)[0].direction == "n<2"
