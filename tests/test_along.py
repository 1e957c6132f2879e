"""Verdicts along an axis (issue 28): ``leaderboard.along``, ``harness claims --along``, ``harness compare
--along`` and the board's Along tab, on hand-written stores whose differences and p-values are known.

Every router's value at a seed is SMoE's plus a chosen difference, so the paired t-test sees exactly those
differences: -0.10, -0.11, -0.12 (t = -19.05 on 2 df: p = 0.0027, "better" on val_bpb), their negation
("worse", the same p) or +0.1, -0.1, 0 (p = 1, SD 0.1: within noise).
"""
from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timedelta

import pytest

from harness.cli import main
from harness.store import Store
from leaderboard.along import AlongError, along_table, axes, check_axis
from leaderboard.stats import mde
from leaderboard.store import load_metrics, load_runs
from leaderboard.suites import SUITES

T0 = datetime(2026, 1, 1, 12)
LM = SUITES["lm"]
SMOE = [2.0, 2.3, 2.1]  # seeds 0, 1, 2
BETTER, WORSE, NOISE = [-0.10, -0.11, -0.12], [0.10, 0.11, 0.12], [0.1, -0.1, 0.0]


def p_df2(t: float) -> float:
    """Two-sided p of Student's t with 2 degrees of freedom (closed form)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


P_SIG = p_df2(-0.11 / (0.01 / math.sqrt(3)))  # paired over BETTER (or WORSE): 0.00273
CI_SIG = 4.302653 * 0.01 / math.sqrt(3)       # t(0.975, 2) * sd / sqrt(n)


def config(router: str, seed: int, model=None, train=None, router_args=None) -> dict:
    """The resolved spec `harness run` stores (RunSpec.to_dict), abridged."""
    return {"suite": "lm", "preset": "default", "router": router, "router_args": router_args or {}, "seed": seed,
            "model": {"d_model": 64, "num_experts": 8, "top_k": 2, **(model or {})},
            "train": {"steps": 200, "lr": 0.003, **(train or {})}, "data": {"corpus": "shakespeare"},
            "eval": {"limit": None}}


def write(path, runs: list[tuple[str, int, dict, dict[str, float]]]):
    """Finished runs ``(router, seed, config, {metric: value})`` in one transaction (metrics ``name@b`` at step b);
    the spec hash is the config's without the seed, as `harness run` keys them."""
    with Store(path).writer() as con:
        for i, (router, seed, cfg, metrics) in enumerate(runs):
            rid = f"lm-{router}-{i}-s{seed}"
            spec = hashlib.sha256(json.dumps({k: v for k, v in cfg.items() if k != "seed"}, sort_keys=True).encode())
            steps = cfg["train"]["steps"]
            con.execute("INSERT INTO runs (run_id, suite, router, spec_hash, seed, preset, status, step, total_steps, "
                        "started_at, finished_at, config) VALUES (?, 'lm', ?, ?, ?, 'default', 'finished', ?, ?, ?, ?, "
                        "?)", [rid, router, spec.hexdigest()[:16], seed, steps, steps, T0 + timedelta(minutes=i),
                               T0 + timedelta(minutes=i + 1), json.dumps(cfg)])
            con.executemany("INSERT INTO metrics VALUES (?, ?, ?, NULL, 'val', ?)",
                            [[rid, n, v, int(n.split("@")[1]) if "@" in n else steps] for n, v in metrics.items()])
    return path


# router -> num_experts -> per-seed differences to smoe
KEY_DIFFS = {"xmoe": {4: BETTER, 8: NOISE, 16: WORSE},
             "competesmoe": {4: BETTER, 8: BETTER, 16: BETTER},
             "moge": {4: NOISE, 8: NOISE, 16: NOISE},
             "hash": {4: BETTER, 8: NOISE, 16: NOISE}}


@pytest.fixture(scope="module")
def key_store(tmp_path_factory):
    """A sweep over model.num_experts = 4, 8, 16: every router at each value, three seeds, paired."""
    rows = []
    for e in (4, 8, 16):
        rows += [("smoe", s, config("smoe", s, {"num_experts": e}), {"val_bpb": SMOE[s]}) for s in range(3)]
        for router, diffs in KEY_DIFFS.items():
            rows += [(router, s, config(router, s, {"num_experts": e}), {"val_bpb": SMOE[s] + diffs[e][s]})
                     for s in range(3)]
    return write(tmp_path_factory.mktemp("along") / "key.duckdb", rows)


@pytest.fixture()
def budget_store(tmp_path):
    """One WSD run per router and seed at 1000 steps with budgets 250, 500, 1000 (val_bpb@b; plain val_bpb is
    the 1000-step value). xmoe: better at 250, within noise at 500, worse at 1000."""
    diffs = {250: BETTER, 500: NOISE, 1000: WORSE}
    rows = []
    for router in ("smoe", "xmoe"):
        for s in range(3):
            at = {b: SMOE[s] + b / 1000 + (diffs[b][s] if router == "xmoe" else 0.0) for b in diffs}
            cfg = config(router, s, train={"steps": 1000, "schedule": "wsd", "budgets": [250, 500, 1000]})
            rows.append((router, s, cfg, {"val_bpb": at[1000], **{f"val_bpb@{b}": v for b, v in at.items()}}))
    return write(tmp_path / "budget.duckdb", rows)


