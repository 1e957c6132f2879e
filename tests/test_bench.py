"""``harness bench`` (harness/bench/) on tiny sizes: rows, phase decomposition, memory, CLI.

No assertion compares speeds: timings on a shared machine are noise at these
sizes. What is pinned: the rows are well formed, the phases of every repeat sum
exactly to that repeat's instrumented total, the instrumented run IS the layer's
forward (bit for bit) and attributes its steps to the right phases, the naive loop
reproduces the real layer, the amortisation formula, and that the memory figures
are positive and grow with the number of tokens.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from harness import bench as P
from harness.routing.registry import router_names
from harness.store import Store

# one worker runs this module: its module-scoped fixtures are built once (Makefile: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_bench")


def _query(path, sql):
    # duckdb directly (Store.query relies on DuckDBPyConnection.pl(), absent in duckdb 2.x)
    import duckdb
    import polars as pl

    con = duckdb.connect(str(path), read_only=True)
    try:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description]
        return pl.DataFrame([dict(zip(cols, r)) for r in cur.fetchall()], infer_schema_length=None)
    finally:
        con.close()

TINY = P.LayerConfig(tokens=64, d_model=16, d_ff=32, num_experts=4, top_k=2)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def one_thread():
    # one intra-op thread: on an oversubscribed 2-core machine OpenMP barriers make 2 threads crawl
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def bench(one_thread):
    return P.run_layer_bench(TINY, None, naive=True, repeats=5, warmup=0, mem_repeats=1, router_inner=1,
                             log=lambda m: None)


def test_every_registered_router_plus_dense_and_naive_is_measured(bench):
    labels = set(bench.stats)
    assert {"smoe", "dense", "naive"} <= labels
    for name in router_names():
        assert any(bench.info[lab]["router"] == name for lab in labels), name
    if "competesmoe" in router_names():
        assert {"competesmoe@compete", "competesmoe@plain", "competesmoe (amortised)"} <= labels
    if "stablemoe" in router_names():  # top-1 only: run at k=1 against k=1 references
        assert bench.info["stablemoe@stage1"]["k"] == 1
        assert {"smoe[k=1]", "dense[k=1]"} <= labels
        assert "ratio_vs_smoe" in bench.stats["stablemoe (amortised)"]


def test_phases_sum_to_the_instrumented_total(bench):
    for res in bench.results:
        assert res.phases_ok, res.label
        s = res.samples
        assert len(s["fwd_bwd"]) == 5 and len(s["phased_total"]) == 5
        for i in range(5):
            parts = [s["phase_" + p][i] for p in P.PHASES]
            assert all(v >= 0 for v in parts), (res.label, parts)
            assert math.isclose(sum(parts), s["phased_total"][i], rel_tol=1e-9, abs_tol=1e-12), res.label
        assert all(0.0 <= a <= 1.0 for a in s["aux_share"])
        if res.kind == "dense":
            assert s["phase_router"] == [0.0] * 5
    # the reported phase figures split the median instrumented total, so they add up to it
    for label, st in bench.stats.items():
        if "phased_total_ms" in st:
            total = sum(st[f"phase_{p}_ms"].median for p in P.PHASES)
            assert total == pytest.approx(st["phased_total_ms"].median, rel=1e-9), label


def test_phase_clock_is_exact_with_a_fake_clock():
    class Tick:
        cuda = False
        t = 0.0

        def now(self):
            self.t += 1.0
            return self.t

    ph = P.PhaseClock(Tick())
    ph.mark("router")
    ph.mark("dispatch")
    ph.mark("router")
    ph.move("router", "aux_loss", 0.5)
    assert ph.times["router"] == 1.5 and ph.times["dispatch"] == 1.0 and ph.times["aux_loss"] == 0.5
    assert sum(ph.times.values()) == ph.total == 3.0


def test_instrumented_run_is_the_layer_and_the_naive_loop_reproduces_it(one_thread):
    cands = P.build_candidates(TINY, [n for n in router_names()], naive=True, log=lambda m: None)
    inp = P.Inputs.make(TINY.tokens, TINY.d_model, torch.float32, CPU, 0)
    clock = P.Clock(CPU)
    assert any(c.kind == "naive" for c in cands)
    for c in cands:
        if c.kind == "moe":  # one forward: the phased run computes exactly what the plain run does
            with torch.no_grad():
                ref, _ = c.module(inp.x, P.route_context(c, inp))
                got, _ = P.moe_forward_phased(c.module, inp.x, P.route_context(c, inp), P.PhaseClock(clock))
            assert torch.equal(got, ref), c.label
        if c.kind == "naive":
            assert P.verify_naive(c, inp) is None


class _Tick:
    """A clock that advances by 1 at every read: each mark adds exactly 1 to its phase."""

    cuda = False

    def __init__(self):
        self.t = 0.0

    def now(self):
        self.t += 1.0
        return self.t


def test_phased_run_marks_the_layer_steps_and_moves_all_expert_time_to_experts(one_thread):
    from harness.layers.moe_layer import STEPS

    assert set(P.PHASE_OF_STEP) == set(STEPS)
    names = ["smoe"] + (["competesmoe"] if "competesmoe" in router_names() else [])
    cands = {c.label: c for c in P.build_candidates(TINY, names, naive=False, log=lambda m: None)}
    inp = P.Inputs.make(TINY.tokens, TINY.d_model, torch.float32, CPU, 0)
    ph = P.PhaseClock(_Tick())
    P.moe_forward_phased(cands["smoe"].module, inp.x, P.route_context(cands["smoe"], inp), ph)
    assert {p: ph.times[p] for p in ("router", "dispatch", "experts", "combine")} == dict.fromkeys(
        ("router", "dispatch", "experts", "combine"), 1.0)
    if "competesmoe@compete" in cands:  # the router runs every expert: marked around, counted as experts
        c = cands["competesmoe@compete"]
        ph = P.PhaseClock(_Tick())
        ctx = P.route_context(c, inp)
        P.moe_forward_phased(c.module, inp.x, ctx, ph)
        assert ctx.has_all_expert_outputs
        assert ph.times["router"] == 2.0 and ph.times["experts"] == 2.0
        assert ph.times["dispatch"] == 1.0 and ph.times["combine"] == 1.0


def test_naive_loop_matches_layer_with_capacity_free_routing(one_thread):
    cfg = P.LayerConfig(tokens=40, d_model=8, d_ff=16, num_experts=5, top_k=3)
    cands = {c.label: c for c in P.build_candidates(cfg, ["smoe"], naive=True, log=lambda m: None)}
    inp = P.Inputs.make(cfg.tokens, cfg.d_model, torch.float32, CPU, 1)
    layer = cands["smoe"].module
    ctx = P.route_context(cands["smoe"], inp)
    y_ref, _ = layer(inp.x, ctx)
    y_naive, _ = P.naive_forward(layer, inp.x, P.route_context(cands["naive"], inp))
    torch.testing.assert_close(y_naive, y_ref, rtol=1e-5, atol=1e-6)
    # and the gradients agree too
    g = torch.randn_like(y_ref)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, [inp.x, layer.experts.w1], g)
    gx, gw = torch.autograd.grad(y_naive, [inp.x, layer.experts.w1], g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-5)


def test_rows_are_well_formed_in_the_store(bench, tmp_path):
    rows = P.layer_rows(bench, "b1", "m1", "sha1")
    store = Store(tmp_path / "h.duckdb")
    P.write_rows(str(store.path), rows, {"machine_id": "m1", "hostname": "h", "cpu": "c", "threads": 1,
                                         "gpu": None, "platform": "p", "python": "3"})
    df = _query(store.path, "SELECT * FROM perf WHERE bench_id = 'b1'")
    assert df.height == len(rows) > 0
    assert df["value"].null_count() == 0
    smoe = df.filter(df["router"] == "smoe")
    metrics = set(smoe["metric"].to_list())
    expected = {"fwd_bwd_ms", "tokens_per_s", "peak_mem_mb", "saved_act_mb", "ratio_vs_smoe", "ratio_vs_dense",
                "throughput_vs_dense", "ratio_vs_naive", "phased_total_ms", "router_fwd_bwd_ms",
                "router_overhead_vs_smoe"} | {f"phase_{p}_ms" for p in P.PHASES}
    assert expected <= metrics, expected - metrics
    for rec in df.iter_rows(named=True):
        cfg = json.loads(rec["config"])
        for key in ("E", "k", "d", "d_ff", "tokens", "dtype", "mode", "variant", "threads"):
            assert key in cfg, key
        assert cfg["mode"] == "layer" and cfg["E"] == 4 and cfg["tokens"] == 64
        assert math.isfinite(rec["value"])
        if rec["spread"] is not None:
            assert rec["spread"] >= 0
        if rec["metric"].endswith("_ms") and not rec["metric"].startswith("phase_"):
            assert rec["value"] > 0
    for metric in ("ratio_vs_smoe", "router_overhead_vs_smoe"):
        ref = smoe.filter((smoe["metric"] == metric))
        assert set(ref["value"].to_list()) == {1.0}, metric
    if "competesmoe" in router_names():
        am = df.filter((df["router"] == "competesmoe") & (df["metric"] == "ratio_vs_smoe"))
        variants = {json.loads(c)["variant"] for c in am["config"]}
        assert variants == {"compete", "plain", "amortised"}


def test_amortised_is_the_weighted_mean_per_repeat():
    cfg = P.LayerConfig(tokens=10, d_model=4, d_ff=8, num_experts=4, top_k=2)
    mk = P.CandidateResult
    res = [
        mk("smoe", "smoe", "reference", "moe", 2,
           samples={"fwd_bwd": [1.0, 1.0, 1.0, 1.0, 1.0], "router_fwd_bwd": [0.01] * 5}),
        mk("dense", "dense", "reference", "dense", 2, samples={"fwd_bwd": [0.5] * 5}),
        mk("c@compete", "c", "compete", "moe", 2, weight=0.05,
           samples={"fwd_bwd": [3.0, 3.0, 3.0, 3.0, 3.0], "router_fwd_bwd": [0.05] * 5}),
        mk("c@plain", "c", "plain", "moe", 2, weight=0.95,
           samples={"fwd_bwd": [1.0, 1.1, 1.2, 1.0, 1.0], "router_fwd_bwd": [0.03] * 5}),
    ]
    b = P.LayerBench(cfg, res, repeats=5, warmup=0)
    P.summarise_layer(b)
    am = b.stats["c (amortised)"]
    assert am["fwd_bwd_ms"].median == pytest.approx(1e3 * (0.05 * 3.0 + 0.95 * 1.0))
    assert am["ratio_vs_smoe"].median == pytest.approx(0.05 * 3.0 + 0.95 * 1.0)
    assert b.stats["smoe"]["ratio_vs_dense"].median == pytest.approx(2.0)
    assert b.stats["smoe"]["throughput_vs_dense"].median == pytest.approx(0.5)
    assert b.stats["c@plain"]["ratio_vs_smoe"].spread > 0
    # router-resolved: smoe layer + (router - smoe router); a competition step counts its whole layer
    assert b.stats["c@plain"]["router_overhead_vs_smoe"].median == pytest.approx(1.02)
    assert b.stats["c@plain"]["router_overhead_vs_smoe"].spread == pytest.approx(0.0, abs=1e-12)
    assert b.stats["c@compete"]["router_overhead_vs_smoe"].median == pytest.approx(3.0)
    assert b.stats["c (amortised)"]["router_overhead_vs_smoe"].median == pytest.approx(0.05 * 3.0 + 0.95 * 1.02)
    assert b.stats["smoe"]["router_overhead_vs_smoe"].median == pytest.approx(1.0)


def test_memory_is_positive_and_grows_with_tokens(one_thread):
    out = {}
    for T in (256, 4096):
        cfg = P.LayerConfig(tokens=T, d_model=32, d_ff=64, num_experts=4, top_k=2)
        cands = P.build_candidates(cfg, ["smoe", "dense"], naive=True, log=lambda m: None)
        inp = P.Inputs.make(T, cfg.d_model, torch.float32, CPU, 0)
        out[T] = {c.label: P.measure_memory(c, inp, P.Clock(CPU)) for c in cands}
    for label in ("smoe", "dense", "naive"):
        small, big = out[256][label], out[4096][label]
        assert small["saved_act_mb"] > 0
        assert big["saved_act_mb"] > 8 * small["saved_act_mb"]  # 16x the tokens
        if big["peak_mem_mb"] is not None:  # needs /proc (Linux)
            assert big["peak_mem_mb"] > 0
            assert big["peak_mem_mb"] > small["peak_mem_mb"]
    # top-2 of d_ff keeps more activations than the dense FFN of width 2*d_ff? both are O(T*d_ff*k)
    assert out[4096]["smoe"]["saved_act_mb"] > 0.5 * out[4096]["dense"]["saved_act_mb"]


def test_absent_router_is_skipped_not_fatal(one_thread):
    names, skipped = P.resolve_routers(["smoe", "no_such_router"], log=lambda m: None)
    assert names[:2] == ["dense", "smoe"] and "no_such_router" not in names
    assert len(skipped) == 1 and "no_such_router" in skipped[0]


def test_too_few_repeats_is_refused():
    with pytest.raises(ValueError, match="repeats"):
        P.run_layer_bench(TINY, ["smoe"], repeats=3, log=lambda m: None)


def test_scaling_mode_tiny(one_thread):
    sb = P.run_scaling_bench(experts=(4, 8), tokens=(32,), d_models=(8,), top_k=2, routers=None, repeats=5,
                             warmup=0, log=lambda m: None)
    labels = {(p["label"], p["E"]) for p in sb.points}
    assert ("smoe", 4) in labels and ("smoe", 8) in labels
    assert not any(p["router"] == "dense" for p in sb.points)
    for p in sb.points:
        st = p["stats"]
        assert st["router_fwd_bwd_ms"].median > 0
        if p["label"] == "smoe":
            assert st["router_ratio_vs_smoe"].median == 1.0
    rows = P.scaling_rows(sb, "s1", "m", "sha")
    assert rows and all(json.loads(json.dumps(r["config"]))["mode"] == "scaling" for r in rows)


def test_cli_bench_writes_rows(one_thread, tmp_path, capsys):
    from harness.cli import main

    store = tmp_path / "b.duckdb"
    rc = main(["bench", "layer", "--routers", "smoe", "--tokens", "32", "--d-model", "8", "--d-ff", "16",
               "--experts", "4", "--repeats", "5", "--warmup", "0", "--device", "cpu", "--store", str(store)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fwd_bwd_ms" in out and "wrote" in out
    df = _query(store, "SELECT DISTINCT router FROM perf")
    assert set(df["router"].to_list()) == {"smoe", "dense", "naive"}
    rc = main(["bench", "--mode", "scaling", "--routers", "smoe", "--tokens", "16", "--d-model", "8",
               "--experts", "4", "--repeats", "5", "--warmup", "0", "--device", "cpu", "--no-store"])
    assert rc == 0
    assert main(["bench", "--repeats", "2", "--no-store"]) == 2  # one-line argparse error (issue 19), no SystemExit
    assert "--repeats" in capsys.readouterr().err


def test_a_positional_router_is_benched_with_positions(one_thread):
    """stablemoe@position reads ``ctx.positions``: the synthetic batch is sequences of CONTEXT tokens."""
    from harness.bench.candidates import CONTEXT, positions

    pos = positions(torch.zeros(2 * CONTEXT + 3, dtype=torch.long))
    assert pos[:3].tolist() == [0, 1, 2] and int(pos[CONTEXT]) == 0 and int(pos.max()) == CONTEXT - 1
    b = P.run_layer_bench(TINY, ["stablemoe@position"], repeats=5, log=lambda m: None)
    assert any(label.startswith("stablemoe@position") for label in b.stats)
