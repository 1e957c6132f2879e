"""Issue 30: local shards (``data.corpus: files``), byte / BPE / tokenizer.json tokens, the token cache, and bits
per byte for every tokenizer. Every corpus here is written in ``tmp_path`` in its real on-disk format."""
from __future__ import annotations

import gzip
import json
import math
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from harness.cli import main
from harness.data import files as files_mod
from harness.data import tokens as tokens_mod
from harness.data.text import DataError, load_corpus
from harness.data.tokenizer import load_tokenizer_file
from harness.data.tokens import EVAL_FLOOR, load_lm_corpus, lm_tokenizer, lm_vocab_size
from harness.spec import SpecError, load_suite
from harness.store import Store
from harness.suites.lm import LMSuite, build_lm

WORDS = ("the king and queen of a far land rode out at dawn with seven knights who sang of old wars "
         "while rivers ran to the grey sea and every bird was still under the long summer sky").split()
EXTRA = ["naïve", "café", "Größe", "日本", "—", "«quoted»"]


def make_docs(n: int, seed: int = 0, ascii_only: bool = False) -> list[str]:
    rng = random.Random(seed)
    pool = WORDS if ascii_only else WORDS + EXTRA
    docs = []
    for i in range(n):
        sents = [" ".join(rng.choice(pool) for _ in range(rng.randint(6, 14))).capitalize() + "."
                 for _ in range(rng.randint(3, 6))]
        docs.append(f"Story {i}. " + " ".join(sents))
    return docs


def write_parquet(path, docs, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=50)


def write_jsonl(path, docs, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({field: d, "meta": {"n": i}}) + "\n" for i, d in enumerate(docs)).encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines))
    elif path.name.endswith(".zst"):
        with pa.output_stream(str(path), compression="zstd") as f:
            f.write(lines)
    else:
        path.write_bytes(lines)


def write_txt(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n<|endoftext|>\n".join(docs) + "\n", encoding="utf-8")


def write_save_to_disk(path, splits: dict[str, list[str]]):
    import datasets

    if list(splits) == [""]:
        datasets.Dataset.from_dict({"text": splits[""]}).save_to_disk(str(path))
    else:
        datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}) \
            .save_to_disk(str(path))


zstd = pytest.param("jsonl.zst", marks=pytest.mark.skipif(not pa.Codec.is_available("zstd"),
                                                           reason="this pyarrow has no zstd codec"))


def _docs_by_split(src, field="text"):
    out = {"train": [], "val": [], "test": []}
    for split, text in files_mod.iter_split_documents(src, field):
        out[split].append(text)
    return out


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "jsonl.gz", zstd, "json-array", "txt", "save_to_disk"])
def test_every_format_reads_every_document_into_one_hash_split(tmp_path, fmt):
    docs = make_docs(400)
    root = tmp_path / "c"
    if fmt == "parquet":
        write_parquet(root / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", docs[:200])
        write_parquet(root / "data" / "CC-MAIN-2024-10" / "001_00000.parquet", docs[200:])
    elif fmt.startswith("jsonl"):
        write_jsonl(root / f"part-000.{fmt}", docs[:150])
        write_jsonl(root / f"part-001.{fmt}", docs[150:])
    elif fmt == "json-array":
        root.mkdir()
        (root / "all.json").write_text(json.dumps([{"text": d} for d in docs]))
    elif fmt == "txt":
        write_txt(root / "stories.txt", docs)
    else:
        write_save_to_disk(root, {"": docs})
    src = files_mod.find_source(str(root))
    got = _docs_by_split(src)
    assert sorted(sum(got.values(), [])) == sorted(docs)
    for split, texts in got.items():
        assert all(files_mod.hash_split(t) == split for t in texts)
    assert not set(got["train"]) & set(got["val"]) and not set(got["train"]) & set(got["test"])
    assert got["val"] and got["test"] and len(got["train"]) > 0.9 * len(docs)


def test_hash_split_is_the_documented_blake2b_rule():
    import hashlib

    for t in make_docs(50):
        b = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "big") % 100
        assert files_mod.hash_split(t) == ("train" if b < 98 else "val" if b == 98 else "test")


