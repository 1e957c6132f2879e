"""Suite specs: frozen dataclasses loaded from YAML, ``--set a.b=v`` overrides, a stable hash.

A suite YAML (``tasks/lm.yaml``) holds the base spec and named ``presets``
that state only what differs. Resolution order: base <- preset <- --set.
Unknown keys and wrong types are errors that name the file (or ``--set``) and
the key. A *run* is one router x one seed of a suite; its hash covers
everything that changes the numbers except the seed (stored beside it).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .layers.config import ConfigError, MoEConfig
from .layers.kernels import DEFAULT_IMPL
from .routing.registry import get_router, router_defaults, split_router_name


class SpecError(UserError, ValueError):
    """A bad spec: the message names the file (or --set) and the key."""


# What a field means for the spec hash (its ``metadata["hash"]``; unmarked fields are always hashed):
NOT_HASHED = {"hash": "never"}     # where things are read from / how many workers: never the numbers
HASHED_IF_SET = {"hash": "if_set"}  # added later: left out while off, so every earlier spec hash stays valid
HASHED_UNLESS_DEFAULT = {"hash": "unless_default"}  # added later, a non-boolean: left out while at its default


def left_out_of_hash(f: dataclasses.Field, value: Any) -> bool:
    """Whether field ``f`` holding ``value`` is left out of the spec hash (its rule, above). Also used on stored
    run configs (leaderboard.verdicts.pairing_key), so one rule decides what counts as the same experiment."""
    rule = f.metadata.get("hash")
    return rule == "never" or (rule == "if_set" and not value) or (rule == "unless_default" and value == f.default)


def hash_view(section: Any) -> dict[str, Any]:
    """A spec section's fields as the hash sees them (the rules sit on the fields above)."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if left_out_of_hash(f, value):
            continue
        out[f.name] = dataclasses.asdict(section)[f.name] if dataclasses.is_dataclass(value) else value
    return out


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "decoder"            # lm: "decoder"; vision: a timm model name
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128                  # width of ONE expert; dense baseline uses d_ff * top_k
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 1               # 1: every block is MoE; 2: every other block (others dense d_ff*k)
    # MoE only in the last N blocks (0: no limit), with moe_every inside them: MoGE's and V-MoE's "Last2"
    # (wangyuankl123/MoGE, configs/vitmoe/*_last2_C4.yaml: MODE 'Last2')
    moe_last: int = field(default=0, metadata=HASHED_IF_SET)
    capacity_factor: float | None = None  # None: router's default (StableMoE: 2.0), else no dropping
    dropout: float = 0.0
    context: int = 128               # tokens per sequence (lm)
    activation: str = "gelu"
    img_size: int = 32               # vision
    patch_size: int = 4              # vision
    num_classes: int = 10            # vision
    expert_parallel: bool = field(default=False, metadata=HASHED_IF_SET)  # under torchrun: shard experts over ranks (harness.layers.expert_parallel)
    shared_experts: int = field(default=0, metadata=HASHED_IF_SET)  # DeepSeekMoE always-on experts of width d_ff (any router); dense: d_ff*(k+N)
    experts_impl: str = field(default=DEFAULT_IMPL, metadata=HASHED_UNLESS_DEFAULT)  # expert kernel: auto | loop | loop_recompute | fused | padded_bmm | grouped_mm (harness.layers.kernels); only loop, loop_recompute and fused (at one thread) are bit-identical
    # the routers' balance loss f_i (harness.routing.losses.GlobalBalance; Qiu et al. 2025, arXiv 2501.11873):
    # "micro" the batch one forward sees, "global" the optimiser step's batch over every data-parallel rank
    balance_scope: str = field(default="micro", metadata=HASHED_UNLESS_DEFAULT)
    balance_window: int = field(default=0, metadata=HASHED_IF_SET)  # global: + the counts of this many earlier steps
    # MoE++ zero-computation experts beside the num_experts FFN experts (harness.layers.null_experts; arXiv 2410.07348),
    # any token-choice router; 0 = none, left out of the hash (every earlier spec hash stays valid)
    zero_experts: int = field(default=0, metadata=HASHED_IF_SET)
    copy_experts: int = field(default=0, metadata=HASHED_IF_SET)
    constant_experts: int = field(default=0, metadata=HASHED_IF_SET)


