"""Learning-rate schedules (``train.schedule``), as multipliers of the peak ``train.lr`` per 0-based step.

``cosine``: linear warm-up, then cosine decay to ``min_lr_ratio`` over the rest of ``train.steps``.

``wsd`` (warmup-stable-decay; Hagele et al. 2024, arXiv 2405.18392, sec. 3; Hu et al. 2024, MiniCPM, arXiv
2404.06395, sec. 4): linear warm-up, then the peak held constant, then over the last
``round(decay_fraction * total)`` steps a decay to ``min_lr_ratio``. Before its decay starts the schedule does
not depend on ``total``, which is what lets one run give several budgets: the budget ``b`` is the trunk's
weights at :func:`decay_start` ``(b)`` cooled down along ``wsd`` of total ``b`` (harness.training.budgets).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..spec import TrainSpec


def cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to ``min_ratio`` of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def decay_steps(total: int, fraction: float) -> int:
    """Steps of a WSD budget ``total`` that decay (rounded half to even, as Python's ``round``)."""
    return round(fraction * total)


def decay_start(total: int, fraction: float) -> int:
    """The first step of a WSD budget's decay: where its cooldown branch forks from the stable phase."""
    return total - decay_steps(total, fraction)


def wsd(warmup: int, total: int, min_ratio: float, fraction: float, shape: str) -> Callable[[int], float]:
    """Warm-up, stable at the peak, then the decay of ``shape`` over progress p = (step - start) / decay_steps:
    ``"1-sqrt"``: 1 - sqrt(p) (Hagele et al. 2024, eq. (1), the cooldown they found best);
    ``"linear"``: 1 - p. Both scaled into [min_ratio, 1]."""
    start, n = decay_start(total, fraction), decay_steps(total, fraction)
    if shape not in ("1-sqrt", "linear"):
        raise ValueError(f"unknown WSD decay shape {shape!r}")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if step < start:
            return 1.0
        p = min(1.0, (step - start) / max(1, n))
        g = 1.0 - math.sqrt(p) if shape == "1-sqrt" else 1.0 - p
        return min_ratio + (1 - min_ratio) * g

    return f


def lr_factor(t: TrainSpec, total: int | None = None) -> Callable[[int], float]:
    """The multiplier of ``t.lr`` at each step of a run (or, for ``wsd``, of the budget ``total``)."""
    total = t.steps if total is None else total
    if t.schedule == "wsd":
        return wsd(t.warmup_steps, total, t.min_lr_ratio, t.decay_fraction, t.decay_shape)
    return cosine(t.warmup_steps, total, t.min_lr_ratio)


def make_scheduler(opt: torch.optim.Optimizer, t: TrainSpec,
                   total: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a LambdaLR, stepped once per optimiser step (step s trains at ``lr_factor(s)``)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(t, total))
