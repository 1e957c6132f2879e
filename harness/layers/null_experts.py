"""Zero-computation experts (MoE++, Jin et al. 2024, arXiv 2410.07348): experts that run no FFN.

MoE++ puts three kinds of "experts" beside the FFN experts of a token-choice MoE layer, all routed like any
other expert (the router scores E_ffn + n_null experts):

* zero:     E(x) = 0                          -- the slot is discarded;
* copy:     E(x) = x                          -- the token skips the slot;
* constant: E(x) = a_1 x + a_2 v,  [a_1, a_2] = softmax(W_c x)   -- W_c in R^{2 x d} (no bias), v in R^d learned.

Reference code: ``SkyworkAI/MoE-plus-plus`` ``MoE++/moe_plus_plus_layer.py`` (``ZeroExpert``, ``CopyExpert``,
``ConstantExpert``; ``Experts`` orders them after the FFNs: the constant experts, then the copy expert, the zero
expert last). Here the same order: experts ``0 .. E_ffn-1`` are FFNs, then ``constant``, ``copy``, ``zero``
(:data:`NULL_KINDS`). Init as the reference: v ~ N(0, 1) (``torch.nn.init.normal_(self.constant)``), W_c as
``nn.Linear(d, 2, bias=False)`` (U(+-1/sqrt(d))).

The MoE layer (:mod:`.moe_layer`) leaves the slots that chose a null expert out of the FFN plan and adds their
weighted outputs in ``combine`` (:meth:`NullExperts.outputs`); ``ctx.all_expert_outputs()`` gets their columns
too (:meth:`NullExperts.forward_all`), so a router that compares every expert's output sees them.

Where the numbers come from: ``model.zero_experts`` / ``copy_experts`` / ``constant_experts`` (spec keys, any
token-choice router, default 0 = none and out of the spec hash), or a router class that pins its own mix with a
class attribute ``null_experts = {"constant": 2, "copy": 1, "zero": 1}`` (``moepp``: MoE++'s last four experts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

NULL_KINDS = ("constant", "copy", "zero")  # their order after the FFN experts (MoE++ ``Experts``)
NULL_EXPERT_KEYS = ("zero_experts", "copy_experts", "constant_experts")  # the spec keys (model.<key>)

# forward FLOPs per slot of each kind, counting a multiply-add as 2 (for the FFN: 2 * (d*f + f*d) = 4 d f)
_CONST_FLOPS_PER_D = 4 + 3   # softmax(W_c x): 2 x 2d for the [2, d] matmul; a_1 x + a_2 v: 2 products + 1 sum per element


def _check_count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class NullMix:
    """How many experts of each zero-computation kind a layer has (after its FFN experts)."""

    constant: int = 0
    copy: int = 0
    zero: int = 0

    def __post_init__(self) -> None:
        for kind in NULL_KINDS:
            _check_count(f"{kind}_experts", getattr(self, kind))

    @classmethod
    def from_keys(cls, zero_experts: int = 0, copy_experts: int = 0, constant_experts: int = 0) -> "NullMix":
        return cls(constant=constant_experts, copy=copy_experts, zero=zero_experts)

    @classmethod
    def from_mapping(cls, m: Mapping[str, int]) -> "NullMix":
        unknown = sorted(set(m) - set(NULL_KINDS))
        if unknown:
            raise ValueError(f"null experts: unknown kind(s) {', '.join(unknown)}; kinds: {', '.join(NULL_KINDS)}")
        return cls(**{k: int(v) for k, v in m.items()})

    @property
    def total(self) -> int:
        return self.constant + self.copy + self.zero

    def kinds(self) -> tuple[str, ...]:
        """The kind of each null expert, in routing order (null expert j is expert E_ffn + j)."""
        return ("constant",) * self.constant + ("copy",) * self.copy + ("zero",) * self.zero

    def describe(self) -> str:
        return ", ".join(f"{getattr(self, k)} {k}" for k in NULL_KINDS if getattr(self, k)) or "none"


def pinned_mix(router_cls: type) -> NullMix | None:
    """The mix a router class pins (its ``null_experts`` class attribute), or None."""
    pinned = getattr(router_cls, "null_experts", None)
    return NullMix.from_mapping(pinned) if pinned else None


def resolve_mix(router_cls: type, spec_mix: NullMix, router_name: str = "") -> NullMix:
    """The layer's null experts: the spec's (``model.*_experts``), or the router's pinned mix; both is an error."""
    pinned = pinned_mix(router_cls)
    if pinned is not None and spec_mix.total:
        name = router_name or getattr(router_cls, "router_name", router_cls.__name__)
        raise ValueError(f"router {name!r} pins its null experts ({pinned.describe()}); leave model.zero_experts, "
                         f"copy_experts and constant_experts at 0 for it")
    return pinned if pinned is not None else spec_mix


class NullExperts(nn.Module):
    """The zero-computation experts of one MoE layer; parameters only for the constant experts."""

    def __init__(self, d_model: int, mix: NullMix) -> None:
        super().__init__()
        self.mix, self.d_model = mix, d_model
        self.register_buffer("kind_code", torch.tensor([NULL_KINDS.index(k) for k in mix.kinds()], dtype=torch.long),
                             persistent=False)
        if mix.constant:
            self.const_gate = nn.Parameter(torch.empty(mix.constant, 2, d_model))  # W_c, one [2, d] per constant expert
            self.const_vec = nn.Parameter(torch.empty(mix.constant, d_model))      # v
            bound = 1 / math.sqrt(d_model)  # nn.Linear(d, 2, bias=False)'s default init
            with torch.no_grad():
                for c in range(mix.constant):
                    self.const_gate[c].uniform_(-bound, bound)
                    self.const_vec[c].normal_()
        else:
            self.const_gate = self.const_vec = None

    def _constant(self, c: int, x: Tensor) -> Tensor:
        a = torch.softmax(x @ self.const_gate[c].to(x.dtype).t(), dim=-1)  # [n, 2]
        return a[:, :1] * x + a[:, 1:] * self.const_vec[c].to(x.dtype)

    def outputs(self, x: Tensor, local: Tensor) -> Tensor:
        """[n, d] outputs of null expert ``local[i]`` (0-based among the null experts) on row ``x[i]``."""
        out = torch.zeros_like(x)
        kind = self.kind_code[local]
        out = torch.where((kind == NULL_KINDS.index("copy")).unsqueeze(-1), x, out)
        for c in range(self.mix.constant):  # constant expert c is null expert c
            out = torch.where((local == c).unsqueeze(-1), self._constant(c, x), out)
        return out

    def forward_all(self, x: Tensor) -> Tensor:
        """Every null expert on every token: [T, d] -> [T, n_null, d]."""
        cols = [self._constant(c, x) for c in range(self.mix.constant)]
        cols += [x] * self.mix.copy + [torch.zeros_like(x)] * self.mix.zero
        return torch.stack(cols, dim=1) if cols else x.new_zeros(x.shape[0], 0, x.shape[1])

    def flops(self, counts: Tensor) -> int:
        """Forward FLOPs of ``counts[j]`` slots on null expert j: constant ~7d per slot, copy and zero 0."""
        return int(counts[:self.mix.constant].sum()) * _CONST_FLOPS_PER_D * self.d_model

    def extra_repr(self) -> str:
        return self.mix.describe()


def ffn_flops(slots: int, d_model: int, d_ff: int) -> int:
    """Forward FLOPs of ``slots`` FFN-expert rows (two matmuls, d -> d_ff -> d; a multiply-add is 2)."""
    return 4 * slots * d_model * d_ff
