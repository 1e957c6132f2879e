"""One training loop for every suite (nanoGPT-style: read it top to bottom).

A *suite adapter* (``harness.suites.lm.LMSuite``, ``harness.suites.vision.VisionSuite``)
supplies the model, batches, task loss and evaluation; this module owns
everything that must be identical across routers and suites: optimiser,
schedule, aux-loss summation, gradient clipping, NaN guard, checkpoints and
resume, throughput/memory measurement, routing health and the store rows.
"""
from __future__ import annotations

import copy
import json
import random
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..routing.router import Routing
from ..spec import RunSpec
from ..store import Store, git_sha, machine_info, now, package_versions
from ..suites.base import SuiteAdapter
from . import budgets, distributed, schedule
from .checkpoint import (
    CKPT_VERSION,
    CheckpointWriteError,
    final_model_path,
    load_checkpoint,
    resume_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
    save_final_model,
)
from .device import peak_memory_mb, pick_device, reset_peak_memory
from .health import HealthTracker


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
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def make_scheduler(opt: torch.optim.Optimizer, run: RunSpec) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's learning-rate schedule (``train.schedule``; harness.training.schedule), stepped once per
    optimiser step."""
    return schedule.make_scheduler(opt, run.train)


# -- the loop -----------------------------------------------------------------------------

def autocast_for(device: torch.device, dtype: str) -> Any:
    """The forward's precision context of ``train.dtype``: bfloat16 autocast, or nothing (float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else _null_ctx()


def train_step(model: nn.Module, train_model: nn.Module, adapter: SuiteAdapter, opt: torch.optim.Optimizer,
               sched: Any, inputs: Tensor, targets: Tensor, step: int, total_steps: int, grad_clip: float,
               amp: Any, dctx: distributed.DistContext,
               mark: Callable[[str], None] | None = None) -> tuple[Tensor, dict[str, Tensor], list[Routing]]:
    """ONE optimiser step: forward, task loss + the routers' aux losses, NaN guard, backward, clipping,
    AdamW and the schedule. ``train_model`` is what is called (DDP or ``model`` itself).

    The loop below calls it; so do the model-level benchmarks (``harness.bench.model_step``,
    ``benchmarks/step_breakdown.py``), so the step they time is this very code. ``mark(stage)``, if
    given, is called as each stage ends (:data:`STEP_STAGES`). Returns the task loss, the summed aux
    losses and the routings.
    """
    mark = mark or _no_mark
    with amp:
        out, routings = train_model(inputs, step=step, total_steps=total_steps)
        task_loss = adapter.loss(out, targets)
    aux = _sum_aux(routings)
    loss = task_loss + sum(aux.values()) if aux else task_loss
    _check_finite(loss, routings, step, dctx)
    mark("forward")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    distributed.finish_grads(model, dctx)
    mark("backward")
    if grad_clip > 0:
        gnorm = distributed.clip_grad_norm(model, grad_clip, dctx)
        if not torch.isfinite(gnorm):
            raise Diverged(step, "non-finite gradient norm")
    mark("clip")
    opt.step()
    sched.step()
    mark("optimizer")
    return task_loss, aux, routings


STEP_STAGES = ("forward", "backward", "clip", "optimizer")  # the names ``train_step`` calls ``mark`` with


