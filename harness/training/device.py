"""The device a run (or an evaluation) uses, and its peak memory."""
from __future__ import annotations

import resource
from pathlib import Path

import torch

from ..errors import UserError


def pick_device(name: str | None, setting: str = "train.device") -> torch.device:
    """``auto`` (or empty): CUDA when present, else CPU. Asking for CUDA without one is a user error
    (``setting`` names the option to change), never a silent fall-back that would mislabel the figures."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"{setting}={name!r} is not a device (auto, cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{setting}={name} but no CUDA device is available; use {setting}=auto or cpu")
    return dev


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the peak RSS (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
