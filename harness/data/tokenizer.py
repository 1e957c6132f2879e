"""The LM suite's tokenizers (``data.tokenizer``): UTF-8 bytes, a byte-level BPE trained here, or a tokenizer.json.

``byte`` (default)
    Token = one UTF-8 byte, vocabulary 256: the suite as it always was.
``bpe``
    A byte-level BPE of ``data.vocab_size`` tokens (default :data:`DEFAULT_BPE_VOCAB`) trained with Hugging
    Face ``tokenizers`` on the run's train split (its first :data:`BPE_TRAIN_BYTES` bytes): GPT-2's byte-to-
    character alphabet (all 256 bytes are base symbols, so every text encodes), GPT-2's pre-tokenising regex,
    no prefix space, no normaliser, no special tokens, ``min_frequency`` 2. A small corpus may stop with
    fewer merges than asked; the model's vocabulary is ``data.vocab_size`` all the same (unused rows), so it
    follows from the spec alone. Training is done once and cached (``harness.data.tokens``).
``PATH``
    An existing ``tokenizer.json`` (or a directory holding one), e.g. a GPT-2 or Llama-3 tokenizer the user
    already has; the vocabulary is the file's (largest id + 1). Encoded without special tokens.

Bits per byte. Every id has a byte length (:attr:`Tokenizer.byte_lengths`): for ``byte`` 1; for a
byte-level tokenizer (``bpe``, GPT-2, Llama-3: a ``ByteLevel`` pre-tokenizer or decoder) the length of the
fixed byte string the id decodes to (GPT-2's character-to-byte map), so the UTF-8 bytes of any evaluated
target sequence are exactly ``byte_lengths[targets].sum()``; special tokens count 0 (they never occur in
a stream encoded without them). For other tokenizers (SentencePiece style: ``▁`` for a space, ``<0xNN>``
byte fallback) each id counts its own piece's bytes, which is exact up to the space a decoder drops at the
start of a text; the token cache records both counts per split (``harness.data.tokens``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .text import DataError

__all__ = ["BPE_TRAIN_BYTES", "DEFAULT_BPE_VOCAB", "MIN_BPE_VOCAB", "ByteTokenizer", "HFTokenizer", "Tokenizer",
           "is_builtin", "load_tokenizer_file", "token_dtype", "train_bpe", "tokenizer_file_path"]

BYTE, BPE = "byte", "bpe"
DEFAULT_BPE_VOCAB = 4096
MIN_BPE_VOCAB = 257           # the 256 byte symbols of a byte-level BPE + at least one merge
BPE_TRAIN_BYTES = 100 << 20   # BPE trains on the first 100 MiB of the train split's text


def is_builtin(name: str) -> bool:
    return name in (BYTE, BPE)


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id: uint8 for bytes, uint16 up to 65536 ids, else uint32."""
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte map (the inverse of its ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """What the LM suite needs of a tokenizer (see the module docstring)."""

    name: str              # byte | bpe | the file's path
    vocab_size: int        # the model's vocabulary (embedding rows, logits)
    byte_lengths: np.ndarray  # [vocab_size] int64: UTF-8 bytes each id stands for
    newline_id: int        # the id of "\n" (the last of its encoding): lm-eval's BOS stand-in
    identity: str          # what a token cache is keyed on (a hash of the tokenizer's definition)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    name = BYTE
    vocab_size = 256
    newline_id = 10
    identity = "byte"

    def __init__(self) -> None:
        self.byte_lengths = np.ones(256, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _is_byte_level(cfg: dict) -> bool:
    def has(node) -> bool:  # noqa: ANN001
        if not isinstance(node, dict):
            return False
        return node.get("type") == "ByteLevel" or any(has(n) for n in node.get("pretokenizers") or [])\
            or any(has(n) for n in node.get("decoders") or [])
    return has(cfg.get("pre_tokenizer")) or has(cfg.get("decoder"))


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (a trained ``bpe`` or a tokenizer.json)."""

    def __init__(self, tok, name: str, vocab_size: int | None = None) -> None:  # noqa: ANN001 - tokenizers.Tokenizer
        self.tok = tok
        self.name = name
        text = tok.to_str()
        self.identity = "hf:" + hashlib.sha256(text.encode()).hexdigest()[:24]
        cfg = json.loads(text)
        vocab = tok.get_vocab(with_added_tokens=True)
        n = max(vocab.values()) + 1 if vocab else 0
        if vocab_size is not None and vocab_size < n:
            raise DataError(f"tokenizer {name}: {n} ids do not fit data.vocab_size={vocab_size}")
        self.vocab_size = vocab_size or n
        special = {t["id"] for t in cfg.get("added_tokens") or [] if t.get("special")}
        byte_level = _is_byte_level(cfg)
        dec = _gpt2_byte_decoder()
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for piece, i in vocab.items():
            if i in special:
                continue
            if byte_level and all(c in dec for c in piece):
                lengths[i] = len(piece)  # one character per byte
            elif _BYTE_FALLBACK.fullmatch(piece):
                lengths[i] = 1
            else:
                lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        self.byte_lengths = lengths
        self.byte_level = byte_level
        nl = tok.encode("\n", add_special_tokens=False).ids
        if not nl:
            raise DataError(f"tokenizer {name}: '\\n' encodes to no id; the LM suite separates documents (and "
                            f"starts lm-eval requests) with a newline token")
        self.newline_id = int(nl[-1])  # the newline itself where a tokenizer prepends a space marker

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def _tokenizers():  # noqa: ANN202
    try:
        import tokenizers
    except ImportError:
        raise DataError("data.tokenizer needs the 'tokenizers' package (pip install tokenizers, or make install)") \
            from None
    return tokenizers


def tokenizer_file_path(path: str | os.PathLike) -> Path:
    """``PATH`` itself, or ``PATH/tokenizer.json`` for a directory (a model folder)."""
    p = Path(path).expanduser()
    return p / "tokenizer.json" if p.is_dir() else p


def load_tokenizer_file(path: str | os.PathLike, vocab_size: int | None = None) -> HFTokenizer:
    """A tokenizer.json, or a :class:`DataError` in one line saying what is wrong with it."""
    f = tokenizer_file_path(path)
    if not f.is_file():
        raise DataError(f"data.tokenizer: {f} not found; give byte, bpe or the path of a tokenizer.json "
                        f"(a Hugging Face tokenizers file)")
    tk = _tokenizers()
    try:
        tok = tk.Tokenizer.from_file(str(f))
    except Exception as exc:  # noqa: BLE001 - the Rust side raises bare Exceptions
        msg = " ".join(str(exc).split())[:200]
        raise DataError(f"data.tokenizer: {f} is not a Hugging Face tokenizer.json ({msg})") from None
    return HFTokenizer(tok, str(f), vocab_size)


def train_bpe(texts: Iterator[str], vocab_size: int, out: Path, progress: bool = False) -> HFTokenizer:
    """Train the byte-level BPE described in the module docstring on ``texts`` and save it to ``out``."""
    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"data.vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                        f"{MIN_BPE_VOCAB} (256 byte symbols and one merge)")
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=progress,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, out)
    return HFTokenizer(tok, BPE, vocab_size)
