"""The shipped offline lm-eval tasks, running them on a model, and storing the results.

``tasks/lm_eval/`` (shipped as ``harness.tasks/lm_eval``) holds the task YAMLs; each task runs
separately (a failing one does not stop the rest) and its metrics are stored on the run as
``lmeval/<task>/<metric>`` (value + stderr, plus ``n_docs``).

lm-eval itself is imported inside the functions that run it: this module is imported by
``harness run`` (``check_tasks`` before pretraining) and by every ``harness`` command line, which
must not pay for lm-eval's (or torch's) import.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .defaults import DEFAULT_TASKS

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
BOOTSTRAP_ITERS = 1000  # lm-eval's bootstrap stderr (perplexity metrics); mean metrics have closed forms

Results = dict[str, dict[str, tuple[float, float | None]]]  # {task: {metric: (value, stderr)}}


def tasks_dir() -> Path:
    """The shipped lm-eval task directory (``tasks/lm_eval`` in the source tree)."""
    from importlib import resources

    return Path(str(resources.files("harness.tasks").joinpath("lm_eval")))


def set_offline() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def one_line(exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and msg.startswith(("'", '"')):
        msg = msg[1:-1]
    return " ".join(msg.split())


# -- which tasks ----------------------------------------------------------------------------------

def task_manager(data_dir: str | os.PathLike[str] | None = None, include_defaults: bool = False):
    """lm-eval TaskManager over the shipped task YAMLs only (indexing lm-eval's ~15k built-ins takes ~10-30 s)."""
    from lm_eval.tasks import TaskManager  # lm-eval only when tasks run (see the module docstring)

    meta = {"data_dir": str(Path(data_dir).expanduser())} if data_dir else None
    return TaskManager(include_path=str(tasks_dir()), include_defaults=include_defaults, metadata=meta)


def resolve_task_name(name: str, known: Iterable[str]) -> str:
    """``hellaswag`` -> ``local_hellaswag`` when only the local variant exists here."""
    known = set(known)
    if name not in known and f"local_{name}" in known:
        return f"local_{name}"
    return name


def shipped_tasks() -> list[str]:
    """Names of the shipped lm-eval tasks (the ``task:`` of each YAML in tasks/lm_eval), without importing lm-eval."""
    out = []
    for f in sorted(tasks_dir().glob("*.yaml")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.startswith("task:"):
                out.append(line.split(":", 1)[1].strip())
    return out


def check_tasks(tasks: Sequence[str], where: str = "--tasks") -> None:
    """SpecError naming the first task that is not shipped (``hellaswag`` counts for ``local_hellaswag``)."""
    known = shipped_tasks()
    for t in tasks:
        if resolve_task_name(t, known) not in known:
            # here, not at the top: harness.spec imports the router registry and torch, which importing
            # harness.lmeval must not (see the module docstring)
            from ..spec import SpecError

            near = difflib.get_close_matches(t, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise SpecError(f"{where}: unknown lm-eval task {t!r}{hint} (tasks: {', '.join(known)})")


# -- metrics ------------------------------------------------------------------------------------

def _ratio_stderr(pairs: list[tuple[float, float]]) -> float | None:
    """Standard error of sum(a)/sum(b) over documents (ratio estimator, linearised)."""
    n = len(pairs)
    sb = sum(b for _, b in pairs)
    if n < 2 or sb <= 0:
        return None
    r = sum(a for a, _ in pairs) / sb
    var = n / (n - 1) * sum((a - r * b) ** 2 for a, b in pairs) / sb**2
    return math.sqrt(var)


def _rolling_stderrs(samples: list[dict[str, Any]], values: dict[str, float]) -> dict[str, float]:
    """lm-eval gives no stderr for weighted perplexities / bits per byte; derive one from the per-document
    (loglikelihood, count) pairs: se(R) of the ratio R = sum(ll)/sum(count), then the delta method."""
    out = {}
    for metric, value in values.items():
        pairs = [tuple(s[metric]) for s in samples if isinstance(s.get(metric), (list, tuple))]
        se = _ratio_stderr([(float(a), float(b)) for a, b in pairs])
        if se is None:
            continue
        if metric == "bits_per_byte":
            out[metric] = se / math.log(2)
        elif metric in ("word_perplexity", "byte_perplexity"):
            out[metric] = value * se
    return out


def _task_metrics(results: dict[str, Any], task: str) -> dict[str, tuple[float, float | None]]:
    res = results["results"][task]
    out: dict[str, tuple[float, float | None]] = {}
    for key, value in res.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, flt = key.split(",", 1)
        se = res.get(f"{metric}_stderr,{flt}")
        name = metric if flt == "none" else f"{metric}_{flt}"
        out[name] = (float(value), float(se) if isinstance(se, (int, float)) else None)
    missing = {m: v for m, (v, se) in out.items() if se is None}
    if missing and results.get("samples", {}).get(task):
        for m, se in _rolling_stderrs(results["samples"][task], missing).items():
            out[m] = (out[m][0], se)
    n = (results.get("n-samples") or {}).get(task, {}).get("effective")
    if n is not None:  # how many documents the numbers are over (a --limit run is not a full one)
        out["n_docs"] = (float(n), None)
    return out


# -- running ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_lm_eval(quiet: bool = True):
    """lm-eval logs every task's defaults at WARNING and datasets draws a bar per split; keep to our own lines."""
    from datasets.utils import logging as ds_logging  # datasets comes with lm-eval: only when tasks run

    lg = logging.getLogger("lm_eval")
    old, bars = lg.level, ds_logging.is_progress_bar_enabled()
    import lm_eval.api.task as lm_task  # lm-eval only when tasks run

    bar = lm_task.tqdm
    if quiet:
        lg.setLevel(logging.ERROR)
        ds_logging.disable_progress_bar()
        # the request-building bar lm-eval draws per task and run (lm_eval/api/task.py build_all_requests)
        lm_task.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        lg.setLevel(old)
        if bars:
            ds_logging.enable_progress_bar()
        lm_task.tqdm = bar


def run_tasks(lm, tasks: Sequence[str], limit: int | float | None = None,
              data_dir: str | os.PathLike[str] | None = None, bootstrap_iters: int = BOOTSTRAP_ITERS,
              log_fn: Callable[[str], None] | None = None, quiet: bool = True) -> tuple[Results, dict[str, str]]:
    """Evaluate ``lm`` on each task separately. Returns ({task: {metric: (value, stderr)}}, {task: error})."""
    set_offline()
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap would otherwise fork a process pool
    # lm-eval's evaluate(), not simple_evaluate(): the latter also collects an environment report (pip list,
    # torch collect_env: seconds per call) that the store already has as the run's versions/machine.
    # Imported here: lm-eval only when tasks run (see the module docstring).
    from lm_eval.evaluator import evaluate

    log_fn = log_fn or (lambda s: print(s, file=sys.stderr))
    results: Results = {}
    errors: dict[str, str] = {}
    with _quiet_lm_eval(quiet):
        tm = task_manager(data_dir)
        for requested in tasks:
            name = resolve_task_name(requested, tm.all_tasks)
            t0 = time.perf_counter()
            try:
                if name not in tm.all_tasks:
                    near = difflib.get_close_matches(name, tm.all_subtasks, n=1)
                    raise KeyError(f"unknown task {requested!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                                   + f" (tasks in {tasks_dir()}: {', '.join(tm.all_subtasks)})")
                loaded = tm.load([name])
                for t in loaded["tasks"].values():  # simple_evaluate's defaults
                    if t.get_config("num_fewshot") is None:
                        t.set_config(key="num_fewshot", value=0)
                    t.set_fewshot_seed(seed=FEWSHOT_SEED)
                with contextlib.redirect_stdout(sys.stderr):  # lm-eval print()s progress notes
                    out = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters,
                                   log_samples=True)
                for task in out["results"]:
                    results[task] = _task_metrics(out, task)
            except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the others
                errors[requested] = one_line(exc)
                log_fn(f"lm-eval {requested}: FAILED: {errors[requested]}")
                continue
            summary = ", ".join(f"{m}={v:.4g}" for m, (v, _) in sorted(results.get(name, {}).items()))
            log_fn(f"lm-eval {name}: {summary} ({time.perf_counter() - t0:.1f}s)")
    return results, errors


# -- storing ------------------------------------------------------------------------------------

def metric_rows(results: Results) -> list[dict[str, Any]]:
    return [{"name": f"lmeval/{task}/{metric}", "value": v, "stderr": se}
            for task, metrics in results.items() for metric, (v, se) in sorted(metrics.items())]


def store_results(store, run_id: str, results: Results) -> None:
    """Replace the run's ``lmeval/<task>/*`` rows for these tasks with the new values."""
    if not results:
        return
    with store.writer() as con:
        for task in results:
            con.execute("DELETE FROM metrics WHERE run_id = ? AND name LIKE ?", [run_id, f"lmeval/{task}/%"])
    store.add_metrics(run_id, metric_rows(results))


def eval_after_pretraining(run, res, store, runs_dir) -> Results:
    """After ``harness run`` finishes an LM run: its ``eval.tasks`` on the saved model.pt, into the store.

    Never raises: a failed evaluation is logged and the suite goes on.
    """
    tag = f"[{run.router} seed {run.seed}]"

    def say(s: str) -> None:
        print(f"{tag} {s}", file=sys.stderr)

    ev = run.eval
    tasks = tuple(ev.tasks) or DEFAULT_TASKS
    try:
        # Imported here: the model module imports torch and lm-eval's model stack, which `import harness.lmeval`
        # (and the training path that imports this module) must not.
        from ..training.checkpoint import final_model_path
        from .model import MoEHarnessLM

        path = final_model_path(runs_dir, run.run_key)
        lm = MoEHarnessLM(pretrained=str(path), device=run.train.device, batch_size=ev.batch_size)
        if lm.run_id != res.run_id:
            say(f"lm-eval skipped: {path} holds run {lm.run_id}, not {res.run_id}")
            return {}
        results, _ = run_tasks(lm, tasks, limit=ev.limit, data_dir=ev.data_dir, log_fn=say)
        for task, metrics in results.items():  # per task, so one bad write cannot lose the others
            store_results(store, res.run_id, {task: metrics})
        return results
    except Exception as exc:  # noqa: BLE001
        say(f"lm-eval after pretraining failed: {type(exc).__name__}: {one_line(exc)}")
        return {}
