"""Memory of one untimed step: peak (CUDA allocator, or the CPU resident set's high-water mark) and the
deterministic bytes autograd saves for backward; also the load imbalance of that step."""
from __future__ import annotations

import ctypes
import gc
from typing import Any, Iterable

import torch
from torch import Tensor

from .candidates import Candidate, Inputs
from .steps import clear_grads, run_plain
from .timing import Clock


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


_LIBC: Any = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


class SavedBytes:
    """Sums the distinct non-parameter storages autograd saves for backward."""

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: Tensor) -> Tensor:
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in self.skip and key not in self.seen:
                self.seen.add(key)
                self.bytes += st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t


def measure_memory(c: Candidate, inp: Inputs, clock: Clock) -> dict[str, float | None]:
    """Peak memory of one (untimed) step and the deterministic saved-activation bytes, in MB."""
    clear_grads(c, inp)
    gc.collect()
    saved = SavedBytes(c.module.parameters())
    peak: float | None = None
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            run_plain(c, inp, clock)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        _malloc_trim()
        ok = _reset_rss_peak()
        base_kb = _proc_status_kb("VmRSS")
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            run_plain(c, inp, clock)
        hwm_kb = _proc_status_kb("VmHWM")
        if ok and base_kb is not None and hwm_kb is not None:
            peak = max(hwm_kb - base_kb, 0) / 1024
    layer_counts = getattr(c.module, "last_counts", None)
    imbalance = None
    if c.kind == "moe" and layer_counts is not None and layer_counts.numel():
        cnt = layer_counts.float()
        imbalance = float(cnt.max() / cnt.mean().clamp_min(1e-9))
    clear_grads(c, inp)
    return {"peak_mem_mb": peak, "saved_act_mb": saved.bytes / 2**20, "load_imbalance": imbalance}