@dataclass(frozen=True)
class DataSpec:
    corpus: str = "shakespeare"      # lm: shakespeare | enwik8 | text8 | wikitext103 | wikitext2; vision: animal-mnist | imagenet
    path: str | None = None          # local directory/file for the real datasets
    strict_size: bool = True         # enwik8/text8: require the standard 100M-byte file
    cache_dir: str | None = field(default=None, metadata=NOT_HASHED)
    augment: bool = False            # vision: RandAugment + mixup through timm
    workers: int = field(default=0, metadata=NOT_HASHED)
    # lm (issue 30; harness.data.tokens): byte | bpe (a byte-level BPE of vocab_size trained on the train split) |
    # the path of a tokenizer.json; corpus `files` reads text_field of local shards at data.path; max_tokens caps
    # the train stream (val/test at max(max_tokens // 98, 65536))
    tokenizer: str = field(default="byte", metadata=HASHED_UNLESS_DEFAULT)
    vocab_size: int | None = field(default=None, metadata=HASHED_IF_SET)  # bpe only; None = 4096
    text_field: str = field(default="text", metadata=HASHED_UNLESS_DEFAULT)  # files only
    max_tokens: int | None = field(default=None, metadata=HASHED_IF_SET)


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1        # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 20
    # cosine: warm-up then cosine decay over train.steps. wsd: warm-up, constant (stable), then the last
    # decay_fraction of the steps decays (warmup-stable-decay; Hagele et al. 2024, arXiv 2405.18392, sec. 3;
    # Hu et al. 2024, MiniCPM, arXiv 2404.06395, sec. 4), which lets one run give every budget (train.budgets)
    schedule: str = field(default="cosine", metadata=HASHED_UNLESS_DEFAULT)
    decay_fraction: float = field(default=0.2, metadata=HASHED_UNLESS_DEFAULT)  # wsd: share of a budget that decays
    # wsd decay shape: "1-sqrt" (lr factor 1 - sqrt(p), Hagele et al. 2024 eq. (1)/Fig. 4, their best cooldown)
    # or "linear" (1 - p), over the decay's progress p in [0, 1)
    decay_shape: str = field(default="1-sqrt", metadata=HASHED_UNLESS_DEFAULT)
    # wsd: the step counts to report besides train.steps: each budget b < steps is a cooldown branch forked
    # from the stable phase at b - round(decay_fraction * b) (harness.training.budgets); metrics `<name>@<b>`.
    # Normalised on load: sorted, train.steps added, a lone train.steps dropped (an ordinary run)
    budgets: tuple[int, ...] = field(default=(), metadata=HASHED_IF_SET)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8            # batches per periodic validation pass (a progress curve, not a verdict)
    # batches of the final validation and test passes, whose val_bpb / val_top1 every verdict rests on;
    # None = the whole split (every real preset). Only the CI-sized `tiny` presets cap it: their runs test
    # plumbing, and a whole-split pass was most of a tiny run's time.
    final_eval_batches: int | None = field(default=None, metadata=HASHED_UNLESS_DEFAULT)
    ckpt_every: int = 50
    # AdamW's implementation (harness.training.optim), the same for the dense baseline and every router:
    # "fused" torch.optim.AdamW(fused=True), one kernel over all parameters (CPU since torch 2.4, CUDA);
    # "foreach" foreach=True (multi-tensor ops); "loop" foreach=False, fused=False, the per-tensor loop that every
    # run before this key used on CPU (torch's CPU default). Fused by default because the optimiser step is
    # 5-7% of a step: one step() over the default LM model's parameters (docs/speed.md, "Issue 33") takes
    # dense 1.33 ms loop / 0.42 ms fused, smoe 5.86 / 0.75 -- MoE pays per expert tensor. Hashed plainly (no
    # metadata), so EVERY spec hash changed when it was added: fused is not bit-identical to the loop (max |diff|
    # 1.2e-7 after two steps), so a run from before it is not the same experiment as one after.
    adamw: str = "fused"
    device: str = "auto"             # auto | cpu | cuda
    dtype: str = "float32"           # float32 | bfloat16 (autocast)
    threads: int | None = field(default=None, metadata=NOT_HASHED)  # torch.set_num_threads; None = torch default


