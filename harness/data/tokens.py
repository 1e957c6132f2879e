"""Any LM corpus x any tokenizer: tokenised once into a memory-mapped token cache (issue 30).

:func:`load_lm_corpus` is the LM suite's one door to its data. ``byte`` on a byte corpus (shakespeare,
enwik8, text8, wikitext) is :func:`harness.data.text.load_corpus` unchanged. Everything else -- a
``files`` corpus (:mod:`harness.data.files`), or ``bpe`` / a tokenizer.json on any corpus -- goes
through the token cache:

* Text. A ``files`` corpus is its documents, each followed by ``"\\n"``; a byte corpus is each split's
  bytes, decoded as UTF-8 (an invalid byte becomes U+FFFD) in pieces of about 256 KiB cut after a newline.
  Pieces are encoded separately and their ids concatenated, so a token never spans two documents.
* Cache. ``<cache>/tokens/<key>/{train,val,test}.bin`` (``np.memmap``: uint8 for bytes, uint16 up to
  65536 ids, else uint32) and ``meta.json``; ``<cache>`` is ``data.cache_dir`` or
  ``$XDG_CACHE_HOME/moe-harness`` (``~/.cache/moe-harness``). The key hashes what the tokens depend on:
  the source (a ``files`` corpus: every shard's path, size and mtime, and ``data.text_field``; a byte
  corpus: its name and the blake2b of each split's bytes), the tokenizer (the hash of its definition)
  and ``data.max_tokens``. A cache is built in a temporary folder beside it and renamed into place
  (atomic), so a second run, a ``--jobs`` worker or a torchrun rank reuses it and a killed build
  leaves nothing half-written. A trained ``bpe`` lives beside it, ``<cache>/tokens/bpe-<key>/tokenizer.json``,
  keyed by the source and ``data.vocab_size``.
* ``data.max_tokens`` caps the train stream at that many tokens and val and test each at
  ``max(max_tokens // 98, 65536)`` (the 98/1/1 proportion, with a floor for a usable evaluation). A
  ``files`` corpus stops reading once all three are full (a shard named for a full split is not read).
* Counts per split in ``meta.json``: tokens, documents, UTF-8 bytes of the text, the bytes the
  tokenizer's byte-length table gives (equal for byte-level tokenizers), words and newlines.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from . import files as files_mod
from .text import (DataError, KNOWN_CORPORA, SPLITS, TextCorpus, _default_cache_root, count_words, load_corpus)
from .tokenizer import (BPE, BPE_TRAIN_BYTES, BYTE, DEFAULT_BPE_VOCAB, ByteTokenizer, HFTokenizer, Tokenizer,
                        load_tokenizer_file, token_dtype, tokenizer_file_path, train_bpe)

__all__ = ["EVAL_FLOOR", "CACHE_VERSION", "load_lm_corpus", "lm_tokenizer", "lm_vocab_size", "split_caps"]

CACHE_VERSION = 1
EVAL_FLOOR = 65536         # val/test keep at least this many tokens under data.max_tokens
_PIECE = 1 << 18           # byte corpora: ~256 KiB text pieces
_BATCH_BYTES = 4 << 20     # encode this much text per encode_batch call
FILES = "files"


def _get(data: Mapping[str, Any], key: str, default: Any = None) -> Any:
    v = data.get(key, default)
    return default if v is None else v


def split_caps(max_tokens: int | None) -> dict[str, int | None]:
    if not max_tokens:
        return {s: None for s in SPLITS}
    ev = max(int(max_tokens) // 98, EVAL_FLOOR)
    return {"train": int(max_tokens), "val": ev, "test": ev}


def _cache_root(data: Mapping[str, Any]) -> Path:
    cd = data.get("cache_dir")
    return (Path(cd).expanduser() if cd else _default_cache_root()) / "tokens"


def _key(parts: Mapping[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(blob.encode(), digest_size=10).hexdigest()


def _show(progress: bool | None) -> bool:
    return bool(progress) if progress is not None else sys.stderr.isatty()


# -- sources: what text a corpus is -------------------------------------------------------------------------


class _Source:
    """A corpus as text: its identity (for cache keys) and its pieces in split order."""

    def __init__(self, name: str, identity: dict[str, Any], total: int | None,
                 pieces: Callable[[Callable[[str], bool]], Iterator[tuple[str, str]]], describe: str) -> None:
        self.name, self.identity, self.total, self.pieces, self.describe = name, identity, total, pieces, describe

    def train_texts(self, limit: int = BPE_TRAIN_BYTES) -> Iterator[str]:
        seen = 0
        for split, text in self.pieces(lambda s: s != "train"):
            if split != "train":
                continue
            yield text
            seen += len(text)
            if seen >= limit:
                return


def _byte_pieces(data: np.ndarray) -> Iterator[str]:
    n, s = len(data), 0
    while s < n:
        e = min(s + _PIECE, n)
        if e < n:
            nl = np.flatnonzero(np.asarray(data[e: min(e + _PIECE, n)]) == 10)
            e = e + int(nl[0]) + 1 if nl.size else min(e + _PIECE, n)
        yield bytes(np.asarray(data[s:e])).decode("utf-8", errors="replace")
        s = e


def _source(data: Mapping[str, Any]) -> _Source:
    corpus = str(_get(data, "corpus", "shakespeare"))
    if corpus.lower() == FILES:
        src = files_mod.find_source(data.get("path"))
        field = str(_get(data, "text_field", "text"))
        ident = {"corpus": FILES, "files": src.fingerprint, "text_field": field, "split_rule": 1}

        def pieces(full):  # noqa: ANN001, ANN202
            for split, text in files_mod.iter_split_documents(src, field, full):
                yield split, text + "\n"

        named = sorted(src.named)
        how = f"named splits ({', '.join(named)}) + hash split" if named else "hash split 98/1/1"
        return _Source(FILES, ident, None, pieces, f"files {src.root} ({len(src.shards)} shards, {how}, "
                                                   f"field {field!r})")
    bc = load_corpus(corpus, data.get("path"), cache_dir=data.get("cache_dir"),
                     strict_size=bool(_get(data, "strict_size", True)))
    digests = {}
    for s in SPLITS:
        h = hashlib.blake2b(digest_size=16)
        arr = bc.split(s)
        for i in range(0, len(arr), 1 << 24):
            h.update(np.asarray(arr[i: i + (1 << 24)]).tobytes())
        digests[s] = h.hexdigest()
    ident = {"corpus": bc.name, "blake2b": digests}

    def byte_pieces(full):  # noqa: ANN001, ANN202
        for s in SPLITS:
            if full(s):
                continue
            for text in _byte_pieces(bc.split(s)):
                if full(s):
                    break
                yield s, text

    return _Source(bc.name, ident, sum(bc.n_bytes.values()), byte_pieces, bc.description)


# -- tokenizers ---------------------------------------------------------------------------------------------


def lm_vocab_size(data: Mapping[str, Any]) -> int:
    """The model's vocabulary for a spec's ``data`` section: 256, data.vocab_size for bpe, or the file's."""
    tok = str(_get(data, "tokenizer", BYTE))
    if tok == BYTE:
        return 256
    if tok == BPE:
        return int(_get(data, "vocab_size", DEFAULT_BPE_VOCAB))
    return load_tokenizer_file(tok).vocab_size


