"""Expert parallelism: each rank holds E / world experts; tokens travel to their expert and back.

A router needs no change to run expert-parallel. It still sees the token's
``[T, E]`` logits over *all* E experts and returns ``[T, k]`` choices; only the
layer's dispatch differs from :class:`harness.layers.moe_layer.MoELayer`, in the two public steps
where tokens meet experts, :meth:`~ExpertParallelMoELayer.run_experts` and
:meth:`~ExpertParallelMoELayer.all_expert_outputs` (``route``, ``permute`` and ``combine`` are the
single-process layer's own):

  1. exactly the single-process slot order and capacity rule (k-major slots,
     stable sort by expert, ``ceil(c * T_local * k / E)`` per expert, where
     T_local is this rank's tokens — the same per-rank semantics as data
     parallelism);
  2. the per-expert slot counts are exchanged first (``all_to_all_single`` of
     an ``[E]`` vector: rank q learns how many slots each rank sends to each of
     its experts);
  3. the expert-sorted tokens are exchanged (``all_to_all_single`` with those
     split sizes; rank r owns experts ``[r * E/W, (r+1) * E/W)``, so the slots
     for one destination rank are already contiguous);
  4. the received rows (grouped by source rank) are regrouped by local expert,
     run through the local :class:`ExpertShard` (the bank's kernel, ``experts_impl``,
     as ``ExpertBank.forward_sorted``), put back in arrival order and
     exchanged back with the split sizes swapped;
  5. combine weights and the scatter-add happen on the token's own rank.

Both exchanges are autograd functions whose backward is the reverse
``all_to_all_single``, so gradients reach the owning rank's expert weights
and the sending rank's activations.

The all-expert path (``ctx.all_expert_outputs()``, CompeteSMoE's competition
steps) is exact too: every rank sends *all* of its tokens to every rank
(an all-gather expressed as ``all_to_all_single``), each rank runs its E/W
experts on all of them and sends each rank its ``[T_r, E/W, d]`` slice back,
which the token's rank concatenates along the expert axis into ``[T_r, E, d]``.

Collectives: every rank must call the layer the same number of times with the
same routing *path* (dispatch vs all-expert). The harness seeds every rank
identically, so routers that draw random decisions from the global torch RNG
(CompeteSMoE's competition schedule) decide the same on every rank. The
exchanges run on their own process group so they never interleave with DDP's
gradient all-reduce on the default group.

Gradients and DDP: expert weights are *not* replicated, so they are excluded
from DDP (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``);
autograd already sums over ranks the gradient of every rank's loss into the
owner's experts. DDP *averages* the replicated parameters' gradients, so the
trainer divides the expert gradients by the world size
(:func:`scale_expert_grads`) to optimise the same objective, and
:func:`clip_grad_norm_` computes the global norm over replicated + all shards.

Checkpoints stay in the single-process format: :func:`full_state_dict` gathers
the shards, and :class:`ExpertShard` slices a full ``[E, ...]`` tensor to its
own experts when a state dict is loaded, so ``model.pt`` of an expert-parallel
run loads into a plain single-process model (lm-eval, ``harness show``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..routing.router import Router
from .experts import ExpertBank
from .moe_layer import Dispatch, MoELayer

EXPERT_PARAM_NAMES = ("w1", "b1", "w2", "b2")


# -- differentiable all_to_all ---------------------------------------------------------------

class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:  # noqa: D102
        ctx.splits, ctx.group = (out_splits, in_splits), group
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        out_splits, in_splits = ctx.splits
        grad = grad.contiguous()
        gin = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(gin, grad, in_splits, out_splits, group=ctx.group)
        return gin, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any = None) -> Tensor:
    """``all_to_all_single`` along dim 0 with autograd (backward = the reverse exchange)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def exchange_counts(send: Tensor, group: Any = None) -> Tensor:
    """[W * n] long -> [W * n]: block q of the result is what rank q put in *our* block (no autograd)."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    return recv


# -- the local experts --------------------------------------------------------------------------

class ExpertShard(ExpertBank):
    """Experts ``[offset, offset + n)`` of an E-expert bank (same kernels as :class:`ExpertBank`).

    Loading a state dict accepts either this shard's ``[n, ...]`` tensors or the
    full ``[E, ...]`` ones (sliced), so single-process checkpoints load here.
    """

    def __init__(self, full: ExpertBank, offset: int, n: int) -> None:
        with torch.device("meta"):  # build without drawing initial weights from the RNG
            super().__init__(n, full.d_model, full.d_ff, full.activation, experts_impl=full.experts_impl)
        self.expert_offset = offset
        self.global_num_experts = full.num_experts
        for name in EXPERT_PARAM_NAMES:
            src = getattr(full, name)
            setattr(self, name, nn.Parameter(src.detach()[offset:offset + n].clone(), requires_grad=src.requires_grad))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: ANN001
        lo, hi = self.expert_offset, self.expert_offset + self.num_experts
        sliced = {}
        for name in EXPERT_PARAM_NAMES:
            t = state_dict.get(prefix + name)
            if t is not None and t.shape[0] == self.global_num_experts != self.num_experts:
                sliced[prefix + name] = t[lo:hi]
        if sliced:  # never mutate the caller's dict
            state_dict = {**state_dict, **sliced}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"experts [{self.expert_offset}, {self.expert_offset + self.num_experts}) of {self.global_num_experts}"


# -- the layer ------------------------------------------------------------------------------------

class ExpertParallelMoELayer(MoELayer):
    """:class:`MoELayer` whose experts are sharded over the ranks of ``group`` (default: the world).

    Build it like an ``MoELayer`` (the full bank is initialised exactly as in a
    single process, then sliced), or convert a built layer with
    :meth:`from_layer` / :func:`shard_experts` (no new random numbers drawn).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        router: Router,
        capacity_factor: float | None = None,
        activation: str = "gelu",
        experts: ExpertBank | None = None,
        group: Any = None,
    ) -> None:
        super().__init__(d_model, d_ff, router, capacity_factor=capacity_factor, activation=activation,
                         experts=experts)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ExpertParallelMoELayer needs torch.distributed to be initialised (run under torchrun)")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        E = self.num_experts
        if E % self.world_size:
            raise ValueError(f"expert parallelism needs num_experts ({E}) divisible by the world size "
                             f"({self.world_size})")
        self.local_experts = E // self.world_size
        self.experts = ExpertShard(self.experts, self.rank * self.local_experts, self.local_experts)

    @classmethod
    def from_layer(cls, layer: MoELayer, group: Any = None) -> "ExpertParallelMoELayer":
        """The expert-parallel twin of ``layer``: same router (shared), this rank's slice of its experts."""
        bank = layer.experts
        twin = cls(bank.d_model, bank.d_ff, layer.router, capacity_factor=layer.capacity_factor,
                   activation=bank.activation, experts=bank, group=group)
        twin.set_balance_scope(layer.balance_scope, layer.global_balance.window)  # the layer's config, carried
        return twin

    # -- dispatch: slots of this rank's tokens -> owning ranks -> back -----------------------
    def run_experts(self, d: Dispatch) -> Tensor:
        x_sorted = d.rows()
        W, El = self.world_size, self.local_experts
        send_counts = d.counts.to(torch.long).reshape(W, El)
        recv_counts = exchange_counts(send_counts.reshape(-1), self.group).reshape(W, El)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        x_recv = all_to_all(x_sorted, recv_splits, send_splits, self.group)  # grouped by source rank
        # regroup (source, local expert) -> (local expert, source); a stable sort keeps source order
        local_e = torch.arange(El, device=x_sorted.device).repeat(W).repeat_interleave(recv_counts.reshape(-1))
        perm = torch.argsort(local_e, stable=True)
        out_local = self.experts.forward_sorted(x_recv.index_select(0, perm), recv_counts.sum(0).tolist())
        if out_local.shape[0] == 0 and torch.is_grad_enabled():
            # No token came to this rank's experts. Keep both exchanges in the autograd graph anyway:
            # every rank must run the reverse all_to_all in backward, or the ranks' collectives pair up
            # wrongly; and give the experts a zero gradient, as the stacked single-process bank gets
            # (AdamW then decays them as it would there). An empty sum is exactly 0 and adds nothing.
            touch = x_recv[:0].sum()
            for p in self.experts.parameters():
                touch = touch + p[:0].sum()
            out_local = out_local + touch
        out_recv = out_local.index_select(0, torch.argsort(perm))  # back to arrival order
        return all_to_all(out_recv, send_splits, recv_splits, self.group)

    # -- all-expert path: all tokens to every rank, [T_r, E/W, d] slices back -----------------
    def all_expert_outputs(self, x: Tensor) -> Tensor:
        W, El = self.world_size, self.local_experts
        T, d = x.shape
        sizes = exchange_counts(torch.full((W,), T, dtype=torch.long, device=x.device), self.group).tolist()
        x_all = all_to_all(x.repeat(W, 1), sizes, [T] * W, self.group)        # [sum T_q, d]
        y = self.experts.forward_all(x_all)                                    # [sum T_q, El, d]
        back = all_to_all(y.reshape(y.shape[0], El * y.shape[-1]), [T] * W, sizes, self.group)  # [W*T, El*d]
        return back.reshape(W, T, El, -1).permute(1, 0, 2, 3).reshape(T, W * El, -1)


