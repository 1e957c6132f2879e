"""How a run is spread over processes, decided once per model: a *parallel strategy*.

:func:`harness.training.distributed.wrap_model` looks at the process context and the spec once and
returns one of three strategies; the trainer then calls the strategy and never asks again:

=====================  ===========================================  ==========================================
strategy               chosen when                                  what it does differently
=====================  ===========================================  ==========================================
:class:`SingleProcess` one process                                  nothing: the model is called as it is
:class:`DataParallel`  ``--nproc N``                                the model is called through DDP
``ExpertParallel``     ``--nproc N`` + ``model.expert_parallel``    experts sharded over the ranks, DDP over the
                                                                    rest; grads, clipping, state dicts and the
                                                                    parameter count gather the shards
                                                                    (``harness.layers.expert_parallel``, beside
                                                                    the layer it shards)
=====================  ===========================================  ==========================================

Every strategy has the same surface (:class:`ParallelStrategy`): ``model`` (evaluation, ``state_dict``, the
optimiser), ``module`` (what a training step calls), ``finish_grads()`` after backward,
``clip_grad_norm(max_norm)``, ``model_state()`` (the single-process-format state dict; a collective under
expert parallelism), ``optimizer_state(opt)`` (this rank's state and, under expert parallelism, every rank's),
``shards_optimizer`` and ``count_parameters()``. The checkpoint dict itself is written and read by
:class:`harness.training.checkpoint.Checkpointer` alone.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP


class ParallelStrategy(Protocol):
    model: nn.Module      # the model itself: evaluation, state_dict, the optimiser's parameters
    module: nn.Module     # what a training step calls (DDP, or the model)
    ctx: Any              # harness.training.distributed.DistContext
    shards_optimizer: bool  # each rank's optimiser holds a different state (expert parallel)

    def wrap(self, device: torch.device) -> nn.Module: ...
    def finish_grads(self) -> None: ...
    def clip_grad_norm(self, max_norm: float) -> Tensor: ...
    def model_state(self) -> dict[str, Tensor]: ...
    def optimizer_state(self, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], list[Any] | None]: ...
    def count_parameters(self) -> int: ...


class SingleProcess:
    """One process: the model is the module a step calls; grads are final after backward."""

    kind = "single"
    shards_optimizer = False

    def __init__(self, model: nn.Module, ctx: Any = None) -> None:
        self.model = self.module = model
        self.ctx = ctx

    def wrap(self, device: torch.device) -> nn.Module:
        return self.module

    def finish_grads(self) -> None:
        pass

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def model_state(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def optimizer_state(self, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], list[Any] | None]:
        """(this rank's state, every rank's state or None): replicas share one state, so None here."""
        return opt.state_dict(), None

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class DataParallel(SingleProcess):
    """``--nproc N``: the model replicated on every rank, called through DDP (which averages the grads).

    ``find_unused_parameters=True``: routers legitimately leave parameters without a gradient in some steps
    (StableMoE freezes its distilled router in stage 2; a router's parameters used only on some steps), and
    DDP must not wait for them."""

    kind = "data_parallel"

    def wrap(self, device: torch.device) -> nn.Module:
        self.module = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=True)
        return self.module
