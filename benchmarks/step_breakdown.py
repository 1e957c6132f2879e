"""Where a model's training step goes: forward, backward, clipping, optimiser, per router, vs the dense model.

    python benchmarks/step_breakdown.py                       # lm default preset: dense, smoe, hash
    python benchmarks/step_breakdown.py --routers smoe,xmoe --experts-impl loop,grouped_mm

The step of ``harness.training.loop.train_step`` itself, the clock read where it marks its stages
(forward + task loss + aux losses, zero_grad + backward, gradient clipping, AdamW + schedule), candidates interleaved round by round, medians [q25, q75]
of per-round values. ``extra_ms`` is the per-round difference to the dense model's stage: what the
MoE model pays on top, stage by stage (the optimiser's share grows with the experts' parameters,
not with the active FLOPs). Together with ``harness bench`` at the model's layer size (its phases
split one layer's forward) this is the profile behind docs/speed.md's "what stands in the way".
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from harness.bench.model_step import build_step_candidates, default_device, timed_steps
from harness.bench.timing import gc_paused, loadavg
from harness.errors import UserError
from harness.training import distributed
from harness.training.loop import STEP_STAGES as STAGES
from harness.training.loop import autocast_for, train_step


def stage_times(c, adapter, inputs, targets, step: int, total: int, dev) -> list[float]:
    """One optimiser step of candidate ``c`` through ``train_step`` itself, the clock read at each stage's end."""
    marks = [time.perf_counter()]
    c.model.on_step(step, total)
    train_step(c.model, c.model, adapter, c.opt, c.sched, inputs, targets, step, total, c.run.train.grad_clip,
               autocast_for(dev, c.run.train.dtype), distributed.current(),
               mark=lambda stage: marks.append(time.perf_counter()))
    return [b - a for a, b in zip(marks, marks[1:])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="lm")
    p.add_argument("--preset", default="default")
    p.add_argument("--routers", default="smoe,hash")
    p.add_argument("--experts-impl", default="loop")
    p.add_argument("--repeats", type=int, default=40, help="rounds of one step per candidate (default 40)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        device = default_device(args.device)
        cands, adapter = build_step_candidates(args.suite, args.preset, args.routers.split(","),
                                               args.experts_impl.split(","), None, device)
    except (UserError, ValueError) as exc:
        print(f"step_breakdown: {exc}", file=sys.stderr)
        return 2
    dev = torch.device(device)
    run0 = cands[0].run
    if run0.train.threads:
        torch.set_num_threads(run0.train.threads)
    total = run0.train.steps
    sched = timed_steps(total, args.warmup + args.repeats)
    batches = {s: adapter.train_batch(run0, s, dev) for s in sched}
    times = {c.label: [] for c in cands}
    load0 = loadavg()
    with gc_paused():
        for r, s in enumerate(sched):
            k = r % len(cands)
            for c in cands[k:] + cands[:k]:
                st = stage_times(c, adapter, *batches[s], s, total, dev)
                if r >= args.warmup:
                    times[c.label].append(st)
    print(f"training step by stage, {args.suite} preset {args.preset!r}, {device}, {torch.get_num_threads()} "
          f"threads, load {load0:.1f} -> {loadavg():.1f}; ms, median [q25, q75] of {args.repeats} interleaved rounds")
    dense = np.array(times["dense"]) * 1e3
    print(f"{'candidate':<22}" + "".join(f"{s:>22}" for s in (*STAGES, "total")))
    for label, ts in times.items():
        a = np.array(ts) * 1e3
        cols = [a[:, i] for i in range(len(STAGES))] + [a.sum(1)]
        print(f"{label:<22}" + "".join(_fmt(v) for v in cols))
        if label != "dense":
            d = [a[:, i] - dense[:, i] for i in range(len(STAGES))] + [a.sum(1) - dense.sum(1)]
            print(f"{'  extra_ms vs dense':<22}" + "".join(_fmt(v) for v in d))
    return 0


def _fmt(v) -> str:
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return f"{med:9.2f} [{q25:5.2f},{q75:5.2f}]"


if __name__ == "__main__":
    sys.exit(main())