# -- whole-model helpers (used by the ExpertParallel strategy below) ------------------------------------

def shard_experts(model: nn.Module, group: Any = None) -> list[str]:
    """Replace every ``MoELayer`` of ``model`` by its expert-parallel twin, in place.

    Returns the qualified names of the (local, not replicated) expert parameters,
    i.e. what DDP must ignore.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, MoELayer) and not isinstance(m, ExpertParallelMoELayer)]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not child:
            raise ValueError("shard_experts: pass a model that contains MoE layers, not a bare MoELayer")
        setattr(parent, child, ExpertParallelMoELayer.from_layer(layer, group))
    return expert_param_names(model)


def expert_param_names(model: nn.Module) -> list[str]:
    return [f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, ExpertShard)
            for p in EXPERT_PARAM_NAMES]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ExpertShard) for p in m.parameters()]


def has_expert_shards(model: nn.Module) -> bool:
    return any(isinstance(m, ExpertShard) for m in model.modules())


def scale_expert_grads(model: nn.Module, world_size: int) -> None:
    """Expert grads hold the *sum* over ranks' losses; DDP averages the rest: divide by W to match."""
    _scale_grads(expert_parameters(model), world_size)


def _scale_grads(params: list[nn.Parameter], world_size: int) -> None:
    if world_size > 1:
        for p in params:
            if p.grad is not None:
                p.grad.div_(world_size)