@dataclass(frozen=True)
class EvalSpec:
    enabled: bool = field(default=True, metadata=NOT_HASHED)  # run lm-eval tasks after pretraining (lm suite)
    tasks: tuple[str, ...] = ("shakespeare_ppl", "shakespeare_cloze")
    limit: int | None = None         # documents per task (None = all)
    data_dir: str | None = None      # directory with local data for standard lm-eval tasks
    batch_size: int = field(default=16, metadata=NOT_HASHED)


@dataclass(frozen=True)
class SuiteSpec:
    suite: str = "lm"
    routers: tuple[str, ...] = ("dense", "smoe")
    seeds: tuple[int, ...] = (0,)
    preset: str = "default"
    router_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def runs(self) -> list["RunSpec"]:
        return [RunSpec(self, r, s) for r in self.routers for s in self.seeds]


@dataclass(frozen=True)
class RunSpec:
    """One router x one seed of a suite."""

    suite_spec: SuiteSpec
    router: str
    seed: int

    @property
    def model(self) -> ModelSpec:
        """The suite's model, with top_k lowered for routers that only support smaller k.

        StableMoE is top-1 by construction; in a top-2 suite it runs top-1 (its
        paper's setting) and the resolved ``model.top_k`` stored with the run says so.
        """

        m = self.suite_spec.model
        k = get_router(self.router).effective_top_k(m.top_k)
        return m if k == m.top_k else dataclasses.replace(m, top_k=k)

    @property
    def data(self) -> DataSpec:
        return self.suite_spec.data

    @property
    def train(self) -> TrainSpec:
        return self.suite_spec.train

    @property
    def eval(self) -> EvalSpec:
        return self.suite_spec.eval

    @property
    def suite(self) -> str:
        return self.suite_spec.suite

    @property
    def router_kwargs(self) -> dict[str, Any]:
        """``router_args`` of this router; for ``name@variant``, those of ``name`` overridden by its own entry."""

        args = self.suite_spec.router_args
        base, variant = split_router_name(self.router)
        merged = dict(args.get(base, {})) if variant is not None else {}
        return {**merged, **args.get(self.router, {})}

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved configuration of this run (stored as JSON with the run)."""
        s = self.suite_spec
        return {
            "suite": s.suite,
            "preset": s.preset,
            "router": self.router,
            "router_args": self.router_kwargs,
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(s.data),
            "train": dataclasses.asdict(s.train),
            "eval": dataclasses.asdict(s.eval),
            "seed": self.seed,
        }

    @property
    def spec_hash(self) -> str:
        s = self.suite_spec
        # not the seed (a run is spec x seed) nor the preset's name (its values are hashed)
        d = {"suite": s.suite, "router": self.router, "router_args": self.router_kwargs,
             **{name: hash_view(section) for name, section in
                (("model", self.model), ("data", s.data), ("train", s.train), ("eval", s.eval))}}

        defaults = router_defaults(self.router)  # the values a router's (or variant's) defaults stand for:
        if defaults:  # changing them re-keys its runs (the dense baseline has none: its hash is unchanged)
            d["router_defaults"] = defaults
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def run_key(self) -> str:
        return f"{self.suite}-{self.router}-{self.spec_hash[:10]}-s{self.seed}"


# -- loading ------------------------------------------------------------------------

def suite_path(name_or_path: str) -> Path:
    """A suite name (``lm``, ``vision``) found in the shipped tasks, or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise SpecError(f"{p}: spec file not found")
        if not p.is_file():
            raise SpecError(f"{p}: is a directory, not a suite YAML file")
        return p
    shipped = resources.files("harness.tasks").joinpath(f"{name_or_path}.yaml")
    if not shipped.is_file():
        known = sorted(q.name[:-5] for q in resources.files("harness.tasks").iterdir() if q.name.endswith(".yaml"))
        raise SpecError(f"unknown suite {name_or_path!r}; known suites: {', '.join(known)} (or give a .yaml path)")
    return Path(str(shipped))


