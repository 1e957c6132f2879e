"""The model-level step benchmark (harness/bench/model_step.py, benchmarks/model_step.py) runs the training
loop's own step on every candidate, interleaved, and reports ratios; speed itself is never asserted."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from harness.bench import model_step as ms
from harness.training import loop

ROOT = Path(__file__).resolve().parents[1]


def test_timed_steps_cover_the_whole_schedule():
    steps = ms.timed_steps(1000, 20)
    assert steps[0] == 0 and steps[-1] == 950 and steps == sorted(set(steps))
    assert ms.timed_steps(3, 6) == [0, 0, 1, 1, 2, 2]  # more timed steps than the run has: repeats, in order


def test_step_bench_times_the_loops_step_for_every_candidate(monkeypatch):
    calls: list[tuple[str, int]] = []
    real = loop.train_step

    def spy(ts, *a, **kw):
        calls.append((type(ts.model.blocks[0].ffn).__name__, a[2]))  # (layer kind, step)
        return real(ts, *a, **kw)

    monkeypatch.setattr(ms, "train_step", spy)
    cands, adapter = ms.build_step_candidates("lm", "tiny", ["smoe", "hash"], ["loop", "grouped_mm"])
    labels = [c.label for c in cands]
    assert labels[:2] == ["dense", "smoe"] and set(labels) == {"dense", "smoe", "smoe:grouped_mm", "hash",
                                                                "hash:grouped_mm"}
    assert all(c.params > 0 for c in cands)
    b = ms.run_step_bench(cands, adapter, repeats=5, warmup=1, steps_per_round=2, log=lambda m: None)
    assert len(calls) == 6 * 2 * len(cands)
    assert {s for _, s in calls} == set(ms.timed_steps(30, 12))  # tiny preset: 30 steps
    assert b.stats["dense"]["ratio_vs_dense"].median == 1.0
    for label, st in b.stats.items():
        assert len(b.times[label]) == 5
        assert st["step_ms"].median > 0 and st["ratio_vs_smoe"].median > 0
    texts = [t for _, t in ms.step_targets(b)]
    assert any(t.startswith("smoe step <= 1.20x dense") for t in texts)
    assert any(t.startswith("hash:grouped_mm step") for t in texts)
    assert not any(t.startswith("dense") for t in texts)
    assert ms.step_table(b).height == len(cands)


def test_step_bench_stage_times_add_up_to_at_most_the_step():
    cands, adapter = ms.build_step_candidates("lm", "tiny", ["smoe"], None)
    b = ms.run_step_bench(cands, adapter, repeats=5, warmup=0, steps_per_round=2, log=lambda m: None, stages=True)
    assert set(b.stage_times) == {"dense", "smoe"}
    for label, rows in b.stage_times.items():
        assert len(rows) == 5
        for row, step in zip(rows, b.times[label]):
            assert set(row) == set(loop.STEP_STAGES) and all(v > 0 for v in row.values())
            assert sum(row.values()) <= step  # on_step and the batch lookup are in the step, in no stage
    plain = ms.run_step_bench(cands, adapter, repeats=5, warmup=0, steps_per_round=1, log=lambda m: None)
    assert plain.stage_times == {}


def test_step_bench_rejects_bad_settings():
    cands, adapter = ms.build_step_candidates("lm", "tiny", ["smoe"], None)
    with pytest.raises(ValueError, match="repeats"):
        ms.run_step_bench(cands, adapter, repeats=2)
    with pytest.raises(ValueError, match="steps per round"):
        ms.run_step_bench(cands, adapter, steps_per_round=0)


def _script():
    spec = importlib.util.spec_from_file_location("model_step_script", ROOT / "benchmarks" / "model_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_script_runs_and_reports(capsys):
    assert _script().main(["--preset", "tiny", "--routers", "smoe", "--repeats", "5", "--warmup", "0",
                           "--steps-per-round", "1"]) == 0
    out = capsys.readouterr().out
    assert "model training step" in out and "smoe step <= 1.20x dense" in out


def test_benchmark_script_bad_router_is_one_line_exit_2(capsys):
    assert _script().main(["--preset", "tiny", "--routers", "nosuchrouter"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuchrouter" in err[0]


def test_step_breakdown_script_runs(capsys):
    spec = importlib.util.spec_from_file_location("step_breakdown_script", ROOT / "benchmarks" / "step_breakdown.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--preset", "tiny", "--routers", "smoe", "--repeats", "5", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "extra_ms vs dense" in out and "optimizer" in out
    assert mod.main(["--preset", "tiny", "--routers", "nosuchrouter"]) == 2


def test_candidates_of_the_default_preset_start_from_its_own_kernel():
    """The default LM preset runs ``experts_impl=auto``: its routers are the plain rows, other kernels the
    ``router:kernel`` rows (this raised "'auto' is not in list" before)."""
    cands, _ = ms.build_step_candidates("lm", "default", ["smoe"], ["loop"])
    assert [c.label for c in cands] == ["dense", "smoe", "smoe:loop"]
    assert [c.run.model.experts_impl for c in cands[1:]] == ["auto", "loop"]
