"""WSD schedule and cooldown branches (train.budgets): hand-computed factors, the spec's rules, a branch that
equals the separate run of its budget to the last bit, the trunk's total seen by routers, resume mid-branch."""
import math

import pytest

from baselines.smoe import SMoERouter
from harness.cli import main
from harness.routing import registry
from harness.routing.registry import register_router
from harness.spec import SpecError, load_suite
from harness.training import budgets, schedule

from storeq import TINY, q

pytestmark = pytest.mark.xdist_group("budgets")

WSD = ["--set", "train.schedule=wsd", "--set", "train.warmup_steps=5", "--set", "train.steps=30"]


def test_wsd_factors_hand_computed():
    f = schedule.wsd(warmup=2, total=10, min_ratio=0.1, fraction=0.2, shape="1-sqrt")
    # warm-up 0.5, 1.0; stable to step 7; decay over steps 8, 9 (2 = round(0.2 * 10)) at p = 0, 1/2
    assert [f(s) for s in range(8)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert f(8) == pytest.approx(1.0) and f(9) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    g = schedule.wsd(warmup=2, total=10, min_ratio=0.1, fraction=0.2, shape="linear")
    assert g(9) == pytest.approx(0.55) and g(100) == pytest.approx(0.1)
    assert schedule.decay_start(1000, 0.2) == 800 and schedule.decay_start(250, 0.2) == 200
    # before its decay the schedule does not depend on the total: what makes one trunk serve every budget
    assert all(schedule.wsd(5, 100, 0.1, 0.2, "1-sqrt")(s) == schedule.wsd(5, 1000, 0.1, 0.2, "1-sqrt")(s)
               for s in range(80))


def test_budgets_normalised_and_checked():
    spec = load_suite("lm", preset="tiny", overrides=[*WSD[1::2], "train.budgets=[20, 10]"])
    assert spec.train.budgets == (10, 20, 30)
    same = load_suite("lm", preset="tiny", overrides=[*WSD[1::2], "train.budgets=[10, 20, 30, 20]"])
    assert same.runs()[0].spec_hash == spec.runs()[0].spec_hash
    assert [(b.budget, b.fork) for b in budgets.branches(spec.runs()[0])] == [(10, 8), (20, 16)]
    lone = load_suite("lm", preset="tiny", overrides=[*WSD[1::2], "train.budgets=[30]"])
    assert lone.train.budgets == () and budgets.branches(lone.runs()[0]) == []
    # the defaults leave every earlier hash as it was
    plain = load_suite("lm", preset="tiny")
    assert plain.runs()[0].spec_hash == load_suite("lm", preset="tiny", overrides=["train.schedule=cosine"]).runs()[0].spec_hash
    for bad, words in (("train.budgets=[10]", "needs train.schedule=wsd"),
                       ("train.decay_fraction=0.3", "applies to train.schedule=wsd"),
                       ("train.schedule=step", "must be one of cosine, wsd")):
        with pytest.raises(SpecError, match=words):
            load_suite("lm", preset="tiny", overrides=[bad])
    for bad, words in (("train.budgets=[40]", "must be > 0 and <= train.steps=30"),
                       ("train.budgets=[5]", "inside the warm-up"),
                       ("train.decay_shape=cosine", "must be one of 1-sqrt, linear"),
                       ("train.decay_fraction=0", "must be > 0 and <= 1")):
        with pytest.raises(SpecError, match=words):
            load_suite("lm", preset="tiny", overrides=[*WSD[1::2], bad])


def _metrics(store):
    return {n: (v, s) for n, v, s in q(store, "SELECT name, value, step FROM metrics")}


def test_a_branch_is_the_run_of_its_budget_to_the_last_bit(tmp_path):
    base = ["run", "--suite", "lm", "--routers", "smoe", *TINY, *WSD, "--set", "train.threads=1"]
    assert main([*base, "--store", str(tmp_path / "a.duckdb"), "--set", "train.budgets=[10,20]"]) == 0
    assert main([*base, "--store", str(tmp_path / "b.duckdb"), "--set", "train.steps=20"]) == 0
    assert main([*base, "--store", str(tmp_path / "c.duckdb")]) == 0
    a, b, c = (_metrics(tmp_path / f"{k}.duckdb") for k in "abc")
    for name in ("val_bpb", "test_bpb"):
        assert a[f"{name}@20"] == (b[name][0], 20)  # the branch = the separate 20-step WSD run, bit for bit
        assert a[name][0] == c[name][0] and a[f"{name}@30"] == (a[name][0], 30)  # branches leave the trunk be
    assert a["val_bpb@10"][1] == 10 and a["val_bpb@10"][0] > a["val_bpb@20"][0] > a["val_bpb"][0]
    names = {n for (n,) in q(tmp_path / "a.duckdb", "SELECT DISTINCT name FROM routing_health")}
    assert {"load_entropy@10", "load_entropy@20", "load_entropy"} <= names


class Recorder(SMoERouter):
    """SMoE that records the totals its schedule hook sees and can stop the process mid-branch once."""
    seen: list[tuple[int, int]] = []
    stop_at: int | None = None

    def on_step(self, step, total_steps):
        Recorder.seen.append((step, total_steps))
        if Recorder.stop_at is not None and step == Recorder.stop_at:
            Recorder.stop_at = None
            raise KeyboardInterrupt
        super().on_step(step, total_steps)


@pytest.fixture
def recorder():
    register_router("test-budget-recorder")(Recorder)
    Recorder.seen, Recorder.stop_at = [], None
    yield Recorder
    registry.unregister_router("test-budget-recorder")


def test_routers_see_the_trunks_total_in_every_branch(tmp_path, recorder):
    args = ["run", "--suite", "lm", "--routers", "test-budget-recorder", *TINY, *WSD, "--set", "train.budgets=[20]",
            "--store", str(tmp_path / "h.duckdb")]
    assert main(args) == 0
    steps = [s for s, _ in recorder.seen][::2]  # both MoE layers of the tiny model call on_step
    assert {t for _, t in recorder.seen} == {30}  # StableMoE's stage switch etc. follow the trunk (budgets.py)
    assert steps == [*range(16), *range(16, 20), *range(16, 30)]  # branch 16..19 forks before trunk step 16


def test_resume_mid_branch_redoes_only_that_branch(tmp_path, recorder):
    common = ["run", "--suite", "lm", "--routers", "test-budget-recorder", *TINY, *WSD, "--set", "train.threads=1",
              "--set", "train.budgets=[10,20]", "--set", "train.ckpt_every=5"]
    assert main([*common, "--store", str(tmp_path / "ref.duckdb")]) == 0
    recorder.seen, recorder.stop_at = [], 18  # step 18 is first reached in the branch of budget 20 (fork 16)
    store = tmp_path / "h.duckdb"
    assert main([*common, "--store", str(store)]) == 130
    assert q(store, "SELECT status, step FROM runs") == [("interrupted", 15)]
    recorder.seen = []
    assert main([*common, "--store", str(store), "--resume"]) == 0
    steps = [s for s, _ in recorder.seen][::2]
    assert 8 not in steps and 9 not in steps  # budget 10 (fork 8) was recorded in the step-15 checkpoint
    assert steps == [15, *range(16, 20), *range(16, 30)]  # the trunk from 15, then the branch of 20 again
    got, want = _metrics(store), _metrics(tmp_path / "ref.duckdb")
    for name in ("val_bpb@10", "val_bpb@20", "val_bpb@30", "test_bpb@20"):
        assert got[name] == want[name], name


def test_a_router_that_froze_parameters_forks_too(tmp_path):
    # StableMoE freezes its distilled router in stage 2 (here from step 3): the branch's optimiser must still
    # mirror the trunk's groups (the default calibration run failed here before)
    args = ["run", "--suite", "lm", "--routers", "stablemoe", *TINY, *WSD, "--set", "train.budgets=[20]",
            "--store", str(tmp_path / "h.duckdb")]
    assert main(args) == 0
    assert {n for (n,) in q(tmp_path / "h.duckdb", "SELECT name FROM metrics")} >= {"val_bpb@20", "val_bpb@30"}
