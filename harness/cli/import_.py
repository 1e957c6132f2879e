"""``harness import PATH...``: result bundles into the store (``harness.bundles``).

    harness import results/runs                       # every bundle below a runs directory
    harness import 'cluster/runs/*' other/bundles --store results/harness.duckdb

PATH is a bundle (a directory holding manifest.json), a run directory, any directory above them, or a glob.
One transaction per bundle; importing a bundle twice adds nothing. A bundle that fails validation is refused
(one line naming the file, exit 2) and nothing of it is written; the good ones are imported all the same.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from tqdm.auto import tqdm

from ..bundles import BundleError, find_bundles, read_bundle
from ..bundles.ingest import import_bundle
from ..errors import UserError
from ..store import Store


def register(sub: argparse._SubParsersAction, store_arg) -> None:  # noqa: ANN001, SLF001
    p = sub.add_parser("import", help="ingest result bundles (runs directories, `harness export` output) into the "
                                      "store")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="bundles, run directories, directories above them, or globs of those")
    store_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    dirs, empty = find_bundles(args.paths)
    if empty:
        raise UserError(f"{empty[0]}: no result bundle there (a bundle is a directory holding manifest.json; "
                        f"give bundles, run directories or a directory above them)")
    store = Store(args.store)
    store.check_readable()
    counts: Counter[str] = Counter()
    refused: list[str] = []
    bar = tqdm(total=len(dirs), unit="bundle", desc="import", leave=False, dynamic_ncols=True, file=sys.stderr,
               disable=args.quiet or not sys.stderr.isatty())
    try:
        for d in dirs:
            try:
                b = read_bundle(d)
            except BundleError as exc:
                refused.append(str(exc))
            else:
                with store.writer() as con:  # one transaction per bundle
                    counts[import_bundle(con, b)] += 1
            bar.update(1)
    finally:
        bar.close()
    print(f"import: {counts['imported']} imported, {counts['updated']} updated, {counts['present']} already present, "
          f"{len(refused)} refused ({len(dirs)} bundles -> {args.store})", flush=True)
    if refused:
        for line in refused[:-1]:
            print(f"harness: error: {' '.join(line.split())}", file=sys.stderr)
        raise BundleError(refused[-1])
    return 0
