"""``harness bench``: time one MoE layer per router, or the routers alone over E/T/d (see :mod:`harness.bench`)."""
from __future__ import annotations

import argparse
import os
from typing import Callable

import torch

from .. import args as argtypes
from .. import bench  # called as bench.run_layer_bench etc., so a test can replace them on the package
from ..layers.kernels import EXPERTS_IMPLS
from ..routing.registry import get_router
from ..spec import SpecError
from ..store import Store
from ..training.device import pick_device


def register(sub: argparse._SubParsersAction, store_arg: Callable[[argparse.ArgumentParser], None]) -> None:  # noqa: SLF001
    p = sub.add_parser(
        "bench", help="time one MoE layer per router (phases, memory, ratios to smoe/dense/naive loop)",
        description="Interleaved, repeated fwd+bwd timing of one MoE layer per router, the equal-FLOP dense FFN "
                    "and the naive per-expert loop (layer mode), or of the routers alone over E/T/d (scaling "
                    "mode). Reports median and IQR; see harness/bench/__init__.py for the method.")
    p.add_argument("what", nargs="?", choices=("layer", "scaling"), default=None,
                   help="shortcut for --mode (harness bench layer | harness bench scaling)")
    p.add_argument("--mode", choices=("layer", "scaling"), default="layer")
    p.add_argument("--routers", default=None, help="comma-separated routers (default: all registered, dense "
                   "included; smoe and dense are always added as references)")
    p.add_argument("--experts", type=argtypes.int_list(1), default=None, help="number(s) of experts, "
                   "comma-separated (default 8; scaling: 8,16,32,64)")
    p.add_argument("--tokens", type=argtypes.int_list(1), default=None, help="tokens per batch, comma-separated "
                   "(default 8192; scaling: 2048,8192)")
    p.add_argument("--d-model", type=argtypes.int_list(1), default=None,
                   help="model width(s) (default 256; scaling: 256,1024)")
    p.add_argument("--d-ff", type=argtypes.positive_int, default=1024, help="expert hidden width (dense: d_ff * k)")
    p.add_argument("--top-k", type=argtypes.positive_int, default=2)
    p.add_argument("--repeats", type=argtypes.int_range(bench.MIN_REPEATS), default=7,
                   help=f"timed rounds, >= {bench.MIN_REPEATS} for a median with a spread (default 7)")
    p.add_argument("--warmup", type=argtypes.nonneg_int, default=2, help="discarded rounds first (default 2)")
    p.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                   help="include the naive per-expert loop (layer mode; default on)")
    p.add_argument("--phases", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the instrumented per-phase pass (layer mode; default on)")
    p.add_argument("--experts-impl", type=_impls, default=None, metavar="IMPL[,IMPL...]",
                   help=f"expert kernels to compare ({', '.join(EXPERTS_IMPLS)}; layer mode): the plain MoE rows "
                        "run loop (the default kernel), each other kernel listed adds a row <router>:<kernel>")
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), default="float32")
    p.add_argument("--device", type=argtypes.device, default="auto", help="auto | cpu | cuda[:i] (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=argtypes.positive_int, default=None,
                   help="torch intra-op threads for the run (default: torch's current setting); recorded in the rows")
    p.add_argument("--no-store", action="store_true", help="print only; write nothing to the store")
    store_arg(p)
    p.set_defaults(fn=cmd_bench)


def _impls(s: str) -> list[str]:
    """``loop,padded_bmm``: distinct names from ``harness.layers.kernels.EXPERTS_IMPLS``."""
    parts = argtypes.split_csv(argtypes.names(s))
    bad = [p for p in parts if p not in EXPERTS_IMPLS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown expert kernel {bad[0]!r}; choose from {', '.join(EXPERTS_IMPLS)}")
    return parts


def cmd_bench(args: argparse.Namespace) -> int:
    mode = args.what or args.mode
    if args.experts_impl and mode != "layer":
        raise SpecError("--experts-impl compares expert kernels in layer mode; the scaling mode times routers alone")
    routers = argtypes.split_csv(args.routers) if args.routers else None
    # before any timing: every router asked for by name exists, and the store can be written
    for name in routers or ():
        get_router(name)  # UnknownRouterError / PluginLoadError: one line, exit 2
    if args.top_k > min(args.experts or [8]):
        raise SpecError(f"--top-k {args.top_k} exceeds --experts {min(args.experts or [8])}")
    if not args.no_store:
        argtypes.probe_dir(os.path.dirname(os.path.abspath(args.store)), "results store directory", "--store")
        Store(args.store).check_readable()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(pick_device(args.device, setting="--device"))  # "auto": cuda where present, else cpu
    try:
        if mode == "layer":
            benches = []
            for d in args.d_model or [256]:
                for E in args.experts or [8]:
                    for T in args.tokens or [8192]:
                        cfg = bench.LayerConfig(tokens=T, d_model=d, d_ff=args.d_ff, num_experts=E, top_k=args.top_k,
                                                dtype=args.dtype, device=device, seed=args.seed)
                        b = bench.run_layer_bench(cfg, routers, naive=args.naive, repeats=args.repeats,
                                                  warmup=args.warmup, phases=args.phases,
                                                  experts_impls=args.experts_impl)
                        bench.print_layer_report(b)
                        benches.append(b)
        else:
            sb = bench.run_scaling_bench(args.experts or (8, 16, 32, 64), args.tokens or (2048, 8192),
                                         args.d_model or (256, 1024), args.top_k, routers, repeats=args.repeats,
                                         warmup=args.warmup, dtype=args.dtype, device=device, seed=args.seed)
            bench.print_scaling_report(sb)
    except ValueError as exc:
        raise SpecError(str(exc)) from exc
    if args.no_store:
        return 0
    machine, sha = bench.provenance()
    bench_id = bench.new_bench_id()
    if mode == "layer":
        rows = [r for b in benches for r in bench.layer_rows(b, bench_id, machine["machine_id"], sha)]
    else:
        rows = bench.scaling_rows(sb, bench_id, machine["machine_id"], sha)
    bench.write_rows(args.store, rows, machine)
    print(f"wrote {len(rows)} perf rows to {args.store} (bench_id {bench_id})")
    return 0
