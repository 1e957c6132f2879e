"""What a suite supplies to the one training loop (``harness.training.loop.train_run``).

The loop owns everything that must be identical across routers and suites (optimiser, schedule,
aux losses, clipping, NaN guard, checkpoints, measurement, store); a suite owns its data, model,
task loss and evaluation. Its model keeps the :class:`harness.models.base.MoEModel` protocol.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from ..spec import RunSpec


class SuiteAdapter(Protocol):
    name: str
    unit: str            # "tok" or "img": what throughput counts
    primary_metric: str  # e.g. "val_bpb" (lower is better) or "val_top1"
    # the CLI's suite-specific steps are these hooks, not tests of the suite's name:
    lm_eval: bool        # its models are language models: ``eval.tasks`` run through lm-eval after pretraining

    def warm_cache(self, run: RunSpec) -> None: ...  # build on-disk caches quietly (``harness run --quiet``)

    def prepare(self, run: RunSpec) -> Any: ...   # load/validate data once, before anything is written
    def build_model(self, run: RunSpec) -> nn.Module: ...
    def train_batch(self, run: RunSpec, step: int, device: torch.device) -> tuple[Any, Tensor]: ...
    def loss(self, out: Tensor, targets: Tensor) -> Tensor: ...
    def items(self, inputs: Any) -> int: ...
    def evaluate(self, model: nn.Module, run: RunSpec, split: str, device: torch.device,
                 hook: Callable[[], None], max_batches: int | None) -> dict[str, float]: ...
