"""What ``harness bench`` times: the layer configuration, the candidates (each router's layer per
schedule variant and expert kernel, the equal-FLOP dense FFN, the naive loop), their inputs and
route contexts.

Expert kernels (``--experts-impl``, :mod:`harness.layers.kernels`): the unlabelled MoE rows run the
shipped default (``loop``); every other kernel listed adds, for every MoE candidate, a row
``<label>:<kernel>`` built from the same seed (same router and expert weights), so one run compares
the kernels interleaved. Listing ``loop`` adds nothing (it is the unlabelled row).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..layers.build import build_ffn
from ..layers.kernels import DEFAULT_IMPL, check_impl, pick
from ..routing.registry import PluginLoadError, UnknownRouterError, get_router, router_names
from ..routing.router import RouteContext
from .timing import Log, log_stderr

REFERENCE = "smoe"
DENSE = "dense"
NAIVE = "naive"
VOCAB = 256  # random token ids for routers that route on them (StableMoE's default vocab_size)
CONTEXT = 128  # the synthetic batch is sequences of this many tokens: ``ctx.positions`` (stablemoe@position)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LayerConfig:
    tokens: int = 8192
    d_model: int = 256
    d_ff: int = 1024
    num_experts: int = 8
    top_k: int = 2
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("tokens", "d_model", "d_ff", "num_experts", "top_k"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"bench: {key} must be positive, got {getattr(self, key)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"bench: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench: dtype {self.dtype!r} not one of {sorted(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict[str, Any]:
        return {"E": self.num_experts, "k": self.top_k, "d": self.d_model, "d_ff": self.d_ff,
                "tokens": self.tokens, "dtype": self.dtype, "device": self.device, "seed": self.seed}


@dataclass
class Candidate:
    """One thing to time: a router's layer (one variant), the dense FFN, or the naive loop."""

    label: str                  # unique: "smoe", "competesmoe@compete", "smoe[k=1]", "naive"
    router: str                 # registry name ("naive" for the loop)
    variant: str                # "default", "compete", "plain", "stage1", "stage2", "naive_loop", "reference"
    kind: str                   # "moe" | "dense" | "naive"
    top_k: int
    module: nn.Module
    schedule: tuple[int, int] = (0, 1)   # (step, total_steps) given to on_step and the context
    weight: float | None = None          # share of training steps spent in this variant (amortisation)
    note: str = ""
    router_noaux: nn.Module | None = None
    aux_gates: tuple[str, ...] = ()
    cached_all: Tensor | None = None     # all-expert outputs for router-only timing of competition
    experts_impl: str = DEFAULT_IMPL     # the expert kernel (harness.layers.kernels)

    @property
    def router_module(self) -> nn.Module | None:
        return getattr(self.module, "router", None) if self.kind != "dense" else None