def _no_mark(stage: str) -> None:
    pass


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
    """``on_step(steps_done)`` after every optimiser step (``--jobs`` workers report progress with it)."""
    t = run.train
    # Under torchrun (harness.training.distributed) every rank runs this loop on its shard of the global batch;
    # rank 0 alone writes the store and checkpoints. In a single process ``dctx`` is inert.
    dctx = distributed.current()
    device = dctx.device(pick_device(t.device))
    if t.threads:
        torch.set_num_threads(t.threads)
    ckpt_path = resume_path(runs_dir, run.run_key)

    # -- identify the run: resume the latest unfinished one with this spec+seed, or start fresh
    run_id, state = None, None
    if not dctx.is_main:
        pass  # rank 0 decides below and tells the others
    elif resume:
        prev = store.find_resumable(run.spec_hash, run.seed)
        if prev is not None:
            run_id = prev["run_id"]
            if ckpt_path.exists():
                state = load_checkpoint(ckpt_path)
                if state.get("run_id") != run_id:
                    state = None  # checkpoint of another attempt; start this one over
    elif ckpt_path.exists():
        ckpt_path.unlink()  # a fresh run never continues a stale checkpoint
    if run_id is None and dctx.is_main:
        run_id = f"{run.run_key}-{uuid.uuid4().hex[:6]}"
        minfo = machine_info()
        store.register_machine(minfo)

        store.start_run({
            "run_id": run_id, "suite": run.suite, "router": run.router, "spec_hash": run.spec_hash,
            "seed": run.seed, "preset": run.suite_spec.preset, "status": "running", "step": 0,
            "total_steps": t.steps, "git_sha": git_sha(), "machine_id": minfo["machine_id"],
            "started_at": now(), "config": json.dumps(run.to_dict(), sort_keys=True, default=str),
            "versions": json.dumps({**package_versions(), **distributed.run_info(dctx)}, sort_keys=True),
        })
    # every rank continues the same run from the same checkpoint (single process: no-ops)
    run_id, has_state = dctx.broadcast((run_id, state is not None))
    if has_state:
        state = distributed.share_checkpoint(state, ckpt_path, dctx, load_checkpoint)
    dctx.barrier()
    start_step = int(state["step"]) if state else 0
    if resume and dctx.is_main:
        store.truncate_after(run_id, start_step)

    seed_everything(run.seed)
    model = adapter.build_model(run).to(device)
    # the module to call for training: DDP (with experts sharded under model.expert_parallel) or the model
    train_model = distributed.wrap_model(model, run, dctx, device)
    opt = make_optimizer(model, run)
    sched = make_scheduler(opt, run)
    health = HealthTracker()
    if state:
        model.load_state_dict(state["model"])
        distributed.load_optimizer_state(opt, state, model, dctx)  # = opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        health.load_state_dict(state["health"])
        set_rng_state(state["rng"], device)
        log(f"[{run.router} seed {run.seed}] resuming {run_id} from step {start_step}")

    amp = autocast_for(device, t.dtype)
    pending_curves: list[tuple[int, str, float]] = []
    routing_rows: list[tuple[int, int, int, float]] = []
    health_rows: list[tuple[int, int, str, float]] = []
    log_every = max(1, t.steps // 200)
    # router stats are averaged over every step of a logging interval, not sampled at its last step, so
    # a rare event (a CompeteSMoE competition step) is counted at its true rate; checkpointed with the run
    stat_acc: dict[str, list[float]] = dict(state.get("stat_acc", {})) if state else {}
    items, train_time = 0, 0.0
    step = start_step
    status, error = "finished", None
    final_metrics: dict[str, float] = {}
    last_val: dict[str, float] | None = None
    # cooldown branches (train.budgets under wsd): metrics and routing health of the budgets done so far,
    # checkpointed with the run so a resume does not redo a recorded branch
    pending_branches = budgets.branches(run)
    budget_metrics: dict[str, float] = dict(state.get("budget_metrics", {})) if state else {}
    budget_health: list[tuple[int, int, str, float]] = list(state.get("budget_health", [])) if state else []
    reset_peak_memory(device)

    def evaluate(split: str, at_step: int, max_batches: int | None, net: nn.Module | None = None,
                 tracker: HealthTracker | None = None, budget: int | None = None) -> dict[str, float]:
        """One pass over ``split`` of the trunk (or of a budget's branch: ``net``, ``tracker``, ``budget``)."""
        net, tracker = net or model, tracker or health
        net.eval()
        layers = net.moe_layers()
        tracker.begin()
        with torch.no_grad(), amp:
            m = adapter.evaluate(net, run, split, device, lambda: tracker.observe(layers) if layers else None,
                                 max_batches)
        if split == "val" and layers:
            lr_rows, h_rows = tracker.end(at_step)
            if budget is None:
                routing_rows.extend(lr_rows)
                health_rows.extend(h_rows)
            else:  # a branch's routing health, named like its metrics (the per-expert loads are the trunk's)
                budget_health.extend((s, li, budgets.budget_name(n, budget), v) for s, li, n, v in h_rows)
        net.train()
        return m

    def run_branch(br: budgets.Branch) -> None:
        """Train the cooldown branch of budget ``br.budget`` from here (step ``br.fork``), evaluate it, drop it."""
        saved_rng = rng_state(device)
        b_model, b_opt, b_sched = budgets.fork(model, opt, sched, run, br.budget)
        b_train = distributed.wrap_model(b_model, run, dctx, device)
        b_health = copy.deepcopy(health)
        for s in range(br.fork, br.budget):
            b_model.on_step(s, t.steps)  # the trunk's total: see harness.training.budgets
            x, y = adapter.train_batch(run, s, device)
            train_step(b_model, b_train, adapter, b_opt, b_sched, dctx.shard(x), dctx.shard(y), s, t.steps,
                       t.grad_clip, amp, dctx)
        got = {**evaluate("val", br.budget, t.final_eval_batches, b_model, b_health, br.budget),
               **evaluate("test", br.budget, t.final_eval_batches, b_model, b_health, br.budget)}
        budget_metrics.update({budgets.budget_name(k, br.budget): v for k, v in got.items()})
        log(f"[{run.router} seed {run.seed}] budget {br.budget}: {adapter.primary_metric} "
            f"{got[adapter.primary_metric]:.4f}")
        set_rng_state(saved_rng, device)  # the trunk goes on as if no branch had run

    bar = None
    try:

        bar = tqdm(total=t.steps, initial=start_step, disable=not progress, leave=False, dynamic_ncols=True,
                   desc=f"{run.router} s{run.seed}")
        model.train()
        for step in range(start_step, t.steps):
            for br in pending_branches:
                if br.fork == step and budgets.budget_name(adapter.primary_metric, br.budget) not in budget_metrics:
                    run_branch(br)
            model.on_step(step, t.steps)
            inputs, targets = adapter.train_batch(run, step, device)
            inputs, targets = dctx.shard(inputs), dctx.shard(targets)  # this rank's rows of the global batch
            t0 = time.perf_counter()
            task_loss, aux, routings = train_step(model, train_model, adapter, opt, sched, inputs, targets,
                                                  step, t.steps, t.grad_clip, amp, dctx)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - t0
            items += adapter.items(inputs)

            for name, v in _mean_stats(routings).items():
                acc = stat_acc.setdefault(name, [0.0, 0])
                acc[0] += v
                acc[1] += 1
            if step % log_every == 0 or step == t.steps - 1:
                logged = {"train_loss": task_loss.item(), **{f"aux/{n}": v.item() for n, v in aux.items()},
                          **{f"stat/{n}": a[0] / a[1] for n, a in stat_acc.items() if a[1]}}
                stat_acc = {}
                logged = dctx.mean_dict(logged)  # means over ranks (the global batch's loss)
                pending_curves.append((step, "train_loss", logged.pop("train_loss")))
                pending_curves.append((step, "lr", sched.get_last_lr()[0]))
                pending_curves.extend((step, name, v) for name, v in logged.items())
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{task_loss.item():.3f}", **{f"{adapter.unit}/s": f"{items / max(train_time, 1e-9):.0f}"})
            if on_step is not None:
                on_step(step + 1)
            done = step + 1
            if done % t.eval_every == 0 or done == t.steps:
                # periodic passes read train.eval_batches (a curve); the last one is the verdict's metric, so it
                # reads the whole split (train.final_eval_batches caps it only in the CI-sized tiny presets)
                last_val = evaluate("val", done, t.final_eval_batches if done == t.steps else t.eval_batches)
                for name, v in last_val.items():
                    pending_curves.append((done, name, v))
            if done % t.ckpt_every == 0 and done < t.steps:
                # curves first, then the checkpoint: a resume truncates anything recorded after it
                if dctx.is_main:
                    store.update_progress(run_id, done, pending_curves)
                pending_curves = []
                model_sd = distributed.model_state(model, dctx)
                opt_sd = distributed.optimizer_state(opt, model, dctx)
                if dctx.is_main:
                    save_checkpoint(ckpt_path, {
                        "version": CKPT_VERSION, "run_id": run_id, "step": done, "model": model_sd,
                        **opt_sd, "scheduler": sched.state_dict(), "health": health.state_dict(), "stat_acc": stat_acc,
                        "budget_metrics": budget_metrics, "budget_health": budget_health,
                        "rng": rng_state(device),
                        "spec": run.to_dict(),
                    })
                dctx.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet
        step = t.steps
        if last_val is None:  # resumed after the final validation pass was checkpointed: redo it
            last_val = evaluate("val", step, t.final_eval_batches)
        final_metrics.update(last_val)
        final_metrics.update(evaluate("test", step, t.final_eval_batches))
        if pending_branches:  # the trunk is the last budget: its metrics under that name too
            budget_metrics.update({budgets.budget_name(k, t.steps): v for k, v in final_metrics.items()})
        # tokens of all ranks over the slowest rank's time; the largest rank's memory
        (items,) = dctx.sum(items)
        train_time, peak_mb = dctx.max(train_time, peak_memory_mb(device))
        final_metrics[f"train_{adapter.unit}_per_s"] = items / max(train_time, 1e-9)
        final_metrics["peak_mem_mb"] = peak_mb
        final_metrics["params_total"] = float(distributed.count_parameters(model, dctx))
        for li, v in health.final_fluctuation(t.steps):
            health_rows.append((step, li, "fluctuation_last_change", v))
        model_sd = distributed.model_state(model, dctx)
        if dctx.is_main:
            save_final_model(final_model_path(runs_dir, run.run_key), run_id, run.to_dict(), model_sd)
    except Diverged as exc:
        status, error = "diverged", str(exc)
        step = exc.step
        log(f"[{run.router} seed {run.seed}] DIVERGED: {exc}")
    except (KeyboardInterrupt, CheckpointWriteError) as exc:
        # stopped before the end (SIGINT, SIGTERM, a checkpoint that cannot be written): record it as
        # interrupted so the store says so and --resume continues from the last checkpoint on disk
        if isinstance(exc, CheckpointWriteError):
            why = f"{exc}; the previous checkpoint is intact"
            exc.args = (f"{exc}; the previous checkpoint is intact: free space or make the runs directory "
                        f"writable (or pass --runs-dir), then `harness run ... --resume` continues",)
        else:
            why = f"interrupted ({'SIGTERM' if type(exc).__name__ == 'Terminated' else 'signal'})"
        if dctx.is_main and run_id is not None:
            _record_interrupted(store, run_id, f"{why} at step {step}; `harness run ... --resume` continues it",
                                log, f"[{run.router} seed {run.seed}]")
        raise
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken router must not stop the suite
        status, error = "failed", traceback.format_exc()
        log(f"[{run.router} seed {run.seed}] FAILED: {type(exc).__name__}: {exc}")
    finally:
        if bar is not None:
            bar.close()

    metrics_rows = [{"name": k, "value": v, "split": k.split("_", 1)[0] if k.startswith(("val_", "test_")) else None}
                    for k, v in final_metrics.items()]
    if status == "finished":  # a budget's rows carry its step count (the verdict along the budget reads them)
        metrics_rows += [{"name": k, "value": v, "split": k.split("_", 1)[0], "step": int(k.rsplit("@", 1)[1])}
                         for k, v in budget_metrics.items()]
        health_rows += budget_health
    if dctx.is_main:
        store.finish_run(run_id, status, step, metrics=metrics_rows, curves=pending_curves, routing=routing_rows,
                         routing_health=health_rows, error=error)
        if status == "finished" and ckpt_path.exists():
            ckpt_path.unlink()  # the final model is kept in model.pt; the resume checkpoint is no longer needed
    dctx.barrier()  # the run is recorded before any rank moves on (or exits)
    return RunResult(run_id, run.router, run.seed, status, step, final_metrics, error)


def _record_interrupted(store: Store, run_id: str, reason: str, log: Callable[[str], None], tag: str) -> None:
    """Best effort and short: a process being stopped must not wait minutes for a busy store."""
    try:
        store.with_timeout(15.0).mark_interrupted(run_id, 0, reason)
    except Exception as exc:  # noqa: BLE001 - the run stays 'running', which --resume also continues
        log(f"{tag} could not record the interruption ({type(exc).__name__}: {exc}); --resume still continues it")


def _sum_aux(routings: list[Routing]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for r in routings:
        for k, v in r.aux_losses.items():
            out[k] = out[k] + v if k in out else v
    return out


def _mean_stats(routings: list[Routing]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for r in routings:
        for k, v in r.stats.items():
            acc.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}


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
