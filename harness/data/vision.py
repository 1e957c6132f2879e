"""Image-classification data for the vision suite (no internet needed).

Every dataset is three splits (train / val / test) of (image, label) with a
fixed, documented split; the vision suite turns them into batches
(``harness.suites.vision``). Images always reach the model as 3-channel
normalised float tensors of ``img_size`` x ``img_size``.

Corpora
-------
``animal-mnist`` (default)
    The PyPI package ``animal-mnist`` (``pip install --no-deps animal-mnist``;
    module ``animal_mnist``): 10,000 grayscale 28x28 animal silhouettes, 10
    classes x 1,000, in ``animal_mnist/data/Animal_MNIST/animal_{data,label}_version_3.gz``
    -- each a gzip'd pickle of one numpy array (uint8 [10000, 28, 28] and int64
    [10000]). The pickles are read with an unpickler that only admits numpy
    arrays (nothing else in the file can run).

    *Split* (stratified, fixed, independent of the run seed): within each
    class the 1,000 indices are permuted by ``np.random.default_rng(0)`` and
    cut 800 / 100 / 100 into train / val / test (8,000 / 1,000 / 1,000
    images); each split is then put in one fixed shuffled order (same
    generator), so a capped validation pass sees every class.

    *Preprocessing* (once, at load): bilinear resize 28 -> ``img_size``
    (default 32), rounded back to uint8 and kept in memory as a [N, 1, H, W]
    uint8 tensor (~8 MB). The channel is repeated to 3 at batch time, so the
    model is the same 3-channel ViT as for ImageNet. Normalisation uses the
    mean/std of the train split (computed at load).

``imagenet`` / ``imagefolder``
    A local directory (``data.path``) in one of two layouts:

    * ImageFolder (torchvision/timm): ``<path>/train/<wnid>/*.JPEG`` and
      ``<path>/val/<wnid>/*.JPEG`` (the validation images sorted into class
      folders, e.g. by the usual ``valprep.sh``). Classes are the sorted folder
      names of ``train/``; ``val/`` must have the same folders.
    * Hugging Face ``imagenet-1k``: ``<path>/data/train-*.parquet`` and
      ``<path>/data/validation-*.parquet`` (or ``.arrow`` shards; also accepted
      directly under ``<path>``), columns ``image`` ({bytes, path}) and
      ``label``. Loaded with ``datasets.load_dataset('parquet', data_files=...)``,
      which converts the shards once into its Arrow cache (``data.cache_dir``,
      default the ``datasets`` cache) and then reads them memory-mapped.

    *Split*: test = the official validation set (what papers report); val = a
    fixed 1% of train (at least 1 image; ``np.random.default_rng(0)``
    permutation, the last 1% -- big_vision's "minival"), train = the other 99%.
    So the capped validation passes during training never touch the reported
    test images.

    ``imagenet`` additionally requires exactly 1,000 classes unless
    ``strict_size`` is false; ``imagefolder`` accepts any number.
    Images are decoded with PIL and go through timm's ``create_transform``
    (ImageNet mean/std, bicubic): RandomResizedCrop + flip for training
    (+ RandAugment ``rand-m9-mstd0.5`` when ``data.augment``), resize + center
    crop 0.875 for evaluation.

A missing or malformed dataset raises :class:`VisionDataError` naming the
expected layout.
"""
from __future__ import annotations

import glob
import gzip
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .text import DataError

CORPORA = ("animal-mnist", "imagenet", "imagefolder")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUTO_AUGMENT = "rand-m9-mstd0.5"
SPLIT_SEED = 0             # fixed: the split never depends on the run seed
MINIVAL_FRACTION = 0.01    # val carved from ImageNet train

LAYOUTS_HELP = (
    "expected either the ImageFolder layout <path>/train/<wnid>/*.JPEG and <path>/val/<wnid>/*.JPEG, "
    "or the Hugging Face imagenet-1k layout <path>/data/train-*.parquet and <path>/data/validation-*.parquet "
    "(columns image{bytes}, label)"
)


class VisionDataError(DataError):
    """An image dataset is missing or malformed; the message names the expected layout. A ``ValueError``."""


# -- splits ------------------------------------------------------------------------------------

class TensorSplit:
    """An in-memory split: uint8 images [N, C, H, W] (C = 1 or 3, already at the model's size), labels [N]."""

    in_memory = True

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def pil(self, i: int):
        from PIL import Image

        a = self.images[i].permute(1, 2, 0).numpy()
        return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).convert("RGB")


class FileSplit:
    """A split read image by image: ``pil(i)`` decodes item ``indices[i]`` of a source."""

    in_memory = False

    def __init__(self, load: Callable[[int], Any], indices: np.ndarray, labels: np.ndarray) -> None:
        self._load = load
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self.indices]

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def pil(self, i: int):
        return self._load(int(self.indices[i]))