def _bpe(data: Mapping[str, Any], source: _Source | None, progress: bool | None) -> HFTokenizer:
    vocab = int(_get(data, "vocab_size", DEFAULT_BPE_VOCAB))
    source = source or _source(data)
    key = _key({"v": CACHE_VERSION, "source": source.identity, "bpe": {"vocab_size": vocab,
                                                                      "train_bytes": BPE_TRAIN_BYTES}})
    path = _cache_root(data) / f"bpe-{key}" / "tokenizer.json"
    if path.is_file():
        try:
            tok = load_tokenizer_file(path, vocab)
            tok.name = BPE
            return tok
        except DataError:
            pass  # a damaged cache file: train again
    t0 = time.perf_counter()
    tok = train_bpe(source.train_texts(), vocab, path, progress=_show(progress))
    print(f"bpe: trained a byte-level BPE of {vocab} ids on {source.name} in {time.perf_counter() - t0:.1f}s "
          f"-> {path}", file=sys.stderr, flush=True)
    return tok


def lm_tokenizer(data: Mapping[str, Any], progress: bool | None = None) -> Tokenizer:
    """The tokenizer of a spec's ``data`` section (a bpe is trained on its corpus unless cached)."""
    tok = str(_get(data, "tokenizer", BYTE))
    if tok == BYTE:
        return ByteTokenizer()
    if tok == BPE:
        return _bpe(data, None, progress)
    return load_tokenizer_file(tokenizer_file_path(tok))


# -- the token cache ----------------------------------------------------------------------------------------


