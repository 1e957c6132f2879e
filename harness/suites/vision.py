"""The vision suite: timm ViT with MoE MLPs, image classification, top-1 / top-5 accuracy.

An adapter for the one training loop (``harness.training.loop.train_run``); it supplies
the model, batches, loss and evaluation and nothing else.

Metrics per split: ``{split}_top1``, ``{split}_top5`` (fractions in [0, 1];
top-5 is top-min(5, classes)) and ``{split}_loss`` (mean cross-entropy, nats).
The primary metric is ``val_top1`` (higher is better).

Batches are a function of (seed, step) only, so a resumed run sees exactly the
batches it would have seen:

* sample order: epochs of a permutation of the train split; the permutation of
  epoch e is ``default_rng(SeedSequence([seed, e]))``, batch ``step`` takes
  positions ``step*B .. step*B+B-1`` of the concatenated epochs (no replacement
  within an epoch, batches may straddle two);
* random transforms (RandomResizedCrop, flip, RandAugment) of the s-th image of
  a batch run under RNGs seeded from ``SeedSequence([seed, step, 1])``, and
  mixup/cutmix under ``SeedSequence([seed, step, 2])`` -- whichever process
  decodes the image, so the number of loader workers does not change the numbers.

Two batch paths:

* in-memory data without augmentation (animal-mnist default): gather uint8
  images by index, move to the device, normalise there. No PIL, no workers.
* everything else (ImageFolder / HF shards, or ``data.augment``): a torch
  ``DataLoader`` whose batch sampler yields the (index, sample-seed) pairs of
  step ``start..steps``, ``data.workers`` processes decode + transform ahead of
  the trainer. A resume or a new run rebuilds it at the requested step. The
  trade-off versus a plain shuffled DataLoader is one seeding per image
  (microseconds) for exact reproducibility and resumability.

With ``data.augment`` the targets are soft (timm ``Mixup``: mixup 0.8, cutmix
1.0, switch 0.5, label smoothing 0.1, the DeiT recipe) and the loss is
soft-target cross-entropy; evaluation always uses hard labels.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.vision import VisionData, image_transform, load_vision, normalize_uint8
from ..layers.config import MoEConfig
from ..spec import RunSpec, SpecError

MIXUP = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)


def build_vit(spec: dict | RunSpec) -> nn.Module:
    """The model of a run, from a RunSpec or its stored ``to_dict()``: ``timm.create_model(model.arch, ...)``."""
    import timm

    from ..models import vit  # noqa: F401 - registers the vit_moe_* models with timm

    d = spec.to_dict() if isinstance(spec, RunSpec) else spec
    m = d["model"]
    try:
        return timm.create_model(
            m["arch"], moe=MoEConfig.from_spec(d), embed_dim=m["d_model"], depth=m["n_layers"],
            num_heads=m["n_heads"], img_size=m["img_size"], patch_size=m["patch_size"], num_classes=m["num_classes"],
            attn_drop_rate=m["dropout"], proj_drop_rate=m["dropout"], pos_drop_rate=m["dropout"],
        )
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise SpecError(f"model.arch={m['arch']!r} is not a timm model; the harness registers "
                            f"{', '.join(vit.VIT_MODELS)}") from exc
        raise


def sample_indices(n: int, batch_size: int, seed: int, step: int, _cache: dict | None = None) -> np.ndarray:
    """Indices of batch ``step``: positions step*B.. of the concatenated per-epoch permutations."""
    pos = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(pos, n)
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        e = int(e)
        perm = _cache.get(e) if _cache is not None else None
        if perm is None:
            perm = np.random.default_rng(np.random.SeedSequence([seed, e])).permutation(n)
            if _cache is not None:
                _cache.clear()  # keep the current epoch only (two at an epoch boundary)
                _cache[e] = perm
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's and torch's CPU RNGs for a block; restore them afterwards (CUDA untouched)."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


def _stream_seed(seed: int, step: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


class _TransformedSamples(torch.utils.data.Dataset):
    """Item ``(i, sample_seed)`` -> (transformed image, label); the transform runs under ``sample_seed``."""

    def __init__(self, split: Any, transform: Callable) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[Tensor, int]:
        i, s = key if isinstance(key, tuple) else (key, None)
        img = self.split.pil(i)
        if s is None:
            return self.transform(img), self.split.label(i)
        with seeded_rngs(s):
            return self.transform(img), self.split.label(i)


class _StepBatchSampler:
    """Yields the [(index, sample_seed)] of steps ``start .. stop-1``."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int) -> None:
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cache: dict = {}
        for step in range(self.start, self.stop):
            idx = sample_indices(self.n, self.batch_size, self.seed, step, cache)
            seeds = np.random.SeedSequence([self.seed, step, 1]).generate_state(self.batch_size)
            yield [(int(i), int(s)) for i, s in zip(idx, seeds)]


