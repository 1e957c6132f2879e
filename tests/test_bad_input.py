"""Bad input, table-driven: every sub-command, every argument and ``--set`` key with bad values.

Each case must exit 2 with exactly one stderr line ``harness: error: ...`` (no traceback) and write
nothing: no store file, no runs directory, no file touched in the test's directory. The work itself
(training, benchmarking, evaluating, serving) is replaced by a tripwire, so a case that slips past
validation fails loudly instead of running. ``hypothesis`` fuzzes the spec parser (``--set``).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harness.tools.board
import harness.tools.regress
import harness.tools.regress.ab
import harness.lmeval
import harness.bench
import harness.training.runner
from harness.cli import build_parser, main
from harness.errors import UserError
from harness.routing.registry import PluginLoadError, UnknownRouterError
from harness.spec import SpecError, load_suite
from harness.store import Store

# one worker runs this module: its module-scoped fixtures are built once (Makefile: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_bad_input")

SUBCOMMANDS = ("routers", "run", "runs", "show", "bench", "eval", "lm-eval", "board", "claims", "compare", "regress",
               "doctor", "import", "export")
R = ["run", "--preset", "tiny", "--quiet", "--no-eval"]  # a run that would start at once if valid
S = ["run", "--preset", "tiny", "--quiet", "--no-eval", "--set"]

# (id, argv) ; placeholders: $F a file, $D a directory, $T the test directory, $G a file that is not a
# DuckDB store, $H a valid store with one finished run, $Y a directory named x.yaml, $B a bad YAML,
# $N a non-UTF-8 .yaml, $L a YAML list, $U a non-ASCII directory
CASES: list[tuple[str, list[str]]] = [
    # top level
    ("no-command", []),
    ("unknown-command", ["nosuch"]),
    ("unknown-command-nonascii", ["rün"]),
    ("unknown-option", ["--bogus"]),
    ("routers-extra-arg", ["routers", "extra"]),
    # run: --seeds
    ("seeds-letters", R + ["--seeds", "a,b"]),
    ("seeds-empty", R + ["--seeds", ""]),
    ("seeds-comma", R + ["--seeds", ","]),
    ("seeds-negative", R + ["--seeds", "-1"]),
    ("seeds-too-large", R + ["--seeds", "99999999999"]),
    ("seeds-float", R + ["--seeds", "1.5"]),
    ("seeds-duplicate", R + ["--seeds", "0,0"]),
    ("seeds-nonascii", R + ["--seeds", "٣"]),
    # run: --routers
    ("routers-empty", R + ["--routers", ""]),
    ("routers-comma", R + ["--routers", ","]),
    ("routers-unknown", R + ["--routers", "nosuchrouter"]),
    ("routers-nonascii", R + ["--routers", "smöe"]),
    ("routers-duplicate", R + ["--routers", "smoe,smoe"]),
    ("routers-undecodable", R + ["--routers", "sm\udcffoe"]),
    # run: --suite / --preset
    ("suite-unknown", ["run", "--suite", "nosuch"]),
    ("suite-empty", ["run", "--suite", ""]),
    ("suite-missing-yaml", ["run", "--suite", "$T/none.yaml"]),
    ("suite-yaml-is-dir", ["run", "--suite", "$Y"]),
    ("suite-bad-yaml", ["run", "--suite", "$B"]),
    ("suite-binary-yaml", ["run", "--suite", "$N"]),
    ("suite-yaml-list", ["run", "--suite", "$L"]),
    ("suite-nonascii", ["run", "--suite", "ñandú"]),
    ("preset-unknown", ["run", "--preset", "nosuch"]),
    ("preset-empty", ["run", "--preset", ""]),
    ("preset-nonascii", ["run", "--preset", "tïny"]),
    # run: --set syntax
    ("set-no-equals", S + ["noequals"]),
    ("set-empty", S + [""]),
    ("set-empty-key", S + ["=1"]),
    ("set-unknown-section", S + ["nosection.x=1"]),
    ("set-unknown-key", S + ["train.stpes=10"]),
    ("set-nonascii-key", S + ["träin.steps=10"]),
    ("set-section-scalar", S + ["model=5"]),
    ("set-key-into-scalar", S + ["model.d_model.x=1"]),
    ("set-router-args-scalar", S + ["router_args=5"]),
    ("set-router-args-unknown-router", S + ["router_args.nosuch.x=1"]),
    ("set-router-args-bad-key", S + ["router_args.smoe.nonsense=1"]),
    ("set-routers-empty-list", S + ["routers=[]"]),
    ("set-seeds-letters", S + ["seeds=[a]"]),
    ("set-seeds-negative", S + ["seeds=[-1]"]),
    ("set-suite-unknown", S + ["suite=nosuch"]),
    # run: --set wrong type / out of range, per key
    ("model.d_model-zero", S + ["model.d_model=0"]),
    ("model.d_model-float", S + ["model.d_model=1.5"]),
    ("model.d_model-bool", S + ["model.d_model=true"]),
    ("model.d_model-list", S + ["model.d_model=[1,2]"]),
    ("model.n_layers-zero", S + ["model.n_layers=0"]),
    ("model.n_heads-zero", S + ["model.n_heads=0"]),
    ("model.n_heads-indivisible", S + ["model.n_heads=3"]),
    ("model.d_ff-negative", S + ["model.d_ff=-1"]),
    ("model.num_experts-zero", S + ["model.num_experts=0"]),
    ("model.top_k-zero", S + ["model.top_k=0"]),
    ("model.top_k-above-E", S + ["model.top_k=9"]),
    ("model.moe_every-zero", S + ["model.moe_every=0"]),
    ("model.capacity_factor-zero", S + ["model.capacity_factor=0"]),
    ("model.capacity_factor-text", S + ["model.capacity_factor=big"]),
    ("model.dropout-above-1", S + ["model.dropout=1.5"]),
    ("model.dropout-negative", S + ["model.dropout=-0.1"]),
    ("model.context-zero", S + ["model.context=0"]),
    ("model.activation-list", S + ["model.activation=[1]"]),
    ("model.expert_parallel-text", S + ["model.expert_parallel=maybe"]),
    ("train.steps-text", S + ["train.steps=abc"]),
    ("train.steps-zero", S + ["train.steps=0"]),
    ("train.steps-negative", S + ["train.steps=-5"]),
    ("train.steps-empty", S + ["train.steps="]),
    ("train.batch_size-zero", S + ["train.batch_size=0"]),
    ("train.lr-zero", S + ["train.lr=0"]),
    ("train.lr-nan", S + ["train.lr=.nan"]),
    ("train.lr-inf", S + ["train.lr=.inf"]),
    ("train.lr-text", S + ["train.lr=fast"]),
    ("train.min_lr_ratio-above-1", S + ["train.min_lr_ratio=2"]),
    ("train.warmup_steps-negative", S + ["train.warmup_steps=-1"]),
    ("train.weight_decay-negative", S + ["train.weight_decay=-1"]),
    ("train.beta1-above-1", S + ["train.beta1=1.5"]),
    ("train.beta2-negative", S + ["train.beta2=-0.1"]),
    ("train.grad_clip-negative", S + ["train.grad_clip=-1"]),
    ("train.eval_every-zero", S + ["train.eval_every=0"]),
    ("train.eval_batches-zero", S + ["train.eval_batches=0"]),
    ("train.ckpt_every-zero", S + ["train.ckpt_every=0"]),
    ("train.device-unknown", S + ["train.device=tpu"]),
    ("train.dtype-unknown", S + ["train.dtype=fp8"]),
    ("train.adamw-unknown", S + ["train.adamw=fast"]),
    ("train.adamw-list", S + ["train.adamw=[fused]"]),
    ("train.threads-zero", S + ["train.threads=0"]),
    ("train.threads-negative", S + ["train.threads=-1"]),
    ("data.corpus-unknown", S + ["data.corpus=nope"]),
    ("data.corpus-nonascii", S + ["data.corpus=ßhakespeare"]),
    ("data.path-missing", S + ["data.corpus=wikitext103", "--set", "data.path=$T/nowhere"]),
    ("data.strict_size-text", S + ["data.strict_size=perhaps"]),
    ("data.workers-negative", S + ["data.workers=-1"]),
    ("data.augment-number", S + ["data.augment=3"]),
    # issue 30: tokenizers and local shards
    ("data.tokenizer-missing-file", S + ["data.tokenizer=$T/none.json"]),
    ("data.tokenizer-not-a-tokenizer", S + ["data.tokenizer=$F"]),
    ("data.tokenizer-empty", S + ["data.tokenizer="]),
    ("data.vocab_size-too-small", S + ["data.tokenizer=bpe", "--set", "data.vocab_size=256"]),
    ("data.vocab_size-without-bpe", S + ["data.vocab_size=1024"]),
    ("data.text_field-not-files", S + ["data.text_field=body"]),
    ("data.max_tokens-zero", S + ["data.max_tokens=0"]),
    ("data.max_tokens-below-context", S + ["data.max_tokens=10"]),
    ("data.files-no-path", S + ["data.corpus=files"]),
    ("data.files-no-match", S + ["data.corpus=files", "--set", "data.path=$T/nowhere/*.parquet"]),
    ("data.files-corrupt-parquet", S + ["data.corpus=files", "--set", "data.path=$T/corrupt.parquet"]),
    ("data.files-corrupt-gzip", S + ["data.corpus=files", "--set", "data.path=$T/corrupt.jsonl.gz"]),
    ("data.files-no-text-field", S + ["data.corpus=files", "--set", "data.path=$T/notext"]),
    ("eval.enabled-text", S + ["eval.enabled=yes please"]),
    ("eval.limit-negative", S + ["eval.limit=-1"]),
    ("eval.batch_size-zero", S + ["eval.batch_size=0"]),
    ("eval.tasks-unknown", ["run", "--preset", "tiny", "--quiet", "--set", "eval.tasks=nosuch_task"]),
    # run: paths
    ("store-is-dir", R + ["--store", "$D"]),
    ("store-empty", R + ["--store", ""]),
    ("store-under-file", R + ["--store", "$F/x.duckdb"]),
    ("store-in-proc", R + ["--store", "/proc/nope/x.duckdb"]),
    ("store-not-duckdb", R + ["--store", "$G"]),
    ("store-nul-byte", R + ["--store", "a\0b.duckdb"]),
    ("store-nonascii-dir", R + ["--store", "$U"]),
    ("store-readonly-dir", R + ["--store", "$T/ro/x.duckdb"]),
    ("runs-dir-is-file", R + ["--runs-dir", "$F"]),
    ("runs-dir-under-file", R + ["--runs-dir", "$F/runs"]),
    ("runs-dir-in-proc", R + ["--runs-dir", "/proc/nope/runs"]),
    ("runs-dir-empty", R + ["--runs-dir", ""]),
    # run: flags
    ("resume-and-restart", R + ["--resume", "--restart"]),
    ("jobs-zero", R + ["--jobs", "0"]),
    ("jobs-text", R + ["--jobs", "many"]),
    ("nproc-zero", R + ["--nproc", "0"]),
    ("nproc-text", R + ["--nproc", "abc"]),
    ("node-rank-negative", R + ["--node-rank", "-1"]),
    ("run-extra-positional", R + ["extra"]),
    # run: --sweep (every point is validated before any trains)
    ("sweep-no-equals", R + ["--sweep", "model.num_experts"]),
    ("sweep-empty-values", R + ["--sweep", "model.num_experts="]),
    ("sweep-empty-value", R + ["--sweep", "model.num_experts=4,,8"]),
    ("sweep-unknown-key", R + ["--sweep", "model.num_exprts=4,8"]),
    ("sweep-bad-value-second-point", R + ["--sweep", "model.top_k=1,9"]),
    ("sweep-text-value", R + ["--sweep", "train.steps=10,many"]),
    ("sweep-and-set-same-key", R + ["--set", "model.top_k=1", "--sweep", "model.top_k=1,2"]),
    ("sweep-key-twice", R + ["--sweep", "model.top_k=1,2", "--sweep", "model.top_k=2"]),
    ("sweep-value-twice", R + ["--sweep", "model.top_k=1,1.0"]),
    ("sweep-routers", R + ["--sweep", "routers=smoe,xmoe"]),
    ("sweep-precision", R + ["--sweep", "model.top_k=1,2", "--precision", "0.01", "--store", "$T/p.duckdb"]),
    ("sweep-nproc", R + ["--sweep", "model.top_k=1,2", "--nproc", "2"]),
    # runs
    ("runs-store-is-dir", ["runs", "--store", "$D"]),
    ("runs-store-missing", ["runs", "--store", "$T/none.duckdb"]),
    ("runs-store-not-duckdb", ["runs", "--store", "$G"]),
    ("runs-suite-unknown", ["runs", "--suite", "nosuch", "--store", "$H"]),
    # show
    ("claims-store-missing", ["claims", "--store", "$T/none.duckdb"]),
    ("claims-store-not-duckdb", ["claims", "--store", "$G"]),
    ("claims-alpha-out-of-range", ["claims", "--store", "$H", "--alpha", "1.5"]),
    ("claims-table-missing", ["claims", "--store", "$H", "--claims", "$T/none.yaml"]),
    ("claims-along-unknown-key", ["claims", "--store", "$H", "--along", "model.num_exprts"]),
    ("claims-along-one-point", ["claims", "--store", "$H", "--along", "budget"]),
    ("claims-along-one-value", ["claims", "--store", "$H", "--along", "model.num_experts"]),
    ("claims-baseline-without-along", ["claims", "--store", "$H", "--baseline", "smoe"]),
    ("compare-along-unknown-key", ["compare", "--store", "$H", "--along", "nosuch"]),
    ("compare-store-missing", ["compare", "--store", "$T/none.duckdb"]),
    ("compare-store-is-dir", ["compare", "--store", "$D"]),
    ("compare-baseline-unknown", ["compare", "--store", "$H", "--baseline", "nosuchrouter"]),
    ("compare-metric-unknown", ["compare", "--store", "$H", "--metric", "no_such_metric"]),
    ("run-precision-negative", ["run", "--precision", "-1", "--store", "$T/p.duckdb"]),
    ("run-precision-text", ["run", "--precision", "abc", "--store", "$T/p.duckdb"]),
    ("run-precision-rerun", ["run", "--precision", "0.01", "--rerun", "--store", "$T/p.duckdb"]),
    ("show-missing-id", ["show"]),
    ("show-empty-id", ["show", "", "--store", "$H"]),
    ("show-unknown-id", ["show", "nosuch", "--store", "$H"]),
    ("show-wildcard-id", ["show", "%", "--store", "$H"]),
    ("show-nonascii-id", ["show", "rün", "--store", "$H"]),
    ("show-store-missing", ["show", "x", "--store", "$T/none.duckdb"]),
    # bench
    ("bench-routers-unknown", ["bench", "--routers", "nosuchrouter", "--store", "$T/b.duckdb"]),
    ("bench-routers-empty", ["bench", "--routers", "", "--store", "$T/b.duckdb"]),
    ("bench-experts-text", ["bench", "--experts", "a"]),
    ("bench-experts-zero", ["bench", "--experts", "0"]),
    ("bench-tokens-negative", ["bench", "--tokens", "-1"]),
    ("bench-d-model-text", ["bench", "--d-model", "x"]),
    ("bench-d-ff-zero", ["bench", "--d-ff", "0"]),
    ("bench-top-k-zero", ["bench", "--top-k", "0"]),
    ("bench-top-k-above-E", ["bench", "--top-k", "9", "--experts", "8", "--store", "$T/b.duckdb"]),
    ("bench-repeats-one", ["bench", "--repeats", "1"]),
    ("bench-warmup-negative", ["bench", "--warmup", "-1"]),
    ("bench-dtype-unknown", ["bench", "--dtype", "fp8"]),
    ("bench-device-unknown", ["bench", "--device", "tpu"]),
    ("bench-seed-text", ["bench", "--seed", "a"]),
    ("bench-threads-zero", ["bench", "--threads", "0"]),
    ("bench-mode-unknown", ["bench", "sideways"]),
    ("bench-store-is-dir", ["bench", "--store", "$D"]),
    ("bench-store-in-proc", ["bench", "--store", "/proc/nope/x.duckdb"]),
    ("bench-store-not-duckdb", ["bench", "--store", "$G"]),
    # eval
    ("eval-missing-id", ["eval"]),
    ("eval-unknown-id", ["eval", "nosuch", "--store", "$H"]),
    ("eval-empty-id", ["eval", "", "--store", "$H"]),
    ("eval-dir-without-model", ["eval", "$D"]),
    ("eval-file-not-model", ["eval", "$F"]),
    ("eval-store-missing", ["eval", "nosuch", "--store", "$T/none.duckdb"]),
    ("eval-tasks-unknown", ["eval", "x", "--tasks", "nosuch_task", "--store", "$H"]),
    ("eval-tasks-empty", ["eval", "x", "--tasks", "", "--store", "$H"]),
    ("eval-limit-text", ["eval", "x", "--limit", "abc"]),
    ("eval-limit-negative", ["eval", "x", "--limit", "-1"]),
    ("eval-limit-nan", ["eval", "x", "--limit", "nan"]),
    ("eval-batch-size-zero", ["eval", "x", "--batch-size", "0"]),
    ("eval-device-unknown", ["eval", "x", "--device", "tpu"]),
    ("eval-data-dir-is-file", ["eval", "x", "--data-dir", "$F"]),
    ("eval-runs-dir-is-file", ["eval", "x", "--runs-dir", "$F"]),
    # lm-eval passthrough
    ("lm-eval-unknown-option", ["lm-eval", "--bogus"]),
    ("lm-eval-unknown-task", ["lm-eval", "run", "--model", "moe-harness", "--tasks", "nosuch_task",
                              "--model_args", "pretrained=$T/none.pt"]),
    # board
    ("board-port-text", ["board", "--port", "abc"]),
    ("board-port-too-large", ["board", "--port", "70000"]),
    ("board-port-negative", ["board", "--port", "-1"]),
    ("board-address-empty", ["board", "--address", ""]),
    ("board-address-garbage", ["board", "--address", "not an address"]),
    ("board-address-nonascii", ["board", "--address", "hôst"]),
    ("board-store-is-dir", ["board", "--store", "$D"]),
    ("board-store-under-file", ["board", "--store", "$F/x.duckdb"]),
    ("board-second-store-is-dir", ["board", "--store", "$H", "--store", "$D"]),
    # import / export (result bundles; the bundles' own refusals: test_bundles.py)
    ("import-no-path", ["import"]),
    ("import-missing", ["import", "$T/nope"]),
    ("import-a-file", ["import", "$F"]),
    ("import-empty-glob", ["import", "$T/nope-*"]),
    ("import-store-is-dir", ["import", "$D", "--store", "$D"]),
    ("export-no-to", ["export", "--store", "$H"]),
    ("export-to-a-file", ["export", "--store", "$H", "--to", "$F"]),
    ("export-unknown-run", ["export", "nosuchrun", "--store", "$H", "--to", "$T/out"]),
    ("export-no-store", ["export", "--to", "$T/out"]),
    ("export-nothing-matches", ["export", "--suite", "nosuch", "--store", "$H", "--to", "$T/out"]),
    ("export-ids-and-filters", ["export", "x", "--routers", "smoe", "--store", "$H", "--to", "$T/out"]),
    # regress
    ("regress-seeds-letters", ["regress", "--update", "--seeds", "a,b", "--baseline", "$T/g.json"]),
    ("regress-repeats-zero", ["regress", "--repeats", "0"]),
    ("regress-repeats-text", ["regress", "--repeats", "abc"]),
    ("regress-min-effect-text", ["regress", "--min-effect", "abc"]),
    ("regress-min-effect-negative", ["regress", "--min-effect", "-1"]),
    ("regress-baseline-is-dir", ["regress", "--baseline", "$D"]),
    ("regress-baseline-missing", ["regress", "--baseline", "$T/none.json"]),
    ("regress-routers-unknown", ["regress", "--routers", "nosuchrouter"]),
    ("regress-routers-empty", ["regress", "--routers", ""]),
    # doctor
    ("doctor-suite-unknown", ["doctor", "--suite", "nosuch", "--store", "$T/h.duckdb"]),
    ("doctor-set-no-equals", ["doctor", "--set", "noequals", "--store", "$T/h.duckdb"]),
    ("doctor-set-unknown-key", ["doctor", "--set", "model.d_modle=8", "--store", "$T/h.duckdb"]),
    ("doctor-store-is-dir", ["doctor", "--store", "$D"]),
]


class Tripwire(AssertionError):
    pass


def _trip(what):
    def f(*a, **k):
        raise Tripwire(f"{what} started: the bad input was not caught before the work")
    return f


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The fixture files; built once (a store with one finished run for show/eval/runs)."""
    t = tmp_path_factory.mktemp("bad")
    (t / "afile").write_text("x")
    (t / "adir").mkdir()
    (t / "x.yaml").mkdir()
    (t / "bad.yaml").write_text("a: [1,\n")
    (t / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    (t / "list.yaml").write_text("- 1\n- 2\n")
    (t / "garbage.duckdb").write_bytes(b"not a duckdb file " * 64)
    (t / "ünï").mkdir()
    (t / "ro").mkdir()
    (t / "corrupt.parquet").write_bytes(b"PAR1" + b"\x07" * 200 + b"PAR1")
    (t / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"not gzip " * 40)
    (t / "notext").mkdir()
    (t / "notext" / "a.jsonl").write_text('{"body": "a document without the text field"}\n' * 3)
    h = t / "h.duckdb"
    s = Store(h)
    s.start_run({"run_id": "lm-smoe-abc-s0-123456", "suite": "lm", "router": "smoe", "spec_hash": "abc",
                 "seed": 0, "status": "running"})
    s.finish_run("lm-smoe-abc-s0-123456", "finished", 10, metrics=[{"name": "val_bpb", "value": 2.0}])
    subs = {"$F": t / "afile", "$D": t / "adir", "$Y": t / "x.yaml", "$B": t / "bad.yaml", "$N": t / "bin.yaml",
            "$L": t / "list.yaml", "$G": t / "garbage.duckdb", "$H": h, "$U": t / "ünï", "$T": t}
    return t, subs


def _snapshot(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st_ = os.stat(p)
            out[p] = (st_.st_size, st_.st_mtime_ns)
    return out


@pytest.fixture
def guarded(world, monkeypatch):
    """The work is a tripwire; cwd is the fixture dir (so a default results/ would show up); ro/ is read-only."""
    t, subs = world
    monkeypatch.chdir(t)
    monkeypatch.delenv("HARNESS_STORE", raising=False)
    monkeypatch.setattr(harness.training.runner, "train_run", _trip("training"))
    monkeypatch.setattr(harness.training.runner, "_run_suite_parallel", _trip("training"))
    monkeypatch.setattr(harness.bench, "run_layer_bench", _trip("benchmarking"))
    monkeypatch.setattr(harness.bench, "run_scaling_bench", _trip("benchmarking"))
    monkeypatch.setattr(harness.lmeval, "run_tasks", _trip("evaluation"))
    monkeypatch.setattr(harness.tools.board.subprocess, "call", _trip("the board server"))
    # the regress gate's two measurements, where cmd_regress looks them up (raising=True: a rename fails here)
    monkeypatch.setattr(harness.tools.regress, "measure_quality", _trip("regress measuring"))
    monkeypatch.setattr(harness.tools.regress.ab, "measure_ab", _trip("regress measuring"))
    # tests run as root, which chmod cannot stop: the read-only directory is simulated
    import harness.args as argtypes
    real_access = os.access
    ro = str(t / "ro")
    monkeypatch.setattr(argtypes.os, "access",
                        lambda p, mode, **k: False if str(p).startswith(ro) and mode & os.W_OK
                        else real_access(p, mode, **k))
    return t, subs


def _expand(argv, subs):
    out = []
    for a in argv:
        for k, v in sorted(subs.items(), key=lambda kv: -len(kv[0])):
            a = a.replace(k, str(v))
        out.append(a)
    return out


def _one_error_line(capsys, rc, argv):
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, (argv, rc, cap.err[-2000:])
    assert len(lines) == 1, (argv, cap.err[-2000:])
    assert lines[0].startswith("harness: error: "), (argv, lines)
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    assert len(lines[0]) > len("harness: error: ") + 10, lines  # it says something
    return lines[0]


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_one_line_writes_nothing(guarded, capsys, argv):
    t, subs = guarded
    argv = _expand(argv, subs)
    before = _snapshot(t)
    rc = main(argv)
    line = _one_error_line(capsys, rc, argv)
    assert _snapshot(t) == before, f"{argv} wrote or touched files"
    assert not (t / "results").exists() and not (t / "runs").exists()
    assert not os.path.exists("/proc/nope")
    assert line


def test_every_subcommand_has_cases_and_rejects_an_unknown_option(guarded, capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")  # noqa: SLF001
    cmds = set(sub.choices)
    assert set(SUBCOMMANDS) == cmds, "a new sub-command needs bad-input cases here"
    covered = {c[1][0] for c in CASES if c[1]}
    assert set(SUBCOMMANDS) <= covered, set(SUBCOMMANDS) - covered
    for cmd in sorted(cmds - {"lm-eval"}):  # lm-eval passes every argument to lm-eval (covered above)
        rc = main([cmd, "--no-such-option-xyz"])
        _one_error_line(capsys, rc, [cmd])


def test_messages_say_what_to_do(guarded, capsys):
    t, subs = guarded
    cases = {
        ("run", "--seeds", "a,b"): "seeds must be integers",
        ("run", "--store", "/proc/nope/x.duckdb"): "--store",
        ("bench", "--routers", "nosuchrouter", "--store", str(t / "b.duckdb")): "unknown router 'nosuchrouter'",
        ("run", "--store", str(t / "adir")): "is a directory",
        ("run", "--runs-dir", str(t / "afile")): "not a directory",
        ("run", "--set", "train.eval_every=0"): "train.eval_every=0 must be >= 1",
        ("run", "--set", "model.n_heads=0"): "model.n_heads=0 must be >= 1",
        ("board", "--port", "70000"): "must be <= 65535",
    }
    for argv, needle in cases.items():
        argv = list(argv)
        if argv[0] == "run":
            argv[1:1] = ["--preset", "tiny", "--no-eval", "--quiet"]
        line = _one_error_line(capsys, main(argv), argv)
        assert needle in line, (argv, line)


def test_help_still_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    assert "--seeds" in capsys.readouterr().out


# -- hypothesis: the spec parser never raises anything but a user error --------------------------------

KEYS = ["suite", "routers", "seeds", "preset", "router_args", "router_args.smoe", "router_args.smoe.balance_weight",
        "model", "model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "model.num_experts", "model.top_k",
        "model.moe_every", "model.capacity_factor", "model.dropout", "model.context", "model.activation",
        "model.expert_parallel", "data", "data.corpus", "data.path", "data.strict_size", "data.cache_dir",
        "data.workers", "data.augment", "data.tokenizer", "data.vocab_size", "data.text_field", "data.max_tokens",
        "train", "train.steps", "train.batch_size", "train.lr", "train.min_lr_ratio",
        "train.warmup_steps", "train.weight_decay", "train.beta1", "train.beta2", "train.grad_clip",
        "train.eval_every", "train.eval_batches", "train.ckpt_every", "train.device", "train.dtype",
        "train.adamw", "train.threads", "eval", "eval.enabled", "eval.tasks", "eval.limit", "eval.data_dir", "eval.batch_size"]
VALUES = st.one_of(
    st.integers(-10, 10).map(str), st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "~", "null", "true", "no", ".nan", "-.inf", "[]", "{}", "[1, 2]", "{a: 1}", "[", "]",
                     "'", '"', ":", "- a", "!!python/object:os.system", "&a *a", "1e3", "0x10", "smoe", "ü",
                     "\udcff", "\0", "a=b", "1:2"]),
    st.text(max_size=12),
)
SET_ITEMS = st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.text(max_size=10), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=16),
)
USER_ERRORS = (UserError, SpecError, UnknownRouterError, PluginLoadError)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SET_ITEMS, min_size=1, max_size=3))
def test_fuzz_spec_parser_only_user_errors(items):
    try:
        spec = load_suite("lm", preset="tiny", overrides=items)
    except USER_ERRORS as exc:
        msg = str(exc)
        assert msg.strip(), items
        return
    spec.runs()  # a spec that loads resolves its runs and hashes
    for r in spec.runs():
        assert r.spec_hash


