"""lm-eval bridge: the harness's byte-level MoE decoder as an lm-eval model, run offline.

Layout
------
``defaults``  the model's registry name, the default tasks and batch size (imports nothing)
``entry``     the ``moe-harness`` registry entry (made when this package is imported) and lm-eval's CLI
``model``     ``MoEHarnessLM``, the lm-eval model (``model_args``, tokens, scoring: see its docstring);
              it imports torch and lm-eval, so nothing imports it before a model is built
``lookup``    which model.pt a ``pretrained=`` names (path, run directory, run id in the store)
``tasks``     the shipped offline tasks, running them, storing ``lmeval/<task>/<metric>``

Tasks
-----
``tasks/lm_eval/`` (shipped as ``harness.tasks/lm_eval``) holds offline task YAMLs:
``shakespeare_ppl`` and ``shakespeare_cloze`` (data shipped, held-out test split)
and ``local_lambada_openai``, ``local_hellaswag``, ``local_arc_easy``,
``local_piqa``, ``local_wikitext`` (lm-eval's own task definitions over local
files ``<data_dir>/<task>/<split>.jsonl``; see ``tasks/lm_eval/moe_harness_tasks.py``).
``harness eval`` also accepts the plain names (``hellaswag`` -> ``local_hellaswag``).

Three ways in
-------------
1. ``harness eval RUN_ID [--tasks shakespeare_ppl,hellaswag] [--limit N] [--data-dir DIR]
   [--store FILE] [--runs-dir DIR] [--device cpu] [--batch-size 16] [--no-store]``
   evaluates one task at a time, prints a table and stores ``lmeval/<task>/<metric>``
   (value + stderr) on the run. A task that fails (e.g. its data is missing) prints
   one line naming the path it looked for; the others still run.
   After pretraining, ``harness run`` does the same for ``eval.tasks`` (see
   :func:`eval_after_pretraining`).
2. Python, lm-eval's API::

       import harness.lmeval  # registers "moe-harness"
       from lm_eval import simple_evaluate
       from lm_eval.tasks import TaskManager
       tm = TaskManager(include_path=str(harness.lmeval.tasks_dir()), include_defaults=False,
                        metadata={"data_dir": "/data/lm_eval"})   # metadata only for local_* tasks
       simple_evaluate(model="moe-harness", model_args="pretrained=RUN_ID,store=results/harness.duckdb",
                       tasks=["shakespeare_ppl"], task_manager=tm, limit=40)

3. lm-eval's own CLI. lm-eval cannot import this module by itself (it has no plugin
   entry point for models), so start it through the harness, which registers the
   model and adds ``--include_path tasks/lm_eval`` when none is given::

       harness lm-eval --model moe-harness --model_args pretrained=RUN_ID --tasks shakespeare_cloze --limit 40
       python -m harness.lmeval --model moe-harness --model_args pretrained=path/to/model.pt ...

   Everything after ``lm-eval`` is lm-eval's command line (``run`` is implied; ``ls
   tasks`` works too). Local data: ``--metadata '{"data_dir": "/data/lm_eval"}'`` or
   ``$HARNESS_LMEVAL_DATA``. Give device and batch size as lm-eval's ``--device`` /
   ``--batch_size`` (lm-eval passes those to the model too, so repeating them in
   ``--model_args`` is a duplicate-argument error). Without ``--device`` (lm-eval's
   own default is ``cuda:0``) the harness passes ``--device auto`` (CUDA when present, else the
   CPU); an explicit cuda device on a machine without one is an error naming ``device``.
   lm-eval's CLI always indexes its own ~15k task YAMLs first (tens of seconds);
   ``harness eval`` does not.

Offline: every entry point sets ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1``
(unless already set); no task here needs the network.
"""
from __future__ import annotations

from .defaults import DEFAULT_BATCH_SIZE, DEFAULT_TASKS, MODEL_NAME
from .entry import lm_eval_cli, register
from .tasks import (check_tasks, eval_after_pretraining, metric_rows, resolve_task_name, run_tasks, set_offline,
                    shipped_tasks, store_results, task_manager, tasks_dir)

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_TASKS", "MODEL_NAME", "check_tasks", "eval_after_pretraining",
           "lm_eval_cli", "metric_rows", "register", "resolve_task_name", "run_tasks", "set_offline",
           "shipped_tasks", "store_results", "task_manager", "tasks_dir"]

register()
