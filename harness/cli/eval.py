"""``harness eval RUN_ID`` (lm-eval tasks on a finished LM run, stored) and ``harness lm-eval ...``
(lm-eval's own command line with the moe-harness model); the bridge itself is :mod:`harness.lmeval`."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .. import lmeval
from ..args import split_csv
from ..lmeval import DEFAULT_BATCH_SIZE, DEFAULT_TASKS


def register(sub, store_arg: Callable[[argparse.ArgumentParser], None]) -> None:  # noqa: ANN001 - argparse's
    s = sub.add_parser("eval", help="lm-eval tasks on a finished LM run, offline (stored as lmeval/<task>/<metric>)",
                       description="Evaluate a finished LM run on lm-eval tasks (offline task YAMLs in "
                                   "tasks/lm_eval). Each task runs separately; a failing one does not stop the rest.")
    s.add_argument("run_id", help="run id (or unique prefix) in the store, or a path to a model.pt / run directory")
    s.add_argument("--tasks", default=None,
                   help=f"comma-separated tasks (default: the run's eval.tasks, else {','.join(DEFAULT_TASKS)}); "
                        "shakespeare_ppl, shakespeare_cloze, lambada_openai, hellaswag, arc_easy, piqa, wikitext")
    s.add_argument("--limit", type=float, default=None, help="documents per task (default: the run's eval.limit)")
    s.add_argument("--all", action="store_true", help="every document (ignore the run's eval.limit)")
    s.add_argument("--data-dir", default=None,
                   help="directory with <task>/<split>.jsonl for the standard tasks (default: the run's "
                        "eval.data_dir, $HARNESS_LMEVAL_DATA, ~/.cache/moe-harness/lm_eval_data)")
    s.add_argument("--runs-dir", default=None, help="run directories (default: runs/ beside the store)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    s.add_argument("--no-store", action="store_true", help="print the metrics only")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    store_arg(s)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("lm-eval", help="lm-eval's own CLI with the moe-harness model and shipped tasks",
                       description="Everything after `lm-eval` goes to lm-eval's command line, with the "
                                   "moe-harness model registered and --include_path tasks/lm_eval added.",
                       add_help=False, prefix_chars="\0")
    s.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    s.set_defaults(fn=cmd_lm_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    # Imported here: the model imports torch and lm-eval's model stack, which building the `harness` parser must not
    from ..lmeval.lookup import lookup_run
    from ..lmeval.lookup import store_path as resolve_store
    from ..lmeval.model import MoEHarnessLM
    from ..store import Store

    lmeval.set_offline()
    if args.tasks:
        lmeval.check_tasks(split_csv(args.tasks))  # before the model loads
    lm = MoEHarnessLM(pretrained=args.run_id, store=args.store, runs_dir=args.runs_dir, device=args.device,
                      batch_size=args.batch_size, progress=not args.quiet)
    spec_eval = lm.spec.get("eval") or {}
    tasks = split_csv(args.tasks) if args.tasks else list(spec_eval.get("tasks") or DEFAULT_TASKS)
    limit = args.limit if args.limit is not None else (None if args.all else spec_eval.get("limit"))
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    data_dir = args.data_dir or spec_eval.get("data_dir")
    # through the package (lmeval.run_tasks), the bridge's public names, which tests replace with tripwires
    results, errors = lmeval.run_tasks(lm, tasks, limit=limit, data_dir=data_dir, log_fn=lambda s: None)
    rows = lmeval.metric_rows(results)
    if rows:
        w = max(len(r["name"]) for r in rows)
        for r in rows:
            se = f" ± {r['stderr']:.4g}" if r["stderr"] is not None else ""
            print(f"{r['name']:<{w}}  {r['value']:.6g}{se}")
    if results and not args.no_store:
        store_path = resolve_store(args.store)
        try:
            lookup_run(lm.run_id or "", store_path)
        except Exception:  # noqa: BLE001 - e.g. a model.pt copied from elsewhere: print only
            print(f"(run {lm.run_id} is not in {store_path}; metrics not stored)", file=sys.stderr)
        else:
            lmeval.store_results(Store(store_path), lm.run_id, results)
            print(f"stored {len(rows)} metrics on {lm.run_id} in {store_path} (limit={limit})")
    for task, msg in errors.items():
        print(f"harness: error: lm-eval task {task}: {msg}", file=sys.stderr)
    return 2 if errors else 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    return lmeval.lm_eval_cli(args.lm_eval_args)
