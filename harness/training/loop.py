"""One training loop for every suite (nanoGPT-style: :meth:`Trainer.train` reads top to bottom).

A *suite adapter* (``harness.suites.lm.LMSuite``, ``harness.suites.vision.VisionSuite``)
supplies the model, batches, task loss and evaluation; the training package owns
everything that must be identical across routers and suites, in named parts:

* :func:`train_step` -- ONE optimiser step of a :class:`TrainState` (forward, aux-loss summation, NaN guard,
  backward, the parallel strategy's grad finishing and clipping, AdamW, the schedule);
* :class:`Trainer` -- one run: identity and resume (``identity.open_run``), the parallel strategy chosen once
  (``distributed.wrap_model`` -> ``strategy``), a ``checkpoint.Checkpointer`` (the one place the checkpoint
  dict is written and read), a ``recorder.Recorder`` (curves, routing health, final metrics, the store rows),
  cooldown branches (``budgets``) and the loop itself;
* :func:`train_run` -- a Trainer run under the error rules (diverged / failed / interrupted) and recorded.
"""
from __future__ import annotations

import copy
import random
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import Terminated
from ..routing.router import Routing
from ..spec import RunSpec
from ..store import Store
from ..suites.base import SuiteAdapter
from . import budgets, distributed, optim, schedule
from .checkpoint import Checkpointer, CheckpointWriteError, rng_state, set_rng_state
from .checkpoint import load_checkpoint  # noqa: F401 - importable from here, as before
from .device import pick_device, reset_peak_memory
from .health import HealthTracker
from .identity import open_run
from .recorder import Recorder
from .strategy import ParallelStrategy


class Diverged(RuntimeError):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"{what} at step {step}")
        self.step = step


@dataclass
class RunResult:
    run_id: str
    router: str
    seed: int
    status: str
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


# -- small utilities -------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that any module (the model itself included) lists in its ``no_weight_decay()``,
    as full names: timm's convention (ViT pos_embed, cls_token; DeiT) applied to every submodule, so the
    expert bank's stacked 2-D biases are left undecayed like the dense FFN's 1-D ones (issue 21)."""
    out: set[str] = set()
    for prefix, m in model.named_modules():
        if hasattr(m, "no_weight_decay"):
            out |= {f"{prefix}.{n}" if prefix else n for n in m.no_weight_decay()}
    return out


def make_optimizer(model: nn.Module, run: RunSpec) -> torch.optim.Optimizer:
    t = run.train
    # nanoGPT's rule: weight-decay matrices (dim >= 2), not biases/norm gains; plus the names any module
    # lists in its no_weight_decay() (ViT pos_embed and cls_token; the experts' stacked biases)
    skip = no_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and n not in skip]
    no_decay = [p for n, p in named if p.dim() < 2 or n in skip]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # train.adamw: fused / foreach / loop, passed to the constructor (harness.training.optim), the same for every model
    return optim.make_adamw(groups, t.adamw, optim.named_ids(model), lr=t.lr, betas=(t.beta1, t.beta2))


def make_scheduler(opt: torch.optim.Optimizer, run: RunSpec) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's learning-rate schedule (``train.schedule``; harness.training.schedule), stepped once per
    optimiser step."""
    return schedule.make_scheduler(opt, run.train)


# -- one optimiser step ------------------------------------------------------------------------------

def autocast_for(device: torch.device, dtype: str) -> Any:
    """The forward's precision context of ``train.dtype``: bfloat16 autocast, or nothing (float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else _null_ctx()


@dataclass
class TrainState:
    """What one optimiser step updates, and how: the parallel strategy (``par.model``, and ``par.module``,
    what is called: DDP or the model), the suite's task loss, AdamW and its schedule, clipping, precision."""

    par: ParallelStrategy
    adapter: SuiteAdapter
    opt: torch.optim.Optimizer
    sched: Any
    grad_clip: float
    amp: Any

    @property
    def model(self) -> nn.Module:
        return self.par.model

    @classmethod
    def build(cls, model: nn.Module, run: RunSpec, adapter: SuiteAdapter, dctx: distributed.DistContext,
              device: torch.device) -> "TrainState":
        """Wrap ``model`` (the parallel strategy, chosen once: ``distributed.wrap_model``), then its
        optimiser and schedule."""
        par = distributed.wrap_model(model, run, dctx, device)
        opt = make_optimizer(model, run)
        return cls(par, adapter, opt, make_scheduler(opt, run), run.train.grad_clip,
                   autocast_for(device, run.train.dtype))