def load_suite(
    suite: str,
    preset: str | None = None,
    overrides: list[str] | None = None,
    routers: list[str] | None = None,
    seeds: list[int] | None = None,
) -> SuiteSpec:
    path = suite_path(suite)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file; a suite spec is YAML text") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: top level must be a mapping")
    presets = raw.pop("presets", {}) or {}
    preset = preset or "default"
    if preset not in presets and preset != "default":
        raise SpecError(f"{path}: unknown preset {preset!r}; presets: {', '.join(sorted(presets)) or '(none)'}")
    merged = _deep_merge(raw, presets.get(preset) or {})
    merged["preset"] = preset
    for item in overrides or []:
        _apply_override(merged, item)
    if routers:
        merged["routers"] = list(routers)
    if seeds is not None and len(seeds):
        merged["seeds"] = list(seeds)
    spec = _build(SuiteSpec, merged, str(path), "")
    _check_semantics(spec, str(path))
    return _normalise_budgets(spec)


def _normalise_budgets(spec: SuiteSpec) -> SuiteSpec:
    """``train.budgets`` as one canonical tuple (sorted, with train.steps; empty for a single budget), so
    ``[250, 500]`` and ``[500, 250, 1000]`` at 1000 steps are one experiment with one hash."""
    t = spec.train
    budgets = tuple(sorted(set(t.budgets) | {t.steps})) if t.budgets else ()
    if budgets == (t.steps,):
        budgets = ()
    return spec if budgets == t.budgets else dataclasses.replace(spec, train=dataclasses.replace(t, budgets=budgets))


