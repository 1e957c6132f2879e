"""``harness routers``: every registered router (built-in and plugins), its origin and one line."""
from __future__ import annotations

import argparse

from ..routing.registry import describe_routers


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001 - argparse's types
    s = sub.add_parser("routers", help="list registered routers (built-in and plugins)")
    s.set_defaults(fn=cmd_routers)


def cmd_routers(args: argparse.Namespace) -> int:
    rows = describe_routers()
    w = max(len(r["name"]) for r in rows)
    wo = max(len(r["origin"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{w}}  {r['origin']:<{wo}}  {r['description']}")
    return 0
