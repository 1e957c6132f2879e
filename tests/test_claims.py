"""The papers' claims beside the harness' verdict (issue 21, part 6): ``leaderboard.claims``, ``harness claims``
and the leaderboard's Claims tab, on a hand-written store whose Welch p-values are computed by hand.

With two seeds a side and equal sample variances Welch's t-test has exactly 2 degrees of freedom,
where Student's t has a closed form: two-sided p = 1 - |t| / sqrt(2 + t^2).
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

import polars as pl
import pytest

from harness.cli import main
from harness.store import Store
from leaderboard.claims import Claim, ClaimsError, claims_table, load_claims, verdict
from leaderboard.stats import distinct_seeds, mean_ci
from leaderboard.store import load_metrics, load_runs
from leaderboard.suites import SUITES

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
    v = verdict([1.0, 1.1], [2.0, 2.1], higher_better=False)
    assert v["label"] == "holds" and v["p"] == pytest.approx(P_ONE, rel=1e-9)
    assert v["verdict"] == "holds (p=0.005)"
    v = verdict([1.0, 1.1], [2.0, 2.1], higher_better=True)  # vision top-1: the lower one lost
    assert v["label"] == "reversed" and v["verdict"] == "reversed (p=0.005)"
    v = verdict([2.05, 2.15], [2.0, 2.1], higher_better=False)
    assert v["label"] == "within noise" and v["p"] == pytest.approx(P_MOGE, rel=1e-9)
    assert v["verdict"] == "within noise (p=0.553, n=2)"
    assert verdict([1.0], [2.0, 2.1], False) == {"label": "n<2", "p": None, "t": None, "n_router": 1,
                                                 "n_baseline": 2, "verdict": "n<2 (n=1 vs 2)"}
    assert verdict([], [], True)["verdict"] == "n<2 (n=0 vs 0)"
    assert verdict([1.0, 1.1, 1.05], [2.0, 2.1], False)["n_router"] == 3
    assert "n=3 vs 2" in verdict([2.0, 2.1, 2.05], [2.0, 2.1], False)["verdict"]
    assert verdict([1.0, 1.0], [1.0, 1.0], False)["verdict"] == "within noise (p=1.000, n=2)"


def test_shipped_claims_table():
    claims = {c.id: c for c in load_claims()}
    pairs = {(c.router, c.baseline) for c in claims.values()}
    assert pairs == {("competesmoe", "smoe"), ("stablemoe", "smoe"), ("xmoe", "smoe"), ("moge", "smoe"),
                     ("auxfree", "smoe"), ("hash", "smoe"), ("expert_choice", "smoe")}
    arxiv = {c.router: c.arxiv for c in claims.values()}
    assert arxiv == {"competesmoe": "2402.02526", "stablemoe": "2204.08396", "xmoe": "2204.09179",
                     "moge": "2504.09265", "auxfree": "2408.15664", "hash": "2106.04426",
                     "expert_choice": "2202.09368"}
    for c in claims.values():
        assert c.claim and c.setting and c.paper and c.figure
        assert "not verified" in c.figure  # nothing here was read from a paper's table
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


def _store(path, suite: str = "lm", values: dict[str, list[float]] = VALUES, duplicate: bool = True):
    """A store with finished runs of the given values (no training); metric = the suite's primary."""
    store = Store(path)
    metric = SUITES[suite].quality
    i = 0
    rows = [(r, s, v) for r, vals in values.items() for s, v in enumerate(vals)]
    if duplicate:  # an older identical copy of competesmoe seed 0 (a --rerun): must not count
        rows.insert(0, ("competesmoe", 0, values["competesmoe"][0]))
    for router, seed, v in rows:
        i += 1
        rid = f"{suite}-{router}-s{seed}-{i}"
        store.start_run({"run_id": rid, "suite": suite, "router": router, "spec_hash": f"h-{router}", "seed": seed,
                         "preset": "default", "status": "running", "step": 0, "total_steps": 10,
                         "started_at": T0 + timedelta(minutes=i), "config": json.dumps({}), "versions": "{}"})
        store.finish_run(rid, "finished", 10, metrics=[{"name": metric, "value": v, "split": "val"},
                                                         {"name": metric.replace("val_", "test_"), "value": v}])
    return path