@dataclass
class VisionData:
    name: str
    train: TensorSplit | FileSplit
    val: TensorSplit | FileSplit
    test: TensorSplit | FileSplit
    num_classes: int
    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layout: str = ""
    classes: list[str] = field(default_factory=list)

    @property
    def in_memory(self) -> bool:
        return self.train.in_memory

    def split(self, name: str) -> TensorSplit | FileSplit:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)


def load_vision(
    name: str = "animal-mnist",
    path: str | os.PathLike | None = None,
    img_size: int = 32,
    *,
    strict_size: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> VisionData:
    """Load an image dataset by name (see module docstring)."""
    if name == "animal-mnist":
        return load_animal_mnist(img_size)
    if name in ("imagenet", "imagefolder"):
        if not path:
            raise VisionDataError(f"data.corpus={name!r} needs data.path: {LAYOUTS_HELP}")
        expect = 1000 if name == "imagenet" and strict_size else None
        return load_image_dir(path, img_size, expect_classes=expect, cache_dir=cache_dir, name=name)
    raise VisionDataError(f"unknown vision corpus {name!r}; known: {', '.join(CORPORA)}")


# -- animal-mnist -----------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are expected")


def _read_pickled_array(p: Path) -> np.ndarray:
    with gzip.open(p, "rb") as fh:
        arr = _NumpyOnlyUnpickler(fh).load()
    if not isinstance(arr, np.ndarray):
        raise VisionDataError(f"{p}: expected a pickled numpy array, got {type(arr).__name__}")
    return arr


def animal_mnist_files() -> tuple[Path, Path]:
    try:
        import animal_mnist
    except ImportError as exc:
        raise VisionDataError(
            "the default vision corpus needs the PyPI package animal-mnist: "
            "pip install --no-deps 'animal-mnist==0.4' (scripts/install.sh does this)"
        ) from exc
    root = Path(animal_mnist.__file__).parent / "data" / "Animal_MNIST"
    return root / "animal_data_version_3.gz", root / "animal_label_version_3.gz"


def load_animal_mnist(img_size: int = 32) -> VisionData:
    data_p, label_p = animal_mnist_files()
    for p in (data_p, label_p):
        if not p.is_file():
            raise VisionDataError(f"animal-mnist file missing: {p}; reinstall with pip install --no-deps animal-mnist")
    try:
        x, y = _read_pickled_array(data_p), _read_pickled_array(label_p)
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise VisionDataError(f"animal-mnist files under {data_p.parent} are unreadable: {exc}") from exc
    if x.dtype != np.uint8 or x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise VisionDataError(f"animal-mnist: expected uint8 [N, 28, 28] images and [N] labels, "
                              f"got {x.dtype} {x.shape} and {y.shape}")
    y = y.astype(np.int64)
    num_classes = int(y.max()) + 1
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = n_test = len(idx) // 10
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    images = _resize_uint8(torch.from_numpy(x).unsqueeze(1), img_size)  # [N, 1, S, S], resized once
    splits = {}
    for name, chunks in parts.items():
        idx = torch.from_numpy(rng.permutation(np.concatenate(chunks)))
        splits[name] = TensorSplit(images[idx].contiguous(), torch.from_numpy(y)[idx].contiguous())
    train = splits["train"].images.float().div_(255)
    mean, std = float(train.mean()), float(train.std())
    return VisionData("animal-mnist", splits["train"], splits["val"], splits["test"], num_classes, img_size,
                      mean=(mean,) * 3, std=(std,) * 3, layout="animal-mnist",
                      classes=[str(c) for c in range(num_classes)])


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


# -- ImageNet: ImageFolder or Hugging Face layout --------------------------------------------------

def load_image_dir(path: str | os.PathLike, img_size: int, *, expect_classes: int | None = None,
                   cache_dir: str | os.PathLike | None = None, name: str = "imagefolder") -> VisionData:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise VisionDataError(f"data.path {str(root)!r} is not a directory; {LAYOUTS_HELP}")
    if (root / "train").is_dir():
        train_src, test_src, classes, layout = _image_folder(root)
    elif _hf_files(root, "train"):
        train_src, test_src, classes, layout = _hf_layout(root, cache_dir)
    else:
        raise VisionDataError(f"{root}: found neither train/ nor data/train-*.parquet; {LAYOUTS_HELP}")
    num_classes = len(classes)
    if expect_classes is not None and num_classes != expect_classes:
        raise VisionDataError(
            f"{root}: {name} needs {expect_classes} classes, found {num_classes} "
            f"(use data.corpus=imagefolder, or --set data.strict_size=false, for a subset)")
    (load_train, train_labels), (load_test, test_labels) = train_src, test_src
    n = len(train_labels)
    if n < 2:
        raise VisionDataError(f"{root}: the train split has {n} image(s); need at least 2 (train + held-out val)")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val = max(1, int(np.ceil(MINIVAL_FRACTION * n)))
    train = FileSplit(load_train, np.sort(perm[:-n_val]), train_labels)
    val = FileSplit(load_train, perm[-n_val:], train_labels)   # fixed random order: capped passes see all classes
    test = FileSplit(load_test, np.arange(len(test_labels)), test_labels)
    return VisionData(name, train, val, test, num_classes, img_size, layout=layout, classes=classes)


def _image_folder(root: Path):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset, pil_loader

    if not (root / "val").is_dir():
        raise VisionDataError(f"{root}: has train/ but no val/; {LAYOUTS_HELP}")
    try:
        classes, class_to_idx = find_classes(str(root / "train"))
        val_classes, _ = find_classes(str(root / "val"))
    except FileNotFoundError as exc:
        raise VisionDataError(f"{root}: {exc}; {LAYOUTS_HELP}") from exc
    if val_classes != classes:
        missing = sorted(set(classes) ^ set(val_classes))[:5]
        raise VisionDataError(f"{root}: train/ and val/ have different class folders (e.g. {missing}); {LAYOUTS_HELP}")
    out = []
    for split in ("train", "val"):
        try:
            samples = make_dataset(str(root / split), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as exc:  # a class folder without images
            raise VisionDataError(f"{root / split}: {exc}; {LAYOUTS_HELP}") from exc
        paths = [p for p, _ in samples]
        labels = np.array([c for _, c in samples], dtype=np.int64)

        def load(i: int, paths: list[str] = paths):
            return pil_loader(paths[i])

        out.append((load, labels))
    return out[0], out[1], classes, "imagefolder"


def _hf_files(root: Path, split: str) -> list[str]:
    for where in (root / "data", root):
        for ext in ("parquet", "arrow"):
            files = sorted(glob.glob(str(where / f"{split}-*.{ext}")))
            if files:
                return files
    return []


class _HFImages:
    """Random access to the decoded images of a ``datasets.Dataset`` (picklable for DataLoader workers)."""

    def __init__(self, ds: Any, image_col: str) -> None:
        self.ds, self.image_col = ds, image_col

    def __call__(self, i: int):
        from PIL import Image

        item = self.ds[i][self.image_col]
        if isinstance(item, dict):
            data = item.get("bytes")
            if data is None and item.get("path"):
                return Image.open(item["path"]).convert("RGB")
            item = Image.open(io.BytesIO(data))
        return item.convert("RGB")


def _hf_layout(root: Path, cache_dir: str | os.PathLike | None):
    train_files, val_files = _hf_files(root, "train"), _hf_files(root, "validation")
    if not val_files:
        raise VisionDataError(f"{root}: has train shards but no validation-*.parquet; {LAYOUTS_HELP}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    builder = "parquet" if train_files[0].endswith(".parquet") else "arrow"
    try:
        dd = datasets.load_dataset(builder, data_files={"train": train_files, "validation": val_files},
                                   cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as exc:  # noqa: BLE001 - any reader failure means malformed shards
        raise VisionDataError(f"{root}: could not read the {builder} shards ({type(exc).__name__}: {exc}); "
                              f"{LAYOUTS_HELP}") from exc
    out, names = [], None
    for split in ("train", "validation"):
        ds = dd[split]
        image_col = next((c for c in ("image", "img") if c in ds.column_names), None)
        label_col = next((c for c in ("label", "labels") if c in ds.column_names), None)
        if image_col is None or label_col is None:
            raise VisionDataError(f"{root}: {split} shards have columns {ds.column_names}; {LAYOUTS_HELP}")
        if isinstance(ds.features[image_col], datasets.Image):
            ds = ds.cast_column(image_col, datasets.Image(decode=False))  # we decode: same path for every source
        labels = np.asarray(ds[label_col], dtype=np.int64)
        if len(labels) and labels.min() < 0:
            raise VisionDataError(f"{root}: {split} has unlabelled rows (label -1); use the labelled validation split")
        feat = ds.features[label_col]
        if names is None:
            names = list(feat.names) if isinstance(feat, datasets.ClassLabel) else None
        out.append((_HFImages(ds, image_col), labels))
    num_classes = max(int(out[0][1].max()) + 1, int(out[1][1].max()) + 1 if len(out[1][1]) else 0)
    classes = names if names is not None else [str(c) for c in range(num_classes)]
    return out[0], out[1], classes, f"hf-{builder}"


# -- transforms ---------------------------------------------------------------------------------

def image_transform(data: VisionData, training: bool, augment: bool):
    """timm's ``create_transform`` for this dataset: PIL image -> normalised [3, S, S] float tensor."""
    from timm.data import create_transform

    if training:
        return create_transform(data.img_size, is_training=True, auto_augment=AUTO_AUGMENT if augment else None,
                                interpolation="bicubic", mean=data.mean, std=data.std)
    return create_transform(data.img_size, is_training=False, interpolation="bicubic", crop_pct=0.875,
                            mean=data.mean, std=data.std)


def normalize_uint8(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 [B, C, H, W] (C = 1 or 3) -> float [B, 3, H, W], ``(x / 255 - mean) / std``."""
    x = images.float().div_(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