def _check_semantics(spec: SuiteSpec, where: str) -> None:

    m = spec.model
    if m.n_heads > 0 and m.d_model % m.n_heads:
        raise SpecError(f"{where}: model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    for key, val in (("model.d_model", m.d_model), ("model.n_layers", m.n_layers), ("model.d_ff", m.d_ff),
                     ("train.steps", spec.train.steps),
                     ("train.batch_size", spec.train.batch_size)):
        if val <= 0:
            raise SpecError(f"{where}: {key}={val} must be positive")
    t, d, e = spec.train, spec.data, spec.eval
    # (key, value, lowest, highest, lowest excluded): every numeric knob whose bad values would only
    # surface mid-training (a modulo by zero, an optimiser or dropout ValueError) is checked here
    for key, val, lo, hi, open_lo in (
        ("model.n_heads", m.n_heads, 1, None, False), ("model.context", m.context, 1, None, False),
        ("model.dropout", m.dropout, 0.0, 1.0, False),
        ("model.capacity_factor", m.capacity_factor, 0.0, None, True),
        ("model.img_size", m.img_size, 1, None, False), ("model.patch_size", m.patch_size, 1, None, False),
        ("model.num_classes", m.num_classes, 1, None, False),
        ("model.moe_last", m.moe_last, 0, m.n_layers, False),
        ("train.lr", t.lr, 0.0, None, True), ("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0, False),
        ("train.warmup_steps", t.warmup_steps, 0, None, False), ("train.weight_decay", t.weight_decay, 0.0, None, False),
        ("train.beta1", t.beta1, 0.0, 0.999999, False), ("train.beta2", t.beta2, 0.0, 0.999999, False),
        ("train.grad_clip", t.grad_clip, 0.0, None, False), ("train.eval_every", t.eval_every, 1, None, False),
        ("train.eval_batches", t.eval_batches, 1, None, False), ("train.ckpt_every", t.ckpt_every, 1, None, False),
        ("train.final_eval_batches", t.final_eval_batches, 1, None, False),
        ("train.threads", t.threads, 1, None, False), ("data.workers", d.workers, 0, None, False),
        ("eval.limit", e.limit, 1, None, False), ("eval.batch_size", e.batch_size, 1, None, False),
    ):
        if val is None:
            continue
        if isinstance(val, float) and not math.isfinite(val):
            raise SpecError(f"{where}: {key}={val} must be a finite number")
        if (lo is not None and (val <= lo if open_lo else val < lo)) or (hi is not None and val > hi):
            rng = (f"> {lo}" if open_lo else f">= {lo}") + (f" and <= {hi}" if hi is not None else "")
            raise SpecError(f"{where}: {key}={val} must be {rng}")
    for s in spec.seeds:
        if not 0 <= s < 2**32:
            raise SpecError(f"{where}: seed {s} must be between 0 and {2**32 - 1}")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise SpecError(f"{where}: seeds {list(spec.seeds)} list a seed twice; each seed is one sample")
    if len(set(spec.routers)) != len(spec.routers):
        raise SpecError(f"{where}: routers {list(spec.routers)} list a router twice")
    if not spec.routers:
        raise SpecError(f"{where}: routers is empty")
    _check_tokens(spec, where)
    if spec.train.dtype not in ("float32", "bfloat16"):
        raise SpecError(f"{where}: train.dtype={spec.train.dtype!r} must be float32 or bfloat16")
    if spec.train.adamw not in ADAMW_IMPLS:
        raise SpecError(f"{where}: train.adamw={spec.train.adamw!r} must be one of {', '.join(ADAMW_IMPLS)}")
    _check_moe_config(spec, where)
    _check_schedule(spec.train, where)
    if spec.train.device not in ("auto", "cpu", "cuda"):
        raise SpecError(f"{where}: train.device={spec.train.device!r} must be auto, cpu or cuda")
    for name in spec.routers:
        get_router(name)  # UnknownRouterError with did-you-mean
    for name in spec.router_args:
        get_router(name)


def _check_moe_config(spec: SuiteSpec, where: str) -> None:
    """The model's FFN rules (top_k, moe_every, shared / null experts, expert parallelism, balance scope, the
    expert kernel) are :class:`harness.layers.config.MoEConfig`'s: checked there, for each router of the suite."""
    for name in spec.routers:
        try:
            MoEConfig.from_spec({"router": name, "model": dataclasses.asdict(spec.model),
                                 "router_args": {}})
        except ConfigError as exc:
            raise SpecError(f"{where}: {exc}") from None


def _check_tokens(spec: SuiteSpec, where: str) -> None:
    """The LM data keys of issue 30 (data.tokenizer, vocab_size, text_field, max_tokens)."""
    d = spec.data
    set_ = [k for k, v, off in (("tokenizer", d.tokenizer, "byte"), ("vocab_size", d.vocab_size, None),
                                ("text_field", d.text_field, "text"), ("max_tokens", d.max_tokens, None))
            if v != off]
    if spec.suite != "lm" and set_:
        raise SpecError(f"{where}: data.{set_[0]} applies to the lm suite, not {spec.suite}")
    if not d.tokenizer.strip():
        raise SpecError(f"{where}: data.tokenizer is empty; give byte, bpe or the path of a tokenizer.json")
    if d.vocab_size is not None:
        if d.tokenizer != "bpe":
            raise SpecError(f"{where}: data.vocab_size applies to data.tokenizer=bpe (byte has 256 ids, a tokenizer "
                            f"file its own); add --set data.tokenizer=bpe or drop it")
        if not 257 <= d.vocab_size <= 2**24:
            raise SpecError(f"{where}: data.vocab_size={d.vocab_size} must be >= 257 (a byte-level BPE's 256 byte "
                            f"symbols and at least one merge) and <= {2**24}")
    if not d.text_field.strip():
        raise SpecError(f"{where}: data.text_field is empty; give the name of the text column (default text)")
    if d.text_field != "text" and d.corpus.lower() != "files":
        raise SpecError(f"{where}: data.text_field applies to data.corpus=files, not {d.corpus}")
    if d.max_tokens is not None and d.max_tokens < 1:
        raise SpecError(f"{where}: data.max_tokens={d.max_tokens} must be >= 1")


ADAMW_IMPLS = ("fused", "foreach", "loop")  # train.adamw (harness.training.optim)
SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("1-sqrt", "linear")


def _check_schedule(t: TrainSpec, where: str) -> None:
    """The learning-rate schedule and the budgets read along it (harness.training.schedule)."""
    if t.schedule not in SCHEDULES:
        raise SpecError(f"{where}: train.schedule={t.schedule!r} must be one of {', '.join(SCHEDULES)}")
    if t.decay_shape not in DECAY_SHAPES:
        raise SpecError(f"{where}: train.decay_shape={t.decay_shape!r} must be one of {', '.join(DECAY_SHAPES)}")
    if not 0.0 < t.decay_fraction <= 1.0:
        raise SpecError(f"{where}: train.decay_fraction={t.decay_fraction} must be > 0 and <= 1")
    if t.schedule != "wsd":
        defaults = {f.name: f.default for f in dataclasses.fields(TrainSpec)}
        for key in ("decay_fraction", "decay_shape"):
            if getattr(t, key) != defaults[key]:
                raise SpecError(f"{where}: train.{key} applies to train.schedule=wsd, not {t.schedule}; "
                                f"add --set train.schedule=wsd or drop it")
        if t.budgets and set(t.budgets) != {t.steps}:
            raise SpecError(f"{where}: train.budgets={list(t.budgets)} needs train.schedule=wsd (a {t.schedule} "
                            f"run reaches its low learning rate only at train.steps, so each other budget would "
                            f"need a run of its own); add --set train.schedule=wsd")
    for b in t.budgets:
        if not 0 < b <= t.steps:
            raise SpecError(f"{where}: train.budgets: {b} must be > 0 and <= train.steps={t.steps}")
        start = b - round(t.decay_fraction * b)
        if b < t.steps and start < t.warmup_steps:
            raise SpecError(f"{where}: train.budgets: the budget {b} would start its decay at step {start}, inside "
                            f"the warm-up (train.warmup_steps={t.warmup_steps}); use budgets of at least "
                            f"{math.ceil(t.warmup_steps / (1 - t.decay_fraction)) if t.decay_fraction < 1 else 'more'} "
                            f"steps or a shorter warm-up")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "router_args":
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, dict) and k == "router_args" and isinstance(out.get(k), dict):
            merged = copy.deepcopy(out[k])
            for r, args in v.items():
                merged[r] = {**merged.get(r, {}), **(args or {})}
            out[k] = merged
        else:
            out[k] = copy.deepcopy(v)
    return out


