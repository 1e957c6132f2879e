"""Model-level step benchmark: a whole training step of every router's model vs the dense model's.

    python benchmarks/model_step.py                          # lm default preset, every router, loop kernel
    python benchmarks/model_step.py --routers smoe,xmoe,moge --experts-impl loop,grouped_mm
    python benchmarks/model_step.py --preset tiny --repeats 5 --steps-per-round 1   # seconds

Times :func:`harness.training.loop.train_step` (forward, loss + aux losses, backward, clipping,
AdamW, schedule) on the models and batches ``harness run --suite lm`` uses, interleaved, ratios per
round, median [q25, q75]; the method is in ``harness/bench/model_step.py``. Prints the issue-17
model-level targets: every token-choice router <= 1.10x the dense model, X-MoE and MoGE <= 1.05x SMoE.
Speed is never asserted in tests; this prints what it measured.
"""
from __future__ import annotations

import argparse
import sys

from harness.bench.model_step import build_step_candidates, default_device, print_step_report, run_step_bench
from harness.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="lm")
    p.add_argument("--preset", default="default")
    p.add_argument("--routers", default=None, help="comma-separated (default: the preset's; dense and smoe always)")
    p.add_argument("--experts-impl", default="loop", help="comma-separated kernels; non-default ones add rows")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override, repeatable")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        device = default_device(args.device)
        cands, adapter = build_step_candidates(
            args.suite, args.preset, args.routers.split(",") if args.routers else None,
            args.experts_impl.split(","), args.set, device)
        bench = run_step_bench(cands, adapter, repeats=args.repeats, warmup=args.warmup,
                               steps_per_round=args.steps_per_round, device=device)
    except (UserError, ValueError) as exc:
        print(f"model_step: {exc}", file=sys.stderr)
        return 2
    print_step_report(bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
