"""What a run records, and the one place that writes it to the store: curves, routing health, final metrics.

The trainer (:mod:`harness.training.loop`) tells the :class:`Recorder` what happened -- a step's losses and
router statistics, an evaluation's metrics and routing loads, a cooldown branch's results -- and the recorder
keeps the rows until they are written: curves at every checkpoint (:meth:`Recorder.flush`, before the
checkpoint, so a resume truncates anything recorded after it), everything else when the run ends
(:meth:`Recorder.finish`, one ``store.finish_run``). Only rank 0 writes; every rank keeps the same rows.

A metric's split is the split it was measured on (the ``split`` of the evaluation that returned it), never
guessed from its name; a budget's metric (``val_bpb@250``) has the split of the trunk's metric of that name.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..routing.router import Routing
from ..spec import RunSpec
from ..store import Store
from . import budgets
from .device import peak_memory_mb
from .health import HealthTracker

Row = tuple[int, int, str, float]  # (step, layer, name, value) of routing health


class Recorder:
    """Curves, routing loads and health, final and budget metrics of one run; ``finish`` writes them."""

    def __init__(self, run: RunSpec, store: Store, dctx: Any, unit: str, log: Callable[[str], None]) -> None:
        self.run, self.store, self.dctx, self.unit, self.log = run, store, dctx, unit, log
        self.run_id: str | None = None
        self.tag = f"[{run.router} seed {run.seed}]"
        self.health = HealthTracker()                      # routing fluctuation across evaluations (checkpointed)
        self.curves: list[tuple[int, str, float]] = []     # pending: written at the next checkpoint or the end
        self.routing_rows: list[tuple[int, int, int, float]] = []
        self.health_rows: list[Row] = []
        # router stats are averaged over every step of a logging interval, not sampled at its last step, so
        # a rare event (a CompeteSMoE competition step) is counted at its true rate; checkpointed with the run
        self.stat_acc: dict[str, list[float]] = {}
        # cooldown branches (train.budgets under wsd): metrics and routing health of the budgets done so far,
        # checkpointed with the run so a resume does not redo a recorded branch
        self.budget_metrics: dict[str, float] = {}
        self.budget_health: list[Row] = []
        self.final: dict[str, float] = {}
        self.splits: dict[str, str | None] = {}            # metric name -> the split it was measured on
        self.last_val: dict[str, float] | None = None      # the latest validation pass of the trunk
        self.items, self.train_time = 0, 0.0
        self.log_every = max(1, run.train.steps // 200)

    # -- during training -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self, inputs: Any, count: Callable[[Any], int], device: torch.device) -> Iterator[None]:
        """Training time (the optimiser step only) and items (tokens or images) for the throughput."""
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.train_time += time.perf_counter() - t0
        self.items += count(inputs)

    def step(self, step: int, task_loss: Tensor, aux: dict[str, Tensor], routings: list[Routing], lr: float) -> None:
        """A step's router stats into the interval's means; every ``log_every`` steps, the curve points."""
        for name, v in _mean_stats(routings).items():
            acc = self.stat_acc.setdefault(name, [0.0, 0])
            acc[0] += v
            acc[1] += 1
        if step % self.log_every == 0 or step == self.run.train.steps - 1:
            logged = {"train_loss": task_loss.item(), **{f"aux/{n}": v.item() for n, v in aux.items()},
                      **{f"stat/{n}": a[0] / a[1] for n, a in self.stat_acc.items() if a[1]}}
            self.stat_acc = {}
            logged = self.dctx.mean_dict(logged)  # means over ranks (the global batch's loss)
            self.curves.append((step, "train_loss", logged.pop("train_loss")))
            self.curves.append((step, "lr", lr))
            self.curves.extend((step, name, v) for name, v in logged.items())

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        """A periodic validation pass of the trunk: its metrics are curve points (the last one the verdict's)."""
        self.last_val = metrics
        self.curves.extend((step, name, v) for name, v in metrics.items())

    def routing(self, load_rows: list[tuple[int, int, int, float]], health_rows: list[Row],
                budget: int | None = None) -> None:
        """An evaluation's routing loads and health: the trunk's, or a budget branch's (named like its metrics;
        the per-expert loads are the trunk's only)."""
        if budget is None:
            self.routing_rows.extend(load_rows)
            self.health_rows.extend(health_rows)
        else:
            self.budget_health.extend((s, li, budgets.budget_name(n, budget), v) for s, li, n, v in health_rows)

    def budget_done(self, budget: int, metrics: dict[str, float], primary: str) -> None:
        self.budget_metrics.update({budgets.budget_name(k, budget): v for k, v in metrics.items()})
        self.log(f"{self.tag} budget {budget}: {primary} {metrics[primary]:.4f}")

    def has_budget(self, primary: str, budget: int) -> bool:
        return budgets.budget_name(primary, budget) in self.budget_metrics

    def flush(self, step: int) -> None:
        """Curves so far into the store (rank 0), before a checkpoint at ``step``."""
        if self.dctx.is_main:
            self.store.update_progress(self.run_id, step, self.curves)
        self.curves = []

    # -- at the end ------------------------------------------------------------------------------------
    def measured(self, split: str, metrics: dict[str, float]) -> None:
        """Final metrics of the trunk, measured on ``split``."""
        self.final.update(metrics)
        self.splits.update(dict.fromkeys(metrics, split))

    def finish_training(self, device: torch.device, par: Any, with_budgets: bool) -> None:
        """Throughput (tokens of all ranks over the slowest rank's time), the largest rank's peak memory, the
        parameter count, and the final routing fluctuation; the trunk's metrics as the last budget's too."""
        steps = self.run.train.steps
        if with_budgets:  # the trunk is the last budget: its metrics under that name too
            self.budget_metrics.update({budgets.budget_name(k, steps): v for k, v in self.final.items()})
        (items,) = self.dctx.sum(self.items)
        train_time, peak_mb = self.dctx.max(self.train_time, peak_memory_mb(device))
        self.measured_none(f"train_{self.unit}_per_s", items / max(train_time, 1e-9))
        self.measured_none("peak_mem_mb", peak_mb)
        self.measured_none("params_total", float(par.count_parameters()))  # a collective under EP
        for li, v in self.health.final_fluctuation(steps):
            self.health_rows.append((steps, li, "fluctuation_last_change", v))

    def measured_none(self, name: str, value: float) -> None:
        self.final[name] = value
        self.splits[name] = None

    def metric_rows(self, finished: bool) -> list[dict[str, Any]]:
        rows = [{"name": k, "value": v, "split": self.splits.get(k)} for k, v in self.final.items()]
        if finished:  # a budget's rows carry its step count (the verdict along the budget reads them)
            for k, v in self.budget_metrics.items():
                base, budget = budgets.parse_budget_name(k)
                rows.append({"name": k, "value": v, "split": self.splits.get(base), "step": budget})
        return rows

    def finish(self, status: str, step: int, error: str | None) -> None:
        """The run's one closing write (rank 0): status, metrics, the curves not yet flushed, routing rows."""
        rows = self.metric_rows(status == "finished")
        health = self.health_rows + self.budget_health if status == "finished" else self.health_rows
        if self.dctx.is_main:
            self.store.finish_run(self.run_id, status, step, metrics=rows, curves=self.curves,
                                  routing=self.routing_rows, routing_health=health, error=error)

    def interrupted(self, reason: str) -> None:
        """Best effort and short: a process being stopped must not wait minutes for a busy store."""
        if not (self.dctx.is_main and self.run_id is not None):
            return
        try:
            self.store.with_timeout(15.0).mark_interrupted(self.run_id, 0, reason)
        except Exception as exc:  # noqa: BLE001 - the run stays 'running', which --resume also continues
            self.log(f"{self.tag} could not record the interruption ({type(exc).__name__}: {exc}); "
                     f"--resume still continues it")


def _mean_stats(routings: list[Routing]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for r in routings:
        for k, v in r.stats.items():
            acc.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}
