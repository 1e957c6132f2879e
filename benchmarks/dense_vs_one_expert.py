"""Is the dense baseline the one-expert MoE? Dense FFN of width W vs SMoE with one expert of width W, top-1.

    python benchmarks/dense_vs_one_expert.py                         # default LM preset, seeds 0,1,2, W=256
    python benchmarks/dense_vs_one_expert.py --preset tiny --steps 100 --seeds 0,1,2,3 --width 64
    python benchmarks/dense_vs_one_expert.py --legacy-init           # the pre-issue-21 experts, for contrast

An MoE layer with one expert and k = 1 computes the dense FFN exactly (its gate weight is 1.0), so
trained from their OWN seeds the two must agree within seed noise; a systematic gap means the MoE
side starts or trains differently (issue 21: zero expert biases, decayed, cost +0.07 bits/byte at
the default preset). Each (model, seed) goes through the harness' one training loop into a
throw-away store; the report gives val bpb per seed, mean ± sd, the mean difference and Welch's p.

Measured (default preset, W=256, 2-core box shared with other jobs, 2026-12-01), val bpb:

    seeds 0-5      dense 3.4344 3.4443 3.4628 3.4866 3.4733 3.5299   mean 3.4719 ± 0.0342 (sd)
                   1-expert 3.5121 3.4356 3.4562 3.4360 3.4962 3.4902   mean 3.4711 ± 0.0328
                   difference -0.0008 bpb, Welch p = 0.97
    --legacy-init  1-expert seeds 0-2: 3.5206 3.4916 3.5455 (+0.072 over dense seeds 0-2, p = 0.026)

``--legacy-init`` patches the experts back to the old rule (zero biases, biases decayed) to show the
gap the shared rule closes. The router keeps its defaults (balance loss, z-loss): they are part of
what an SMoE layer is, and with one expert only the z-loss has a gradient.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def legacy_init() -> None:
    """The expert init before issue 21: zero biases, and the stacked biases weight-decayed."""
    import torch

    from harness.layers.moe import ExpertBank

    def reset(self) -> None:  # noqa: ANN001
        torch.nn.init.uniform_(self.w1, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        torch.nn.init.uniform_(self.w2, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))
        with torch.no_grad():
            self.b1.zero_()
            self.b2.zero_()

    ExpertBank.reset_parameters = reset
    ExpertBank.no_weight_decay = staticmethod(lambda: set())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", help="LM preset (default, tiny, regress, ...)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--width", type=int, default=None,
                   help="FFN width W (default: the preset's d_ff * top_k, the usual dense width)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="further spec overrides")
    p.add_argument("--legacy-init", action="store_true", help="experts with the old init (zero, decayed biases)")
    args = p.parse_args(argv)

    if args.legacy_init:
        legacy_init()
    from harness.suites.lm import LMSuite
    from harness.spec import load_suite
    from harness.store import Store
    from harness.training.loop import train_run
    from leaderboard.stats import welch

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    base = load_suite("lm", preset=args.preset, overrides=args.set)
    width = args.width or base.model.d_ff * base.model.top_k
    ov = ["model.num_experts=1", "model.top_k=1", f"model.d_ff={width}", "eval.enabled=false", *args.set]
    if args.steps:
        ov.append(f"train.steps={args.steps}")
    adapter = LMSuite()
    out: dict[str, list[float]] = {"dense": [], "smoe": []}
    tmp = Path(tempfile.mkdtemp(prefix="dense_vs_one_expert-"))
    store = Store(tmp / "h.duckdb")
    spec = load_suite("lm", preset=args.preset, overrides=ov, routers=["dense", "smoe"], seeds=seeds)
    t = spec.train
    print(f"preset {args.preset}: d_model {spec.model.d_model}, {spec.model.n_layers} layers, FFN width {width}, "
          f"{t.steps} steps x batch {t.batch_size}, lr {t.lr}, wd {t.weight_decay}; seeds {seeds}"
          + ("; LEGACY expert init" if args.legacy_init else ""))
    t0 = time.perf_counter()
    for seed in seeds:  # interleaved, so machine load drifts hit both sides alike
        for run in (r for r in spec.runs() if r.seed == seed):
            res = train_run(run, adapter, store, tmp / "runs", progress=False, log=lambda s: None)
            if res.status != "finished":
                print(f"{run.router} seed {seed}: {res.status}: {res.error}", file=sys.stderr)
                return 1
            out[run.router].append(res.metrics["val_bpb"])
            print(f"  {run.router:>5} seed {seed}: val bpb {res.metrics['val_bpb']:.4f}", flush=True)
    print(f"{'':>8}  " + "  ".join(f"s{s:<6}" for s in seeds) + "  mean ± sd")
    for name, label in (("dense", f"dense {width}"), ("smoe", f"1-expert {width}")):
        v = out[name]
        sd = statistics.stdev(v) if len(v) > 1 else float("nan")
        print(f"{label:>16}  " + "  ".join(f"{x:.4f}" for x in v) + f"  {statistics.mean(v):.4f} ± {sd:.4f}")
    diff = statistics.mean(out["smoe"]) - statistics.mean(out["dense"])
    res = welch(out["smoe"], out["dense"])
    # the within-group seed SD, pooled over the two sides (not the SD of all values, which holds the gap)
    pooled = math.sqrt((statistics.variance(out["dense"]) + statistics.variance(out["smoe"])) / 2) \
        if len(seeds) > 1 else float("nan")
    p_txt = f"Welch p = {res[1]:.3f}" if res else "Welch p: n<2"
    print(f"1-expert - dense: {diff:+.4f} bpb ({diff / pooled:+.2f} seed SDs); {p_txt}; "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