def test_named_splits_slimpajama_and_tinystories_layouts(tmp_path):
    docs = make_docs(300, seed=1)
    sp = tmp_path / "slimpajama"
    write_jsonl(sp / "train" / "chunk1" / "example_train_0.jsonl.gz", docs[:200])
    write_jsonl(sp / "validation" / "chunk1" / "example_holdout_0.jsonl.gz", docs[200:250])
    write_jsonl(sp / "test" / "chunk1" / "example_holdout_0.jsonl.gz", docs[250:])
    got = _docs_by_split(files_mod.find_source(str(sp)))
    assert got == {"train": docs[:200], "val": docs[200:250], "test": docs[250:]}

    # TinyStories: a train and a valid file, no test: test takes the train documents that hash to test
    ts = tmp_path / "tinystories"
    write_txt(ts / "TinyStoriesV2-GPT4-train.txt", docs[:250])
    write_txt(ts / "TinyStoriesV2-GPT4-valid.txt", docs[250:])
    got = _docs_by_split(files_mod.find_source(str(ts)))
    assert got["val"] == docs[250:]
    assert got["test"] == [d for d in docs[:250] if files_mod.hash_split(d) == "test"] and got["test"]
    assert got["train"] == [d for d in docs[:250] if files_mod.hash_split(d) != "test"]

    # a DatasetDict names its splits by key
    dd = tmp_path / "dd"
    write_save_to_disk(dd, {"train": docs[:200], "validation": docs[200:260], "test": docs[260:]})
    got = _docs_by_split(files_mod.find_source(str(dd)))
    assert got == {"train": docs[:200], "val": docs[200:260], "test": docs[260:]}


def test_glob_picks_the_matching_shards_only(tmp_path):
    docs = make_docs(200, seed=2)
    write_parquet(tmp_path / "a.parquet", docs[:100])
    write_parquet(tmp_path / "b.parquet", docs[100:])
    write_jsonl(tmp_path / "c.jsonl", ["never read " * 20])
    src = files_mod.find_source(str(tmp_path / "*.parquet"))
    assert [s.path.name for s in src.shards] == ["a.parquet", "b.parquet"]
    assert sorted(sum(_docs_by_split(src).values(), [])) == sorted(docs)


def _files(tmp_path, n=500, seed=0, **kw):
    root = tmp_path / "corpus"
    write_jsonl(root / "shard-0.jsonl.gz", make_docs(n, seed=seed, **kw))
    return {"corpus": "files", "path": str(root), "cache_dir": str(tmp_path / "cache")}


def test_token_cache_is_built_once_then_reused_and_follows_the_files(tmp_path, monkeypatch):
    data = {**_files(tmp_path), "tokenizer": "bpe", "vocab_size": 320}
    c1 = load_lm_corpus(data, progress=False)
    assert c1.train.dtype == np.uint16 and c1.vocab_size == 320 and c1.tokenizer == "bpe"
    caches = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
    assert len(caches) == 2 and any(n.startswith("bpe-") for n in caches)  # the tokens and the BPE beside them

    def no(*a, **k):
        raise AssertionError("re-tokenised / re-trained although the cache is there")
    monkeypatch.setattr(tokens_mod, "_build", no)
    monkeypatch.setattr(tokens_mod, "train_bpe", no)
    c2 = load_lm_corpus(data, progress=False)
    assert all(np.array_equal(c1.split(s), c2.split(s)) for s in ("train", "val", "test"))
    assert c2.text_bytes == c1.text_bytes and c2.words == c1.words
    monkeypatch.undo()

    shard = tmp_path / "corpus" / "shard-0.jsonl.gz"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the files changed: a new cache
    load_lm_corpus(data, progress=False)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 4
    assert not [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.name.startswith(".")]  # no temp left


