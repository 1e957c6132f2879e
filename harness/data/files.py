"""``data.corpus: files``: documents from local shards, read offline, each assigned to one split.

``data.path`` is a directory (searched recursively), a file, or a glob (``**`` allowed) of shards:

* ``.parquet``: the ``data.text_field`` column (default ``text``), read with pyarrow in row batches;
* ``.jsonl`` / ``.json`` (JSON lines, or one JSON array of objects), optionally ``.gz`` / ``.zst``: the
  ``data.text_field`` of every record; decompressed by pyarrow's codecs, streamed line by line;
* ``.txt`` (optionally ``.gz`` / ``.zst``): one document per file, or several separated by lines that are
  exactly ``<|endoftext|>`` (the separator TinyStories' text files use);
* a directory written by ``datasets``' ``save_to_disk`` (``dataset_dict.json`` for a DatasetDict,
  ``state.json`` for one Dataset), read with ``datasets.load_from_disk`` (``HF_DATASETS_OFFLINE=1``).

Hidden files and folders (``.name``) are skipped. Shards are read in sorted path order, records in file order.

Splits. A shard names its split when a component of its path relative to ``data.path`` (folder or file
name, cut at ``-``, ``_`` and ``.``) is ``train``, ``validation`` / ``valid`` / ``val`` / ``dev``, or ``test``
(``train/chunk1/example_train_0.jsonl.zst``, ``TinyStoriesV2-GPT4-valid.txt``; a path naming two different
splits names none); a save_to_disk DatasetDict
names its splits by key the same way. Every document also has a fixed bucket, ``blake2b(UTF-8 text,
digest_size=8)`` as a big-endian integer mod 100, whose hash split is train for 0-97, val for 98, test
for 99 (98/1/1). A document goes to its shard's named split, except that a train document whose hash
split is val (test) goes there when no shard names val (test); documents of shards that name no split
follow the hash split. So identical texts always land in one split, and with no named shards no document
sits in two splits.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .text import DataError

__all__ = ["Shard", "FileSource", "find_source", "hash_split", "iter_split_documents"]

SPLITS = ("train", "val", "test")
_SPLIT_WORDS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
                "dev": "val", "test": "test", "testing": "test"}
_COMPRESSION = (".gz", ".zst")
_KINDS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".txt": "txt"}
_EOT = "<|endoftext|>"
HINT = ("data.path is a directory, file or glob of .parquet, .jsonl/.json(.gz/.zst), .txt shards or a "
        "datasets save_to_disk directory")


@dataclass(frozen=True)
class Shard:
    path: Path
    kind: str            # parquet | jsonl | json | txt | arrow (a save_to_disk split)
    split: str | None    # the split its name gives, or None (hash split)
    key: str = ""        # save_to_disk: the DatasetDict key (or "" for one Dataset)


@dataclass(frozen=True)
class FileSource:
    """The shards of a ``files`` corpus and what identifies their contents (paths, sizes, mtimes)."""

    root: str
    shards: tuple[Shard, ...]
    fingerprint: tuple[tuple[str, int, int], ...]  # (path, size, mtime_ns) of every file read

    @property
    def named(self) -> set[str]:
        return {s.split for s in self.shards if s.split}


def _kind(p: Path) -> str | None:
    name = p.name.lower()
    for c in ("",) + _COMPRESSION:
        for ext, kind in _KINDS.items():
            if name.endswith(ext + c) and not (kind == "parquet" and c):
                return kind
    return None


def _split_named(rel: str) -> str | None:
    found = {_SPLIT_WORDS[w] for w in re.split(r"[-_./\\]+", rel.lower()) if w in _SPLIT_WORDS}
    return found.pop() if len(found) == 1 else None


def _save_to_disk_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or
                           ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()))


def _stat(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for f in sorted(paths):
        st = f.stat()
        out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def find_source(path: str | None) -> FileSource:
    """The shards ``data.path`` names, or a one-line :class:`DataError`."""
    if not path:
        raise DataError(f"files: no path given: set data.path (--set data.path=DIR|FILE|GLOB); {HINT}")
    p = Path(path).expanduser()
    if _save_to_disk_dir(p):
        files = [f for f in p.rglob("*") if f.is_file()]
        if (p / "dataset_dict.json").is_file():
            try:
                keys = json.loads((p / "dataset_dict.json").read_text())["splits"]
            except (OSError, ValueError, KeyError, TypeError):
                raise DataError(f"files: {p / 'dataset_dict.json'} is not a datasets DatasetDict index "
                                f"(no 'splits' list)") from None
            shards = tuple(Shard(p, "arrow", _SPLIT_WORDS.get(str(k).lower()), str(k)) for k in keys)
        else:
            shards = (Shard(p, "arrow", None, ""),)
        return FileSource(str(p), shards, _stat(files))
    if p.is_dir():
        root = p
        cands = [f for f in p.rglob("*") if f.is_file()]
    elif p.is_file():
        root = p.parent
        cands = [p]
    else:
        prefix = re.split(r"[*?\[]", path, maxsplit=1)[0]
        root = Path(os.path.expanduser(prefix[: prefix.rfind("/") + 1] or "."))
        cands = [Path(f) for f in glob.glob(os.path.expanduser(path), recursive=True)]
        dirs = [c for c in cands if _save_to_disk_dir(c)]
        if dirs and len(dirs) == len(cands) == 1:
            return find_source(str(dirs[0]))
        cands = [f for c in cands for f in ([c] if c.is_file() else (c.rglob("*") if c.is_dir() else []))]
        cands = [f for f in cands if f.is_file()]
    shards = []
    for f in sorted(cands):
        try:
            rel = f.relative_to(root)
        except ValueError:
            rel = Path(f.name)
        if any(part.startswith(".") for part in rel.parts):
            continue
        kind = _kind(f)
        if kind is not None:
            shards.append(Shard(f, kind, _split_named(str(rel.with_suffix("")))))
    if not shards:
        what = "no such file or directory" if not cands and not p.exists() and "*" not in path else \
            f"{len(cands)} files, none a shard"
        raise DataError(f"files: no shards match {path} ({what}); {HINT}")
    return FileSource(str(root), tuple(shards), _stat([s.path for s in shards]))


def hash_bucket(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") % 100


def hash_split(text: str) -> str:
    """98/1/1: the split a document's text hashes to (see the module docstring)."""
    b = hash_bucket(text)
    return "train" if b < 98 else ("val" if b == 98 else "test")