def table(path, axis, **kw):
    return along_table(load_runs(path), load_metrics(path), LM, axis, **kw)


def test_key_axis_reads_the_config_and_pairs_by_seed(key_store):
    al = table(key_store, "model.num_experts")
    assert al.points == ["4", "8", "16"] and al.family == 12  # 4 routers x 3 points, one Holm family
    rows = {(r["router"], r["point"]): r for r in al.rows.iter_rows(named=True)}
    x4 = rows[("xmoe", "4")]
    assert x4["test"] == "paired" and x4["n_pairs"] == 3 and x4["baseline"] == "smoe"
    assert x4["diff"] == pytest.approx(-0.11) and x4["diff_ci"] == pytest.approx(CI_SIG, rel=1e-5)
    assert x4["p"] == pytest.approx(P_SIG, rel=1e-6)
    # Holm over 12: six tests at P_SIG (ranks 1-6: 12p .. 7p, made monotone: all 12p), six at p = 1
    assert x4["p_holm"] == pytest.approx(12 * P_SIG, rel=1e-5) and x4["direction"] == "better"
    assert rows[("xmoe", "16")]["diff"] == pytest.approx(0.11) and rows[("xmoe", "16")]["direction"] == "worse"
    assert rows[("xmoe", "8")]["p"] == pytest.approx(1.0) and rows[("xmoe", "8")]["direction"] == "within noise"
    assert rows[("moge", "8")]["mde"] == pytest.approx(mde(0.1, 3), rel=1e-6)


def test_key_axis_labels(key_store):
    labels = dict(table(key_store, "model.num_experts").labels.select("router", "label").iter_rows())
    assert labels == {
        "competesmoe": "holds at every point",
        "hash": "mixed: holds at 4; within noise at 8, 16",
        "moge": f"within noise at every point (could have detected ±{mde(0.1, 3):.2f} bpb)",
        "xmoe": "crossover between 4 and 16 (better at 4, worse at 16)",
    }
    assert labels["moge"] == "within noise at every point (could have detected ±0.33 bpb)"
    kinds = dict(table(key_store, "model.num_experts").labels.select("router", "kind").iter_rows())
    assert kinds == {"competesmoe": "holds", "hash": "mixed", "moge": "within noise", "xmoe": "crossover"}
    # against another baseline: smoe is now a row, and on the vision side (higher is better) the words flip
    al = table(key_store, "model.num_experts", baseline="competesmoe")
    assert dict(al.labels.select("router", "label").iter_rows())["smoe"] == "reversed at every point"


def test_budget_axis_reads_the_at_rows(budget_store):
    al = table(budget_store, "budget")
    assert al.points == ["250", "500", "1000"] and al.family == 3  # plain val_bpb is not a fourth point
    rows = {r["point"]: r for r in al.rows.iter_rows(named=True)}
    assert [rows[b]["diff"] for b in ("250", "500", "1000")] == pytest.approx([-0.11, 0.0, 0.11], abs=1e-12)
    assert rows["250"]["test"] == "paired" and rows["250"]["x"] == 250.0
    # Holm over 3: P_SIG twice (3p, then max(3p, 2p)), 1
    assert rows["250"]["p_holm"] == pytest.approx(3 * P_SIG, rel=1e-5)
    assert rows["1000"]["p_holm"] == pytest.approx(3 * P_SIG, rel=1e-5)
    assert al.labels["label"].to_list() == ["crossover between 250 and 1000 (better at 250, worse at 1000)"]
    assert axes(load_runs(budget_store), load_metrics(budget_store), "val_bpb") == ["budget"]


def test_budget_axis_of_runs_without_budgets_is_their_train_steps(tmp_path):
    """Old runs (no @ rows) are one point each, at train.steps: a --sweep train.steps reads as a budget axis."""
    rows = []
    for steps, diffs in ((250, BETTER), (500, BETTER)):
        for s in range(3):
            rows.append(("smoe", s, config("smoe", s, train={"steps": steps}), {"val_bpb": SMOE[s]}))
            rows.append(("xmoe", s, config("xmoe", s, train={"steps": steps}), {"val_bpb": SMOE[s] + diffs[s]}))
    path = write(tmp_path / "old.duckdb", rows)
    al = table(path, "budget")
    assert al.points == ["250", "500"] and al.labels["label"].to_list() == ["holds at every point"]
    assert table(path, "train.steps").rows["diff"].to_list() == al.rows["diff"].to_list()
    one = write(tmp_path / "one.duckdb", [r for r in rows if r[2]["train"]["steps"] == 250])
    with pytest.raises(AlongError, match=r"one budget \(250 steps\)"):
        table(one, "budget")


