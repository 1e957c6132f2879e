"""AdamW's implementation (``train.adamw``): the same for the dense baseline and every router.

``fused``: ``torch.optim.AdamW(fused=True)``, one kernel over all parameters; ``foreach``: ``foreach=True``
(multi-tensor ops); ``loop``: ``foreach=False, fused=False``, the per-tensor loop (torch's default on CPU, what
every run used before the key existed). The three agree to ~1e-7 per step but are not bit-identical, which is
why the key is in the spec hash (harness.spec.TrainSpec.adamw).

The flags are passed to the constructor (so ``opt.defaults`` and every group carry them, and the constructor's
own checks run) and never taken from elsewhere: a param group copied from another optimiser, or loaded with
``load_state_dict``, carries that optimiser's ``fused`` / ``foreach`` and would silently override them --
:func:`load_state` therefore puts the run's flags back after loading (a checkpoint or a trunk's state saved
under one setting continues under the spec's).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..errors import UserError

ADAMW_FLAGS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True, "foreach": False},
    "foreach": {"fused": False, "foreach": True},
    "loop": {"fused": False, "foreach": False},
}


class OptimizerImplError(UserError, RuntimeError):
    """``train.adamw`` asks for an implementation the parameters' device or dtype do not support."""


def adamw_flags(impl: str) -> dict[str, bool]:
    """The ``fused`` / ``foreach`` constructor flags of ``train.adamw=impl``."""
    try:
        return dict(ADAMW_FLAGS[impl])
    except KeyError:
        raise ValueError(f"train.adamw={impl!r} must be one of {', '.join(ADAMW_FLAGS)}") from None


def check_fused_supported(params: Iterable[torch.Tensor], names: dict[int, str] | None = None) -> None:
    """Raise :class:`OptimizerImplError` (before training, not at the first step) when torch's fused AdamW has no
    kernel for a parameter's device or dtype. Never falls back silently: that would change the numbers."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices  # noqa: PLC0415 - torch-private

    devices = _get_fused_kernels_supported_devices()
    for p in params:
        if p.device.type not in devices or not torch.is_floating_point(p):
            name = (names or {}).get(id(p), f"a {tuple(p.shape)} tensor")
            raise OptimizerImplError(
                f"train.adamw=fused: torch {torch.__version__} has no fused AdamW for parameter {name} "
                f"({p.dtype} on {p.device.type}; fused supports floating point on {', '.join(devices)}); "
                f"use --set train.adamw=foreach or --set train.adamw=loop (either changes the spec hash)")


def make_adamw(groups: list[dict[str, Any]], impl: str, names: dict[int, str] | None = None,
               **hyper: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(groups, **hyper)`` with the flags of ``impl`` set on the optimiser and on every group."""
    flags = adamw_flags(impl)
    if flags["fused"]:
        check_fused_supported((p for g in groups for p in g["params"]), names)
    # a group that brings its own fused / foreach (one copied from another optimiser) would override the flags
    groups = [{k: v for k, v in g.items() if k not in flags} for g in groups]
    opt = torch.optim.AdamW(groups, **hyper, **flags)
    check_flags(opt, impl)
    return opt


def check_flags(opt: torch.optim.Optimizer, impl: str) -> None:
    """Assert that ``opt`` and each of its groups run ``impl`` (no group carrying another optimiser's flags)."""
    flags = adamw_flags(impl)
    for where, d in [("defaults", opt.defaults)] + [(f"param_groups[{i}]", g) for i, g in enumerate(opt.param_groups)]:
        got = {k: bool(d.get(k)) for k in flags}
        if got != flags:
            raise AssertionError(f"optimizer {where} has {got}, train.adamw={impl} needs {flags}")


def load_state(opt: torch.optim.Optimizer, state_dict: dict[str, Any], impl: str) -> None:
    """``opt.load_state_dict(state_dict)``, then the run's implementation put back.

    ``load_state_dict`` replaces every group's hyperparameters with the saved ones, ``fused`` and ``foreach``
    included, and places each ``step`` counter as the *saved* group's flags say (fused: float32 on the
    parameter's device; otherwise as saved). Both are set here as a freshly built optimiser of ``impl`` would
    have them: the flags from ``impl``, a fused step on the parameter's device, an unfused one on the CPU.
    The counters are small integers, exact in float32, so moving them changes no number."""
    opt.load_state_dict(state_dict)
    flags = adamw_flags(impl)
    for group in opt.param_groups:
        group.update(flags)
        fused_or_capturable = group["fused"] or group.get("capturable", False)
        for p in group["params"]:
            st = opt.state.get(p)
            if not st or not torch.is_tensor(st.get("step")):
                continue
            st["step"] = (st["step"].to(dtype=torch.float32, device=p.device) if fused_or_capturable
                          else st["step"].to(device="cpu"))
    opt._step_supports_amp_scaling = flags["fused"]  # noqa: SLF001 - what the constructor sets for fused=True
    check_flags(opt, impl)


def named_ids(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name, for error messages."""
    return {id(p): n for n, p in model.named_parameters()}
