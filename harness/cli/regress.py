"""``harness regress``: the regression gate's command line (the gate itself: :mod:`harness.tools.regress`)."""
from __future__ import annotations

import argparse

from .. import args as argtypes
from ..tools import regress
from ..tools.regress import ab
from ..training.parallel import available_cpus


def _seeds(s: str) -> list[int]:
    return [int(x) for x in argtypes.seeds(s).split(",")]


def _rounds(s: str) -> int:
    v = argtypes.positive_int(s)
    if v < ab.MIN_ROUNDS:
        raise argparse.ArgumentTypeError(f"--rounds must be >= {ab.MIN_ROUNDS}: with {v} processes per tree a "
                                         f"rank test cannot reach p < {ab.ALPHA}, so no slowdown could ever fail")
    return v


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    p = sub.add_parser("regress", help="quality + routing health against committed goldens; throughput A/B "
                                       "against the base revision on this machine")
    p.add_argument("--suite", default=regress.DEFAULT_SUITE)
    p.add_argument("--preset", default=regress.DEFAULT_PRESET)
    p.add_argument("--routers", default=None,
                   help="comma-separated (default: every router with a golden); named routers are gated")
    p.add_argument("--strict", action="store_true", help="a registered router without a golden fails the gate")
    p.add_argument("--baseline", default=None, help="golden JSON (default: tasks/regress/<suite>.json)")
    p.add_argument("--base", default=None,
                   help="git revision the throughput is compared against (default: the golden's revision)")
    p.add_argument("--repo", default=None,
                   help="git checkout whose working tree is the current code (default: the harness package's)")
    p.add_argument("--update", action="store_true", help="re-record the goldens (all --seeds) and say what moved")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="seeds measured by --update for the tolerance")
    p.add_argument("--jobs", type=argtypes.positive_int, default=available_cpus(),
                   help="parallel training processes (default: the CPUs here; 1 = in this process)")
    p.add_argument("--rounds", type=_rounds, default=ab.ROUNDS,
                   help=f"A/B processes per tree (>= {ab.MIN_ROUNDS}: fewer cannot reach p < {ab.ALPHA})")
    p.add_argument("--repeats", type=argtypes.int_range(5), default=ab.REPEATS, help="timed repeats inside one A/B process")
    p.add_argument("--min-effect", type=float, default=ab.MIN_EFFECT)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=regress.cmd_regress)