def train_step(ts: TrainState, inputs: Tensor, targets: Tensor, step: int, total_steps: int,
               mark: Callable[[str], None] | None = None) -> tuple[Tensor, dict[str, Tensor], list[Routing]]:
    """ONE optimiser step: forward, task loss + the routers' aux losses, NaN guard, backward, the strategy's
    grad finishing and clipping, AdamW and the schedule.

    The loop below calls it; so do the model-level benchmarks (``harness.bench.model_step``,
    ``benchmarks/step_breakdown.py``), so the step they time is this very code. ``mark(stage)``, if
    given, is called as each stage ends (:data:`STEP_STAGES`). Returns the task loss, the summed aux
    losses and the routings.
    """
    mark = mark or _no_mark
    with ts.amp:
        out, routings = ts.par.module(inputs, step=step, total_steps=total_steps)
        task_loss = ts.adapter.loss(out, targets)
    aux = _sum_aux(routings)
    loss = task_loss + sum(aux.values()) if aux else task_loss
    _check_finite(loss, routings, step, ts.par.ctx)
    mark("forward")
    ts.opt.zero_grad(set_to_none=True)
    loss.backward()
    ts.par.finish_grads()
    mark("backward")
    if ts.grad_clip > 0:
        gnorm = ts.par.clip_grad_norm(ts.grad_clip)
        if not torch.isfinite(gnorm):
            raise Diverged(step, "non-finite gradient norm")
    mark("clip")
    ts.opt.step()
    ts.sched.step()
    mark("optimizer")
    return task_loss, aux, routings


STEP_STAGES = ("forward", "backward", "clip", "optimizer")  # the names ``train_step`` calls ``mark`` with


def _no_mark(stage: str) -> None:
    pass


# -- the run -----------------------------------------------------------------------------------------------