def _empty_counts() -> dict[str, dict[str, int]]:
    return {s: {"tokens": 0, "docs": 0, "text_bytes": 0, "table_bytes": 0, "words": 0, "lines": 0} for s in SPLITS}


def _build(dest: Path, source: _Source, tok: Tokenizer, caps: dict[str, int | None], progress: bool | None,
           meta_extra: dict[str, Any]) -> None:
    from tqdm.auto import tqdm  # a bar only while building

    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = token_dtype(tok.vocab_size)
    counts = _empty_counts()
    t0 = time.perf_counter()
    outs = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}  # noqa: SIM115 - closed in finally
    bar = tqdm(total=source.total, unit="B", unit_scale=True, desc=f"tokenising {source.name}", leave=False,
               disable=not _show(progress), dynamic_ncols=True)
    try:
        writer = _SplitWriter(tok, caps, counts, outs, dtype, bar)
        read = _encode_all(source, writer)
        for f in outs.values():
            f.close()
        for s in SPLITS:  # before anything is kept: an empty split is the user's data, not a cache to reuse
            if counts[s]["tokens"] == 0:
                raise DataError(f"{source.describe}: split {s!r} has no documents; with a hash split every split "
                                f"needs enough documents (about 1 in 100 goes to val and to test), or name shards "
                                f"for their split (…-train.jsonl, …-valid.jsonl, …-test.jsonl)")
        seconds = time.perf_counter() - t0
        meta = {**meta_extra, "source": source.describe, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
                "dtype": dtype.name, "caps": caps, "counts": counts, "build_seconds": round(seconds, 3),
                "text_chars_encoded": read}
        _publish(tmp, dest, meta)
        mb = read / 1e6
        print(f"token cache: {source.name} x {tok.name}: {sum(c['tokens'] for c in counts.values()):,} tokens kept, "
              f"{mb:.2f} M characters encoded in {seconds:.1f}s ({seconds / max(mb, 1e-9):.2f} s per M) -> {dest}",
              file=sys.stderr, flush=True)
    finally:
        bar.close()
        for f in outs.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)


class _SplitWriter:
    """Encoded documents appended to their split's file, each split stopped at its cap; counts kept."""

    def __init__(self, tok: Tokenizer, caps: dict[str, int | None], counts: dict[str, dict[str, int]],
                 outs: dict[str, Any], dtype: np.dtype, bar: Any) -> None:
        self.tok, self.caps, self.counts, self.outs, self.dtype, self.bar = tok, caps, counts, outs, dtype, bar

    def full(self, s: str) -> bool:
        return self.caps[s] is not None and self.counts[s]["tokens"] >= self.caps[s]

    def flush(self, batch: list[tuple[str, str]]) -> None:
        tok = self.tok
        for (s, text), ids in zip(batch, tok.encode_batch([t for _, t in batch])):
            c, cap = self.counts[s], self.caps[s]
            room = len(ids) if cap is None else cap - c["tokens"]
            if room <= 0:
                continue
            partial = room < len(ids)
            ids = ids[:room]
            raw = (tok.decode(ids.tolist()) if partial else text).encode("utf-8")
            self.outs[s].write(np.asarray(ids, dtype=self.dtype).tobytes())
            c["tokens"] += len(ids)
            c["docs"] += 1
            table = int(tok.byte_lengths[np.asarray(ids, dtype=np.int64)].sum())
            c["table_bytes"] += table
            c["text_bytes"] += table if partial else len(raw)  # a cut document: the bytes its kept ids stand for
            arr = np.frombuffer(raw, dtype=np.uint8)
            c["words"] += count_words(arr)
            c["lines"] += int(np.count_nonzero(arr == 10))
        self.bar.update(sum(len(t) for _, t in batch))


def _encode_all(source: _Source, writer: _SplitWriter) -> int:
    """Read the source's pieces in batches through ``writer``; the characters of text encoded (a cap cuts the
    last batch: more than the tokens kept stand for)."""
    caps, counts = writer.caps, writer.counts
    read = 0
    batch: list[tuple[str, str]] = []
    size = 0
    pending = {sp: 0 for sp in SPLITS}
    for s, text in source.pieces(writer.full):
        batch.append((s, text))
        size += len(text)
        pending[s] += len(text)
        # a capped split is flushed once its pending text could fill what is left of it (a token is at
        # least one character), so a cap stops the reading within about one piece of text
        near_cap = caps[s] is not None and pending[s] >= max(caps[s] - counts[s]["tokens"], 1 << 16)
        if size >= _BATCH_BYTES or len(batch) >= 4096 or near_cap:
            writer.flush(batch)
            read += size
            batch, size, pending = [], 0, {sp: 0 for sp in SPLITS}
    if batch:
        writer.flush(batch)
        read += size
    return read