# -- reading --------------------------------------------------------------------------------------------------


def _text_stream(path: Path) -> io.TextIOWrapper:
    import pyarrow as pa  # pyarrow only when shards are read

    name = path.name.lower()
    comp = "gzip" if name.endswith(".gz") else ("zstd" if name.endswith(".zst") else None)
    raw = pa.input_stream(str(path), compression=comp)
    return io.TextIOWrapper(io.BufferedReader(raw, 1 << 20), encoding="utf-8", newline="")


def _check_text(v, where: str, field: str):  # noqa: ANN001, ANN202
    if v is None:
        return None
    if not isinstance(v, str):
        raise DataError(f"files: {where}: field {field!r} is {type(v).__name__}, not a string; set data.text_field "
                        f"to the text column")
    return v


def _read_json_like(shard: Shard, field: str) -> Iterator[str]:
    with _text_stream(shard.path) as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if shard.kind == "json" and head == "[":
            try:
                records = json.loads(head + f.read())
            except ValueError as exc:
                raise DataError(f"files: {shard.path}: not valid JSON ({exc})") from None
            lines = enumerate(records, 1)
        else:
            lines = enumerate(_json_lines(f, head, shard.path), 1)
        for n, rec in lines:
            if not isinstance(rec, dict):
                raise DataError(f"files: {shard.path} record {n}: a {type(rec).__name__}, not an object with a "
                                f"{field!r} field")
            if field not in rec:
                raise DataError(f"files: {shard.path} record {n} has no field {field!r} (fields: "
                                f"{', '.join(map(str, list(rec)[:12]))}); set data.text_field")
            v = _check_text(rec[field], f"{shard.path} record {n}", field)
            if v:
                yield v


def _json_lines(f: io.TextIOWrapper, head: str, path: Path) -> Iterator[dict]:
    first = True
    for n, line in enumerate(f, 1):
        if first:
            line, first = head + line, False
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError as exc:
            raise DataError(f"files: {path} line {n}: not a JSON record ({exc})") from None


def _read_txt(shard: Shard) -> Iterator[str]:
    with _text_stream(shard.path) as f:
        buf: list[str] = []
        for line in f:
            if line.rstrip("\r\n") == _EOT:
                doc = "".join(buf).strip("\n")
                if doc:
                    yield doc
                buf = []
            else:
                buf.append(line)
        doc = "".join(buf).strip("\n")
        if doc:
            yield doc


def _read_parquet(shard: Shard, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(str(shard.path))
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"files: {shard.path} has no column {field!r} (columns: {', '.join(names[:12])}); "
                        f"set data.text_field")
    typ = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(f"files: {shard.path}: column {field!r} is {typ}, not a string; set data.text_field")
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for v in batch.column(0).to_pylist():
            if v:
                yield v


def _read_arrow(shard: Shard, field: str) -> Iterator[str]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets  # only for save_to_disk directories

    ds = datasets.load_from_disk(str(shard.path))
    if shard.key:
        ds = ds[shard.key]
    if field not in ds.column_names:
        raise DataError(f"files: {shard.path}{'/' + shard.key if shard.key else ''} has no column {field!r} "
                        f"(columns: {', '.join(ds.column_names[:12])}); set data.text_field")
    col = ds.data.column(field)
    for chunk in col.chunks:
        for v in chunk.to_pylist():
            v = _check_text(v, str(shard.path), field)
            if v:
                yield v


def read_documents(shard: Shard, field: str) -> Iterator[str]:
    """The non-empty texts of one shard, or a one-line :class:`DataError` naming the file."""
    try:
        if shard.kind == "parquet":
            yield from _read_parquet(shard, field)
        elif shard.kind in ("jsonl", "json"):
            yield from _read_json_like(shard, field)
        elif shard.kind == "txt":
            yield from _read_txt(shard)
        else:
            yield from _read_arrow(shard, field)
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"files: {shard.path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"files: {shard.path}: cannot read this {shard.kind} shard ({msg})") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow / datasets errors on corrupt files
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"files: {shard.path}: cannot read this {shard.kind} shard ({type(exc).__name__}: {msg})") \
            from None


def iter_split_documents(source: FileSource, field: str, full=lambda split: False) -> Iterator[tuple[str, str]]:  # noqa: ANN001
    """``(split, text)`` for every document, by the split rule of the module docstring.

    ``full(split)`` says a split needs no more documents: a shard named for a full split is not read, and
    reading stops when all three are full.
    """
    named = source.named
    for shard in source.shards:
        if all(full(s) for s in SPLITS):
            return
        if shard.split is not None and full(shard.split):
            continue
        for text in read_documents(shard, field):
            h = hash_split(text)
            if shard.split is None:
                split = h
            elif shard.split == "train" and h != "train" and h not in named:
                split = h
            else:
                split = shard.split
            if not full(split):
                yield split, text
            elif all(full(s) for s in SPLITS):
                return