def test_bpe_vocab_byte_lengths_and_round_trip(tmp_path):
    data = {**_files(tmp_path), "tokenizer": "bpe", "vocab_size": 400}
    c = load_lm_corpus(data, progress=False)
    tok = lm_tokenizer(data)
    assert tok.vocab_size == 400 == lm_vocab_size(data) and int(c.train.max()) < 400
    assert len(tok.tok.get_vocab()) > 300  # merges were learnt
    for text in make_docs(20, seed=9) + ["é\n日本語 — «x»", "  two  spaces\n\n"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tok.byte_lengths[ids].sum()) == len(text.encode("utf-8"))  # exact bytes per token id
    meta = json.loads((lambda d: (d / "meta.json").read_text())(__import__("pathlib").Path(c.cache_dir)))
    for s, counts in meta["counts"].items():
        assert counts["text_bytes"] == counts["table_bytes"] > 0
        assert c.n_bytes[s] == counts["text_bytes"]
    # a saved tokenizer.json (or its folder) is a tokenizer PATH
    f = tmp_path / "tok" / "tokenizer.json"
    f.parent.mkdir()
    tok.tok.save(str(f))
    for p in (str(f), str(f.parent)):
        other = {**_files(tmp_path), "tokenizer": p}
        assert lm_vocab_size(other) == len(tok.tok.get_vocab())
        c2 = load_lm_corpus(other, progress=False)
        assert np.array_equal(c2.val, c.val)