def _publish(tmp: Path, dest: Path, meta: dict[str, Any]) -> None:
    """``meta.json`` written last, then the directory renamed into place (atomic; a concurrent builder's
    identical cache may win)."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished the same cache first: theirs is identical
        if not (dest / "meta.json").is_file():
            raise


def _open(dest: Path, parts: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cache's meta when it is complete and for these key parts, else None."""
    try:
        meta = json.loads((dest / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != json.loads(json.dumps(parts, default=str)):
        return None
    size = np.dtype(meta["dtype"]).itemsize
    for s in SPLITS:
        f = dest / f"{s}.bin"
        if not f.is_file() or f.stat().st_size != meta["counts"][s]["tokens"] * size:
            return None
    return meta


def _capped_byte_corpus(bc: TextCorpus, caps: dict[str, int | None]) -> TextCorpus:
    if all(c is None for c in caps.values()):
        return bc
    arrs = {s: bc.split(s)[: caps[s]] if caps[s] is not None else bc.split(s) for s in SPLITS}
    return TextCorpus(name=bc.name, train=arrs["train"], val=arrs["val"], test=arrs["test"],
                      words={s: count_words(arrs[s]) for s in SPLITS},
                      lines={s: int(np.count_nonzero(np.asarray(arrs[s]) == 10)) for s in SPLITS},
                      description=f"{bc.description}; capped by data.max_tokens: "
                                  + "/".join(f"{len(arrs[s]):,}" for s in SPLITS))


def load_lm_corpus(data: Mapping[str, Any], progress: bool | None = None) -> TextCorpus:
    """The LM corpus a spec's ``data`` section names, tokenised as it says (see the module docstring).

    ``progress``: a bar while a cache is built (None: when stderr is a terminal).
    """
    corpus = str(_get(data, "corpus", "shakespeare"))
    tok_name = str(_get(data, "tokenizer", BYTE))
    caps = split_caps(data.get("max_tokens"))
    if tok_name == BYTE and corpus.lower() != FILES:
        return _capped_byte_corpus(load_corpus(corpus, data.get("path"), cache_dir=data.get("cache_dir"),
                                               strict_size=bool(_get(data, "strict_size", True))), caps)
    if corpus.lower() != FILES and corpus.lower().replace("-", "").replace("_", "") not in KNOWN_CORPORA:
        raise DataError(f"unknown corpus {corpus!r}; known corpora: {', '.join(KNOWN_CORPORA + (FILES,))}")
    source = _source(data)
    tok = _bpe(data, source, progress) if tok_name == BPE else (
        ByteTokenizer() if tok_name == BYTE else load_tokenizer_file(tok_name))
    parts = {"v": CACHE_VERSION, "source": source.identity, "tokenizer": tok.identity, "caps": caps}
    dest = _cache_root(data) / _key(parts)
    meta = _open(dest, parts)
    if meta is None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _build(dest, source, tok, caps, progress, {"key": parts})
        meta = _open(dest, parts)
        if meta is None:
            raise DataError(f"token cache {dest}: incomplete after building it (was it removed meanwhile?)")
    counts = meta["counts"]
    dtype = np.dtype(meta["dtype"])
    arrs = {s: np.memmap(dest / f"{s}.bin", dtype=dtype, mode="r") for s in SPLITS}
    exact = all(c["text_bytes"] == c["table_bytes"] for c in counts.values())
    desc = (f"{source.describe}; tokenizer {tok.name} (vocab {tok.vocab_size}); tokens train/val/test = "
            + "/".join(f"{counts[s]['tokens']:,}" for s in SPLITS)
            + ("" if exact else "; bytes per token from the tokenizer's pieces (not byte-level: approximate)"))
    return TextCorpus(name=source.name, train=arrs["train"], val=arrs["val"], test=arrs["test"],
                      words={s: counts[s]["words"] for s in SPLITS}, description=desc, vocab_size=tok.vocab_size,
                      lines={s: counts[s]["lines"] for s in SPLITS}, tokenizer=tok.name,
                      byte_lengths=None if tok_name == BYTE else tok.byte_lengths,
                      text_bytes={s: counts[s]["text_bytes"] for s in SPLITS}, cache_dir=str(dest))
