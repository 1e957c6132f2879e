"""Clocks and statistics of ``harness bench``: device-synchronised clock, the phase clock whose
phases sum exactly to its total, median/IQR, paired per-repeat ratios, and the run conditions
(garbage collector paused, load average)."""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

PHASES = ("router", "dispatch", "experts", "combine", "aux_loss", "backward")
MIN_REPEATS = 5

Log = Callable[[str], None]


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Clock:
    """``perf_counter`` that first waits for the device (CUDA work is asynchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class PhaseClock:
    """Attributes the time since the previous mark to a phase; phases sum exactly to ``total``.

    ``phases``: the names (default the layer's :data:`PHASES`). ``mark(None)`` drops the time since the
    previous mark from every phase (the training-step bench leaves ``on_step`` out of the stages); a
    clock marked only with names keeps the sum exact."""

    def __init__(self, clock: Clock, phases: Sequence[str] = PHASES) -> None:
        self.clock = clock
        self.times = dict.fromkeys(phases, 0.0)
        self.start = self._last = clock.now()

    def mark(self, phase: str | None) -> None:
        now = self.clock.now()
        if phase is not None:
            self.times[phase] += now - self._last
        self._last = now

    def move(self, src: str, dst: str, seconds: float) -> None:
        self.times[src] -= seconds
        self.times[dst] += seconds

    @property
    def total(self) -> float:
        return self._last - self.start


@dataclass(frozen=True)
class Stat:
    """Median and quartiles of a per-repeat sample; ``spread`` is the IQR."""

    median: float
    q25: float
    q75: float

    @property
    def spread(self) -> float:
        return self.q75 - self.q25

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        a = np.asarray(values, dtype=float)
        q25, med, q75 = np.percentile(a, [25, 50, 75])
        return cls(float(med), float(q25), float(q75))

    def scaled(self, f: float) -> "Stat":
        lo, hi = sorted((self.q25 * f, self.q75 * f))
        return Stat(self.median * f, lo, hi)



def paired(a: Sequence[float], b: Sequence[float], fn: Callable[[float, float], float]) -> list[float]:
    """``fn`` of the two candidates' times in the same repeat (they ran seconds apart), per repeat."""
    return [fn(x, y) for x, y in zip(a, b)]


def check_repeats(repeats: int, warmup: int) -> None:
    if repeats < MIN_REPEATS:
        raise ValueError(f"bench: repeats must be >= {MIN_REPEATS} (a median of fewer is not a measurement), got {repeats}")
    if warmup < 0:
        raise ValueError(f"bench: warmup must be >= 0, got {warmup}")


@contextlib.contextmanager
def gc_paused():
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def load_note(load: tuple[float | None, float | None] | None) -> str:
    if not load or load[0] is None or load[1] is None:
        return ""
    return f" on {os.cpu_count()} cores, load average {load[0]:.1f} -> {load[1]:.1f}"
