"""The expert kernels alone: forward + backward of one expert bank on expert-sorted rows, interleaved.

    python benchmarks/expert_kernels.py                                  # the LM default's size: 2,048 rows, d 64, d_ff 128, E 8
    python benchmarks/expert_kernels.py --rows 8192 --d-ff 1024 --threads 2

Every kernel of ``model.experts_impl`` (``harness/layers/kernels.py``) on the same rows, the same uneven
per-expert loads (a trained router's: the largest expert ~2x the smallest) and the same output gradient,
round by round in turn; per round the time of each kernel over ``loop``'s, median [q25, q75]. No router,
dispatch or combine: what a kernel choice can change, and nothing else. Speed is never asserted in tests.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness.layers.experts import ExpertBank
from harness.layers.kernels import EXPERTS_IMPLS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048, help="expert-sorted rows (tokens x top_k)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--impls", default="loop,loop_recompute,fused,grouped_mm")
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    impls = a.impls.split(",")
    bad = [i for i in impls if i not in EXPERTS_IMPLS or i == "auto"]
    if bad or "loop" not in impls:
        p.error(f"--impls: {', '.join(bad) or 'loop is required (the reference)'}; one of {', '.join(EXPERTS_IMPLS[1:])}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    # uneven loads, as a trained router leaves them: shares from 0.6x to 1.4x the mean
    share = torch.linspace(0.6, 1.4, a.experts)[torch.randperm(a.experts)]
    counts = (share / share.sum() * a.rows).long()
    counts[0] += a.rows - int(counts.sum())
    banks = {i: ExpertBank(a.experts, a.d_model, a.d_ff, experts_impl=i) for i in impls}
    x0, g = torch.randn(a.rows, a.d_model), torch.randn(a.rows, a.d_model)
    times: dict[str, list[float]] = {i: [] for i in impls}
    for _ in range(a.warmup + a.rounds):
        for i, bank in banks.items():
            bank.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            bank.forward_sorted(x, counts).backward(g)
            times[i].append(time.perf_counter() - t0)
    print(f"expert kernels fwd+bwd: {a.rows} rows, d {a.d_model}, d_ff {a.d_ff}, E {a.experts}, "
          f"loads {counts.tolist()}, {a.threads} thread(s), {a.rounds} interleaved rounds")
    for i in impls:
        t, ref = times[i][a.warmup:], times["loop"][a.warmup:]
        r = sorted(x / y for x, y in zip(t, ref))
        q = lambda f: r[int(f * (len(r) - 1))]  # noqa: E731
        print(f"  {i:15s} {statistics.median(t) * 1e3:7.3f} ms   / loop {statistics.median(r):.3f} [{q(0.25):.3f}, {q(0.75):.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
