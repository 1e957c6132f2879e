"""The papers' claims beside the harness' verdict (issue 21, part 6; issue 27; issue 29: claims per suite):
``leaderboard.claims``, ``harness claims``, ``harness compare`` and the leaderboard's Claims tab, on hand-written
stores whose p-values are computed by hand.

With two seeds a side and equal sample variances Welch's t-test has exactly 2 degrees of freedom, and so has
the paired t-test on three pairs: there Student's t has a closed form, two-sided p = 1 - |t| / sqrt(2 + t^2).
The first store's runs carry no config (they cannot pair: Welch); the second's are one suite launched
together (paired by seed), except StableMoE, whose resolved model differs (Welch).
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

import polars as pl
import pytest
from scipy import stats

from harness.cli import main
from harness.store import Store
from leaderboard.claims import Claim, ClaimsError, claims_table, load_claims, verdict
from leaderboard.stats import compare, distinct_seeds, mde, mean_ci, n_needed
from leaderboard.store import load_metrics, load_runs
from leaderboard.suites import SUITES
from leaderboard.verdicts import CompareError, compare_table, pairs_with, samples

T0 = datetime(2026, 1, 1, 12)
# router -> val_bpb of seeds 0, 1 (lm: lower is better); smoe is every claim's baseline
VALUES = {"smoe": [2.0, 2.1], "competesmoe": [1.0, 1.1], "xmoe": [3.0, 3.1], "moge": [2.05, 2.15],
          "stablemoe": [1.0]}


def p_df2(t: float) -> float:
    """Two-sided p of Student's t with 2 degrees of freedom (closed form)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


# t = (mean_a - mean_b) / sqrt(s_a^2/2 + s_b^2/2), s^2 = 0.005 on every side
P_ONE = p_df2(-1.0 / math.sqrt(0.005))  # means 1 apart: 0.0049628...
P_MOGE = p_df2(0.05 / math.sqrt(0.005))  # means 0.05 apart: 0.5527864...


def test_hand_computed_p_values_are_what_the_verdict_uses():
    assert P_ONE == pytest.approx(0.0049628, abs=1e-7) and P_MOGE == pytest.approx(0.5527864, abs=1e-7)
    v = verdict([1.0, 1.1], [2.0, 2.1], higher_better=False)  # one claim alone: Welch, Holm p = p
    assert v["label"] == "holds" and v["p"] == pytest.approx(P_ONE, rel=1e-9) and v["p_holm"] == v["p"]
    assert v["verdict"] == "holds (Welch p=0.005, Holm p=0.005)" and v["test"] == "welch"
    assert v["diff"] == pytest.approx(-1.0) and v["n_pairs"] is None
    v = verdict([1.0, 1.1], [2.0, 2.1], higher_better=True)  # vision top-1: the lower one lost
    assert v["label"] == "reversed" and v["verdict"] == "reversed (Welch p=0.005, Holm p=0.005)"
    v = verdict([2.05, 2.15], [2.0, 2.1], higher_better=False)
    assert v["label"] == "within noise" and v["p"] == pytest.approx(P_MOGE, rel=1e-9)
    assert v["verdict"] == "within noise (Welch p=0.553, Holm p=0.553, n=2)"
    v = verdict([1.0], [2.0, 2.1], False)
    assert {k: v[k] for k in ("label", "p", "p_holm", "t", "test", "n_router", "n_baseline", "verdict")} == \
        {"label": "n<2", "p": None, "p_holm": None, "t": None, "test": "n<2", "n_router": 1, "n_baseline": 2,
         "verdict": "n<2 (n=1 vs 2)"}
    assert verdict([], [], True)["verdict"] == "n<2 (n=0 vs 0)"
    assert verdict([1.0, 1.1, 1.05], [2.0, 2.1], False)["n_router"] == 3
    assert "n=3 vs 2" in verdict([2.0, 2.1, 2.05], [2.0, 2.1], False)["verdict"]
    assert verdict([1.0, 1.0], [1.0, 1.0], False)["verdict"] == "within noise (Welch p=1.000, Holm p=1.000, n=2)"


def fig_of(claims, router):
    return next(c.figure for c in claims.values() if c.router == router)