def test_bits_per_byte_is_token_nll_over_utf8_bytes_by_hand(tmp_path):
    """bpb = summed token NLL in bits / UTF-8 bytes of the evaluated targets, computed here independently by
    decoding the targets (ASCII text, so every token decodes to whole characters)."""
    data = {**_files(tmp_path, ascii_only=True), "tokenizer": "bpe", "vocab_size": 300}
    spec = load_suite("lm", preset="tiny", routers=["hash"],
                      overrides=[f"data.{k}={v}" for k, v in data.items()] + ["model.context=16"])
    run = spec.runs()[0]
    suite = LMSuite()
    corpus = suite.prepare(run)
    tok = lm_tokenizer(data)
    torch.manual_seed(0)
    model = build_lm(run).eval()
    with torch.no_grad():
        got = suite.evaluate(model, run, "val", torch.device("cpu"), lambda: None, 2)
    ctx, bs = 16, run.train.batch_size
    ids = np.asarray(corpus.val[: 2 * bs * ctx + 1]).astype(np.int64)
    x = torch.from_numpy(ids[:-1].reshape(-1, ctx))
    y = torch.from_numpy(ids[1:].reshape(-1, ctx))
    with torch.no_grad():
        logits, _ = model(x)
    nll = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum"))
    n_bytes = len(tok.decode(y.reshape(-1).tolist()).encode("utf-8"))
    assert n_bytes > y.numel()  # subword tokens: more than one byte each
    assert got["val_bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)
    assert got["val_tok_ppl"] == pytest.approx(math.exp(nll / y.numel()), rel=1e-6)
    assert got["val_byte_ppl"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-6)


def test_byte_tokenizer_numbers_unchanged():
    """The byte path is the old one: the same arrays, the old formula to the last bit, no tok_ppl row."""
    new = load_lm_corpus({"corpus": "shakespeare"})
    old = load_corpus("shakespeare")
    assert new.byte_lengths is None and all(np.array_equal(new.split(s), old.split(s)) for s in ("val", "test"))
    spec = load_suite("lm", preset="tiny", routers=["hash"])
    run = spec.runs()[0]
    torch.manual_seed(0)
    model = build_lm(run).eval()
    assert model.vocab_size == 256 and model.blocks[0].ffn.router.vocab_size == 256
    with torch.no_grad():
        got = LMSuite().evaluate(model, run, "val", torch.device("cpu"), lambda: None, 2)
    total_nll, total_tok = 0.0, 0
    from harness.data.text import iter_eval_batches
    for x, y in iter_eval_batches(old.val, run.train.batch_size, run.model.context, 2):
        with torch.no_grad():
            out, _ = model(x)
        total_nll += float(F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum"))
        total_tok += y.numel()
    nll = total_nll / total_tok
    assert got["val_bpb"] == nll / math.log(2)  # bit for bit
    assert got["val_byte_ppl"] == math.exp(nll)
    assert got["val_word_ppl"] == math.exp(nll * len(old.val) / old.words["val"])
    assert "val_tok_ppl" not in got


def test_spec_keys_keep_every_existing_hash_and_reject_bad_values():
    base = load_suite("lm", preset="regress", routers=["smoe", "hash"])
    same = load_suite("lm", preset="regress", routers=["smoe", "hash"],
                      overrides=["data.tokenizer=byte", "data.text_field=text"])
    assert [r.spec_hash for r in base.runs()] == [r.spec_hash for r in same.runs()]
    golden = json.load(open(os.path.join(os.path.dirname(__file__), "..", "tasks", "regress", "lm.json")))
    assert all(r.spec_hash == golden["routers"][r.router]["spec_hash"] for r in base.runs())
    bpe = load_suite("lm", preset="regress", routers=["smoe"], overrides=["data.tokenizer=bpe"])
    assert bpe.runs()[0].spec_hash != base.runs()[0].spec_hash
    for bad, needle in ((["data.vocab_size=1024"], "applies to data.tokenizer=bpe"),
                        (["data.tokenizer=bpe", "data.vocab_size=100"], "must be >= 257"),
                        (["data.text_field=body"], "applies to data.corpus=files"),
                        (["data.max_tokens=0"], "must be >= 1"),
                        (["data.tokenizer="], "must be a string"),
                        (["data.tokenizr=bpe"], "did you mean 'data.tokenizer'")):
        with pytest.raises(SpecError, match=needle):
            load_suite("lm", preset="tiny", overrides=bad)
    with pytest.raises(SpecError, match="applies to the lm suite"):
        load_suite("vision", preset="tiny", overrides=["data.tokenizer=bpe"])


def test_model_vocab_and_hash_router_follow_the_tokenizer():
    spec = load_suite("lm", preset="tiny", routers=["hash", "stablemoe"],
                      overrides=["data.tokenizer=bpe", "data.vocab_size=1024"])
    for run in spec.runs():
        assert lm_vocab_size(run.to_dict()["data"]) == 1024
        model = build_lm(run.to_dict())  # from the stored spec dict, as `harness eval` builds it
        assert model.vocab_size == 1024 and model.head.out_features == 1024
        router = model.blocks[0].ffn.router
        assert router.vocab_size == 1024
        ids = torch.tensor([[1023, 512, 7, 300]])
        logits, routings = model(ids)
        assert logits.shape == (1, 4, 1024) and len(routings) == 2
    hash_router = build_lm(spec.runs()[0]).blocks[0].ffn.router
    assert hash_router.table.shape[0] == 1024  # ids hash over the whole vocabulary: each expert gets ~V/E ids
    counts = torch.bincount(hash_router.table[:, 0], minlength=4)
    assert int(counts.max() - counts.min()) <= 1


def test_max_tokens_caps_the_train_stream(tmp_path):
    data = {**_files(tmp_path, n=600), "max_tokens": 5000}
    c = load_lm_corpus(data, progress=False)
    full = load_lm_corpus({k: v for k, v in data.items() if k != "max_tokens"}, progress=False)
    assert len(c.train) == 5000 and c.train.dtype == np.uint8  # byte tokens of a files corpus
    assert np.array_equal(c.train, full.train[:5000])
    assert len(full.val) < EVAL_FLOOR and np.array_equal(c.val, full.val)
    # byte corpora are capped by slicing
    s = load_lm_corpus({"corpus": "shakespeare", "max_tokens": 70000})
    assert len(s.train) == 70000 and len(s.val) == EVAL_FLOOR == len(s.test)


def test_shakespeare_with_bpe_and_max_tokens(tmp_path):
    data = {"corpus": "shakespeare", "tokenizer": "bpe", "vocab_size": 512, "cache_dir": str(tmp_path / "cache"),
            "max_tokens": 200_000}
    c = load_lm_corpus(data, progress=False)
    byte = load_corpus("shakespeare")
    assert len(c.train) == 200_000 and len(c.val) == EVAL_FLOOR  # val/test capped at max(200k // 98, 65536)
    assert c.n_bytes["val"] > 1.5 * EVAL_FLOOR  # subword tokens: bytes per token > 1
    text = bytes(np.asarray(byte.val[: c.n_bytes["val"]])).decode()
    assert lm_tokenizer(data).decode(np.asarray(c.val).tolist()) == text  # the val split's first bytes, in order


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------------------


def _bad_world(tmp_path):
    t = tmp_path / "bad"
    t.mkdir()
    (t / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    (t / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"not gzip at all " * 40)
    write_jsonl(t / "notext" / "a.jsonl", ["x" * 50] * 3, field="body")
    write_parquet(t / "notextpq" / "a.parquet", ["x" * 50] * 3, field="content")
    (t / "few").mkdir()
    write_jsonl(t / "few" / "a.jsonl", make_docs(3))
    (t / "tok.json").write_text('{"this": "is not a tokenizer"}')
    return t


@pytest.mark.parametrize("case,sets,needle", [
    ("no-match", ["data.path=$T/nothing/*.parquet"], "no shards match"),
    ("no-path", [], "no path given"),
    ("corrupt-parquet", ["data.path=$T/corrupt.parquet"], "corrupt.parquet: cannot read"),
    ("corrupt-gzip", ["data.path=$T/corrupt.jsonl.gz"], "corrupt.jsonl.gz: cannot read"),
    ("no-text-field-jsonl", ["data.path=$T/notext"], "has no field 'text' (fields: body, meta)"),
    ("no-text-field-parquet", ["data.path=$T/notextpq"], "has no column 'text' (columns: content, id)"),
    ("too-few-documents", ["data.path=$T/few"], "has no documents"),
    ("tokenizer-not-loadable", ["data.path=$T/few", "data.tokenizer=$T/tok.json"], "is not a Hugging Face"),
    ("tokenizer-missing", ["data.path=$T/few", "data.tokenizer=$T/none.json"], "none.json not found"),
    ("vocab-too-small", ["data.path=$T/few", "data.tokenizer=bpe", "data.vocab_size=200"], "must be >= 257"),
])
def test_bad_corpora_one_line_exit_2_nothing_written(tmp_path, capsys, case, sets, needle):
    t = _bad_world(tmp_path)
    store = tmp_path / "store" / "h.duckdb"
    argv = ["run", "--preset", "tiny", "--routers", "smoe", "--quiet", "--no-eval", "--store", str(store),
            "--set", "data.corpus=files", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    for s in sets:
        argv += ["--set", s.replace("$T", str(t))]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("harness: error: "), (case, err)
    assert needle in err[0], (case, err[0])
    assert not (tmp_path / "store").exists()
    cache = tmp_path / "cache" / "tokens"
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith("bpe-")]


# -- end to end: harness run on shards with a BPE, into a store, in bits per byte ---------------------------------


@pytest.mark.parametrize("layout", ["parquet-glob", "jsonl.gz-dir", "save_to_disk"])
def test_harness_run_on_files_with_bpe_lands_in_the_store(tmp_path, capsys, layout):
    docs = make_docs(500, seed=3)
    root = tmp_path / "corpus"
    if layout == "parquet-glob":
        write_parquet(root / "000.parquet", docs[:250])
        write_parquet(root / "001.parquet", docs[250:])
        path = str(root / "*.parquet")
    elif layout == "jsonl.gz-dir":
        write_jsonl(root / "a" / "000.jsonl.gz", docs[:250])
        write_jsonl(root / "b" / "001.jsonl.gz", docs[250:])
        path = str(root)
    else:
        write_save_to_disk(root, {"": docs})
        path = str(root)
    store = tmp_path / "h.duckdb"
    rc = main(["run", "--preset", "tiny", "--routers", "hash", "--quiet", "--no-eval", "--store", str(store),
               "--set", "data.corpus=files", "--set", f"data.path={path}", "--set", "data.tokenizer=bpe",
               "--set", "data.vocab_size=320", "--set", f"data.cache_dir={tmp_path / 'cache'}",
               "--set", "train.steps=6", "--set", "train.eval_every=3"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    with Store(store).reader() as con:
        rows = dict(con.execute("SELECT m.name, m.value FROM metrics m JOIN runs r USING (run_id) "
                                "WHERE r.status = 'finished'").fetchall())
        cfg = json.loads(con.execute("SELECT config FROM runs").fetchone()[0])
    assert 0 < rows["val_bpb"] < 20 and rows["test_bpb"] > 0 and rows["val_tok_ppl"] > 1
    assert cfg["data"]["tokenizer"] == "bpe" and cfg["data"]["vocab_size"] == 320


def test_lm_eval_bridge_tokenises_with_the_runs_tokenizer(tmp_path, capsys):
    """A BPE run, then `harness eval` on it: the bridge encodes with the run's BPE (the offline task runs)."""
    store = tmp_path / "h.duckdb"
    cache = tmp_path / "cache"
    data = {**_files(tmp_path, n=500, seed=4), "tokenizer": "bpe", "vocab_size": 300}
    rc = main(["run", "--preset", "tiny", "--routers", "smoe", "--quiet", "--no-eval", "--store", str(store),
               *sum((["--set", f"data.{k}={v}"] for k, v in data.items()), []),
               "--set", "train.steps=4", "--set", "train.eval_every=2"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    with Store(store).reader() as con:
        run_id = con.execute("SELECT run_id FROM runs").fetchone()[0]
    from harness.lmeval.model import MoEHarnessLM

    lm = MoEHarnessLM(pretrained=run_id, store=str(store), device="cpu")
    tok = lm_tokenizer(data)
    text = "The king rode out at dawn.\n"
    assert lm.tok_encode(text) == tok.encode(text) and len(lm.tok_encode(text)) < len(text.encode())
    assert lm.prefix_token_id == tok.newline_id and lm.tok_decode(lm.tok_encode(text)) == text
    (saved,) = [p / "tokenizer.json" for p in (cache / "tokens").iterdir() if p.name.startswith("bpe-")]
    assert load_tokenizer_file(saved).tok.to_str() == tok.tok.to_str()  # the BPE cached beside the token cache
    rc = main(["eval", run_id, "--store", str(store), "--tasks", "shakespeare_ppl", "--limit", "2", "--device", "cpu",
               "--quiet"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    with Store(store).reader() as con:
        names = {r[0] for r in con.execute("SELECT name FROM metrics WHERE name LIKE 'lmeval/%'").fetchall()}
    assert "lmeval/shakespeare_ppl/bits_per_byte" in names, names


def test_bpe_training_is_deterministic(tmp_path):
    """The spec hash stands for the BPE: training it again (another cache, another machine) gives the same file."""
    from harness.data.tokenizer import train_bpe

    docs = make_docs(300, seed=7)
    a = train_bpe(iter(docs), 400, tmp_path / "a" / "tokenizer.json")
    b = train_bpe(iter(docs), 400, tmp_path / "b" / "tokenizer.json")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a.identity == b.identity and len(a.tok.get_vocab()) > 300


def test_a_sentencepiece_style_tokenizer_file_counts_its_pieces(tmp_path):
    """A tokenizer.json that is not byte-level (Metaspace "▁" + byte fallback, as Llama-2's): it loads, its
    newline is the last id of encode("\\n"), and each id counts the bytes of its own piece; the cache records
    both byte counts, which differ only by the "▁" the pre-tokenizer puts before each document."""
    import tokenizers as tk

    docs = make_docs(500, seed=5)
    tok = tk.Tokenizer(tk.models.BPE(byte_fallback=True, unk_token=None))
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace()
    tok.decoder = tk.decoders.Sequence([tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(),
                                        tk.decoders.Fuse(), tk.decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(docs, tk.trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                          special_tokens=["<unk>"]))
    cfg = json.loads(tok.to_str())
    vocab = cfg["model"]["vocab"]
    n = len(vocab)
    vocab.update({f"<0x{b:02X}>": n + b for b in range(256)})  # the byte-fallback pieces Llama-2's vocab holds
    f = tmp_path / "sp" / "tokenizer.json"
    f.parent.mkdir()
    f.write_text(json.dumps(cfg))
    data = {**_files(tmp_path), "tokenizer": str(f)}
    t = lm_tokenizer(data)
    assert not t.byte_level and t.decode([t.newline_id]).strip(" ") == "\n"
    c = load_lm_corpus(data, progress=False)
    meta = json.loads((__import__("pathlib").Path(c.cache_dir) / "meta.json").read_text())
    for counts in meta["counts"].values():
        assert 0 < counts["table_bytes"] - counts["text_bytes"] <= counts["docs"]
    assert "approximate" in c.description


def test_quiet_builds_the_token_cache_without_a_bar(tmp_path, capsys, monkeypatch):
    """--quiet reaches the token cache: the first run of a new corpus tokenises it with progress=False."""
    seen = []
    real = tokens_mod._build

    def spy(dest, source, tok, caps, progress, meta_extra):
        seen.append(progress)
        return real(dest, source, tok, caps, progress, meta_extra)
    monkeypatch.setattr(tokens_mod, "_build", spy)
    data = _files(tmp_path, n=500, seed=8)
    rc = main(["run", "--preset", "tiny", "--routers", "dense", "--quiet", "--no-eval",
               "--store", str(tmp_path / "h.duckdb"), *sum((["--set", f"data.{k}={v}"] for k, v in data.items()), []),
               "--set", "train.steps=2", "--set", "train.eval_every=1"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert seen == [False]


@pytest.mark.parametrize("name", ["wikitext2", "text8"])
def test_wikitext_and_text8_with_bpe_keep_their_splits(tmp_path, name):
    """The raw byte corpora under a BPE: the same split bytes, tokenised (decoding gives the split back)."""
    text = "\n".join(make_docs(400, seed=6, ascii_only=True)) + "\n"
    if name == "wikitext2":
        n = len(text) // 10
        for fn, part in (("wiki.train.raw", text[: 8 * n]), ("wiki.valid.raw", text[8 * n: 9 * n]),
                         ("wiki.test.raw", text[9 * n:])):
            (tmp_path / fn).write_text(part)
        path = tmp_path
    else:
        path = tmp_path / "text8"
        path.write_text(text)
    data = {"corpus": name, "path": str(path), "strict_size": False, "tokenizer": "bpe", "vocab_size": 300,
            "cache_dir": str(tmp_path / "cache")}
    c = load_lm_corpus(data, progress=False)
    byte = load_corpus(name, str(path), strict_size=False)
    tok = lm_tokenizer(data)
    for s in ("train", "val", "test"):
        assert tok.decode(np.asarray(c.split(s)).tolist()).encode() == bytes(np.asarray(byte.split(s)))
        assert c.n_bytes[s] == len(byte.split(s)) and c.words[s] == byte.words[s]
