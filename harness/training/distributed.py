"""Data (and expert) parallel training across processes and machines, launched through torchrun.

``harness run --suite lm --nproc N`` re-launches the *same* command as

    python -m torch.distributed.run --nproc-per-node N [--standalone | rendezvous flags]
        -m harness.cli run <the same arguments without the launcher flags>

with ``HARNESS_TORCHRUN=1`` in the environment. Each worker then finds
torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR``,
initialises ``torch.distributed`` (gloo on CPU; nccl on GPU with
``cuda:LOCAL_RANK`` per rank) and runs the suite with every model wrapped in
``DistributedDataParallel``. Launching ``torchrun ... -m harness.cli run ...``
by hand (e.g. from a cluster's own launcher) works the same way.

Semantics (see docs/distributed.md for the long form):

* ``train.batch_size`` is the GLOBAL batch. Every rank draws the same
  deterministic (seed, step) batch and keeps its contiguous block of
  ``batch_size / world`` rows (:func:`shard_rows`); DDP averages gradients, so
  N processes optimise the same objective as 1 process on the same batch.
* Aux losses are computed by every rank on its own tokens (balance statistics
  f_i, P_i are per-rank, as in data-parallel Switch/GShard); their gradients
  are averaged with the rest. The logged curves are means over ranks.
* Every rank is seeded identically, so routers' random decisions
  (CompeteSMoE's competition schedule) agree across ranks.
* Rank 0 alone writes the store and the checkpoints; every rank loads the
  checkpoint on resume. Checkpoints and ``model.pt`` are in the
  single-process format, so a run can resume with another world size (data
  parallel) and lm-eval loads the model as usual.
* Every rank evaluates the same (deterministic) validation/test batches on the
  full model; rank 0 records them.
* Throughput = tokens summed over ranks / the slowest rank's training time.
* ``nproc`` is not part of the spec hash; the run's ``versions`` JSON records
  ``world_size`` (and backend) instead.
"""
from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layers.expert_parallel import ExpertParallel, to_cpu
from ..layers.moe_layer import set_balance_scope
from ..spec import SpecError
from .strategy import DataParallel, ParallelStrategy, SingleProcess