def test_shipped_claims_table():
    claims = {c.id: c for c in load_claims()}
    pairs = {(c.router, c.baseline) for c in claims.values()}
    assert pairs == {("competesmoe", "smoe"), ("stablemoe", "smoe"), ("xmoe", "smoe"), ("moge", "smoe"),
                     ("auxfree", "smoe"), ("hash", "smoe"), ("expert_choice", "smoe"),
                     ("smoe_global", "smoe"), ("topp", "smoe"), ("remoe", "smoe"),
                     ("moepp", "smoe")}  # the last four: issue 31
    arxiv = {c.router: c.arxiv for c in claims.values()}
    assert arxiv == {"competesmoe": "2402.02526", "stablemoe": "2204.08396", "xmoe": "2204.09179",
                     "moge": "2504.09265", "auxfree": "2408.15664", "hash": "2106.04426",
                     "expert_choice": "2202.09368", "smoe_global": "2501.11873", "topp": "2403.07652",
                     "remoe": "2412.14711", "moepp": "2410.07348"}
    for c in claims.values():
        assert c.claim and c.setting and c.paper and c.figure
    # each claim names the suite its paper's evidence comes from: MoGE's is ImageNet classification
    assert {c.router: c.suite for c in claims.values()} == {r: "vision" if r == "moge" else "lm" for r in arxiv}
    assert all(c.preset is None for c in claims.values())  # the most-run preset: the calibrated benchmark
    assert "32 experts" in claims["moge-beats-moe"].setting and "capacity factor 4" in claims["moge-beats-moe"].setting
    # figures read in the paper or its official repository are quoted with where; the rest stay unverified
    unverified = {c.router for c in claims.values() if "not verified" in c.figure}
    assert unverified == {"competesmoe", "moge", "smoe_global", "topp", "remoe", "moepp"}  # issue 31: no paper text read
    assert "8.167 vs 8.038" in fig_of(claims, "smoe_global") and "not re-read" in fig_of(claims, "smoe_global")
    fig = {c.router: c.figure for c in claims.values()}
    assert "19.20 vs 18.93" in fig["stablemoe"] and "Table 2" in fig["stablemoe"]
    assert "63.8 vs X-MoE 65.3" in fig["xmoe"] and "19.02" in fig["xmoe"] and "Tables 1-2" in fig["xmoe"]
    assert "9.56 / 0.72 vs 9.50 / 0.04" in fig["auxfree"] and "OpenReview" in fig["auxfree"]
    assert "23.65" in fig["hash"] and "read off a plot" in fig["hash"]
    assert "2x faster" in fig["expert_choice"] and "83.5 vs 85.0" in fig["expert_choice"]
    from harness.routing.registry import get_router

    for c in claims.values():  # every claim names registered routers
        get_router(c.router)
        get_router(c.baseline)


