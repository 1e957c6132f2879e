"""``harness run --precision D``: seeds are added for every router at once until every difference to the
baseline has a 95% CI half-width <= D, or --max-seeds; the rule looks at the width, never at p."""
from __future__ import annotations

import math

import pytest

from harness.cli import main
from harness.spec import SpecError, load_suite
from harness.tools.precision import check_request, judge, next_seed

from storeq import TINY, q

SHORT = [*TINY, "--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.ckpt_every=2"]


def test_judge_pairs_by_seed_and_reports_the_widest_interval():
    values = {"smoe": {0: 2.0, 1: 2.3, 2: 2.1},
              "xmoe": {0: 1.9, 1: 2.2, 2: 2.0},   # -0.1 every seed: a zero-width interval
              "moge": {0: 2.1, 1: 2.2, 2: 2.1}}   # +0.1, -0.1, 0: sd 0.1, half-width 4.303 * 0.1 / sqrt(3)
    rnd = judge(values, (0, 1, 2), "smoe")
    assert set(rnd.comparisons) == {"xmoe", "moge"} and rnd.comparisons["xmoe"].kind == "paired"
    worst, width = rnd.widest()
    assert worst == "moge" and width == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    # a router with one seed has no interval yet: the widest is unknown (infinite), never "precise"
    rnd = judge({"smoe": {0: 2.0, 1: 2.1}, "xmoe": {0: 1.9}}, (0, 1), "smoe")
    assert rnd.widest() == ("xmoe", math.inf)
    assert next_seed((0, 1, 2)) == 3 and next_seed((5,)) == 6


def test_bad_requests_are_one_line_errors():
    spec = load_suite("lm", preset="tiny", routers=["smoe", "dense"])
    for target, max_seeds, base, needle in [(0.0, 5, "smoe", "positive"), (math.nan, 5, "smoe", "positive"),
                                           (0.1, 1, "smoe", "at least 2"), (0.1, 5, "xmoe", "not among")]:
        with pytest.raises(SpecError, match=needle):
            check_request(spec, target, max_seeds, base)


def test_precision_adds_whole_seeds_until_max_then_stops_at_the_target(tmp_path, capsys):
    store = tmp_path / "h.duckdb"
    common = ["run", "--suite", "lm", "--routers", "smoe,dense", "--seeds", "0", *SHORT, "--store", str(store)]
    # an unreachable target: seeds 0, 1 (a CI needs two), then 2, and it says so at --max-seeds
    assert main([*common, "--precision", "1e-12", "--max-seeds", "3"]) == 0
    err = capsys.readouterr().err
    assert "adding seed 2 for every router" in err and "not reached at --max-seeds 3" in err
    assert q(store, "SELECT router, count(*) FROM runs WHERE status = 'finished' GROUP BY 1 ORDER BY 1") == \
        [("dense", 3), ("smoe", 3)]
    # a loose target is met by the seeds already there: nothing is trained again
    assert main([*common, "--precision", "100", "--max-seeds", "5"]) == 0
    err = capsys.readouterr().err
    assert "every difference to smoe within ±100 at n = 2 seeds" in err
    assert q(store, "SELECT count(*) FROM runs") == [(6,)]


@pytest.mark.parametrize("extra,needle", [
    (["--precision", "-0.5"], "--precision must be a positive number"),
    (["--precision", "0.1", "--rerun"], "--rerun"),
    (["--precision", "0.1", "--baseline", "moge"], "not among the suite's routers"),
    (["--precision", "0.1", "--baseline", "/proc/nope"], "not among the suite's routers"),  # a router, not a file
    (["--precision", "0.1", "--max-seeds", "1"], "--max-seeds must be at least 2"),
])
def test_precision_bad_input_exit_2_nothing_written(tmp_path, capsys, extra, needle):
    store = tmp_path / "h.duckdb"
    assert main(["run", "--suite", "lm", "--routers", "smoe,dense", *SHORT, "--store", str(store), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("harness: error: ") and needle in err[0]
    assert not store.exists()
