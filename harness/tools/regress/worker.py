"""One A/B throughput sample: ``python -m harness.tools.regress.worker --routers smoe,moge``.

Run by ``harness regress`` in a fresh process *inside the tree being measured*
(the base revision's worktree or the current working tree, first on
``PYTHONPATH``), so each sample times that tree's own MoE layer. The process
times one layer per router and the dense equal-FLOP FFN, fwd+bwd, interleaved
(``harness.bench.run_layer_bench``), and prints one line::

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
import sys

import torch

import harness
from harness.bench import LayerConfig, run_layer_bench
from harness.tools.regress.ab import MARKER


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.tools.regress.worker")
    p.add_argument("--routers", required=True)
    p.add_argument("--bench", required=True, help="JSON LayerConfig fields")
    p.add_argument("--repeats", type=int, default=5)  # the bench's minimum for a median with a spread
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # 1 thread: small ops on 2 threads swing 2-5x with other load
    routers = [r for r in args.routers.split(",") if r]
    bench = run_layer_bench(LayerConfig(**json.loads(args.bench)), sorted(set(routers) | {"dense"}), naive=False,
                            repeats=args.repeats, warmup=args.warmup, phases=False, mem_repeats=1,
                            log=lambda s: None)
    # bench.stats holds per label the median of the per-repeat ratios to the dense FFN at the same k;
    # a scheduled router (CompeteSMoE's competition steps) is read at its amortised label
    ratios = {}
    for r in routers:
        st = bench.stats.get(f"{r} (amortised)") or bench.stats.get(r) or {}
        if "ratio_vs_dense" in st:
            ratios[r] = st["ratio_vs_dense"].median
    print(MARKER + json.dumps({"ratios": ratios, "tree": str(harness.__path__[0]),
                               "threads": torch.get_num_threads()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