def test_claims_table_on_stored_runs(tmp_path):
    path = _store(tmp_path / "h.duckdb")
    runs, metrics = load_runs(path), load_metrics(path)
    assert distinct_seeds(runs)[1] == 1
    t = {r["router"]: r for r in claims_table(runs, metrics, SUITES["lm"]).iter_rows(named=True)}
    assert t["competesmoe"]["verdict"] == "holds (p=0.005)" and t["competesmoe"]["n_router"] == 2
    assert t["competesmoe"]["p"] == pytest.approx(P_ONE, rel=1e-9)  # the duplicate seed 0 is not a third sample
    assert t["xmoe"]["verdict"] == "reversed (p=0.005)"
    assert t["moge"]["verdict"] == "within noise (p=0.553, n=2)"
    assert t["stablemoe"]["verdict"] == "n<2 (n=1 vs 2)" and t["stablemoe"]["p"] is None
    assert t["competesmoe"]["router_mean"] == pytest.approx(1.05)
    assert t["competesmoe"]["baseline_ci"] == pytest.approx(mean_ci([2.0, 2.1])[1])
    # the same claims on a vision store: top-1 is higher-is-better, so the directions flip
    vpath = _store(tmp_path / "v.duckdb", suite="vision")
    vt = {r["router"]: r["label"] for r in claims_table(load_runs(vpath), load_metrics(vpath),
                                                        SUITES["vision"]).iter_rows(named=True)}
    assert vt == {"competesmoe": "reversed", "xmoe": "holds", "moge": "within noise", "stablemoe": "n<2",
                  "auxfree": "n<2", "hash": "n<2", "expert_choice": "n<2"}  # no runs of these in the fixture
    # a custom claim about a router that never ran
    t = claims_table(runs, metrics, SUITES["lm"], [Claim("a", "nosuch", "smoe", "nosuch beats SMoE")])
    assert t["verdict"].to_list() == ["n<2 (n=0 vs 2)"]


def test_harness_claims_prints_each_verdict(tmp_path, capsys):
    path = _store(tmp_path / "h.duckdb")
    assert main(["claims", "--store", str(path)]) == 0
    out = capsys.readouterr().out
    assert "suite lm, preset default, 9 distinct finished runs (1 duplicate set aside)" in out
    assert "val_bpb (lower is better)" in out
    lines = out.splitlines()
    assert "CompeteSMoE beats SMoE: holds (p=0.005)" in lines
    assert "X-MoE beats SMoE: reversed (p=0.005)" in lines
    assert "MoGE beats MoE (SMoE): within noise (p=0.553, n=2)" in lines
    assert "StableMoE beats Switch (SMoE top-1): n<2 (n=1 vs 2)" in lines
    assert "  harness: competesmoe 1.05 ± 0.64 (n=2) vs smoe 2.05 ± 0.64 (n=2) (val_bpb, mean ± 95% CI)" in lines
    assert any(ln.startswith("  paper:   arXiv 2402.02526") for ln in lines)
    assert main(["claims", "--store", str(path), "--preset", "tiny"]) == 0  # nothing under that preset
    assert "no claim can be tested yet" in capsys.readouterr().out
    assert main(["claims", "--store", str(path), "--alpha", "2"]) == 2


def test_claims_tab(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    try:  # skip AppTest's scan of every installed distribution for components (the page uses none)
        import streamlit.components.v2.manifest_scanner as scanner

        monkeypatch.setattr(scanner, "scan_component_manifests", lambda *a, **k: [])
    except ImportError:
        pass
    from test_leaderboard import APP

    path = _store(tmp_path / "h.duckdb")
    monkeypatch.setenv("HARNESS_STORE", str(path))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    frames = [df.value for df in at.dataframe if "harness verdict" in list(df.value.columns)]
    assert frames, "claims table not rendered"
    tab = frames[0].set_index("claim")
    expected = {r["claim"]: r["verdict"] for r in claims_table(load_runs(path), load_metrics(path),
                                                                 SUITES["lm"]).iter_rows(named=True)}
    assert tab["harness verdict"].to_dict() == expected
    assert tab.loc["CompeteSMoE beats SMoE", "harness verdict"] == "holds (p=0.005)"
    assert "arXiv 2402.02526" in tab.loc["CompeteSMoE beats SMoE", "paper"]
    assert "not verified" in tab.loc["MoGE beats MoE (SMoE)", "paper's figure"]
    captions = "\n".join(str(c.value) for c in at.caption)
    assert "1 duplicate run set aside" in captions
    # the overview counts distinct seeds too
    ov = [df.value for df in at.dataframe if "vs SMoE" in list(df.value.columns)][0]
    assert ov.loc[ov["router"] == "competesmoe", "n"].iloc[0] == 2
    assert "1 duplicate" in ov.loc[ov["router"] == "competesmoe", "excluded"].iloc[0]
    # filtering routers in the sidebar feeds the tab: without SMoE nothing can be tested
    at.sidebar.multiselect(key="routers").set_value(["competesmoe", "xmoe"]).run()
    assert not at.exception
    tab = [df.value for df in at.dataframe if "harness verdict" in list(df.value.columns)][0]
    assert set(tab["harness verdict"]) == {"n<2 (n=2 vs 0)", "n<2 (n=0 vs 0)"}
