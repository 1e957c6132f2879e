"""Where a run's files live and how they are written and read; :class:`Checkpointer`, the one place that
writes and reads the checkpoint dict.

``<runs_dir>/<run_key>/ckpt.pt``   the resume checkpoint (model, optimiser, schedule, RNG, health), every
                                   ``train.ckpt_every`` steps; deleted when the run finishes
``<runs_dir>/<run_key>/model.pt``  the final model (spec + weights), read by ``harness eval`` / lm-eval

``runs_dir`` defaults to ``runs/`` beside the results store. Writes are atomic (temporary file, fsync,
rename), so a full disk or a kill leaves the previous file intact.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import UserError
from .distributed import share_checkpoint
from .optim import load_state as load_optimizer_state
CKPT_VERSION = 1
CKPT_NAME, MODEL_NAME = "ckpt.pt", "model.pt"


class CheckpointError(UserError, RuntimeError):
    pass


class CheckpointWriteError(CheckpointError):
    """A checkpoint (or the final model) could not be written: disk full, read-only directory.

    The previous checkpoint is untouched (writes go to a temporary file that replaces it only when
    complete); the run is recorded ``interrupted`` and ``--resume`` continues from that checkpoint."""


def default_runs_dir(store_path: str | os.PathLike[str]) -> Path:
    return Path(store_path).parent / "runs"


def resume_path(runs_dir: str | os.PathLike[str], run_key: str) -> Path:
    return Path(runs_dir) / run_key / CKPT_NAME


def final_model_path(runs_dir: str | os.PathLike[str], run_key: str) -> Path:
    return Path(runs_dir) / run_key / MODEL_NAME


def run_key_of(run_id: str) -> str:
    """A run id is ``<run_key>-<6 hex>``; its files are under the run key (shared by reruns of a spec+seed)."""
    return run_id.rsplit("-", 1)[0]


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block ends, then deliver them to the handlers that were in place.

    A KeyboardInterrupt raised inside torch.save leaves its zip writer half-written, and the writer's cleanup
    then raises a RuntimeError ("unexpected pos ...") that hides the interrupt: the run was recorded failed
    instead of interrupted. A checkpoint write takes milliseconds; deferring the signal over it costs nothing.
    (Handlers, not the signal mask: torch's threads would take a process signal the main thread blocks.)
    An ignored SIGINT (nohup, a background job) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be changed, and only run, in the main thread
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) not in (signal.SIG_IGN, None):
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)  # now handled as it would have been (KeyboardInterrupt, Terminated, ...)


def atomic_save(path: Path, obj: Any, what: str) -> None:
    """torch.save to ``path.tmp``, fsync, rename over ``path``; a failed write leaves ``path`` as it was.
    Ctrl-C / SIGTERM wait until the write is done (:func:`signals_deferred`)."""
    with signals_deferred():
        _atomic_save(path, obj, what)


def _atomic_save(path: Path, obj: Any, what: str) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "writ" not in str(exc).lower():
            raise  # not an I/O failure (torch wraps those as "PytorchStreamWriter failed writing ...")
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        why = (f"{exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)})"
               if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:200])
        raise CheckpointWriteError(f"cannot write {what} {path}: {why}") from exc


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: write a temporary file, fsync, then rename over the old checkpoint (CheckpointWriteError)."""
    atomic_save(path, state, "checkpoint")


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); "
            f"re-run with --restart to start this run from scratch"
        ) from exc
    if not isinstance(state, dict) or state.get("version") != CKPT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a moe-harness v{CKPT_VERSION} checkpoint; use --restart")
    return state


