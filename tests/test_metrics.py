"""Metrics declared once (harness/metrics.py) and the one registry type (harness/catalog.py): what reads the
declarations agrees with them, and a new leaderboard column is one declaration."""
from __future__ import annotations

import polars as pl
import pytest

from harness import metrics
from harness.catalog import Registry
from harness.errors import UserError
from harness.tools.regress.gate import RULES
from leaderboard.columns import board_columns
from leaderboard.overview import best_rows, display_best_cells, display_overview, overview, to_latex
from leaderboard.store import HEALTH_COLUMNS
from leaderboard.suites import SUITES, suite_meta
from leaderboard.verdicts import higher_is_better


def test_split_metrics_are_declared_with_their_split():
    for name in metrics.METRICS.names():
        m = metrics.get(name)
        if name.startswith(("val_", "test_")):
            assert m.split == name.split("_", 1)[0], name
        else:
            assert m.split is None, name
    assert metrics.get("val_bpb@250") is metrics.get("val_bpb")  # a budget's metric is its base metric's
    assert metrics.get("nosuch") is None and metrics.higher_is_better("nosuch") is None


def test_suites_take_direction_label_and_percent_from_the_declarations():
    for meta in SUITES.values():
        for name in (meta.quality, meta.test, *meta.extra):
            assert metrics.higher_is_better(name) == meta.higher_better, name
        assert meta.label == metrics.get(meta.quality).label
        assert meta.percent == metrics.get(meta.quality).percent
    # an unknown suite that wrote a declared metric gets its declared direction, not a guess from the name
    assert suite_meta("mine", ["val_top5", "train_img_per_s"]).higher_better is True
    assert suite_meta("mine", ["val_score"]).higher_better is True  # undeclared: guessed as before
    assert higher_is_better("peak_mem_mb", SUITES["lm"]) is False
    assert higher_is_better("load_entropy", SUITES["lm"]) is True


def test_regress_rules_fail_in_the_declared_bad_direction():
    for name, rule in RULES.items():
        higher = metrics.higher_is_better(name)
        if higher is not None and rule.worse != "both":
            assert rule.worse == ("lower" if higher else "higher"), name


def _frames():
    runs, rows, health = [], [], []
    for router, vals in {"smoe": [1.40, 1.41, 1.39], "xmoe": [1.30, 1.31, 1.29]}.items():
        for seed, v in enumerate(vals):
            rid = f"{router}-{seed}"
            runs.append({"run_id": rid, "suite": "lm", "router": router, "seed": seed, "status": "finished",
                         "spec_hash": f"h-{router}", "preset": "tiny", "machine": "m", "git_sha": "abc",
                         "started_at": None})
            rows += [{"run_id": rid, "name": "val_bpb", "value": v}, {"run_id": rid, "name": "test_bpb", "value": v},
                     {"run_id": rid, "name": "train_tok_per_s", "value": 100.0},
                     {"run_id": rid, "name": "peak_mem_mb", "value": 10.0}]
            for name, value in (("load_entropy", 0.9), ("dead_experts", 0.0), ("max_over_mean_load", 1.5),
                                ("fluctuation_last_change", 0.2 if router == "smoe" else 0.1)):
                health.append({"run_id": rid, "step": 30, "layer": 0, "name": name, "value": value})
    runs_df = pl.DataFrame(runs, schema_overrides={"started_at": pl.Datetime("us")})
    return runs_df, pl.DataFrame(rows), pl.DataFrame(health, schema=HEALTH_COLUMNS)


def test_a_new_leaderboard_column_is_one_declaration():
    runs, rows, health = _frames()
    meta = SUITES["lm"]
    before = display_overview(overview(runs, rows, health, meta), meta)
    assert "last change" not in before.columns
    metrics.declare(metrics.Metric("fluctuation_last_change", None, False, ".3f", "last change", source="health",
                                   board="last change", paper=True,
                                   help="when a token's expert last changed, as a fraction of training"))
    try:  # the one edit: everything below picks it up
        ov = overview(runs, rows, health, meta)
        disp = display_overview(ov, meta)
        assert disp.columns[-2:] == ["last change", "excluded"]
        cells = dict(zip(disp["router"].to_list(), disp["last change"].to_list()))
        assert cells == {"xmoe": "0.100", "smoe": "0.200"}
        assert best_rows(ov, meta)["fluctuation_last_change"] == [ov["router"].to_list().index("xmoe")]
        assert "last change" in display_best_cells(ov, meta)
        assert "last change" in to_latex(ov, meta) and "last change" in disp.write_csv()
        col = next(c for c in board_columns(meta) if c.key == "fluctuation_last_change")  # the page's tooltip
        assert col.shown and col.header == "last change" and col.help.startswith("when a token's expert")
    finally:
        metrics.METRICS.remove("fluctuation_last_change")
    assert "last change" not in display_overview(overview(runs, rows, health, meta), meta).columns


def test_the_registry_type_lazy_entries_did_you_mean_and_loaders():
    loads = []
    reg: Registry[object] = Registry("widget", error=UserError, loaders=[lambda: loads.append(1)])
    reg.add("alpha", 1)
    reg.add_lazy("beta", "harness.errors:UserError", origin="package x")
    assert reg.names() == ["alpha", "beta"] and loads == [1]
    assert reg.get("beta") is UserError and reg.entry("beta").origin == "package x"
    with pytest.raises(UserError, match=r"unknown widget 'alpah'\. Did you mean 'alpha'\? Known widgets: alpha, beta"):
        reg.get("alpah")
    reg.names()
    assert loads == [1]  # loaders run once
