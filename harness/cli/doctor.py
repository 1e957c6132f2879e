"""``harness doctor``: install, versions, data paths and store health, one row each (exit 1 on a problem)."""
from __future__ import annotations

import argparse

from ..spec import load_suite
from ..tools.doctor import run_checks


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    p = sub.add_parser("doctor", help="check install, versions, data paths and store health")
    store_arg(p)
    p.add_argument("--suite", default="lm", help="also check the data paths of this suite (default lm)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.suite:  # a bad --suite / --set is a usage error (exit 2); a problem doctor finds is a FAIL row (exit 1)
        load_suite(args.suite, overrides=args.set)
    rows = run_checks(args.store, args.suite, args.set)
    w = max(len(r[0]) for r in rows)
    for name, ok, detail in rows:
        print(f"{'ok  ' if ok else 'FAIL'}  {name:<{w}}  {detail}")
    # chromium is optional: it only gates one test
    failed = [r for r in rows if not r[1] and not r[0].startswith("chromium")]
    print(f"\n{len(failed)} problem(s)" if failed else "\nall checks passed")
    return 1 if failed else 0
