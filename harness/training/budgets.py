"""Several training budgets from one run: WSD cooldown branches (``train.budgets``; issue 28).

Under ``train.schedule: wsd`` the learning rate before a budget's decay does not depend on the budget, so
the run of ``steps = b`` and the long run (the *trunk*) are the same model up to ``decay_start(b)``. At that
step the loop forks a **branch**: model, optimiser, scheduler, router state and routing-health tracker are
copied, the branch trains steps ``decay_start(b) .. b-1`` on the very batches the trunk would see, with the
learning rate of a WSD run of ``b`` steps, then evaluates the whole validation and test splits. Its metrics
are recorded as ``<name>@<b>`` and the branch is dropped; the RNG states are put back, so the trunk continues
as if no branch had run. The trunk's own decay is the last budget, ``train.steps``.

What a budget means for routers whose schedule is tied to the total step count (StableMoE's stage switch at
``stage1_fraction * total``, CompeteSMoE's competition warm-up, MoGE's sigma annealing over ``step / total``,
auxiliary-loss-free's bias updates): **every branch keeps the trunk's schedule** -- routers see
``total_steps = train.steps`` in the trunk and in every branch. A branch at ``b`` is therefore "the trunk's
model cooled down at ``b``": for a router that ignores ``total_steps`` (smoe, xmoe, hash, ...) it is exactly
the WSD run of ``steps = b`` (tests/test_budgets.py checks it bit for bit); for StableMoE at a budget below its
stage switch it is a stage-1 model, as it would be at that step of the long run. docs/benchmark.md lists it
per router.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..routing.router import Routing
from ..spec import RunSpec
from .optim import load_state, make_adamw
from .schedule import decay_start, lr_factor, make_scheduler


@dataclass(frozen=True)
class Branch:
    budget: int
    fork: int  # the trunk step at which the branch forks (its first step)


def branches(run: RunSpec) -> list[Branch]:
    """The cooldown branches of a run, in the order the trunk reaches their forks (none unless wsd + budgets)."""
    t = run.train
    if t.schedule != "wsd":
        return []
    out = [Branch(b, decay_start(b, t.decay_fraction)) for b in t.budgets if b < t.steps]
    return sorted(out, key=lambda br: (br.fork, br.budget))


def budget_name(name: str, budget: int) -> str:
    """The stored name of a metric at a budget: ``val_bpb@250``."""
    return f"{name}@{budget}"


def parse_budget_name(stored: str) -> tuple[str, int]:
    """The inverse of :func:`budget_name`: ``val_bpb@250`` -> ``("val_bpb", 250)``."""
    name, _, budget = stored.rpartition("@")
    return name, int(budget)


def fork(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, run: RunSpec,
         budget: int) -> tuple[nn.Module, Any, Any]:
    """Copies of the trunk's model and optimiser, and the schedule of a WSD run of ``budget`` steps at the
    trunk's step. The optimiser state is deep-copied: AdamW updates its moments in place."""
    # the layers keep their last forward's Routing (tensors inside the autograd graph, which deepcopy refuses);
    # the branch starts without one, as a freshly built model does
    memo: dict[int, Any] = {id(m.last_routing): None for m in model.modules()
                            if isinstance(getattr(m, "last_routing", None), Routing)}
    b_model = copy.deepcopy(model, memo)
    b_opt = _mirror_optimizer(opt, model, b_model, run.train.adamw)
    load_state(b_opt, copy.deepcopy(opt.state_dict()), run.train.adamw)  # the trunk's moments, the spec's AdamW
    b_sched = make_scheduler(b_opt, run.train, total=budget)
    b_sched.load_state_dict(sched.state_dict())  # step count and base rates; the lambda stays the budget's
    factor = lr_factor(run.train, budget)
    # the learning rate of the branch's first step: the budget's schedule at this step (its stable 1.0), set
    # from the same function a WSD run of `budget` steps evaluates, so the two agree to the last bit
    for group, base in zip(b_opt.param_groups, b_sched.base_lrs):
        group["lr"] = base * factor(b_sched.last_epoch)
    b_sched._last_lr = [g["lr"] for g in b_opt.param_groups]  # noqa: SLF001 - what get_last_lr() reports
    return b_model, b_opt, b_sched


def _mirror_optimizer(opt: torch.optim.Optimizer, model: nn.Module, b_model: nn.Module,
                      impl: str) -> torch.optim.Optimizer:
    """An AdamW (``train.adamw=impl``, passed to the constructor) over the copy's parameters, group for group as
    the trunk's was built.

    Not ``make_optimizer(b_model)``: that lists only parameters that train *now*, and a router may have frozen
    some since step 0 (StableMoE's distilled router in stage 2), so its groups would not match the state."""
    names = {id(p): n for n, p in model.named_parameters()}
    b_params = dict(b_model.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [b_params[names[id(p)]] for p in g["params"]]}
              for g in opt.param_groups]
    # every group carries all its hyperparameters; make_adamw drops their fused / foreach and passes impl's
    return make_adamw(groups, impl, {id(p): n for n, p in b_params.items()})
