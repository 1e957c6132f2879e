"""Auxiliary routing losses shared by several routers (unweighted; routers apply their weights).

Every loss here returns an exact 0 (not NaN) for an empty batch (T = 0): an
expert-parallel rank or a capacity edge case can route no tokens at all.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import torch
from torch import Tensor, nn

# f_i conventions of the Switch balance loss for k > 1 (see docs/routers.md):
#   "first":   share of tokens whose FIRST choice is expert i. fairseq ``moe/top2gate.py`` /
#              torchscale ``component/xmoe/routing.py`` ``top2gating`` (``ce = mean(mask1)``), DeepSpeed
#              ``deepspeed/moe/sharded_moe.py`` ``top2gating``, GShard's pseudo-code; also X-MoE's
#              MoEc_model ``top1gate.py`` and CompeteSMoE's ``moe_model/model/moe/moe.py`` ``balanceloss``
#              (``one_hot(...)[0]``).
#   "slots":   share of all T*k routing slots that go to expert i (sums to 1). Megatron-Core
#              ``switch_load_balancing_loss_func``; DeepSpeed ``topkgating`` for k > 2 (``/ k``).
#   "k_slots": k times "slots" (sums to k). Hugging Face ``MixtralSparseMoeBlock``'s
#              ``load_balancing_loss_func`` (mean over tokens of the [T, k, E] one-hot, summed over k).
BALANCE_FRACTIONS = ("first", "slots", "k_slots")


def _chosen(indices: Tensor, mode: str, used: Tensor | None) -> Tensor:
    """The choices f_i counts: first choices, or every (used) slot."""
    if mode not in BALANCE_FRACTIONS:
        raise ValueError(f"balance fraction mode must be one of {', '.join(BALANCE_FRACTIONS)}, got {mode!r}")
    if mode == "first":
        return indices[:, 0]  # a variable-k router's first slot is its strongest expert, always used
    return indices.reshape(-1) if used is None else indices.reshape(-1)[used.reshape(-1)]


def expert_fractions(indices: Tensor, num_experts: int, mode: str = "first", used: Tensor | None = None) -> Tensor:
    """f_i of the Switch balance loss from the [T, k] chosen experts (conventions above).

    ``used`` ([T, k] bool), for a variable-k router: only those slots count ("slots" is then the share of the
    used slots; "k_slots" multiplies it by k all the same). An empty batch gives all zeros.
    """
    chosen = _chosen(indices, mode, used)
    counts = torch.bincount(chosen, minlength=num_experts).to(torch.float32)
    if chosen.numel() == 0:
        return counts
    f = counts / chosen.numel()
    if mode == "k_slots":
        f = f * indices.shape[1]
    return f


def switch_balance_loss(probs: Tensor, indices: Tensor, mode: str = "first", used: Tensor | None = None) -> Tensor:
    """Switch Transformer eq. (4): ``E * sum_i f_i * P_i`` with P_i = mean_t p_i(x_t).

    Equals 1 when routing is perfectly uniform (k under "k_slots"); the caller
    multiplies by alpha. f_i is a count (no gradient); the gradient flows
    through P_i. 0 for an empty batch.
    """
    num_experts = probs.shape[-1]
    scope = _ACTIVE_SCOPE.get()
    if scope is not None:  # model.balance_scope=global in a training forward: f_i over the global batch
        f = scope.fractions(indices, num_experts, mode, probs.device, used)
        if probs.shape[0] == 0:
            return probs.float().sum() * 0.0
        return num_experts * torch.sum(f * probs.float().mean(0))
    if probs.shape[0] == 0:
        return probs.float().sum() * 0.0
    f = expert_fractions(indices, num_experts, mode, used).to(probs.device)
    p = probs.float().mean(0)
    return num_experts * torch.sum(f * p)


# -- balance scope: micro-batch or global-batch f_i (model.balance_scope) -----------------------------------------
BALANCE_SCOPES = ("micro", "global")


class GlobalBalance(nn.Module):
    """One MoE layer's running expert counts for the global-batch balance loss (``model.balance_scope=global``).

    Qiu et al. 2025, "Demons in the Detail" (arXiv 2501.11873; used in Qwen3-MoE): the balance loss
    ``E * sum_i f_i P_i`` computed per micro-batch pushes every micro-batch -- a handful of sequences -- to be
    balanced; with f_i taken over the *global* batch (every micro-batch of the optimiser step, on every
    data-parallel rank) only the corpus-level load is balanced. Reference code: Megatron-Core
    ``megatron/core/transformer/moe/router.py`` ``TopKRouter._apply_global_aux_loss`` (routing type
    ``global_aux_loss``): ``get_tokens_per_expert_and_token_count`` (``moe_utils.py``) all-reduces the
    micro-batch's tokens-per-expert over the tensor/data/context-parallel group, the router adds them to its
    ``global_tokens_per_expert`` buffer and counts ``ga_steps``, the loss uses the running mean
    ``global_tokens_per_expert / ga_steps`` as the counts, and ``reset_global_aux_loss_tracker`` zeroes both
    after each optimiser step (``megatron/core/distributed/finalize_model_grads.py``
    ``reset_model_temporary_tensors``); torchtitan PR #3000 all-reduces the counts over the same ranks.

    Here, on each call in a training forward: the micro-batch's counts c_i (the f_i convention's: first
    choices, or all used slots) and its number of counted choices n are all-reduced over the data-parallel
    ranks (``torch.distributed`` when initialised with more than one rank; a single process is the degenerate
    case), added to this layer's running sums C_i, N since the step began, and
    ``f_i = C_i / N`` (times k under "k_slots"). A new ``ctx.step`` starts the sums afresh, i.e. they are
    reset once per optimiser step, as Megatron's tracker is. With equal micro-batches C_i / N is Megatron's
    ``(global_tokens_per_expert / ga_steps) / (topk * total_num_tokens)``.

    P_i stays the mean router probability over *this* micro-batch on this rank. Megatron divides the
    local probability sum by the global token count instead (each rank's loss is its share of a global sum,
    and its parallel groups sum the router's gradient); the harness' DDP *averages* gradients over ranks, so
    with the local mean the averaged gradient is exactly that of ``E * sum_i f_i^global P_i^global`` when
    the ranks hold equal numbers of tokens, and the logged loss is on the same scale as the micro-batch one.
    The harness trains one micro-batch per optimiser step (no gradient accumulation), so in a single process
    ``global`` alone gives the same numbers as ``micro``; under ``--nproc N`` f_i spans the N ranks' shards.
    ``window`` W > 0 (``model.balance_window``) also keeps the (all-reduced) counts of the W previous optimiser
    steps in a buffer and adds them to C_i and N: the balance is then over W + 1 steps' batches even in one
    process -- the buffer Qiu et al. describe for when one step's batch is small (read in secondary summaries
    of the paper, not in its text). Megatron-Core has no such buffer: its tracker is reset every step. With
    W > 0 the counts are stale by up to W steps (the router has moved since); W = 0 is Megatron's rule.
    f_i is a count: no gradient flows through it, and the all-reduce carries no autograd.
    """

    def __init__(self, num_experts: int, window: int = 0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.set_window(window)

    def set_window(self, window: int) -> None:
        """W earlier steps (``model.balance_window``); a new window empties the sums. The sums are checkpointed (persistent
        buffers) when W > 0, so a resumed run balances over the same steps as an uninterrupted one; with W = 0
        they are rebuilt within each step and left out of the state dict (every model's keys stay as they were).
        The same window again keeps the sums (a cooldown branch forked from a trained model goes on with them)."""
        if getattr(self, "balance_counts", None) is not None and self.window == window:
            return
        # row 0: this step's counts and (last column) counted choices; rows 1..W: earlier steps, newest first
        self.register_buffer("balance_counts", torch.zeros(window + 1, self.num_experts + 1, dtype=torch.float64),
                             persistent=window > 0)
        self.register_buffer("balance_step", torch.tensor(-1, dtype=torch.long), persistent=window > 0)

    @property
    def window(self) -> int:
        return self.balance_counts.shape[0] - 1

    @property
    def counts(self) -> Tensor:
        """This step's (all-reduced) counts so far."""
        return self.balance_counts[0, :self.num_experts]

    @property
    def total(self) -> float:
        return float(self.balance_counts[0, self.num_experts])

    def reset(self) -> None:
        self.balance_counts.zero_()
        self.balance_step.fill_(-1)

    @torch.no_grad()
    def fractions(self, indices: Tensor, num_experts: int, mode: str, device: torch.device,
                  used: Tensor | None = None) -> Tensor:
        """f_i from the running global counts, after adding this micro-batch's (all-reduced)."""
        if num_experts != self.num_experts:
            raise ValueError(f"GlobalBalance holds {self.num_experts} experts, the router scored {num_experts}")
        chosen = _chosen(indices, mode, used)
        local = torch.cat([torch.bincount(chosen, minlength=num_experts).to(torch.float64),
                           torch.tensor([float(chosen.numel())], dtype=torch.float64, device=chosen.device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(local)  # SUM over the data-parallel ranks (Megatron: tp_dp_cp_group)
        sums = self.balance_counts
        step = _ACTIVE_STEP.get()
        if int(self.balance_step) != step:  # a new optimiser step: the finished one moves into the buffer
            if self.window > 0 and int(self.balance_step) >= 0:
                sums[1:] = sums[:-1].clone()  # shift: the oldest row drops out
            else:
                sums.zero_()
            sums[0].zero_()
            self.balance_step.fill_(step)
        sums[0] += local.to(sums.device)
        tot = sums.sum(0)
        if float(tot[num_experts]) == 0:
            return torch.zeros(num_experts, dtype=torch.float32, device=device)
        f = (tot[:num_experts] / tot[num_experts]).to(torch.float32)
        if mode == "k_slots":
            f = f * indices.shape[1]
        return f.to(device)


_ACTIVE_SCOPE: contextvars.ContextVar[GlobalBalance | None] = contextvars.ContextVar("balance_scope", default=None)
_ACTIVE_STEP: contextvars.ContextVar[int] = contextvars.ContextVar("balance_step", default=0)


@contextlib.contextmanager
def global_balance(scope: GlobalBalance, step: int) -> Iterator[None]:
    """While active, :func:`switch_balance_loss` takes f_i from ``scope`` (optimiser step ``step``).

    The MoE layer enters it around its router's call in training forwards when its balance scope is
    ``global`` (``harness.layers.moe_layer.MoELayer.route``); every router whose balance loss goes through
    :func:`switch_balance_loss` (smoe and its variants, xmoe, moge, sigmoid_smoe, competesmoe, topp) then
    honours ``model.balance_scope`` without a line of its own.
    """
    t1, t2 = _ACTIVE_SCOPE.set(scope), _ACTIVE_STEP.set(int(step))
    try:
        yield
    finally:
        _ACTIVE_SCOPE.reset(t1)
        _ACTIVE_STEP.reset(t2)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE eq. (5): ``mean_t (logsumexp_i logits_ti)^2``; keeps router logits small. 0 for T = 0."""
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def marginal_entropy_loss(probs: Tensor) -> Tensor:
    """``log E - H(mean_t p_t)``: the entropy ("perplexity") balance regulariser of sigma-MoE.

    Csordas et al. 2023 maximise the entropy of the batch-averaged router
    distribution (``moe.perplexity_reg`` in the CompeteSMoE LM-pretraining sweeps);
    the constant ``log E`` makes it 0 at perfect balance without changing the gradient.
    0 for an empty batch.
    """
    if probs.shape[0] == 0:
        return probs.float().sum() * 0.0
    p = probs.float().mean(0)
    h = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return math.log(probs.shape[-1]) - h


def load_importance_loss(probs: Tensor, topk_logits: Tensor, gate_noise: float) -> Tensor:
    """Tutel's ``load_importance_loss`` (``tutel/impls/losses.py``; Shazeer et al. 2017 Sec. 4 / App. A).

    ``(CV^2(Importance) + CV^2(Load)) / 2`` with Importance_i = sum_t p_ti (``probs``, the
    noise-free softmax), Load_i = sum_t Phi((p_ti - threshold_t) / (gate_noise / E)),
    threshold_t = the k-th selected *noisy logit* of token t (``topk_logits[:, -1]``, as
    Tutel passes it), CV^2 = var / (mean^2 + 1e-10) with the unbiased variance over
    experts. Needs ``gate_noise > 0``. 0 for an empty batch.
    """
    if probs.shape[0] == 0:
        return probs.float().sum() * 0.0
    num_experts = probs.shape[-1]
    p = probs.float()
    imp = p.sum(0)
    l_imp = imp.var() / (imp.mean() ** 2 + 1e-10)
    std = gate_noise / num_experts
    diff = p - topk_logits[:, -1:].float()
    load = (0.5 * (1.0 + torch.erf(diff / (std * math.sqrt(2.0))))).sum(0)  # Normal(0, std).cdf
    l_load = load.var() / (load.mean() ** 2 + 1e-10)
    return (l_imp + l_load) / 2.0