class VisionSuite:
    name = "vision"
    unit = "img"
    primary_metric = "val_top1"
    lm_eval = False  # image classifiers: no lm-eval tasks

    def __init__(self) -> None:
        self._data: VisionData | None = None
        self._data_key: tuple | None = None
        self._perm_cache: dict = {}
        self._loader: Iterator | None = None
        self._loader_key: tuple | None = None
        self._next_step = -1
        self._mixup: Any = None

    # -- data ------------------------------------------------------------------------------
    def prepare(self, run: RunSpec) -> VisionData:
        """Load and validate the dataset of ``run`` (cached on the instance); the runner's preflight calls it."""
        d = run.data
        key = (d.corpus, d.path, run.model.img_size, d.strict_size, d.cache_dir)
        if self._data is None or self._data_key != key:
            self._data = load_vision(d.corpus, d.path, run.model.img_size, strict_size=d.strict_size,
                                     cache_dir=d.cache_dir)
            self._data_key = key
            self._perm_cache = {}
            self._close_loader()
        data = self._data
        if run.model.num_classes < data.num_classes:
            raise SpecError(f"model.num_classes={run.model.num_classes} but {data.name} has {data.num_classes} "
                            f"classes; set --set model.num_classes={data.num_classes}")
        if d.augment and run.train.batch_size % 2:
            raise SpecError(f"data.augment uses mixup, which needs an even train.batch_size "
                            f"(got {run.train.batch_size})")
        return data

    def _close_loader(self) -> None:
        self._loader, self._loader_key, self._next_step = None, None, -1

    # -- adapter interface -------------------------------------------------------------------
    def warm_cache(self, run: RunSpec) -> None:
        """Nothing to build ahead: the dataset is read (and validated) by the runner's preflight."""

    def build_model(self, run: RunSpec) -> nn.Module:
        self.prepare(run)
        return build_vit(run)

    def train_batch(self, run: RunSpec, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        data = self.prepare(run)
        bs = run.train.batch_size
        if data.in_memory and not run.data.augment:
            idx = torch.from_numpy(sample_indices(len(data.train), bs, run.seed, step, self._perm_cache))
            x = normalize_uint8(data.train.images[idx].to(device, non_blocking=True), data.mean, data.std)
            return x, data.train.labels[idx].to(device, non_blocking=True)
        x, y = self._loader_batch(run, data, step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if run.data.augment:
            if self._mixup is None or self._mixup.num_classes != run.model.num_classes:
                from timm.data import Mixup

                self._mixup = Mixup(num_classes=run.model.num_classes, **MIXUP)
            with seeded_rngs(_stream_seed(run.seed, step, 2)):
                x, y = self._mixup(x, y)
        return x, y

    def _loader_batch(self, run: RunSpec, data: VisionData, step: int) -> tuple[Tensor, Tensor]:
        key = (run.spec_hash, run.seed)
        if self._loader is None or self._loader_key != key or self._next_step != step:
            self._close_loader()
            ds = _TransformedSamples(data.train, image_transform(data, training=True, augment=run.data.augment))
            sampler = _StepBatchSampler(len(data.train), run.train.batch_size, run.seed, step, run.train.steps)
            dl = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=run.data.workers,
                                             pin_memory=torch.cuda.is_available())
            self._loader, self._loader_key = iter(dl), key
        batch = next(self._loader)
        self._next_step = step + 1
        return batch[0], batch[1]

    def loss(self, out: Tensor, targets: Tensor) -> Tensor:
        out = out.float()
        if targets.is_floating_point():  # mixup / cutmix soft targets
            return torch.sum(-targets * F.log_softmax(out, dim=-1), dim=-1).mean()
        return F.cross_entropy(out, targets)

    def items(self, inputs: Tensor) -> int:
        return int(inputs.shape[0])

    def evaluate(self, model: nn.Module, run: RunSpec, split: str, device: torch.device,
                 hook: Callable[[], None], max_batches: int | None) -> dict[str, float]:
        data = self.prepare(run)
        part = data.split(split)
        bs = run.train.batch_size
        n = len(part) if max_batches is None else min(len(part), max_batches * bs)
        if n == 0:
            raise ValueError(f"{split} split of {data.name} is empty")
        k5 = min(5, run.model.num_classes)
        nll, top1, top5 = 0.0, 0, 0
        for x, y in self._eval_batches(data, part, n, bs, run.data.workers):
            x = normalize_uint8(x.to(device), data.mean, data.std) if x.dtype == torch.uint8 else x.to(device)
            y = y.to(device)
            out, _ = model(x, step=0, total_steps=1)
            hook()
            out = out.float()
            nll += float(F.cross_entropy(out, y, reduction="sum"))
            pred = out.topk(k5, dim=-1).indices
            hit = pred == y.unsqueeze(1)
            top1 += int(hit[:, 0].sum())
            top5 += int(hit.any(dim=1).sum())
        return {f"{split}_top1": top1 / n, f"{split}_top5": top5 / n, f"{split}_loss": nll / n}

    @staticmethod
    def _eval_batches(data: VisionData, part: Any, n: int, bs: int, workers: int) -> Iterator[tuple[Tensor, Tensor]]:
        if part.in_memory:
            for i in range(0, n, bs):
                yield part.images[i:min(i + bs, n)], part.labels[i:min(i + bs, n)]
            return
        ds = torch.utils.data.Subset(_TransformedSamples(part, image_transform(data, training=False, augment=False)),
                                     range(n))
        yield from torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False, num_workers=workers,
                                               pin_memory=torch.cuda.is_available())
