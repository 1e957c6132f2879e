"""The ``fused`` expert kernel (harness/layers/fused_experts.py, csrc/segment_mlp.cpp) is the ``loop`` kernel
bit for bit at one thread (through whole MoE layers of every router: tests/test_segment_mlp.py); where the C++ extension cannot be built
it says so in one line and runs ``loop_recompute`` (the same numbers)."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from harness.layers import fused_experts
from harness.layers.experts import ExpertBank


pytestmark = pytest.mark.usefixtures("one_thread")  # the bit-for-bit claims hold at one thread (conftest.py)


def test_the_extension_builds_here():
    # the install script builds it; a machine without a C++ compiler runs loop_recompute (the tests below).
    # HARNESS_NO_FUSED_EXPERTS=1 says so on purpose, and is then what is checked.
    if os.environ.get("HARNESS_NO_FUSED_EXPERTS"):
        assert not fused_experts.available()
    else:
        assert fused_experts.available(), ("the fused expert kernel did not build: is a C++ compiler installed? "
                                           "(HARNESS_NO_FUSED_EXPERTS=1 runs loop_recompute instead)")


@pytest.mark.parametrize("counts", [[30, 0, 21, 5, 0, 40, 10, 7], [0] * 7 + [9], [0] * 8])
@pytest.mark.parametrize("need_x", [True, False])
def test_ragged_and_empty_loads_and_frozen_inputs(counts, need_x):
    res = {}
    for impl in ("loop", "fused"):
        torch.manual_seed(0)
        bank = ExpertBank(8, 16, 24, "gelu", experts_impl=impl)
        x = torch.randn(sum(counts), 16, generator=torch.Generator().manual_seed(1)).requires_grad_(need_x)
        y = bank.forward_sorted(x, torch.tensor(counts))
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y)) if y.numel() else None
        res[impl] = [y.detach(), x.grad, bank.w1.grad, bank.b1.grad, bank.w2.grad, bank.b2.grad]
    for u, v in zip(res["loop"], res["fused"]):
        assert (u is None and v is None) or torch.equal(u, v)


def test_without_the_extension_it_runs_loop_recompute(monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("the C++ kernel ran although it is unavailable")

    monkeypatch.setattr(fused_experts, "available", lambda: False)
    monkeypatch.setattr(fused_experts, "fused_segment_mlp", never)
    out = {}
    for impl in ("loop", "fused"):
        torch.manual_seed(0)
        bank = ExpertBank(4, 8, 12, "gelu", experts_impl=impl)
        out[impl] = bank.forward_sorted(torch.randn(10, 8, generator=torch.Generator().manual_seed(2)), [3, 0, 7, 0])
    assert torch.equal(out["loop"], out["fused"])


def test_a_failed_build_is_one_logged_line(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def boom(**_):
        raise RuntimeError("Error building extension 'harness_segment_mlp'\nlong compiler output ...")

    fused_experts.extension.cache_clear()
    monkeypatch.delenv("HARNESS_NO_FUSED_EXPERTS", raising=False)
    monkeypatch.setattr(cpp_extension, "load", boom)
    try:
        with caplog.at_level(logging.WARNING, logger="harness"):
            assert fused_experts.extension() is None
        lines = [r.getMessage() for r in caplog.records if r.name == "harness"]
        assert len(lines) == 1 and "loop_recompute" in lines[0] and "\n" not in lines[0]
    finally:
        fused_experts.extension.cache_clear()


def test_the_kernel_benchmark_script_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "expert_kernels.py"
    spec = importlib.util.spec_from_file_location("expert_kernels_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--rows", "64", "--d-model", "8", "--d-ff", "12", "--rounds", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    for impl in ("loop", "loop_recompute", "fused", "grouped_mm"):
        assert f"  {impl} " in out
    with pytest.raises(SystemExit) as e:
        mod.main(["--impls", "fused,nope"])
    assert e.value.code == 2