def save_final_model(path: Path, run_id: str, spec: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    atomic_save(path, {"version": CKPT_VERSION, "run_id": run_id, "spec": spec, "model": state}, "final model")


def load_final_model(path: Path) -> dict[str, Any]:
    """A ``model.pt``: ``{"version", "run_id", "spec", "model"}`` (weights only: no pickled code runs)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"cannot read model checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or not {"spec", "model"} <= set(ckpt) or ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path} is not a moe-harness v{CKPT_VERSION} model.pt (written at the end of a run)")
    return ckpt


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator a run draws from (torch, numpy, Python, CUDA): what a checkpoint stores and a
    cooldown branch (harness.training.budgets) puts back after it ran."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`'s snapshot."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """The one place that writes and reads a run's checkpoint dict (``ckpt.pt``) and writes its ``model.pt``.

    The dict holds: ``version``, ``run_id``, ``step``, ``model`` (single-process format), ``optimizer`` (and,
    under expert parallelism, ``optimizer_shards`` -- every rank's state -- with
    ``expert_parallel_world_size``), ``scheduler``, the recorder's ``health`` / ``stat_acc`` /
    ``budget_metrics`` / ``budget_health``, ``rng`` and ``spec``. Rank 0 writes; every rank takes part in
    gathering what it holds (a collective under expert parallelism) and waits until the file is on disk.
    ``ts`` is the run's ``loop.TrainState`` (parallel strategy, optimiser, schedule), ``rec`` its
    ``recorder.Recorder``.
    """

    def __init__(self, runs_dir: str | os.PathLike[str], run: Any, dctx: Any, device: torch.device) -> None:
        self.path = resume_path(runs_dir, run.run_key)
        self.final_path = final_model_path(runs_dir, run.run_key)
        self.run, self.dctx, self.device = run, dctx, device

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> dict[str, Any]:
        return load_checkpoint(self.path)

    def discard(self) -> None:
        """Delete the resume checkpoint (a fresh run never continues a stale one; a finished run needs none)."""
        if self.path.exists():
            self.path.unlink()

    def share(self, state: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0 loaded ``state``; every rank gets the same one (harness.training.distributed)."""
        return share_checkpoint(state, self.path, self.dctx, load_checkpoint)

    def save(self, step: int, run_id: str, ts: Any, rec: Any) -> None:
        model_sd = ts.par.model_state()
        opt_sd, shards = ts.par.optimizer_state(ts.opt)
        optimizer: dict[str, Any] = {"optimizer": opt_sd}
        if ts.par.shards_optimizer:
            optimizer.update(optimizer_shards=shards, expert_parallel_world_size=self.dctx.world_size)
        if self.dctx.is_main:
            save_checkpoint(self.path, {
                "version": CKPT_VERSION, "run_id": run_id, "step": step, "model": model_sd, **optimizer,
                "scheduler": ts.sched.state_dict(), "health": rec.health.state_dict(), "stat_acc": rec.stat_acc,
                "budget_metrics": rec.budget_metrics, "budget_health": rec.budget_health,
                "rng": rng_state(self.device), "spec": self.run.to_dict(),
            })
        self.dctx.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet

    def restore(self, state: dict[str, Any], ts: Any, rec: Any) -> None:
        """Put model, optimiser, schedule, recorder state and every RNG back as they were at the checkpoint."""
        rec.stat_acc = dict(state.get("stat_acc", {}))
        rec.budget_metrics = dict(state.get("budget_metrics", {}))
        rec.budget_health = list(state.get("budget_health", []))
        ts.par.model.load_state_dict(state["model"])
        # the moments as saved, the implementation (train.adamw) as the spec says: load_state_dict alone would
        # bring back the saved groups' fused / foreach flags
        load_optimizer_state(ts.opt, self._optimizer_state(state, ts.par.shards_optimizer), self.run.train.adamw)
        ts.sched.load_state_dict(state["scheduler"])
        rec.health.load_state_dict(state["health"])
        set_rng_state(state["rng"], self.device)

    def _optimizer_state(self, state: dict[str, Any], sharded: bool) -> dict[str, Any]:
        """This rank's optimiser state; a checkpoint of the other kind (expert parallel or not, another world
        size) is a CheckpointError naming the way to resume it."""
        shards = state.get("optimizer_shards")
        ep_world = state.get("expert_parallel_world_size")
        if sharded:
            if shards is None or len(shards) != self.dctx.world_size:
                got = "no per-rank optimiser state" if shards is None else f"{len(shards)} ranks"
                raise CheckpointError(f"expert-parallel checkpoint has {got}; resume it with --nproc "
                                      f"{ep_world or '?'} or use --restart")
            return shards[self.dctx.rank]
        if shards is not None:
            raise CheckpointError(f"checkpoint was written by an expert-parallel run on {ep_world} ranks; "
                                  f"resume it the same way or --restart")
        return state["optimizer"]

    def save_final(self, run_id: str, ts: Any) -> None:
        """``model.pt`` (spec + single-process-format weights; gathering them is a collective)."""
        model_sd = ts.par.model_state()
        if self.dctx.is_main:
            save_final_model(self.final_path, run_id, self.run.to_dict(), model_sd)