ENV_MARKER = "HARNESS_TORCHRUN"
TIMEOUT_ENV = "HARNESS_DIST_TIMEOUT_S"
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# launcher-only flags of ``harness run``: they configure torchrun and are not passed to the workers
LAUNCHER_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands. The default (world_size 1) means: plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    expert_group: Any = None  # process group for expert-parallel all_to_all (separate from DDP's)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in a single process) ---------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Objects of every rank on ``dst`` (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def _reduce(self, values: Sequence[float], op: Any) -> list[float]:
        dev = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor(list(values), dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, *values: float) -> list[float]:
        return list(values) if not self.distributed else self._reduce(values, dist.ReduceOp.SUM)

    def max(self, *values: float) -> list[float]:
        return list(values) if not self.distributed else self._reduce(values, dist.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        return flag if not self.distributed else self.max(float(flag))[0] > 0

    def mean_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks per key (keys may differ between ranks: averaged over the ranks that have them).

        The first rank's key order is kept so single-process and rank-0 rows come out in the same order.
        """
        if not self.distributed:
            return values
        every: list[dict[str, float]] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(every, values)
        out: dict[str, float] = {}
        for k in [k for d in every for k in d]:
            if k not in out:
                vs = [d[k] for d in every if k in d]
                out[k] = sum(vs) / len(vs)
        return out

    # -- devices and data --------------------------------------------------------------------------
    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` on GPU, unchanged on CPU."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, obj: Any) -> Any:
        """This rank's rows of a global batch (unchanged in a single process)."""
        return shard_rows(obj, self.rank, self.world_size) if self.distributed else obj


_CTX = DistContext()


def current() -> DistContext:
    """The process's distributed context (world size 1 unless :func:`init_from_env` ran)."""
    return _CTX


def launched_by_torchrun() -> bool:
    """Running as a torchrun worker of a job with more than one process."""
    return all(k in os.environ for k in _TORCHRUN_ENV) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> DistContext:
    """Initialise torch.distributed from torchrun's environment (idempotent); returns the context.

    Backend: nccl when this run trains on CUDA (``train.device`` cuda, or auto with a GPU), else gloo.
    """
    global _CTX
    if _CTX.distributed:
        return _CTX
    if not launched_by_torchrun():
        return _CTX
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if use_cuda:
            kwargs["device_id"] = torch.device("cuda", local)
        dist.init_process_group(**kwargs)
    # expert all_to_all gets its own group so it never interleaves with DDP's all-reduce on the default one
    expert_group = dist.new_group(backend=backend)
    _CTX = DistContext(rank=rank, world_size=world, local_rank=local, backend=backend, expert_group=expert_group)
    return _CTX


def shutdown() -> None:
    global _CTX
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CTX = DistContext()


def shard_rows(obj: Any, rank: int, world: int) -> Any:
    """Rank ``rank``'s contiguous block of rows of every tensor in ``obj`` (tensor, tuple, list, dict)."""
    if isinstance(obj, Tensor):
        n = obj.shape[0]
        if n % world:
            raise ValueError(f"global batch of {n} rows is not divisible by the world size {world}")
        per = n // world
        return obj[rank * per:(rank + 1) * per]
    if isinstance(obj, (tuple, list)):
        return type(obj)(shard_rows(o, rank, world) for o in obj)
    if isinstance(obj, dict):
        return {k: shard_rows(v, rank, world) for k, v in obj.items()}
    return obj


def check_spec(spec: Any, world_size: int) -> None:
    """Spec constraints of an N-process run (raises SpecError before anything is written)."""

    if world_size <= 1:
        return
    bs = spec.train.batch_size
    if bs % world_size:
        raise SpecError(f"train.batch_size={bs} is the global batch and must be divisible by the number of "
                        f"processes ({world_size}); e.g. --set train.batch_size={bs - bs % world_size or world_size}")
    if spec.train.budgets:
        raise SpecError(f"train.budgets (cooldown branches) run in one process; drop --nproc/--nnodes or "
                        f"train.budgets={list(spec.train.budgets)} (a run per budget also works)")
    m = spec.model
    if getattr(m, "expert_parallel", False) and m.num_experts % world_size:
        raise SpecError(f"model.expert_parallel needs model.num_experts={m.num_experts} divisible by the number "
                        f"of processes ({world_size})")


# -- model wrapping: the parallel strategy, chosen once ------------------------------------------------

def wrap_model(model: nn.Module, run: Any, ctx: DistContext, device: torch.device) -> ParallelStrategy:
    """Decide how ``model`` trains across processes, once: the run's parallel strategy
    (harness.training.strategy). ``strategy.module`` is what a training step calls (DDP, or the model);
    ``strategy.model`` is ``model`` itself -- changed in place under expert parallelism (its MoE layers
    replaced by expert-parallel twins) -- and stays the module for evaluation, ``state_dict`` and the
    optimiser."""
    if not ctx.distributed:
        strategy: ParallelStrategy = SingleProcess(model, ctx)
    elif getattr(run.model, "expert_parallel", False):
        strategy = ExpertParallel(model, ctx)  # shards the experts now
    else:
        strategy = DataParallel(model, ctx)
    _balance_scope(model, run)  # after sharding (the expert-parallel layers are new modules), before DDP
    strategy.wrap(device)
    return strategy


def _balance_scope(model: nn.Module, run: Any) -> None:
    """model.balance_scope / balance_window (issue 31): the routers' balance loss over the micro-batch or the
    global batch (set before a checkpoint is loaded into ``model``: the window's sums are part of its state)."""
    set_balance_scope(model, getattr(run.model, "balance_scope", "micro"), getattr(run.model, "balance_window", 0))


def share_checkpoint(state: dict[str, Any] | None, path: Any, ctx: DistContext, load: Any) -> dict[str, Any]:
    """Rank 0 loaded ``state``; give every rank the same one.

    Ranks read the file themselves when all of them can see it (a shared runs directory);
    otherwise (nodes with local disks) rank 0 broadcasts the checkpoint.
    """
    if not ctx.distributed:
        return state
    sees = state is not None or os.path.exists(path)
    if not ctx.any(not sees):
        return state if state is not None else load(path)
    return ctx.broadcast(to_cpu(state) if ctx.is_main else None)


def run_info(ctx: DistContext) -> dict[str, Any]:
    """Extra keys for the run's ``versions`` JSON (empty in a single process: the row stays as it was)."""
    if not ctx.distributed:
        return {}
    return {"world_size": ctx.world_size, "dist_backend": ctx.backend,
            "nnodes": int(os.environ.get("GROUP_WORLD_SIZE", "0")) or None}


# -- launching ------------------------------------------------------------------------------------

def strip_launcher_args(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` and the other launcher-only flags."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        flag = a.split("=", 1)[0]
        if flag in LAUNCHER_FLAGS:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def torchrun_command(worker_argv: Sequence[str], nproc: int, nnodes: str | int | None = None,
                     rdzv_endpoint: str | None = None, node_rank: int | None = None,
                     rdzv_id: str | None = None) -> list[str]:
    """The torchrun command line that runs ``python -m harness.cli <worker_argv>`` on ``nproc`` processes.

    * one node, no endpoint: ``--standalone`` (a local rendezvous on a free port);
    * ``--node-rank`` given: static rendezvous at ``rdzv_endpoint`` (= master host:port of node 0);
    * otherwise: the c10d rendezvous at ``rdzv_endpoint`` (elastic; ranks assigned on arrival).
    """

    nnodes_s = str(nnodes) if nnodes is not None else "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", nnodes_s]
    if rdzv_endpoint:
        if node_rank is not None:
            cmd += ["--rdzv-backend", "static", "--rdzv-endpoint", rdzv_endpoint, "--node-rank", str(node_rank)]
        else:
            cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id or "harness"]
    elif nnodes_s != "1":
        raise SpecError(f"--nnodes {nnodes_s} needs --rdzv-endpoint HOST:PORT (the same on every node)")
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "harness.cli", *worker_argv]


def launch(argv: Sequence[str], nproc: int, nnodes: str | None = None, rdzv_endpoint: str | None = None,
           node_rank: int | None = None, rdzv_id: str | None = None) -> int:
    """Re-run ``harness <argv>`` under torchrun; returns torchrun's exit status."""
    cmd = torchrun_command(strip_launcher_args(argv), nproc, nnodes, rdzv_endpoint, node_rank, rdzv_id)
    env = dict(os.environ)
    env[ENV_MARKER] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default too; train.threads sets the real count
    print("harness: launching " + " ".join(cmd[1:]), file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env)
    # torchrun stops its workers on SIGTERM/SIGINT; pass a SIGTERM sent to us on (Ctrl-C reaches it directly)
    try:
        old = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    except ValueError:  # not the main thread
        old = None
    try:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.wait()  # torchrun got the same SIGINT and is shutting its workers down
            raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def total_world(nproc: int, nnodes: str | None) -> int | None:
    """nproc * nnodes when that is fixed (None for an elastic ``MIN:MAX`` node range)."""
    if nnodes is None:
        return nproc
    try:
        return nproc * int(nnodes)
    except ValueError:
        return None


# -- sweeps through a scheduler --------------------------------------------------------------------