def test_bad_claims_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("claims:\n  - {id: x, router: smoe, baseline: dense, claim: y, colour: red}\n")
    with pytest.raises(ClaimsError, match="unknown key 'colour'"):
        load_claims(bad)
    store = _store(tmp_path / "h.duckdb")
    assert main(["claims", "--store", str(store), "--claims", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error:") and "\n" not in err


def _store(path, suite: str = "lm", values: dict[str, list[float]] = VALUES, duplicate: bool = True,
           config=lambda router, seed: {}, preset: str = "default"):
    """A store with finished runs of the given values (no training); metric = the suite's primary;
    ``config(router, seed)``: the resolved spec stored with each run (default none: such runs never pair).
    Called again on the same path it adds runs (another suite or preset) to the store."""
    store = Store(path)
    metric = SUITES[suite].quality
    i = 0
    rows = [(r, s, v) for r, vals in values.items() for s, v in enumerate(vals)]
    if duplicate:  # an older identical copy of competesmoe seed 0 (a --rerun): must not count
        rows.insert(0, ("competesmoe", 0, values["competesmoe"][0]))
    for router, seed, v in rows:
        i += 1
        rid = f"{suite}-{preset}-{router}-s{seed}-{i}"
        store.start_run({"run_id": rid, "suite": suite, "router": router, "spec_hash": f"h-{suite}-{preset}-{router}",
                         "seed": seed, "preset": preset, "status": "running", "step": 0, "total_steps": 10,
                         "started_at": T0 + timedelta(minutes=i), "config": json.dumps(config(router, seed)),
                         "versions": "{}"})
        store.finish_run(rid, "finished", 10, metrics=[{"name": metric, "value": v, "split": "val"},
                                                         {"name": metric.replace("val_", "test_"), "value": v}])
    return path


def test_claims_table_on_stored_runs(tmp_path):
    path = _store(tmp_path / "h.duckdb")
    runs, metrics = load_runs(path), load_metrics(path)
    assert distinct_seeds(runs)[1] == 1
    t = {r["router"]: r for r in claims_table(runs, metrics, suite="lm").iter_rows(named=True)}
    # --suite lm: every claim on lm; three claims tested (competesmoe, xmoe, moge): Holm multiplies the smallest p by 3
    assert t["competesmoe"]["verdict"] == "holds (Welch p=0.005, Holm p=0.015)" and t["competesmoe"]["n_router"] == 2
    assert t["competesmoe"]["p"] == pytest.approx(P_ONE, rel=1e-9)  # the duplicate seed 0 is not a third sample
    assert t["competesmoe"]["p_holm"] == pytest.approx(3 * P_ONE, rel=1e-9)
    assert t["competesmoe"]["test"] == "welch" and t["competesmoe"]["note"] == "run configs unknown or mixed"
    assert t["xmoe"]["verdict"] == "reversed (Welch p=0.005, Holm p=0.015)"
    assert t["xmoe"]["p_holm"] == pytest.approx(3 * P_ONE, rel=1e-9)  # tied with competesmoe: 2p, made monotone
    assert t["moge"]["verdict"] == "within noise (Welch p=0.553, Holm p=0.553, n=2)"
    assert t["moge"]["resolution"].startswith("within noise: effects under ") and "n = 2" in t["moge"]["resolution"]
    assert t["stablemoe"]["verdict"] == "n<2 (n=1 vs 2)" and t["stablemoe"]["p"] is None
    assert t["stablemoe"]["p_holm"] is None and t["stablemoe"]["resolution"] == ""
    assert t["competesmoe"]["router_mean"] == pytest.approx(1.05)
    assert t["competesmoe"]["baseline_ci"] == pytest.approx(mean_ci([2.0, 2.1])[1])
    # the same claims on a vision store: top-1 is higher-is-better, so the directions flip
    vpath = _store(tmp_path / "v.duckdb", suite="vision",
                   values={("moge@vit" if r == "moge" else r): v for r, v in VALUES.items()})
    vt = {r["router"]: r["label"] for r in claims_table(load_runs(vpath), load_metrics(vpath),
                                                        suite="vision").iter_rows(named=True)}
    assert vt == {"competesmoe": "reversed", "xmoe": "holds", "moge@vit": "within noise", "stablemoe": "n<2",
                  "auxfree": "n<2", "hash": "n<2", "expert_choice": "n<2", "smoe_global": "n<2", "topp": "n<2",
                  "remoe": "n<2", "moepp": "n<2"}  # no runs of these in the fixture
    # a custom claim about a router that never ran
    t = claims_table(runs, metrics, [Claim("a", "nosuch", "smoe", "nosuch beats SMoE")])  # suite lm
    assert t["verdict"].to_list() == ["n<2 (n=0 vs 2)"]


def test_harness_claims_prints_each_verdict(tmp_path, capsys):
    path = _store(tmp_path / "h.duckdb")
    assert main(["claims", "--store", str(path), "--suite", "lm"]) == 0  # every claim on lm, MoGE's too
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"claims on {path}: suite lm, preset default, 9 distinct finished runs " \
                                  f"(1 duplicate set aside) for every claim (--suite lm)"
    assert "val_bpb (lower is better)" in out and "Holm-adjusted over the 3 claims tested" in out
    lines = out.splitlines()
    assert "CompeteSMoE beats SMoE: holds (Welch p=0.005, Holm p=0.015)" in lines
    assert "X-MoE beats SMoE: reversed (Welch p=0.005, Holm p=0.015)" in lines
    assert "MoGE beats MoE (SMoE): within noise (Welch p=0.553, Holm p=0.553, n=2)" in lines
    # Welch-Satterthwaite: se = sqrt(0.005/2 + 0.005/2) = 0.0707, df = 2: 4.3027 * 0.0707 = 0.30
    assert "  test:    Welch (run configs unknown or mixed); competesmoe - smoe = -1.00 ± 0.30; p=0.005, " \
           "Holm p=0.015" in lines
    assert "StableMoE beats Switch (SMoE top-1): n<2 (n=1 vs 2)" in lines
    assert "  harness: competesmoe 1.05 ± 0.64 (n=2) vs smoe 2.05 ± 0.64 (n=2) (val_bpb, mean ± 95% CI)" in lines
    assert any(ln.startswith("  paper:   arXiv 2402.02526") for ln in lines)
    assert "  judged on: suite lm, preset default (9 distinct finished runs)" in lines
    assert main(["claims", "--store", str(path), "--suite", "lm", "--preset", "tiny"]) == 0  # nothing there
    out = capsys.readouterr().out
    assert "no claim can be tested yet" in out and "harness run --suite lm --preset tiny --seeds 0,1,2" in out
    assert "  note:    no runs of suite lm, preset tiny in this store: harness run --suite lm --preset tiny" in out
    assert main(["claims", "--store", str(path), "--alpha", "2"]) == 2


# -- each claim on its own suite (issue 29) --------------------------------------------------------------------

# val_top1 (vision: higher is better) of seeds 0, 1: the default preset has most runs (6), `moge` fewer (4)
# in vision MoGE's claim reads moge@vit, its authors' ViT code (papers.yaml: router_in)
VISION = {"smoe": [0.50, 0.51], "moge@vit": [0.60, 0.61], "xmoe": [0.55, 0.56]}
VISION_MOGE = {"smoe": [0.40, 0.41], "moge@vit": [0.30, 0.31]}


def _mixed_store(path):
    """lm runs (:data:`VALUES`, one duplicate) and vision runs of two presets, in one store."""
    _store(path)
    _store(path, suite="vision", values=VISION, duplicate=False)
    return _store(path, suite="vision", values=VISION_MOGE, duplicate=False, preset="moge")


def test_each_claim_is_judged_on_its_suite(tmp_path):
    path = _mixed_store(tmp_path / "m.duckdb")
    runs, metrics = load_runs(path), load_metrics(path)
    t = {r["router"]: r for r in claims_table(runs, metrics).iter_rows(named=True)}
    m = t["moge@vit"]  # judged on vision, where the claim names the authors' ViT reading (router_in)
    assert (m["suite"], m["preset"], m["metric"], m["higher_better"], m["n_runs"], m["other_presets"]) == \
        ("vision", "default", "val_top1", True, 6, "moge")
    # top-1 0.605 vs 0.505: higher is better, so it holds (read as lower-is-better, the same p would be "reversed")
    assert m["label"] == "holds" and m["diff"] == pytest.approx(0.1) and m["p"] == pytest.approx(P_ONE, rel=1e-6)
    assert m["router_mean"] == pytest.approx(0.605) and m["note"] == "run configs unknown or mixed"
    for r in ("competesmoe", "stablemoe", "xmoe", "auxfree", "hash", "expert_choice"):
        assert (t[r]["suite"], t[r]["preset"], t[r]["metric"], t[r]["higher_better"]) == \
            ("lm", "default", "val_bpb", False)
        assert (t[r]["n_runs"], t[r]["n_dupes"], t[r]["other_presets"]) == (9, 1, "")
    assert t["competesmoe"]["label"] == "holds" and t["xmoe"]["label"] == "reversed"
    # one Holm family across the suites: three claims tested, all at p = P_ONE
    for r in ("competesmoe", "xmoe", "moge@vit"):
        assert t[r]["p_holm"] == pytest.approx(3 * P_ONE, rel=1e-6)
    assert t["stablemoe"]["label"] == "n<2" and t["stablemoe"]["note"] == ""  # lm has runs, just one stablemoe seed
    # suite="lm" (--suite lm): every claim on lm; MoGE's lm runs are within noise there
    lm = {r["router"]: r for r in claims_table(runs, metrics, suite="lm").iter_rows(named=True)}
    assert {r["suite"] for r in lm.values()} == {"lm"} and lm["moge"]["metric"] == "val_bpb"
    assert lm["moge"]["verdict"] == "within noise (Welch p=0.553, Holm p=0.553, n=2)"
    # suite="vision", preset="moge": MoGE's top-1 is below SMoE's there
    vm = {r["router"]: r for r in claims_table(runs, metrics, suite="vision", preset="moge").iter_rows(named=True)}
    assert vm["moge@vit"]["label"] == "reversed" and vm["moge@vit"]["preset"] == "moge"
    assert vm["moge@vit"]["n_runs"] == 4
    assert vm["competesmoe"]["verdict"] == "n<2 (n=0 vs 2)"


def test_a_suite_without_runs_is_n2_and_says_so(tmp_path, capsys):
    path = _store(tmp_path / "h.duckdb")  # lm runs only
    t = {r["router"]: r for r in claims_table(load_runs(path), load_metrics(path)).iter_rows(named=True)}
    m = t["moge@vit"]
    assert (m["label"], m["suite"], m["preset"], m["n_runs"], m["metric"], m["higher_better"]) == \
        ("n<2", "vision", None, 0, "val_top1", True)
    assert m["note"] == "no runs of suite vision in this store: harness run --suite vision"
    assert t["competesmoe"]["verdict"] == "holds (Welch p=0.005, Holm p=0.010)"  # two claims tested, not three
    assert t["xmoe"]["label"] == "reversed" and t["xmoe"]["suite"] == "lm"
    assert main(["claims", "--store", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"claims on {path}: suite lm, preset default, 9 distinct finished runs (1 duplicate set " \
                       f"aside) for 10 claims; suite vision, no finished runs, for 1 claim"
    assert lines[1].startswith("verdict: each claim on its suite's metric (lm: val_bpb, lower is better; vision: "
                               "val_top1, higher is better) over distinct seeds")
    assert "Holm-adjusted over the 2 claims tested (one family across suites)" in lines[1]
    i = lines.index("MoGE beats MoE (SMoE): n<2 (n=0 vs 0)")
    assert lines[i + 1] == "  judged on: suite vision (no finished runs)"
    assert lines[i + 3] == "  note:    no runs of suite vision in this store: harness run --suite vision"
    assert "CompeteSMoE beats SMoE: holds (Welch p=0.005, Holm p=0.010)" in lines
    # a vision run still running is no finished run, and the note says so
    Store(path).start_run({"run_id": "v-running", "suite": "vision", "router": "moge", "spec_hash": "hv", "seed": 0,
                           "preset": "default", "status": "running", "step": 0, "total_steps": 10,
                           "started_at": T0, "config": "{}", "versions": "{}"})
    t = {r["router"]: r for r in claims_table(load_runs(path), load_metrics(path)).iter_rows(named=True)}
    assert t["moge@vit"]["note"] == "no finished runs of suite vision, preset default in this store (1 unfinished): " \
                                "harness run --suite vision --preset default"


def test_harness_claims_names_the_suite_of_each_claim(tmp_path, capsys):
    path = _mixed_store(tmp_path / "m.duckdb")
    assert main(["claims", "--store", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"claims on {path}: suite lm, preset default, 9 distinct finished runs (1 duplicate set " \
                       f"aside) for 10 claims; suite vision, preset default, 6 distinct finished runs (other presets: " \
                       f"moge) for 1 claim"
    assert "Holm-adjusted over the 3 claims tested (one family across suites)" in lines[1]
    i = lines.index("MoGE beats MoE (SMoE): holds (Welch p=0.005, Holm p=0.015)")
    assert lines[i + 1] == "  judged on: suite vision, preset default (6 distinct finished runs)"
    # top-1 in percent, as the board shows it
    assert lines[i + 2].startswith("  harness: moge@vit 60.5 ± ") and "% (n=2) vs smoe 50.5 ± " in lines[i + 2]
    assert lines[i + 2].endswith("(val_top1, mean ± 95% CI)")
    assert lines[i + 3].startswith("  test:    Welch (run configs unknown or mixed); moge@vit - smoe = +10.0 ± ")
    assert lines[i + 4].startswith("  power:   effects under ") and " pp undetectable at n = 2; 1 pp needs" in lines[i + 4]
    j = lines.index("CompeteSMoE beats SMoE: holds (Welch p=0.005, Holm p=0.015)")
    assert lines[j + 1] == "  judged on: suite lm, preset default (9 distinct finished runs)"
    # --suite lm judges every claim on lm
    assert main(["claims", "--store", str(path), "--suite", "lm"]) == 0
    out = capsys.readouterr().out
    assert "MoGE beats MoE (SMoE): within noise (Welch p=0.553, Holm p=0.553, n=2)" in out
    assert out.count("  judged on: suite lm, preset default (9 distinct finished runs)") == 11  # every shipped claim
    assert "judged on: suite vision" not in out
    # --suite vision --preset moge: every claim on that preset
    assert main(["claims", "--store", str(path), "--suite", "vision", "--preset", "moge"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"claims on {path}: suite vision, preset moge, 4 distinct finished runs (other " \
                                  f"presets: default) for every claim (--suite vision)"
    assert "MoGE beats MoE (SMoE): reversed (Welch p=0.005, Holm p=0.005)" in out
    # a preset belongs to one suite, and the claims span two
    assert main(["claims", "--store", str(path), "--preset", "moge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error: --preset picks a preset of --suite") and "\n" not in err


def test_a_claim_may_name_its_preset(tmp_path, capsys):
    path = _mixed_store(tmp_path / "m.duckdb")
    f = tmp_path / "c.yaml"
    f.write_text("claims:\n"
                 "  - {id: a, router: moge@vit, baseline: smoe, claim: MoGE at its scale, suite: vision, preset: moge}\n"
                 "  - {id: b, router: moge, router_in: {vision: moge@vit}, baseline: smoe, claim: MoGE on the "
                 "benchmark, suite: vision}\n"
                 "  - {id: c, router: moge, baseline: smoe, claim: MoGE unrun, suite: vision, preset: big}\n"
                 "  - {id: d, router: moge, baseline: smoe, claim: MoGE on speech, suite: speech}\n")
    claims = load_claims(f)  # an unknown suite or preset is a verdict, not an error
    assert [(c.suite, c.preset) for c in claims] == [("vision", "moge"), ("vision", None), ("vision", "big"),
                                                     ("speech", None)]
    rows = {r["id"]: r for r in claims_table(load_runs(path), load_metrics(path), claims).iter_rows(named=True)}
    assert (rows["a"]["preset"], rows["a"]["label"], rows["a"]["n_runs"]) == ("moge", "reversed", 4)
    assert (rows["b"]["preset"], rows["b"]["label"], rows["b"]["n_runs"]) == ("default", "holds", 6)
    assert rows["c"]["label"] == "n<2" and rows["c"]["note"] == \
        "no runs of suite vision, preset big in this store: harness run --suite vision --preset big"
    assert rows["d"]["note"] == "no runs of suite speech in this store: harness run --suite speech"
    assert main(["claims", "--store", str(path), "--claims", str(f)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "suite vision, preset moge, 4 distinct finished runs (other presets: default) for 1 claim" in first
    assert "suite vision, preset big, no finished runs (other presets: default, moge), for 1 claim" in first
    assert "suite speech, no finished runs, for 1 claim" in first


@pytest.mark.parametrize("entry, says", [
    ("suite: [lm]", "claims[0]: 'suite' must be a suite name such as lm or vision, got ['lm']"),
    ("suite: 3", "'suite' must be a suite name such as lm or vision, got 3"),
    ("suite: 'lm vision'", "'suite' must be a suite name"),
    ("suite: lm, preset: {a: 1}", "'preset' must be a preset name such as default, got {'a': 1}"),
    ("suite: lm, presets: moge", "claims[0]: unknown key 'presets'"),
    ("preset: default", "claims[0]: missing 'suite'"),
    ("suite: vision, router_in: moge@vit", "'router_in' must map a suite to a router name, e.g. {vision: moge@vit}"),
    ("suite: vision, router_in: {vision: ''}", "'router_in' must map a suite to a router name"),
])
def test_claims_loader_rejects_a_bad_suite_in_one_line(tmp_path, capsys, entry, says):
    bad = tmp_path / "c.yaml"
    bad.write_text("claims:\n  - {id: x, router: moge, baseline: smoe, claim: y, " + entry + "}\n")
    with pytest.raises(ClaimsError) as exc:
        load_claims(bad)
    assert says in str(exc.value) and "\n" not in str(exc.value)
    assert main(["claims", "--store", str(tmp_path / "none.duckdb"), "--claims", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error:") and "\n" not in err


def _app(monkeypatch, path):
    """The board on ``path`` (AppTest), run once."""
    from streamlit.testing.v1 import AppTest

    try:  # skip AppTest's scan of every installed distribution for components (the page uses none)
        import streamlit.components.v2.manifest_scanner as scanner

        monkeypatch.setattr(scanner, "scan_component_manifests", lambda *a, **k: [])
    except ImportError:
        pass
    from test_leaderboard import APP

    monkeypatch.setenv("HARNESS_STORE", str(path))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _claims_frame(at):
    frames = [df.value for df in at.dataframe if "harness verdict" in list(df.value.columns)]
    assert frames, "claims table not rendered"
    return frames[0].set_index("claim")


def test_claims_tab(tmp_path, monkeypatch):
    path = _store(tmp_path / "h.duckdb")
    at = _app(monkeypatch, path)
    tab = _claims_frame(at)
    expected = {r["claim"]: r["verdict"] for r in claims_table(load_runs(path), load_metrics(path)).iter_rows(named=True)}
    assert tab["harness verdict"].to_dict() == expected
    # an lm-only store: MoGE's claim (vision) has nothing to judge on, so two claims form the Holm family
    assert tab.loc["CompeteSMoE beats SMoE", "harness verdict"] == "holds (Welch p=0.005, Holm p=0.010)"
    assert tab.loc["CompeteSMoE beats SMoE", "test"] == "Welch (run configs unknown or mixed)"
    assert tab.loc["CompeteSMoE beats SMoE", "p (Holm)"] == "p=0.010"
    assert tab.loc["CompeteSMoE beats SMoE", "judged on"] == "lm · default"
    assert tab.loc["CompeteSMoE beats SMoE", "metric"] == "val_bpb ↓"
    assert tab.loc["MoGE beats MoE (SMoE)", "judged on"] == "vision (no runs)"
    assert tab.loc["MoGE beats MoE (SMoE)", "harness verdict"] == "n<2 (n=0 vs 0)"
    assert tab.loc["MoGE beats MoE (SMoE)", "test"] == "no runs of suite vision among the runs selected: " \
                                                        "harness run --suite vision"
    assert "arXiv 2402.02526" in tab.loc["CompeteSMoE beats SMoE", "paper"]
    assert "not verified" in tab.loc["MoGE beats MoE (SMoE)", "paper's figure"]
    assert "read in the paper, Table 2" in tab.loc["StableMoE beats Switch (SMoE top-1)", "paper's figure"]
    captions = "\n".join(str(c.value) for c in at.caption)
    assert "1 duplicate run set aside" in captions
    assert "judged on" in captions and "one family across suites" in captions
    # the overview counts distinct seeds too
    ov = [df.value for df in at.dataframe if "vs SMoE" in list(df.value.columns)][0]
    assert ov.loc[ov["router"] == "competesmoe", "n"].iloc[0] == 2
    assert "1 duplicate" in ov.loc[ov["router"] == "competesmoe", "excluded"].iloc[0]
    # filtering routers in the sidebar feeds the tab: without SMoE nothing can be tested
    at.sidebar.multiselect(key="routers").set_value(["competesmoe", "xmoe"]).run()
    assert not at.exception
    tab = _claims_frame(at)
    assert set(tab["harness verdict"]) == {"n<2 (n=2 vs 0)", "n<2 (n=0 vs 0)"}


def test_claims_tab_judges_each_claim_on_its_suite(tmp_path, monkeypatch):
    path = _mixed_store(tmp_path / "m.duckdb")
    at = _app(monkeypatch, path)
    tab = _claims_frame(at)
    assert tab.loc["MoGE beats MoE (SMoE)", "judged on"] == "vision · default"
    assert tab.loc["MoGE beats MoE (SMoE)", "metric"] == "val_top1 ↑"
    assert tab.loc["MoGE beats MoE (SMoE)", "harness verdict"] == "holds (Welch p=0.005, Holm p=0.015)"
    assert tab.loc["MoGE beats MoE (SMoE)", "harness (mean ± 95% CI)"].startswith("moge@vit 60.5 ± ")  # x 100
    assert tab.loc["MoGE beats MoE (SMoE)", "Δ (router − baseline)"].endswith(" pp")
    assert tab.loc["X-MoE beats SMoE", "judged on"] == "lm · default"
    before = tab.copy()
    # the sidebar's suite picks what the other tabs show; the claims stay on their own suites
    at.sidebar.selectbox(key="suite").set_value("vision").run()
    assert not at.exception
    after = _claims_frame(at)
    assert after[["harness verdict", "judged on"]].equals(before[["harness verdict", "judged on"]])


# -- paired by seed (issue 27) ---------------------------------------------------------------------------------

# smoe and three routers, seeds 0-2, launched together (one spec outside the router: they pair by seed);
# stablemoe ran another experiment (300 steps: its resolved spec differs outside the router: Welch)
PAIRED = {"smoe": [2.0, 2.3, 2.1],
          "competesmoe": [1.90, 2.19, 1.98],  # differences -0.10, -0.11, -0.12
          "xmoe": [2.2, 2.6, 2.5],            # +0.2, +0.3, +0.4: raw p = 0.035, not after Holm
          "moge": [2.1, 2.2, 2.1],            # +0.1, -0.1, 0: p = 1
          "stablemoe": [1.0, 1.1, 1.05]}


def spec(router: str, seed: int) -> dict:
    """The resolved spec `harness run` stores (RunSpec.to_dict), abridged."""
    return {"suite": "lm", "preset": "default", "router": router, "router_args": {}, "seed": seed,
            "model": {"d_model": 64, "top_k": 1 if router == "stablemoe" else 2},
            "train": {"steps": 300 if router == "stablemoe" else 200, "lr": 0.003}, "data": {"corpus": "shakespeare"},
            "eval": {"limit": None}}


def p_paired(diffs: list[float]) -> float:
    n = len(diffs)
    m = sum(diffs) / n
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))
    return p_df2(m / (sd / math.sqrt(n)))


P_COMPETE = p_paired([-0.10, -0.11, -0.12])  # t = -19.05: 0.00273
P_XMOE = p_paired([0.2, 0.3, 0.4])  # t = 5.196: 0.0351


@pytest.fixture()
def paired_store(tmp_path):
    return _store(tmp_path / "p.duckdb", values=PAIRED, duplicate=False, config=spec)


def test_claims_are_paired_where_the_runs_pair(paired_store):
    assert P_COMPETE == pytest.approx(0.0027, abs=1e-4) and P_XMOE == pytest.approx(0.0351, abs=1e-4)
    runs, metrics = load_runs(paired_store), load_metrics(paired_store)
    t = {r["router"]: r for r in claims_table(runs, metrics, suite="lm").iter_rows(named=True)}
    c = t["competesmoe"]
    assert c["test"] == "paired" and c["n_pairs"] == 3 and c["p"] == pytest.approx(P_COMPETE, rel=1e-6)
    assert c["diff"] == pytest.approx(-0.11) and c["diff_ci"] == pytest.approx(4.302653 * 0.01 / math.sqrt(3),
                                                                               rel=1e-5)
    # unpaired, the seed-to-seed spread (sd 0.15) hides the 0.11 the pairs show
    assert verdict(PAIRED["competesmoe"], PAIRED["smoe"], False)["label"] == "within noise"
    s = t["stablemoe"]
    assert s["test"] == "welch" and s["note"] == "specs differ outside the router" and s["n_pairs"] is None
    p_s = stats.ttest_ind(PAIRED["stablemoe"], PAIRED["smoe"], equal_var=False).pvalue
    assert s["p"] == pytest.approx(p_s)
    # Holm over the four claims tested, by hand: sorted p_c < p_s < p_x < 1
    assert P_COMPETE < p_s < P_XMOE
    assert c["p_holm"] == pytest.approx(4 * P_COMPETE, rel=1e-6)
    assert s["p_holm"] == pytest.approx(max(4 * P_COMPETE, 3 * p_s), rel=1e-6)
    assert t["xmoe"]["p_holm"] == pytest.approx(2 * P_XMOE, rel=1e-6)
    assert t["moge"]["p"] == pytest.approx(1.0) and t["moge"]["p_holm"] == pytest.approx(1.0)
    labels = {r: row["label"] for r, row in t.items()}
    assert labels == {"competesmoe": "holds", "stablemoe": "holds", "xmoe": "within noise", "moge": "within noise",
                      "auxfree": "n<2", "hash": "n<2", "expert_choice": "n<2", "smoe_global": "n<2", "topp": "n<2",
                      "remoe": "n<2", "moepp": "n<2"}
    assert t["xmoe"]["p"] < 0.05  # significant alone; not among four
    assert t["xmoe"]["verdict"] == "within noise (paired p=0.035, Holm p=0.070, n=3)"
    assert c["verdict"] == "holds (paired p=0.003, Holm p=0.011)"
    # what the within-noise verdict could have seen, and what 0.01 would take
    x = t["xmoe"]
    assert x["mde"] == pytest.approx(mde(0.1, 3)) and x["n_needed"] == n_needed(0.01, 0.1)
    assert x["resolution"] == f"within noise: effects under {x['mde']:.2f} bpb undetectable at n = 3; " \
                              f"0.01 bpb needs ≈ {x['n_needed']} seeds"


def test_harness_claims_prints_the_test_and_the_power(paired_store, capsys):
    assert main(["claims", "--store", str(paired_store), "--suite", "lm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "CompeteSMoE beats SMoE: holds (paired p=0.003, Holm p=0.011)" in lines
    assert "  test:    paired over 3 seeds; competesmoe - smoe = -0.110 ± 0.025; p=0.003, Holm p=0.011" in lines
    assert "X-MoE beats SMoE: within noise (paired p=0.035, Holm p=0.070, n=3)" in lines
    i = lines.index("X-MoE beats SMoE: within noise (paired p=0.035, Holm p=0.070, n=3)")
    assert lines[i + 4].startswith("  power:   effects under 0.33 bpb undetectable at n = 3; 0.01 bpb needs ≈ ")
    assert any(ln.startswith("  test:    Welch (specs differ outside the router); stablemoe - smoe") for ln in lines)


def test_harness_compare_end_to_end(paired_store, capsys):
    assert main(["compare", "--store", str(paired_store)]) == 0
    out = capsys.readouterr().out
    assert "suite lm, preset default, 15 distinct finished runs" in out
    assert "Holm over the 4 comparisons" in out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.split() and ln.split()[0] in PAIRED}
    assert rows["smoe"].split()[1:5] == ["3", "2.13", "±", "0.38"] and rows["smoe"].endswith("baseline")
    assert "paired (n=3)" in rows["competesmoe"] and "-0.110 ± 0.025" in rows["competesmoe"]
    assert rows["competesmoe"].endswith("better") and " 0.003 " in rows["competesmoe"]
    assert " 0.011 " in rows["competesmoe"]  # Holm over four
    assert "paired (n=3)" in rows["xmoe"] and rows["xmoe"].endswith("within noise") and " 0.070 " in rows["xmoe"]
    assert "Welch" in rows["stablemoe"] and rows["stablemoe"].endswith("better")
    assert "stablemoe: Welch, specs differ outside the router" in out
    assert "xmoe: effects under 0.33 bpb undetectable at n = 3; 0.01 bpb needs ≈ " in out
    # the markdown table the README pastes
    assert main(["compare", "--store", str(paired_store), "--markdown"]) == 0
    md = capsys.readouterr().out.strip().splitlines()
    assert md[0] == "| router | n | val_bpb (95% CI) | test | Δ vs smoe | p | p (Holm) | MDE (bpb) | seeds for 0.01 " \
                    "| verdict |"
    assert md[1].startswith("| :--- | ---: |") and len(md) == 2 + len(PAIRED)
    assert md[2].startswith("| smoe | 3 |")
    comp = next(ln for ln in md if ln.startswith("| competesmoe |"))
    assert "| paired (n=3) | -0.110 ± 0.025 | 0.003 | 0.011 |" in comp and comp.endswith("| better |")
    # another baseline and another metric: the same computation
    assert main(["compare", "--store", str(paired_store), "--baseline", "xmoe", "--metric", "test_bpb"]) == 0
    out = capsys.readouterr().out
    assert "test_bpb (lower is better) vs xmoe" in out


def test_compare_table_is_the_function_others_call(paired_store):
    runs, metrics = load_runs(paired_store), load_metrics(paired_store)
    t = compare_table(runs, metrics, SUITES["lm"])
    assert t["router"].to_list()[0] == "smoe" and t.height == len(PAIRED)
    row = {r["router"]: r for r in t.iter_rows(named=True)}
    assert row["competesmoe"]["test"] == "paired" and row["competesmoe"]["label"] == "better"
    assert row["competesmoe"]["p_holm"] == pytest.approx(4 * P_COMPETE, rel=1e-6)
    assert row["smoe"]["label"] == "baseline" and row["smoe"]["p"] is None
    # --precision reads Comparison.diff_ci of each router against the baseline
    by = samples(runs, metrics, "val_bpb")
    c = compare(by["competesmoe"].values, by["smoe"].values, pairable=pairs_with(by["competesmoe"], by["smoe"]))
    assert c.kind == "paired" and c.diff_ci == pytest.approx(row["competesmoe"]["diff_ci"])
    with pytest.raises(CompareError, match="baseline 'nosuch'"):
        compare_table(runs, metrics, SUITES["lm"], baseline="nosuch")


@pytest.mark.parametrize("argv, says", [
    (["--baseline", "nosuch"], "no finished run of the baseline 'nosuch'"),
    (["--metric", "nosuch"], "has the metric 'nosuch'"),
    (["--suite", "vision"], "no finished run of suite 'vision'"),
    (["--alpha", "0"], "--alpha must lie between 0 and 1"),
    (["--bogus"], "unrecognized arguments"),
])
def test_harness_compare_bad_input_is_one_line(paired_store, capsys, argv, says):
    assert main(["compare", "--store", str(paired_store), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error:") and "\n" not in err and says in err, err


def test_harness_compare_missing_store(tmp_path, capsys):
    assert main(["compare", "--store", str(tmp_path / "none.duckdb")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error: no results store") and "\n" not in err
    assert not (tmp_path / "none.duckdb").exists()


def test_pairing_ignores_the_router_and_a_router_fixed_top_k_but_nothing_else():
    from leaderboard.verdicts import pairing_key

    base = pairing_key(spec("smoe", 0))
    assert base is not None and pairing_key(spec("xmoe", 1)) == base
    top1 = {**spec("smoe", 0), "router": "stablemoe", "model": {"d_model": 64, "top_k": 1}}
    assert pairing_key(top1) == base  # StableMoE fixes k = 1: same batches, same weights outside the router
    assert pairing_key({**spec("smoe", 0), "train": {"steps": 201, "lr": 0.003}}) != base
    assert pairing_key({**spec("smoe", 0), "model": {"d_model": 32, "top_k": 2}}) != base
    assert pairing_key("{}") is None and pairing_key(None) is None