_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _apply_override(d: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise SpecError(f"--set {key}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = parsed


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: {prefix or 'spec'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(fields), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys: {', '.join(fields)}"
        raise SpecError(f"{where}: unknown key '{prefix}{k}'{hint}")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(hints[k], v, where, f"{prefix}{k}")
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v or {}, where, key + ".")
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], v, where, key)
    if origin is tuple:
        if isinstance(v, (str, int)):
            v = [x.strip() for x in v.split(",")] if isinstance(v, str) else [v]
        if not isinstance(v, (list, tuple)):
            raise SpecError(f"{where}: {key} must be a list, got {v!r}")
        return tuple(_coerce(args[0], x, where, key) for x in v)
    if origin is dict:
        if not isinstance(v, dict):
            raise SpecError(f"{where}: {key} must be a mapping, got {v!r}")
        return {str(a): (dict(b) if isinstance(b, dict) else _raise(where, f"{key}.{a}", "a mapping", b))
                for a, b in v.items()}
    if tp is bool:
        if isinstance(v, bool):
            return v
        return _raise(where, key, "true or false", v)
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        return _raise(where, key, "an integer", v)
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str) and _EXP_FLOAT.fullmatch(v.strip()):
            return float(v)  # YAML 1.1 reads 1e-2 (no dot) as a string; every user means the number
        return _raise(where, key, "a number", v)
    if tp is str:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        return _raise(where, key, "a string", v)
    return v


def _raise(where: str, key: str, expected: str, got: Any) -> Any:
    raise SpecError(f"{where}: {key} must be {expected}, got {got!r}")