# --set values that reach the CLI: either one error line and exit 2, or (valid) the tripwire at training
SMALL_VALUES = st.one_of(st.integers(-3, 300).map(str), st.sampled_from(
    ["", "x", "0", "-1", ".nan", ".inf", "[]", "[1]", "{}", "true", "0.5", "1.5", "ü", "cpu", "cuda", "bfloat16"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([k for k in KEYS if "." in k and not k.startswith("data.path")]),
                          SMALL_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), min_size=1, max_size=2))
def test_fuzz_cli_set_one_line_or_valid(guarded, capsys, items):
    t, _ = guarded
    argv = ["run", "--preset", "tiny", "--quiet", "--no-eval", "--store", str(t / "fz.duckdb")]
    for it in items:
        argv += ["--set", it]
    try:
        rc = main(argv)
    except Tripwire:
        capsys.readouterr()
        return  # a valid spec: it got as far as training
    _one_error_line(capsys, rc, argv)
    assert not (t / "fz.duckdb").exists()


def test_subprocess_seeds_and_store_no_traceback(tmp_path):
    """The two commands of the issue, as a user types them (a real process, real exit status)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (["run", "--suite", "lm", "--seeds", "a,b"],
                 ["run", "--suite", "lm", "--store", "/proc/nope/x.duckdb"],
                 ["bench", "--routers", "nosuchrouter"]):
        p = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("harness: error: "), (args, p.stderr)
        assert list(tmp_path.iterdir()) == [], f"{args} wrote {list(tmp_path.iterdir())}"


def test_board_binds_localhost_unless_address(monkeypatch, tmp_path, capsys):
    """The leaderboard is private by default; --address shares it on purpose."""
    seen = []
    monkeypatch.setattr(harness.tools.board.subprocess, "call", lambda cmd, **k: seen.append(cmd) or 0)
    store = str(tmp_path / "x.duckdb")
    assert main(["board", "--store", store]) == 0
    assert main(["board", "--store", store, "--address", "0.0.0.0"]) == 0
    default, shared = seen
    assert default[default.index("--server.address") + 1] == "127.0.0.1"
    assert shared[shared.index("--server.address") + 1] == "0.0.0.0"
    out = capsys.readouterr().out
    assert "this machine only" in out and "--address 0.0.0.0" in out
    assert not (tmp_path / "x.duckdb").exists()