def clip_grad_norm_(model: nn.Module, max_norm: float, group: Any = None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over replicated parameters plus every rank's expert shard."""
    return _clip_grad_norm(model, {id(p) for p in expert_parameters(model)}, max_norm, group)


def _clip_grad_norm(model: nn.Module, local: set[int], max_norm: float, group: Any) -> Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    rep = [p.grad for p in params if id(p) not in local]
    own = [p.grad for p in params if id(p) in local]
    dev = params[0].grad.device if params else torch.device("cpu")
    sq_rep = torch.zeros((), device=dev, dtype=torch.float32)
    sq_own = torch.zeros((), device=dev, dtype=torch.float32)
    for g in rep:
        sq_rep += torch.linalg.vector_norm(g, 2).float() ** 2
    for g in own:
        sq_own += torch.linalg.vector_norm(g, 2).float() ** 2
    dist.all_reduce(sq_own, group=group)
    total = torch.sqrt(sq_rep + sq_own)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return total


def full_state_dict(model: nn.Module, group: Any = None) -> dict[str, Tensor]:
    """``model.state_dict()`` with every expert shard gathered to the full ``[E, ...]`` tensor.

    A collective: every rank must call it. The result is in the single-process format.
    """
    sd = model.state_dict()
    world = dist.get_world_size(group)
    for name, m in model.named_modules():
        if not isinstance(m, ExpertShard):
            continue
        for p in EXPERT_PARAM_NAMES:
            t = getattr(m, p).detach().contiguous()
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t, group=group)
            sd[f"{name}.{p}"] = torch.cat(parts, 0)
    return sd


def count_parameters(model: nn.Module, group: Any = None) -> int:
    """Parameters of the whole (unsharded) model: replicated ones once, expert shards summed over ranks."""
    shards = {id(p) for p in expert_parameters(model)}
    rep = sum(p.numel() for p in model.parameters() if id(p) not in shards)
    own = sum(p.numel() for p in model.parameters() if id(p) in shards)
    if shards:
        t = torch.tensor([own], dtype=torch.long, device=next(iter(expert_parameters(model))).device)
        dist.all_reduce(t, group=group)
        own = int(t.item())
    return rep + own



# -- the expert-parallel training strategy -------------------------------------------------------------

class ExpertParallel:
    """The parallel strategy of ``--nproc N`` with ``model.expert_parallel`` (harness.training.strategy lists
    the three). Chosen once by ``harness.training.distributed.wrap_model``; constructing it shards the
    model's experts in place (:func:`shard_experts`), and the expert parameters are found here once, not on
    every step.

    ``ctx`` is the process's ``harness.training.distributed.DistContext`` (``world_size``, ``rank``,
    ``expert_group``, ``gather``); this layer module does not import the training package.
    """

    kind = "expert_parallel"
    shards_optimizer = True  # each rank's optimiser holds its own experts' moments

    def __init__(self, model: nn.Module, ctx: Any) -> None:
        self.model = self.module = model
        self.ctx = ctx
        self._ignore = shard_experts(model, ctx.expert_group)   # names DDP must not replicate
        self._experts = expert_parameters(model)                 # this rank's shards, found once
        self._expert_ids = {id(p) for p in self._experts}

    def wrap(self, device: torch.device) -> nn.Module:
        """DDP over the replicated parameters (``find_unused_parameters``: see ``DataParallel``)."""
        if self._ignore:
            DDP._set_params_and_buffers_to_ignore_for_model(self.model, self._ignore)
        self.module = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=True)
        return self.module

    def finish_grads(self) -> None:
        """Expert shards hold summed grads, DDP averaged the rest -> make them agree."""
        _scale_grads(self._experts, self.ctx.world_size)

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        return _clip_grad_norm(self.model, self._expert_ids, max_norm, self.ctx.expert_group)

    def model_state(self) -> dict[str, Tensor]:
        """The single-process-format state dict, shards gathered (a collective: every rank calls it)."""
        return full_state_dict(self.model, self.ctx.expert_group)

    def optimizer_state(self, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], list[Any] | None]:
        """(this rank's state on CPU, every rank's state on rank 0 / None elsewhere): a collective."""
        cpu = to_cpu(opt.state_dict())
        return cpu, self.ctx.gather(cpu)

    def count_parameters(self) -> int:
        return count_parameters(self.model, self.ctx.expert_group)


def to_cpu(obj: Any) -> Any:
    """``obj`` (tensors in dicts, lists, tuples) with every tensor detached and on the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
