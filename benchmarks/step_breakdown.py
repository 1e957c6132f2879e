"""Where a model's training step goes: forward, backward, clipping, optimiser, per router, vs the dense model.

    python benchmarks/step_breakdown.py                       # lm default preset: dense, smoe, hash
    python benchmarks/step_breakdown.py --routers smoe,xmoe --experts-impl loop,grouped_mm

The step of ``harness.training.loop.train_step`` itself, the clock read where it marks its stages
(forward + task loss + aux losses, zero_grad + backward, gradient clipping, AdamW + schedule) by
``harness.bench.model_step.run_step_bench(..., stages=True)``: candidates interleaved round by
round, one step each, medians [q25, q75] of per-round values. ``extra_ms`` is the per-round difference to the dense model's stage: what the
MoE model pays on top, stage by stage (the optimiser's share grows with the experts' parameters,
not with the active FLOPs). Together with ``harness bench`` at the model's layer size (its phases
split one layer's forward) this is the profile behind docs/speed.md's "what stands in the way".
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from harness.bench.model_step import build_step_candidates, default_device, run_step_bench
from harness.errors import UserError
from harness.training.loop import STEP_STAGES as STAGES


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
        b = run_step_bench(cands, adapter, repeats=args.repeats, warmup=args.warmup, steps_per_round=1,
                           device=device, stages=True)
    except (UserError, ValueError) as exc:
        print(f"step_breakdown: {exc}", file=sys.stderr)
        return 2
    load = f"load {b.load[0]:.1f} -> {b.load[1]:.1f}" if b.load and None not in b.load else "load n/a"
    print(f"training step by stage, {args.suite} preset {args.preset!r}, {device}, {b.threads} threads, {load}; "
          f"ms, median [q25, q75] of {args.repeats} interleaved rounds")
    table = {label: np.array([[r[s] for s in STAGES] for r in rows]) * 1e3 for label, rows in b.stage_times.items()}
    dense = table["dense"]
    print(f"{'candidate':<22}" + "".join(f"{s:>22}" for s in (*STAGES, "total")))
    for label, a in table.items():
        print(f"{label:<22}" + "".join(_fmt(v) for v in _columns(a)))
        if label != "dense":
            print(f"{'  extra_ms vs dense':<22}" + "".join(_fmt(v) for v in _columns(a - dense)))
    return 0


def _columns(a: np.ndarray) -> list[np.ndarray]:
    return [a[:, i] for i in range(a.shape[1])] + [a.sum(1)]


def _fmt(v) -> str:
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return f"{med:9.2f} [{q25:5.2f},{q75:5.2f}]"


if __name__ == "__main__":
    sys.exit(main())
