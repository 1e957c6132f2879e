"""``harness run --sweep KEY=V1,V2,...`` (issue 28): the pure expansion (harness.sweep) and one real sweep.

The bad-input cases (one line, exit 2, nothing written) are in tests/test_bad_input.py with every other
sub-command's; here: the expansion itself, and what each error says.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.cli import main
from harness.spec import SpecError, load_suite
from harness.sweep import Point, parse_sweep, parse_sweeps, points, split_values

from storeq import TINY, q


def test_split_values_keeps_lists_and_quotes_whole():
    assert split_values("4,8,16") == ["4", "8", "16"]
    assert split_values(" 4 , 8 ") == ["4", "8"]
    assert split_values("[250,500],[500,1000]") == ["[250,500]", "[500,1000]"]
    assert split_values("{a: 1, b: 2},x") == ["{a: 1, b: 2}", "x"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("") == [""]


def test_product_order_and_labels():
    sw = parse_sweeps(["model.num_experts=4,8,16", "model.top_k=1,2"])
    pts = points(sw)
    assert len(pts) == 6
    assert [p.label for p in pts] == [
        "model.num_experts=4 model.top_k=1", "model.num_experts=4 model.top_k=2",
        "model.num_experts=8 model.top_k=1", "model.num_experts=8 model.top_k=2",
        "model.num_experts=16 model.top_k=1", "model.num_experts=16 model.top_k=2"]
    assert pts[3].overrides == ["model.num_experts=8", "model.top_k=2"]
    assert pts[3] == Point((("model.num_experts", "8"), ("model.top_k", "2")))
    assert [p.label for p in points(parse_sweeps(["train.lr=1e-3"]))] == ["train.lr=1e-3"]  # one value: a --set


def test_each_point_is_the_spec_of_the_same_set():
    """A point's values are parsed exactly as --set parses them: the same spec, the same hash."""
    for pt in points(parse_sweeps(["model.num_experts=2,4", "train.lr=1e-2", "model.capacity_factor=null,1.5"])):
        a = load_suite("lm", preset="tiny", overrides=pt.overrides)
        b = load_suite("lm", preset="tiny", overrides=[f"{k}={v}" for k, v in pt.items])
        assert a == b and [r.spec_hash for r in a.runs()] == [r.spec_hash for r in b.runs()]
    specs = [load_suite("lm", preset="tiny", overrides=p.overrides)
             for p in points(parse_sweeps(["model.num_experts=2,4"]))]
    assert [s.model.num_experts for s in specs] == [2, 4]
    assert specs[0].runs()[0].spec_hash != specs[1].runs()[0].spec_hash


@pytest.mark.parametrize("items, sets, says", [
    (["model.top_k"], [], "expected KEY=V1,V2"),
    (["=1,2"], [], "no key before '='"),
    (["model.top_k="], [], "empty value"),
    (["model.top_k=1,,2"], [], "empty value"),
    (["model.top_k=1,"], [], "empty value"),
    (["model.top_k=1,1.0"], [], "1.0 and 1 are the same value"),
    (["model.top_k=1,2", "model.top_k=2"], [], "model.top_k is swept twice"),
    (["router_args.xmoe.routing_dim=4,8", "router_args.xmoe={routing_dim: 4},{routing_dim: 8}"], [],
     "router_args.xmoe overlaps --sweep router_args.xmoe.routing_dim"),
    (["model.top_k=1,2"], ["model={top_k: 1}"], "--sweep model.top_k and --set model both set"),
    (["model.top_k=1,2"], ["model.top_k=1"], "--sweep model.top_k and --set model.top_k both set"),
    (["routers=smoe,xmoe"], [], "give routers with --routers"),
    (["seeds=0,1"], [], "give seeds with --seeds"),
    (["model=1"], [], "sweep one key of the section"),
])
def test_parse_errors(items, sets, says):
    with pytest.raises(SpecError) as e:
        parse_sweeps(items, sets)
    assert says in str(e.value), str(e.value)


def test_true_and_one_are_different_values():
    assert parse_sweep("data.strict_size=true,1").values == ("true", "1")  # the spec parser rejects 1 later


@pytest.mark.parametrize("argv, says", [
    (["--sweep", "model.num_exprts=4,8"], "--sweep point model.num_exprts=4: "),
    (["--sweep", "model.top_k=1,9"], "--sweep point model.top_k=9: "),
    (["--sweep", "train.lr=0.01,1e-2"], "points train.lr=0.01 and train.lr=1e-2 are the same spec"),
    (["--sweep", "model.top_k=1,2", "--precision", "0.01"], "does not combine with --precision"),
    (["--sweep", "model.top_k=1,2", "--nproc", "2"], "does not combine with --nproc"),
])
def test_run_sweep_errors_name_the_point(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *TINY, "--store", str(tmp_path / "s.duckdb"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error: ") and "\n" not in err and says in err, err
    assert list(tmp_path.iterdir()) == []


def test_sweep_end_to_end(tmp_path):
    """Two points, one process: two spec hashes land finished, num_experts 2 and 4, one summary table."""
    store = tmp_path / "s.duckdb"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--suite", "lm", *TINY, "--routers", "smoe",
                        "--seeds", "0", "--set", "train.steps=12", "--set", "train.eval_every=6",
                        "--sweep", "model.num_experts=2,4", "--store", str(store)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sweep point 1/2: model.num_experts=2 (1 runs)" in p.stderr
    assert "sweep point 2/2: model.num_experts=4 (1 runs)" in p.stderr
    rows = q(store, "SELECT spec_hash, status, config FROM runs ORDER BY started_at")
    assert len(rows) == 2 and len({r[0] for r in rows}) == 2 and {r[1] for r in rows} == {"finished"}
    assert [json.loads(r[2])["model"]["num_experts"] for r in rows] == [2, 4]
    header = next(ln for ln in p.stdout.splitlines() if "model.num_experts" in ln)
    assert header.index("model.num_experts") < header.index("router")  # the swept key first
    table = [ln for ln in p.stdout.splitlines() if "smoe" in ln]
    assert [ln.split("┆")[0].strip("│ ") for ln in table] == ["2", "4"]
