"""The router contract: a router only *decides*; the harness owns experts and dispatch.

Every routing strategy is a :class:`Router` subclass whose ``forward(x, ctx)``
returns a :class:`Routing`. The MoE layer (``harness.layers.moe``) then runs the chosen
experts on the same kernels for every router, which is what makes speed and
quality comparisons fair.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import BALANCE_FRACTIONS


@dataclass
class Routing:
    """What a router decided for a batch of T tokens, as S slots per token.

    indices:    [T, S] long, the chosen experts per token, S = ``router.num_slots``
                (= ``top_k`` for every fixed-k router).
    weights:    [T, S] float, combine weights (need not sum to 1: StableMoE gates
                with a sigmoid).
    logits:     [T, E] raw scores for diagnostics, or None.
    aux_losses: named scalar losses, *already weighted*; the trainer sums them.
    stats:      router-specific diagnostics (floats), logged per layer.

    Variable-k routers (``Router.variable_k = True``, e.g. expert choice: a token gets
    0..E experts) fill the S slots with the token's experts, strongest first, and mark an
    unused slot by a weight of *exactly* 0; the used slots of a token name distinct experts
    (:func:`slots_from_dense` builds this from a [T, E] weight matrix). The MoE layer drops
    unused slots before dispatch and from the expert loads; for a fixed-k router every slot
    is used, whatever its weight.
    """

    indices: Tensor
    weights: Tensor
    logits: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


class RouteContext:
    """What the layer knows about the batch, handed to the router.

    ``token_ids`` ([T] long) and ``embeddings`` ([T, d], the model's input
    embeddings) let routers such as StableMoE route on the token itself;
    ``positions`` ([T] long) is each token's position in its sequence (0 starts a
    sequence; patch index for vision). ``patches`` ([T, f] float) is the raw input each
    token was embedded from -- in vision the pixels of its patch, flattened in the patch
    embedding's order (``F.unfold``: channel, then row, then column; f = C * p * p), zero
    rows for the class and register tokens; set by ``harness.models.vit`` inside the model's
    forward, None in the LM (whose raw input is ``token_ids``): the content a router can
    route on when there is no vocabulary (StableMoE's distilled router).

    ``causal`` is True in a causal (decoder) LM: a token's routing must then not depend on
    later tokens of its sequence, so a router that pools over the batch (expert choice)
    picks a causal rule; set by
    ``harness.models.lm.MoEDecoderLM``, False elsewhere (vision). ``shared`` is one dict per
    model forward pass, seen by every layer: routers that coordinate across
    layers (CompeteSMoE's "at most n competing layers per step") keep counters in it.

    ``step`` / ``total_steps`` are the layer's: the optimiser step this training forward belongs to, where the
    global-batch balance (``model.balance_scope=global``) starts its sums afresh. A router's schedule (warm-up,
    stages, annealing) reads the step from :meth:`Router.on_step`, the one step channel to routers (issue 32;
    CompeteSMoE read ``ctx.step`` where ``on_step`` had not been called, the only router that did).

    ``all_expert_outputs()`` runs *every* expert on every token once and
    memoises the result ([T, E, d]); when a router called it, the layer combines
    from it instead of running the experts again. The layer provides those experts
    with :meth:`attach_experts` (or whoever builds the context, with ``expert_fn``).
    """

    def __init__(
        self,
        *,
        training: bool = False,
        step: int = 0,
        total_steps: int = 1,
        token_ids: Tensor | None = None,
        embeddings: Tensor | None = None,
        positions: Tensor | None = None,
        patches: Tensor | None = None,
        layer_index: int = 0,
        shared: dict[str, Any] | None = None,
        expert_fn: Callable[[], Tensor] | None = None,
        causal: bool = False,
    ) -> None:
        self.training = training
        self.step = step
        self.total_steps = total_steps
        self.token_ids = token_ids
        self.embeddings = embeddings
        self.positions = positions
        self.patches = patches
        self.layer_index = layer_index
        self.causal = causal
        self.shared = shared if shared is not None else {}
        self._expert_fn = expert_fn
        self._all_outputs: Tensor | None = None

    def attach_experts(self, fn: Callable[[], Tensor]) -> None:
        """``fn()`` -> [T, E, d]: every expert on every token of this batch (called at most once, lazily).

        The MoE layer attaches its experts before it calls the router; attaching forgets the
        outputs of experts attached before.
        """
        self._expert_fn = fn
        self._all_outputs = None

    def all_expert_outputs(self) -> Tensor:
        """[T, E, d] outputs of every expert for every token (computed once)."""
        if self._all_outputs is None:
            if self._expert_fn is None:
                raise RuntimeError("this RouteContext has no experts attached (not called from an MoE layer)")
            self._all_outputs = self._expert_fn()
        return self._all_outputs

    @property
    def has_all_expert_outputs(self) -> bool:
        return self._all_outputs is not None


class Router(nn.Module):
    """Base class of every routing strategy.

    Subclasses take ``(d_model, num_experts, top_k, **hparams)``; each
    hyper-parameter is a keyword argument with the paper's default. The base
    constructor checks the common arguments; :meth:`check_hparams` lets a
    subclass reject values outside their domain with its name and the key.

    Class attributes a router may set:
      description:       one line shown by ``harness routers``.
      capacity_factor:   the capacity the paper trains with (None = no dropping);
                         a spec's ``model.capacity_factor`` overrides it.
      is_dense:          True only for the dense FFN baseline.
      variable_k:        True for a router that gives a token a variable number of experts
                         (expert choice): it returns ``num_slots`` slots per token (default E)
                         and marks unused ones by weight exactly 0 (see :class:`Routing`).
                         ``top_k`` is then its compute budget (mean experts per token), not a
                         per-token count.
      variants:          named sets of hyper-parameters, e.g. ``{"paper": {...}, "code": {...}}``;
                         ``name@variant`` (CLI ``--routers``, suite YAML ``routers:``) builds the
                         router with those keyword arguments as its defaults (``harness.routing.registry``).

    Routers decide in fp32: compute scores from fp32 weights and inputs with autocast
    disabled (``harness.conformance`` runs every router under bf16 autocast and
    requires the same decisions and fp32 logits).
    """

    description: ClassVar[str] = ""
    capacity_factor: ClassVar[float | None] = None
    is_dense: ClassVar[bool] = False
    variable_k: ClassVar[bool] = False
    supports_top_k: ClassVar[tuple[int, ...] | None] = None  # e.g. (1,) for StableMoE
    variants: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        name = getattr(type(self), "router_name", type(self).__name__)
        if d_model <= 0:
            raise ValueError(f"router {name!r}: d_model must be positive, got {d_model}")
        if num_experts <= 0:
            raise ValueError(f"router {name!r}: num_experts must be positive, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"router {name!r}: top_k={top_k} must be in [1, num_experts={num_experts}]")
        if self.supports_top_k is not None and top_k not in self.supports_top_k:
            raise ValueError(f"router {name!r}: top_k={top_k} not supported (supports {list(self.supports_top_k)})")
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k

    @property
    def num_slots(self) -> int:
        """Columns S of ``Routing.indices`` / ``weights``: ``top_k``; E for a variable-k router
        (which may override this with a smaller bound on the experts of one token)."""
        return self.num_experts if self.variable_k else self.top_k

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_step(self, step: int, total_steps: int) -> None:
        """The one step channel to a router: called (through the model's ``on_step``) before each optimiser
        step, and by the benchmarks before they time a router at a point of its schedule. A router that was
        never told is at step 0 of 1. Schedules, stages and annealing read it here, not ``RouteContext.step``."""

    # -- helpers -----------------------------------------------------------
    @classmethod
    def effective_top_k(cls, top_k: int) -> int:
        """``top_k`` if supported, else the largest supported k below it (else the smallest).

        The one rule for routers with a fixed k (StableMoE is top-1): a top-2 suite runs
        them at k=1 and records that k with the run.
        """
        supported = cls.supports_top_k
        if not supported or top_k in supported:
            return top_k
        return max([k for k in supported if k <= top_k] or [min(supported)])

    @classmethod
    def hparam_names(cls) -> list[str]:
        """Keyword hyper-parameters accepted by the constructor (beyond d/E/k)."""
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name not in ("self", "d_model", "num_experts", "top_k")
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    @classmethod
    def hparam_defaults(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        return {n: sig.parameters[n].default for n in cls.hparam_names()}


def slots_from_dense(weights: Tensor, chosen: Tensor, num_slots: int | None = None) -> tuple[Tensor, Tensor]:
    """[T, E] combine weights and a [T, E] bool ``chosen`` mask -> ``(indices, weights)`` of [T, S] slots.

    The variable-k encoding of :class:`Routing`: each token's chosen experts by decreasing
    weight (ties: lower expert first), then its other experts in expert order with weight
    exactly 0 (so the indices of a row are distinct). ``num_slots`` S (default E) keeps the
    first S slots: a token chosen by more experts keeps its S strongest. Gradients flow to
    ``weights`` at the chosen entries only.
    """
    T, E = weights.shape
    S = E if num_slots is None else num_slots
    if not 1 <= S <= E:
        raise ValueError(f"num_slots={S} must be in [1, {E}]")
    w = torch.where(chosen, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
    # chosen first (key >= 0 for non-negative weights), by decreasing weight; unchosen keep expert order
    key = torch.where(chosen, w.detach().float(), torch.full((), -1.0, device=weights.device))
    idx = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :S]
    return idx, w.gather(1, idx)


def fp32_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T (+ bias)`` in fp32 with autocast off: the routing scores of every baseline.

    Under bf16 autocast ``nn.Linear`` would run the gate matmul in bf16 (logit errors
    of ~1e-2 change the top-k set of a few percent of tokens at E = 64); the
    reference code computes the gate in fp32 (DeepSpeed ``TopKGate.forward``:
    ``input.float()`` and ``wg.weight.float()``; ST-MoE Sec. 3.2).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def check_range(router: str, key: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, integer: bool = False, optional: bool = False,
                note: str = "") -> None:
    """Reject a hyper-parameter outside ``[lo, hi]`` with the router's name and the key.

    ``lo_open`` / ``hi_open`` exclude the bound (``> lo`` / ``< hi``); NaN is outside every bounded range.
    ``integer``: only an ``int`` is accepted (never a bool or a float such as 2.0); ``optional``: ``None``
    (``null`` in a YAML: the documented "off" or default) is accepted too. ``note`` is appended to the message
    (why the bound is what it is, e.g. the hyper-parameter it comes from).
    """
    if optional and value is None:
        return
    ok = not integer or (isinstance(value, int) and not isinstance(value, bool))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if ok:
        return
    if lo is not None and hi is not None:
        domain = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        domain = f"{'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        domain = f"{'<' if hi_open else '<='} {hi}"
    else:
        domain = ""
    domain = " ".join(x for x in ("an integer" if integer else "", domain, "or null" if optional else "") if x)
    raise ValueError(f"router {router!r}: hyper-parameter {key}={value!r} must be {domain}{' ' + note if note else ''}")


def check_choice(router: str, key: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Reject a hyper-parameter that is not one of ``choices`` with the router's name and the key."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"router {router!r}: hyper-parameter {key}={value!r} must be one of {allowed}")


def check_gate_options(router: str, balance_fraction: str, renormalize: bool | str) -> None:
    """The two options every softmax-top-k router shares (see baselines/smoe.py and harness/losses.py)."""

    check_choice(router, "balance_fraction", balance_fraction, BALANCE_FRACTIONS)
    check_choice(router, "renormalize", renormalize, ("auto", True, False))
