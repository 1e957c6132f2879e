"""One A/B throughput sample: ``python -m harness.regress.worker --routers smoe,moge``.

Run by ``harness regress`` in a fresh process *inside the tree being measured*
(the base revision's worktree or the current working tree, first on
``PYTHONPATH``), so each sample times that tree's own MoE layer. The process
times one layer per router and the dense equal-FLOP FFN, fwd+bwd, interleaved
(``harness.profile.run_layer_bench``), and prints one line::

    REGRESS-RATIOS {"ratios": {"smoe": 1.12, ...}, "tree": "...", "threads": 1}

where each ratio is the median over this process's repeats of t_router / t_dense.
Dividing by the dense FFN timed in the same process cancels most of what the
machine does at that moment (clock, load, cache state); comparing the two trees'
samples with a rank test then judges the code change alone.

This command line is a protocol between revisions: a later tree runs it in an
older one. Keep its flags and its output line stable.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

MARKER = "REGRESS-RATIOS "


def ratio_series(bench) -> dict[str, list[float]]:
    """router -> per-repeat t_router / t_dense at the same k (amortised over a router's scheduled variants)."""
    samples = {res.label: res.samples.get("fwd_bwd") for res in bench.results}
    by_router: dict[str, list[Any]] = {}
    for res in bench.results:
        if res.kind == "moe":
            by_router.setdefault(res.router, []).append(res)
    out: dict[str, list[float]] = {}
    for router, parts in by_router.items():
        k = parts[0].top_k
        dense = samples.get("dense" if k == bench.cfg.top_k else f"dense[k={k}]")
        if not dense:
            continue
        weighted = [p for p in parts if p.weight is not None]
        if len(weighted) >= 2:  # e.g. CompeteSMoE: competition steps at their rate, normal steps otherwise
            t = [sum(p.weight * p.samples["fwd_bwd"][i] for p in weighted) for i in range(len(dense))]
        else:
            main = next((p for p in parts if p.label == router), parts[0])
            t = main.samples["fwd_bwd"]
        out[router] = [a / b for a, b in zip(t, dense)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.regress.worker")
    p.add_argument("--routers", required=True)
    p.add_argument("--bench", required=True, help="JSON LayerConfig fields")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    import harness
    from harness.profile import LayerConfig, run_layer_bench

    torch.set_num_threads(args.threads)  # 1 thread: small ops on 2 threads swing 2-5x with other load
    routers = [r for r in args.routers.split(",") if r]
    bench = run_layer_bench(LayerConfig(**json.loads(args.bench)), sorted(set(routers) | {"dense"}), naive=False,
                            repeats=args.repeats, warmup=args.warmup, phases=False, mem_repeats=1,
                            log=lambda s: None)
    series = ratio_series(bench)
    ratios = {r: statistics.median(series[r]) for r in routers if r in series}
    print(MARKER + json.dumps({"ratios": ratios, "tree": str(harness.__path__[0]),
                               "threads": torch.get_num_threads()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