def test_router_args_axis_applies_to_its_router_only(tmp_path):
    """router_args.xmoe.routing_dim: smoe's runs (no such argument) join every point as the baseline."""
    rows = [("smoe", s, config("smoe", s), {"val_bpb": SMOE[s]}) for s in range(3)]
    for dim, diffs in ((4, BETTER), (8, NOISE)):
        rows += [("xmoe", s, config("xmoe", s, router_args={"routing_dim": dim}), {"val_bpb": SMOE[s] + diffs[s]})
                 for s in range(3)]
    path = write(tmp_path / "ra.duckdb", rows)
    al = table(path, "router_args.xmoe.routing_dim")
    assert al.points == ["4", "8"] and al.rows["test"].to_list() == ["paired", "paired"]
    assert al.labels["label"].to_list() == ["mixed: holds at 4; within noise at 8"]
    assert axes(load_runs(path), load_metrics(path), "val_bpb") == ["router_args.xmoe.routing_dim"]


def test_axis_errors(key_store):
    with pytest.raises(AlongError, match="did you mean 'model.num_experts'"):
        check_axis("model.num_expert")
    with pytest.raises(AlongError, match="every finished run has model.top_k=2; an axis needs two values"):
        table(key_store, "model.top_k")
    with pytest.raises(AlongError, match="baseline 'nosuch'"):
        table(key_store, "model.num_experts", baseline="nosuch")
    assert axes(load_runs(key_store), load_metrics(key_store), "val_bpb") == ["model.num_experts"]


def test_harness_claims_along(key_store, capsys):
    assert main(["claims", "--store", str(key_store), "--along", "model.num_experts"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"along model.num_experts on {key_store}: suite lm, preset default, 45 distinct finished " \
                       f"runs; points: 4, 8, 16"
    assert "Holm over the 12 tests of this table, alpha 0.05" in lines[1]
    i = lines.index("xmoe vs smoe: crossover between 4 and 16 (better at 4, worse at 16)")
    assert lines[i + 1].split() == ["model.num_experts", "Δ", "val_bpb", "test", "p", "Holm", "p", "verdict"]
    assert lines[i + 2].split() == ["4", "-0.110", "±", "0.025", "paired", "n=3", "0.003", "0.033", "better"]
    assert lines[i + 4].split()[:4] == ["16", "+0.110", "±", "0.025"] and lines[i + 4].endswith("worse")
    assert "competesmoe vs smoe: holds at every point" in lines
    # compare --along prints the same table
    assert main(["compare", "--store", str(key_store), "--along", "model.num_experts"]) == 0
    assert capsys.readouterr().out == out
    # without --along, claims prints the claims as before
    assert main(["claims", "--store", str(key_store)]) == 0
    assert capsys.readouterr().out.startswith(f"claims on {key_store}: suite lm")


@pytest.mark.parametrize("argv, says", [
    (["claims", "--along", "model.num_exprts"], "axis 'model.num_exprts': unknown key (did you mean "
                                                "'model.num_experts'?)"),
    (["claims", "--along", "model.top_k"], "every finished run has model.top_k=2"),
    (["claims", "--along", "budget"], "every finished run has one budget (200 steps)"),
    (["claims", "--baseline", "xmoe"], "--baseline picks the reference of --along"),
    (["compare", "--along", "model.num_experts", "--markdown"], "drop --markdown"),
])
def test_along_bad_input_is_one_line(key_store, capsys, argv, says):
    assert main([*argv, "--store", str(key_store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error:") and "\n" not in err and says in err, err


def test_along_tab(key_store, monkeypatch):
    from streamlit.testing.v1 import AppTest

    try:  # skip AppTest's scan of every installed distribution for components (the page uses none)
        import streamlit.components.v2.manifest_scanner as scanner

        monkeypatch.setattr(scanner, "scan_component_manifests", lambda *a, **k: [])
    except ImportError:
        pass
    from test_leaderboard import APP

    monkeypatch.setenv("HARNESS_STORE", str(key_store))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    frames = [df.value for df in at.dataframe if "along model.num_experts" in list(df.value.columns)]
    assert frames, "along table not rendered"
    shown = dict(zip(frames[0]["router"], frames[0]["along model.num_experts"]))
    expected = dict(table(key_store, "model.num_experts").labels.select("router", "label").iter_rows())
    assert shown == expected
    assert any(s.get("title", {}).get("text", "") == "Difference to smoe along model.num_experts"
               for s in (json.loads(c.proto.spec) for c in at.get("vega_lite_chart")))
    # another baseline from the tab's own picker
    at.selectbox(key="along_baseline").set_value("competesmoe").run()
    assert not at.exception
    frames = [df.value for df in at.dataframe if "along model.num_experts" in list(df.value.columns)]
    assert dict(zip(frames[0]["router"], frames[0]["along model.num_experts"]))["smoe"] == "reversed at every point"
