"""Model-level step benchmark: one whole training step of each router's model, as the loop runs it.

The layer benchmark (:mod:`.layer`) times one FFN layer; what a researcher waits for is the
training step of the whole model: attention, embeddings, every MoE layer, the loss, backward,
clipping and AdamW (which pays for every expert's parameters, not only the active ones). This
times exactly that code, :func:`harness.training.loop.train_step`, on the models a suite preset
builds (``harness run --suite lm`` builds the same ones), on the suite's real batches.

How the numbers are made (the rules of :mod:`harness.bench`):

* Every candidate (a router, or ``router:kernel`` for another ``model.experts_impl``) is built from
  the same seed and trains on the same batches. Each round runs ``steps_per_round`` consecutive
  optimiser steps per candidate, candidates round-robin with the order rotated every round; the
  first ``warmup`` rounds are thrown away. A round's value is its mean step time.
* The timed steps are spread evenly over the preset's whole schedule (step ``j * steps / N`` for
  the j-th of N timed steps, the same sequence for every candidate), so a router whose cost
  changes during training (StableMoE's two stages, CompeteSMoE's warm-up and its 5% competition
  steps, which are random per step) is timed at its real mix rather than at step 0.
* Ratios are formed per round (``vs_dense``: t / t_dense; ``vs_smoe``: t / t_smoe, both on the
  default kernel) and reported as median [q25, q75]. The models train while they are timed, so
  routing drifts as it would in a run; nothing is asserted about speed anywhere (tests only run it).
* The garbage collector is paused during the timed rounds; the report prints the load average.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl
import torch
from torch import nn

from ..layers.kernels import DEFAULT_IMPL, check_impl
from ..spec import RunSpec, load_suite
from ..suites import get_adapter
from ..training import distributed
from ..training.device import pick_device
from ..training.loop import (STEP_STAGES, TrainState, autocast_for, make_optimizer, make_scheduler, seed_everything,
                             train_step)
from ..training.strategy import SingleProcess
from .timing import Clock, Log, PhaseClock, Stat, check_repeats, gc_paused, load_note, loadavg, log_stderr, paired


@dataclass
class StepCandidate:
    label: str            # "smoe", or "smoe:grouped_mm" for a non-default kernel
    run: RunSpec
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    params: int


@dataclass
class StepBench:
    suite: str
    preset: str
    device: str
    steps_per_round: int
    times: dict[str, list[float]] = field(default_factory=dict)   # seconds per step, one value per round
    # with ``stages=True``: per round, seconds per step in each of train_step's stages (STEP_STAGES)
    stage_times: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    stats: dict[str, dict[str, Stat]] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    tokens_per_step: int = 0
    load: tuple[float | None, float | None] | None = None
    threads: int = 1


def build_step_candidates(suite: str = "lm", preset: str | None = "default", routers: list[str] | None = None,
                          impls: list[str] | None = None, overrides: list[str] | None = None,
                          device: str = "cpu") -> tuple[list[StepCandidate], Any]:
    """One candidate per router of the preset (seed: the preset's first), plus ``router:kernel`` rows for
    every kernel in ``impls`` other than the default; ``dense`` and ``smoe`` are always included.
    Rows are router by router, each router's kernels in the order given."""
    spec = load_suite(suite, preset, overrides=overrides, routers=routers)
    names = list(dict.fromkeys(["dense", "smoe", *spec.routers]))
    # the preset's own kernel first (the default LM preset says ``auto``), then every other one asked for
    base = next(iter(spec.runs())).model.experts_impl if spec.routers else DEFAULT_IMPL
    kernels = list(dict.fromkeys([base, *(check_impl(i) for i in impls or ())]))
    adapter = get_adapter(spec.suite)
    dev, dctx = torch.device(device), distributed.current()
    cands = []
    for impl in kernels:  # one spec per kernel; the dense FFN has no expert kernel
        extra = [] if impl == base else [f"model.experts_impl={impl}"]
        on = names if impl == base else [n for n in names if n != "dense"]
        for r in load_suite(suite, preset, overrides=[*(overrides or []), *extra], routers=on,
                            seeds=spec.seeds[:1]).runs():
            adapter.prepare(r)
            seed_everything(r.seed)
            model = adapter.build_model(r).to(dev)
            model.train()
            opt = make_optimizer(model, r)
            label = r.router if impl == base else f"{r.router}:{impl}"
            cands.append(StepCandidate(label, r, model, opt, make_scheduler(opt, r),
                                       SingleProcess(model, dctx).count_parameters()))
    cands.sort(key=lambda c: (names.index(c.run.router), kernels.index(c.run.model.experts_impl)))
    return cands, adapter


def timed_steps(total_steps: int, n: int) -> list[int]:
    """The n step numbers timed: evenly over the run's whole schedule, the same for every candidate."""
    return [j * total_steps // n for j in range(n)]


def run_step_bench(cands: list[StepCandidate], adapter: Any, repeats: int = 7, warmup: int = 2,
                   steps_per_round: int = 5, device: str = "cpu", log: Log = log_stderr,
                   stages: bool = False) -> StepBench:
    """Interleaved rounds of ``steps_per_round`` real optimiser steps per candidate (module docstring).

    ``stages``: also read the clock where ``train_step`` marks its stages (``b.stage_times``; on CUDA
    each read synchronises, which slows the step it measures, so it is off by default)."""
    check_repeats(repeats, warmup)
    if steps_per_round < 1:
        raise ValueError(f"bench: steps per round must be >= 1, got {steps_per_round}")
    if not cands:
        raise ValueError("bench: no candidates to time")
    first = cands[0].run
    if first.train.threads:
        torch.set_num_threads(first.train.threads)
    dev = torch.device(device)
    clock = Clock(dev)
    dctx = distributed.current()
    total = first.train.steps
    schedule = timed_steps(total, (warmup + repeats) * steps_per_round)
    batches = {s: adapter.train_batch(first, s, dev) for s in schedule}
    b = StepBench(first.suite, first.suite_spec.preset, device, steps_per_round,
                  times={c.label: [] for c in cands}, params={c.label: c.params for c in cands},
                  tokens_per_step=adapter.items(batches[schedule[0]][0]), threads=torch.get_num_threads())
    b.stage_times = {c.label: [] for c in cands} if stages else {}
    load0 = loadavg()
    with gc_paused():
        for r in range(warmup + repeats):
            steps = schedule[r * steps_per_round:(r + 1) * steps_per_round]
            k = r % len(cands)
            for c in cands[k:] + cands[:k]:
                ts = TrainState(SingleProcess(c.model, dctx), adapter, c.opt, c.sched, c.run.train.grad_clip,
                                autocast_for(dev, c.run.train.dtype))
                ph = PhaseClock(clock, STEP_STAGES) if stages else None
                t0 = clock.now()
                for s in steps:
                    c.model.on_step(s, total)
                    inputs, targets = batches[s]
                    if ph is not None:
                        ph.mark(None)  # on_step is not one of the stages
                    train_step(ts, inputs, targets, s, total, mark=ph.mark if ph is not None else None)
                dt = (clock.now() - t0) / len(steps)
                if r >= warmup:
                    b.times[c.label].append(dt)
                    if ph is not None:
                        b.stage_times[c.label].append({st: v / len(steps) for st, v in ph.times.items()})
            log(f"bench step: round {r + 1}/{warmup + repeats}")
    b.load = (load0, loadavg())
    summarise_step_bench(b)
    return b


def summarise_step_bench(b: StepBench) -> None:
    dense, smoe = b.times.get("dense"), b.times.get("smoe")
    for label, ts in b.times.items():
        st = {"step_ms": Stat.of([t * 1e3 for t in ts]),
              "tokens_per_s": Stat.of([b.tokens_per_step / t for t in ts])}
        if dense:
            st["ratio_vs_dense"] = Stat.of(paired(ts, dense, lambda a, d: a / d))
        if smoe:
            st["ratio_vs_smoe"] = Stat.of(paired(ts, smoe, lambda a, s: a / s))
        b.stats[label] = st


# The model-level targets: every token-choice router's step <= 1.20x the dense model's (issue 33, at the
# size the suites train; issue 17 asked 1.10x, at no size reached); X-MoE and MoGE <= 1.05x SMoE's (issue 17).
# Token choice: every built-in router but expert_choice (and dense itself).
STEP_DENSE_TARGET = 1.20
STEP_SMOE_TARGETS: dict[str, float] = {"xmoe": 1.05, "moge": 1.05}
NOT_TOKEN_CHOICE = ("dense", "expert_choice")


def step_table(b: StepBench) -> pl.DataFrame:
    rows = []
    for label, st in b.stats.items():
        rows.append({
            "candidate": label, "params": b.params[label],
            "step_ms": st["step_ms"].median, "iqr_ms": st["step_ms"].spread,
            "tokens_per_s": st["tokens_per_s"].median,
            "vs_dense": st["ratio_vs_dense"].median if "ratio_vs_dense" in st else None,
            "vs_dense_q25": st["ratio_vs_dense"].q25 if "ratio_vs_dense" in st else None,
            "vs_dense_q75": st["ratio_vs_dense"].q75 if "ratio_vs_dense" in st else None,
            "vs_smoe": st["ratio_vs_smoe"].median if "ratio_vs_smoe" in st else None,
        })
    return pl.DataFrame(rows)


def step_targets(b: StepBench) -> list[tuple[bool, str]]:
    out = []
    for label, st in b.stats.items():
        router = label.split(":")[0]
        if router in NOT_TOKEN_CHOICE or "ratio_vs_dense" not in st:
            continue
        s = st["ratio_vs_dense"]
        lim = STEP_DENSE_TARGET
        out.append((s.median <= lim, f"{label} step <= {lim:.2f}x dense: {_stat(s)}"))
        if router in STEP_SMOE_TARGETS and "ratio_vs_smoe" in st and ":" not in label:
            s2, lim = st["ratio_vs_smoe"], STEP_SMOE_TARGETS[router]
            out.append((s2.median <= lim, f"{label} step <= {lim:.2f}x smoe: {_stat(s2)}"))
    return out


def _stat(s: Stat) -> str:
    return f"{s.median:.3f} [{s.q25:.3f}, {s.q75:.3f}]"


def print_step_report(b: StepBench) -> None:
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, float_precision=3):
        print(f"\nmodel training step ({b.suite} preset {b.preset!r}, {b.tokens_per_step} tokens per step, "
              f"{b.device}, {b.threads} threads{load_note(b.load)}): median [q25, q75] over "
              f"{len(next(iter(b.times.values())))} interleaved rounds of {b.steps_per_round} steps; "
              f"vs_*: per-round time ratios")
        print(step_table(b))
    print("\ntargets (issues 33 and 17, model level):")
    for ok, text in step_targets(b):
        print(f"  {'met   ' if ok else 'MISSED'}  {text}")


def default_device(name: str = "auto") -> str:
    return str(pick_device(name, setting="--device"))