def train_run(
    run: RunSpec,
    adapter: SuiteAdapter,
    store: Store,
    runs_dir: Path,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train one run start to finish and record it. ``on_step(steps_done)`` after every optimiser step
    (``--jobs`` workers report progress with it).

    Under torchrun (harness.training.distributed) every rank runs this on its shard of the global batch;
    rank 0 alone writes the store and checkpoints. A divergence or a failure is recorded and returned; an
    interruption (Ctrl-C, SIGTERM, a checkpoint that cannot be written) is recorded and raised."""
    trainer = Trainer(run, adapter, store, runs_dir, resume, log)
    status, error = trainer.guarded(progress, on_step)
    trainer.close(status, error)
    return RunResult(trainer.rec.run_id, run.router, run.seed, status, trainer.step, trainer.rec.final, error)


class Trainer:
    """One run in named parts: its identity (:func:`harness.training.identity.open_run`), the parallel
    strategy and optimiser (:class:`TrainState`), a :class:`~harness.training.checkpoint.Checkpointer` and a
    :class:`~harness.training.recorder.Recorder`; :meth:`train` is the loop."""

    def __init__(self, run: RunSpec, adapter: SuiteAdapter, store: Store, runs_dir: Path, resume: bool,
                 log: Callable[[str], None]) -> None:
        self.run, self.adapter, self.log = run, adapter, log
        self.dctx = distributed.current()
        self.device = self.dctx.device(pick_device(run.train.device))
        if run.train.threads:
            torch.set_num_threads(run.train.threads)
        self.ckpt = Checkpointer(runs_dir, run, self.dctx, self.device)
        self.rec = Recorder(run, store, self.dctx, adapter.unit, log)
        self.rec.run_id, state = open_run(run, store, self.ckpt, resume, self.dctx)
        self.start_step = self.step = int(state["step"]) if state else 0
        seed_everything(run.seed)
        self.ts = TrainState.build(adapter.build_model(run).to(self.device), run, adapter, self.dctx, self.device)
        if state:
            self.ckpt.restore(state, self.ts, self.rec)
            log(f"{self.rec.tag} resuming {self.rec.run_id} from step {self.start_step}")
        self.branches = budgets.branches(run)
        self.bar: Any = None
        self.on_step: Callable[[int], None] | None = None
        reset_peak_memory(self.device)

    def train(self) -> None:
        """The loop: a step, its records, an evaluation every ``eval_every`` and a checkpoint every
        ``ckpt_every`` steps; cooldown branches fork where their budget's decay starts."""
        t, ts, rec = self.run.train, self.ts, self.rec
        ts.model.train()
        for step in range(self.start_step, t.steps):
            self.step = step
            for br in self.branches:
                if br.fork == step and not rec.has_budget(self.adapter.primary_metric, br.budget):
                    self.run_branch(br)
            ts.model.on_step(step, t.steps)
            inputs, targets = self.batch(step)
            with rec.timed(inputs, self.adapter.items, self.device):
                task_loss, aux, routings = train_step(ts, inputs, targets, step, t.steps)
            rec.step(step, task_loss, aux, routings, ts.sched.get_last_lr()[0])
            self.report(step, task_loss)
            done = step + 1
            if done % t.eval_every == 0 or done == t.steps:
                # periodic passes read train.eval_batches (a curve); the last one is the verdict's metric, so it
                # reads the whole split (train.final_eval_batches caps it only in the CI-sized tiny presets)
                batches = t.final_eval_batches if done == t.steps else t.eval_batches
                rec.evaluated(done, self.evaluate("val", done, batches))
            if done % t.ckpt_every == 0 and done < t.steps:
                rec.flush(done)  # curves first, then the checkpoint: a resume truncates anything after it
                self.ckpt.save(done, rec.run_id, ts, rec)
        self.finish()

    def batch(self, step: int) -> tuple[Any, Tensor]:
        """This rank's rows of the global batch of ``step``."""
        inputs, targets = self.adapter.train_batch(self.run, step, self.device)
        return self.dctx.shard(inputs), self.dctx.shard(targets)

    def report(self, step: int, task_loss: Tensor) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                speed = self.rec.items / max(self.rec.train_time, 1e-9)
                self.bar.set_postfix(loss=f"{task_loss.item():.3f}", **{f"{self.adapter.unit}/s": f"{speed:.0f}"})
        if self.on_step is not None:
            self.on_step(step + 1)

    def evaluate(self, split: str, at_step: int, max_batches: int | None, net: nn.Module | None = None,
                 tracker: HealthTracker | None = None, budget: int | None = None) -> dict[str, float]:
        """One pass over ``split`` of the trunk (or of a budget's branch: ``net``, ``tracker``, ``budget``);
        a validation pass also measures routing health."""
        net, tracker = net or self.ts.model, tracker or self.rec.health
        net.eval()
        layers = net.moe_layers()
        tracker.begin()
        with torch.no_grad(), self.ts.amp:
            m = self.adapter.evaluate(net, self.run, split, self.device,
                                      lambda: tracker.observe(layers) if layers else None, max_batches)
        if split == "val" and layers:
            self.rec.routing(*tracker.end(at_step), budget=budget)
        net.train()
        return m

    def run_branch(self, br: budgets.Branch) -> None:
        """Train the cooldown branch of budget ``br.budget`` from here (step ``br.fork``), evaluate it, drop it."""
        t, ts = self.run.train, self.ts
        saved_rng = rng_state(self.device)
        b_model, b_opt, b_sched = budgets.fork(ts.model, ts.opt, ts.sched, self.run, br.budget)
        b_par = distributed.wrap_model(b_model, self.run, self.dctx, self.device)
        branch = TrainState(b_par, self.adapter, b_opt, b_sched, t.grad_clip, ts.amp)
        b_health = copy.deepcopy(self.rec.health)
        for s in range(br.fork, br.budget):
            b_model.on_step(s, t.steps)  # the trunk's total: see harness.training.budgets
            x, y = self.adapter.train_batch(self.run, s, self.device)
            train_step(branch, self.dctx.shard(x), self.dctx.shard(y), s, t.steps)
        got = {**self.evaluate("val", br.budget, t.final_eval_batches, b_model, b_health, br.budget),
               **self.evaluate("test", br.budget, t.final_eval_batches, b_model, b_health, br.budget)}
        self.rec.budget_done(br.budget, got, self.adapter.primary_metric)
        set_rng_state(saved_rng, self.device)  # the trunk goes on as if no branch had run

    def finish(self) -> None:
        """The final validation (again, if the last one was before a resume) and test passes, throughput and
        memory, and ``model.pt``."""
        t, rec = self.run.train, self.rec
        self.step = t.steps
        last_val = rec.last_val if rec.last_val is not None else self.evaluate("val", t.steps, t.final_eval_batches)
        rec.measured("val", last_val)
        rec.measured("test", self.evaluate("test", t.steps, t.final_eval_batches))
        rec.finish_training(self.device, self.ts.par, bool(self.branches))
        self.ckpt.save_final(rec.run_id, self.ts)

    def guarded(self, progress: bool, on_step: Callable[[int], None] | None) -> tuple[str, str | None]:
        """:meth:`train` under the run's error rules: (status, error). Diverged and failed runs are results
        (a broken router must not stop the suite); an interruption is recorded and raised."""
        self.on_step = on_step
        try:
            self.bar = tqdm(total=self.run.train.steps, initial=self.start_step, disable=not progress,
                            leave=False, dynamic_ncols=True, desc=f"{self.run.router} s{self.run.seed}")
            self.train()
            return "finished", None
        except Diverged as exc:
            self.step = exc.step
            self.log(f"{self.rec.tag} DIVERGED: {exc}")
            return "diverged", str(exc)
        except (KeyboardInterrupt, CheckpointWriteError) as exc:
            # stopped before the end (SIGINT, SIGTERM, a checkpoint that cannot be written): record it as
            # interrupted so the store says so and --resume continues from the last checkpoint on disk
            self.rec.interrupted(f"{_interruption(exc)} at step {self.step}; `harness run ... --resume` continues it")
            raise
        except SystemExit:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken router must not stop the suite
            self.log(f"{self.rec.tag} FAILED: {type(exc).__name__}: {exc}")
            return "failed", traceback.format_exc()
        finally:
            if self.bar is not None:
                self.bar.close()

    def close(self, status: str, error: str | None) -> None:
        """Record the run (rank 0); a finished run's resume checkpoint goes (its model is in model.pt)."""
        self.rec.finish(status, self.step, error)
        if self.dctx.is_main and status == "finished":
            self.ckpt.discard()
        self.dctx.barrier()  # the run is recorded before any rank moves on (or exits)


def _interruption(exc: BaseException) -> str:
    """Why a run stopped early, for its record (a CheckpointWriteError's message also gets the way out)."""
    if isinstance(exc, CheckpointWriteError):
        why = f"{exc}; the previous checkpoint is intact"
        exc.args = (f"{exc}; the previous checkpoint is intact: free space or make the runs directory "
                    f"writable (or pass --runs-dir), then `harness run ... --resume` continues",)
        return why
    return f"interrupted ({'SIGTERM' if isinstance(exc, Terminated) else 'signal'})"


def _sum_aux(routings: list[Routing]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for r in routings:
        for k, v in r.aux_losses.items():
            out[k] = out[k] + v if k in out else v
    return out


def _check_finite(loss: Tensor, routings: list[Routing], step: int,
                  dctx: distributed.DistContext | None = None) -> None:
    if dctx is not None and dctx.distributed:  # every rank stops together, or the others would hang in backward
        try:
            _check_finite(loss, routings, step)
            local = None
        except Diverged as exc:
            local = exc
        if dctx.any(local is not None):
            raise local or Diverged(step, "non-finite loss or router logits on another rank")
        return
    for i, r in enumerate(routings):
        if r.logits is not None and not bool(torch.isfinite(r.logits).all()):
            raise Diverged(step, f"non-finite router logits in MoE layer {i}")
    if not bool(torch.isfinite(loss)):
        raise Diverged(step, f"non-finite loss ({float(loss)})")


class _null_ctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