@dataclass
class Inputs:
    x: Tensor          # [T, d], requires grad
    g: Tensor          # [T, d] upstream gradient of the layer output
    token_ids: Tensor  # [T] long in [0, VOCAB)
    one: Tensor        # scalar 1 (gradient of the summed aux loss)
    positions: Tensor  # [T] long, each token's position in its synthetic sequence (:func:`positions`)

    @classmethod
    def make(cls, tokens: int, d_model: int, dtype: torch.dtype, device: torch.device, seed: int) -> "Inputs":
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(tokens, d_model, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        g = torch.randn(tokens, d_model, generator=gen).to(device=device, dtype=dtype)
        ids = torch.randint(0, VOCAB, (tokens,), generator=gen).to(device)
        return cls(x, g, ids, torch.ones((), device=device), positions(ids))


def route_context(c: Candidate, inp: Inputs, expert_fn: Callable[[], Tensor] | None = None) -> RouteContext:
    step, total = c.schedule
    return RouteContext(training=True, step=step, total_steps=total, token_ids=inp.token_ids,
                        positions=inp.positions, embeddings=inp.x.detach(), shared={}, expert_fn=expert_fn)


def positions(token_ids: Tensor) -> Tensor:
    """Each token's position in its synthetic sequence of :data:`CONTEXT` tokens (what ``ctx.positions`` holds)."""
    return torch.arange(token_ids.shape[0], device=token_ids.device) % CONTEXT


def schedule_variants(cls: type, defaults: dict[str, Any]) -> list[tuple[str, dict[str, Any], float | None, tuple[int, int]]]:
    """(variant, router kwargs, amortisation weight, (step, total)) for one router class."""
    names = set(cls.hparam_names())
    total = 1000
    if "competition_prob" in names:
        p = float(defaults["competition_prob"])
        forced: dict[str, Any] = {"competition_prob": 1.0}
        if "warmup_fraction" in names:
            forced["warmup_fraction"] = 0.0
        return [("compete", forced, p, (total // 2, total)),
                ("plain", {"competition_prob": 0.0}, 1.0 - p, (total // 2, total))]
    if "stage1_fraction" in names:
        f = float(defaults["stage1_fraction"])
        return [("stage1", {}, f, (0, total)), ("stage2", {}, 1.0 - f, (total, total))]
    return [("default", {}, None, (0, total))]


def _without_aux_losses(router: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """A copy of ``router`` with every numeric ``*_weight`` hyper-parameter set to 0 (aux losses off)."""
    r = copy.deepcopy(router)
    gates = []
    for name in type(router).hparam_names():
        v = getattr(r, name, None)
        if name.endswith("_weight") and isinstance(v, (int, float)) and not isinstance(v, bool):
            setattr(r, name, 0.0)
            gates.append(name)
    return r, tuple(gates)


def ref_label(base: str, k: int, main_k: int) -> str:
    return base if k == main_k else f"{base}[k={k}]"


def impl_label(label: str, impl: str) -> str:
    """``smoe`` + ``padded_bmm`` -> ``smoe:padded_bmm``; the default kernel's rows keep their plain label."""
    return label if impl == DEFAULT_IMPL else f"{label}:{impl}"


def impl_list(impls: Sequence[str] | None) -> list[str]:
    """The kernels to compare, validated, each once, the default first (its rows are the references)."""
    out = [DEFAULT_IMPL]
    for name in impls or ():
        check_impl(name)
        if name not in out:
            out.append(name)
    return out


def resolve_routers(requested: Sequence[str] | None, log: Log = log_stderr) -> tuple[list[str], list[str]]:
    """Registered names to run (smoe and dense always, as references) and messages for the skipped ones."""
    known = router_names()
    wanted = list(requested) if requested else list(known)
    for ref in (DENSE, REFERENCE):
        if ref in known and ref not in wanted:
            wanted.insert(0, ref)
    out, skipped = [], []
    for name in dict.fromkeys(wanted):
        try:
            get_router(name)
        except (UnknownRouterError, PluginLoadError) as exc:
            skipped.append(f"{name}: skipped ({exc})")
            continue
        out.append(name)
    # references first, then the rest in the given order
    out.sort(key=lambda n: (n != DENSE, n != REFERENCE))
    for msg in skipped:
        log(f"bench: {msg}")
    return out, skipped


def _impl_note(note: str, impl: str, cfg: LayerConfig, k: int) -> str:
    """``auto`` rows say which kernel it picks for this configuration."""
    if impl != "auto":
        return note
    picked = pick(torch.device(cfg.device), cfg.torch_dtype, cfg.d_model, cfg.d_ff, cfg.tokens * k, cfg.num_experts)
    return "; ".join(x for x in (note, f"experts_impl auto -> {picked}") if x)


def build_candidates(cfg: LayerConfig, routers: Sequence[str], naive: bool = True,
                     log: Log = log_stderr, experts_impls: Sequence[str] | None = None) -> list[Candidate]:
    """Build every candidate's layer with ``harness.layers.moe.build_ffn`` (seeded, training mode).

    ``experts_impls``: expert kernels to compare (module docstring); None: the default kernel only.
    """
    device = torch.device(cfg.device)
    cands: list[Candidate] = []
    impls = impl_list(experts_impls)

    def build(name: str, k: int, kwargs: dict[str, Any], schedule: tuple[int, int],
              impl: str = DEFAULT_IMPL) -> nn.Module:
        torch.manual_seed(cfg.seed)
        mod = build_ffn(name, cfg.d_model, cfg.d_ff, cfg.num_experts, k, router_kwargs=kwargs or None,
                        experts_impl=impl)
        mod = mod.to(device=device, dtype=cfg.torch_dtype).train()
        router = getattr(mod, "router", None)
        if router is not None:
            router.on_step(*schedule)
        return mod

    extra_k: set[int] = set()
    for name in routers:
        cls = get_router(name)
        k = cfg.top_k
        note = ""
        if cls.supports_top_k is not None and k not in cls.supports_top_k:
            k = cls.supports_top_k[0]
            note = f"supports top_k {list(cls.supports_top_k)} only: run at k={k}, compared with k={k} references"
            log(f"bench: {name}: {note}")
            extra_k.add(k)
        if cls.is_dense:
            cands.append(Candidate(name if k == cfg.top_k else ref_label(name, k, cfg.top_k), name,
                                   "reference", "dense", k, build(name, k, {}, (0, 1)), note=note))
            continue
        defaults = cls.hparam_defaults()
        try:
            variants = schedule_variants(cls, defaults)
        except (KeyError, TypeError, ValueError):
            variants = [("default", {}, None, (0, 1000))]
        for variant, kwargs, weight, schedule in variants:
            for impl in impls:
                label = impl_label(name if variant == "default" else f"{name}@{variant}", impl)
                try:
                    mod = build(name, k, kwargs, schedule, impl)
                except Exception as exc:  # noqa: BLE001 - a broken router must not stop the others
                    log(f"bench: {label}: skipped, could not build it ({type(exc).__name__}: {exc})")
                    continue
                ref = name == REFERENCE and variant == "default" and impl == DEFAULT_IMPL
                cands.append(Candidate(label, name, "reference" if ref else variant, "moe", k, mod,
                                       schedule=schedule, weight=weight, note=_impl_note(note, impl, cfg, k),
                                       experts_impl=impl))
    have = {c.label for c in cands}
    for k in sorted(extra_k):
        for base, kind in ((REFERENCE, "moe"), (DENSE, "dense")):
            for impl in (impls if kind == "moe" else [DEFAULT_IMPL]):
                label = impl_label(ref_label(base, k, cfg.top_k), impl)
                if base in routers and label not in have:
                    cands.append(Candidate(label, base, "reference", kind, k, build(base, k, {}, (0, 1000), impl),
                                           experts_impl=impl))
    if naive:
        smoe = next((c for c in cands if c.label == REFERENCE), None)  # the default kernel's smoe layer
        if smoe is None:
            log("bench: naive loop skipped (it reuses the smoe layer, which is not available)")
        else:
            # the same module: same router, same stacked expert weights; only the dispatch differs
            cands.append(Candidate(NAIVE, NAIVE, "naive_loop", "naive", smoe.top_k, smoe.module,
                                   schedule=smoe.schedule))
    for c in cands:
        if c.router_module is not None:
            c.router_noaux, c.aux_gates = _without_aux_losses(c.router_module)
    return cands

