"""lm-eval bridge (harness/lmeval/, tasks/lm_eval/): the model against lm-eval's API, every shipped
task offline, the three entry points, and the post-pretraining hook."""
from __future__ import annotations

import json
import math
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import lm_eval  # noqa: F401  (a required dependency: a broken install fails here, never skips)
import torch

import harness.lmeval as ev
from harness.errors import UserError
from harness.lmeval.model import PREFIX_TOKEN, MoEHarnessLM
from harness.suites.lm import build_lm
from harness.spec import EvalSpec, ModelSpec, RunSpec, SuiteSpec, TrainSpec
from harness.store import Store
from harness.training.checkpoint import CheckpointError, final_model_path, save_final_model
from harness.training.loop import RunResult

# one worker runs this module: its module-scoped fixtures are built once (Makefile: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_lm_eval")

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 64


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: a second thread only adds synchronisation (and is very slow on a busy shared CPU)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _guarded(real):
    def connect(self, address, *a):
        host = address[0] if isinstance(address, tuple) else None
        if host is None or host in ("127.0.0.1", "::1", "localhost"):  # AF_UNIX paths and loopback are fine
            return real(self, address, *a)
        raise OSError(f"offline test tried to reach {address!r}")

    return connect


@pytest.fixture
def offline(monkeypatch):
    """No network: the HF offline switches (env and, if already imported, the modules' constants) and a
    socket.connect that refuses every non-loopback address."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", _guarded(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded(socket.socket.connect_ex))


def _make_run(root: Path, capacity_factor: float | None = None, eval_spec: EvalSpec | None = None):
    """A tiny untrained LM saved exactly as a finished run saves it, plus its row in a store."""
    suite = SuiteSpec(
        routers=("smoe",),
        model=ModelSpec(d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4, top_k=2, context=CONTEXT,
                        capacity_factor=capacity_factor),
        train=TrainSpec(steps=30, threads=1),
        eval=eval_spec or EvalSpec(limit=4),
    )
    run = RunSpec(suite, "smoe", 0)
    torch.manual_seed(0)
    model = build_lm(run)
    with torch.no_grad():  # sharper than the 0.02-std init, so scores and argmaxes are not all alike
        model.tok_emb.weight.normal_(0, 0.7)
    run_id = f"{run.run_key}-abc123"
    runs_dir = root / "runs"
    save_final_model(final_model_path(runs_dir, run.run_key), run_id, run.to_dict(), model.state_dict())
    store = Store(root / "h.duckdb")
    store.start_run({"run_id": run_id, "suite": "lm", "router": "smoe", "spec_hash": run.spec_hash, "seed": 0,
                     "preset": "test", "status": "finished", "step": 30, "total_steps": 30,
                     "config": json.dumps(run.to_dict(), default=str)})
    return SimpleNamespace(run=run, run_id=run_id, store=store, store_path=root / "h.duckdb", runs_dir=runs_dir,
                           model_pt=runs_dir / run.run_key / "model.pt", model=model.eval())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("lmeval"))


@pytest.fixture(scope="module")
def lm(tiny):
    return MoEHarnessLM(pretrained=str(tiny.model_pt), device="cpu", batch_size=4)


def _req(kind: str, *args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _metric_names(store: Store, run_id: str, like: str = "%") -> list[str]:
    with store.reader() as con:
        return [r[0] for r in con.execute("SELECT name FROM metrics WHERE run_id = ? AND name LIKE ?",
                                          [run_id, like]).fetchall()]


def _logp(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens]))
    return torch.log_softmax(logits[0].float(), -1)


def _ref_score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Reference: pieces of <= CONTEXT targets, each fed the CONTEXT tokens before its last target."""
    full = context + continuation
    total, greedy = 0.0, True
    for start in range(len(context), len(full), CONTEXT):
        end = min(start + CONTEXT, len(full))
        inp = full[max(0, end - 1 - CONTEXT): end - 1]
        lp = _logp(model, inp)[len(inp) - (end - start):]
        tgt = torch.tensor(full[start:end])
        total += float(lp.gather(1, tgt[:, None]).sum())
        greedy &= bool((lp.argmax(-1) == tgt).all())
    return total, greedy


# -- the model -----------------------------------------------------------------------------------------

def test_registered_lazily_with_lm_eval():
    from lm_eval.api.registry import get_model

    cls = get_model("moe-harness")
    assert cls is MoEHarnessLM and cls.__module__ == "harness.lmeval.model"
    from lm_eval.api.model import TemplateLM

    assert issubclass(cls, TemplateLM)


def test_loads_from_path_run_dir_run_id_and_prefix(tiny):
    cls = MoEHarnessLM
    by_id = cls.create_from_arg_string(f"pretrained={tiny.run_id},store={tiny.store_path}", {"device": "cpu"})
    assert by_id.checkpoint == tiny.model_pt and by_id.run_id == tiny.run_id
    by_prefix = cls(pretrained=tiny.run_id[:-3], store=str(tiny.store_path), device="cpu")
    assert by_prefix.run_id == tiny.run_id
    by_dir = cls(pretrained=str(tiny.model_pt.parent), device="cpu")
    assert by_dir.run_id == tiny.run_id and by_dir.device.type == "cpu"
    if not torch.cuda.is_available():  # asking for a GPU that is not there: an error, never a silent CPU run
        with pytest.raises(UserError, match="device=cuda:7 but no CUDA device is available"):
            cls(pretrained=str(tiny.model_pt.parent), device="cuda:7")
    assert by_id.max_length == CONTEXT and not by_id.per_sequence
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(by_id.model.state_dict()[key].cpu(), value)

    from harness.store import UnknownRun

    with pytest.raises(UnknownRun, match="no run 'nope'"):
        cls(pretrained="nope", store=str(tiny.store_path))
    with pytest.raises(CheckpointError, match="no model checkpoint at"):
        cls(pretrained=str(tiny.model_pt.parent / "missing.pt"))


def test_checkpoint_of_a_later_run_is_refused(tiny, tmp_path):
    other = f"{tiny.run.run_key}-ffffff"  # same spec+seed -> same run directory, different attempt
    tiny.store.start_run({"run_id": other, "suite": "lm", "router": "smoe", "status": "finished",
                          "config": "{}"})
    with pytest.raises(CheckpointError, match=f"holds run {tiny.run_id}, not {other}"):
        MoEHarnessLM(pretrained=other, store=str(tiny.store_path))


def test_loglikelihood_equals_direct_forward_pass(lm, tiny):
    long_ctx = ("Now is the winter of our discontent made glorious summer by this sun of York; " * 2).rstrip()
    pairs = [
        ("To be, or not to be:", " that is the question"),
        ("ROMEO.", "\nBut soft!"),
        ("", "Friends, Romans"),                       # empty context -> conditioned on the "\n" prefix
        (long_ctx, " And all the clouds"),             # context longer than the model's: left-truncated
        ("O", " brave new world, that has such people in't! " * 4),  # continuation longer than the context
    ]
    out = lm.loglikelihood([_req("loglikelihood", c, k) for c, k in pairs])
    for (c, k), (ll, greedy) in zip(pairs, out):
        ctx = list(c.encode()) or [PREFIX_TOKEN]
        ref, ref_greedy = _ref_score(tiny.model, ctx, list(k.encode()))
        assert ll == pytest.approx(ref, abs=1e-4), (c[:20], k[:20])
        assert greedy == ref_greedy
    # the simplest case spelled out: one forward pass, sum of the continuation's log-probs
    c, k = pairs[0]
    toks = list((c + k).encode())
    lp = _logp(tiny.model, toks[:-1])
    direct = sum(float(lp[i - 1, toks[i]]) for i in range(len(c.encode()), len(toks)))
    assert out[0][0] == pytest.approx(direct, abs=1e-4)
    # lm-eval's convention: a context's trailing space belongs to the continuation
    (a, _), (b, _) = lm.loglikelihood([_req("loglikelihood", "To be, or not to be: ", "that"),
                                       _req("loglikelihood", "To be, or not to be:", " that")])
    assert a == pytest.approx(b, abs=1e-5)
    # the byte the model would emit greedily is reported as greedy, another one is not
    lp = _logp(tiny.model, list(b"To be"))[-1]
    ranked = [int(i) for i in lp.argsort(descending=True) if 32 <= int(i) < 127]  # printable ASCII
    best = int(lp.argmax())
    if best == ranked[0]:
        [(_, g1), (_, g2)] = lm.loglikelihood([_req("loglikelihood", "To be", chr(ranked[0])),
                                               _req("loglikelihood", "To be", chr(ranked[1]))])
        assert g1 and not g2


def test_scores_do_not_depend_on_batching(tiny, lm):
    reqs = [_req("loglikelihood", "ab" * i, " cd" * (i + 1)) for i in range(1, 9)]
    single = MoEHarnessLM(pretrained=str(tiny.model_pt), device="cpu", batch_size=1).loglikelihood(reqs)
    batched = lm.loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(single, batched):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_rolling_windows_cover_every_token_exactly_once(lm, tiny):
    text = ("Full fathom five thy father lies; — of his bones are coral made; "
            "Those are pearls that were his eyes: Nothing of him that doth fade, née café. ") * 3
    toks = list(text.encode("utf-8"))
    windows = lm.rolling_windows(text)
    assert sum(len(cont) for _, cont in windows) == len(toks) == len(text.encode())
    assert [t for _, cont in windows for t in cont] == toks   # in order, none twice, none skipped
    assert windows[0][0] == [PREFIX_TOKEN]
    assert all(len(c) + len(k) <= CONTEXT + 1 and c for c, k in windows)

    [ll] = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    # reference: disjoint blocks of CONTEXT bytes, each predicted from the (prefixed) stream before it
    stream = [PREFIX_TOKEN] + toks
    ref = 0.0
    for s in range(0, len(toks), CONTEXT):
        e = min(s + CONTEXT, len(toks))
        inp = stream[max(0, e - CONTEXT): e]
        lp = _logp(tiny.model, inp)[len(inp) - (e - s):]
        ref += float(lp.gather(1, torch.tensor(toks[s:e])[:, None]).sum())
    assert ll == pytest.approx(ref, abs=1e-3)
    assert lm.loglikelihood_rolling([_req("loglikelihood_rolling", "")]) == [0.0]


def _greedy_bytes(model, prompt: bytes, n: int) -> bytes:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_logp(model, ids[-CONTEXT:])[-1].argmax()))
    return bytes(ids[len(prompt):])


def test_generate_until_stops_at_the_until_string(lm, tiny):
    prompt = "ROMEO.\n"
    raw = _greedy_bytes(tiny.model, prompt.encode(), 40)
    [free] = lm.generate_until([_req("generate_until", prompt, {"until": [], "max_gen_toks": 40})])
    assert free == raw.decode("utf-8", errors="replace")  # greedy, byte by byte, max_gen_toks respected
    stop = next(free[i:i + 2] for i in range(6, 30) if "\ufffd" not in free[i:i + 2])
    expected = free.split(stop)[0]
    assert len(expected) < len(free)
    outs = lm.generate_until([
        _req("generate_until", prompt, {"until": [stop], "max_gen_toks": 40}),
        _req("generate_until", prompt, {"until": stop, "max_gen_toks": 5}),
        _req("generate_until", "A much longer prompt, so the batch is ragged.\n", {"until": ["\n\n"]}),
    ])
    assert outs[0] == expected and stop not in outs[0]
    assert outs[1] == raw[:5].decode("utf-8", errors="replace").split(stop)[0]
    assert "\n\n" not in outs[2]


def test_token_dropping_models_run_one_sequence_per_pass(tmp_path):
    t = _make_run(tmp_path, capacity_factor=1.0)
    lm1 = MoEHarnessLM(pretrained=str(t.model_pt), device="cpu", batch_size=8)
    assert lm1.per_sequence
    reqs = [_req("loglikelihood", "x" * i, " yz") for i in range(1, 6)]
    each = [lm1.loglikelihood([r])[0] for r in reqs]
    assert [a for a, _ in lm1.loglikelihood(reqs)] == pytest.approx([a for a, _ in each], abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(tiny, lm):
    gpu = MoEHarnessLM(pretrained=str(tiny.model_pt), device="cuda", batch_size=4)
    reqs = [_req("loglikelihood", "To be, or not", " to be"), _req("loglikelihood", "", "Hark!")]
    for (a, _), (b, _) in zip(lm.loglikelihood(reqs), gpu.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-3)
    text = "Our revels now are ended. " * 8
    assert gpu.loglikelihood_rolling([_req("loglikelihood_rolling", text)])[0] == pytest.approx(
        lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])[0], abs=1e-2)
    assert gpu.generate_until([_req("generate_until", "ROMEO.\n", {"until": ["\n"], "max_gen_toks": 8})]) == \
        lm.generate_until([_req("generate_until", "ROMEO.\n", {"until": ["\n"], "max_gen_toks": 8})])


# -- tasks ---------------------------------------------------------------------------------------------

def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _local_data(root: Path) -> Path:
    """Two rows per standard task, in the schema of the dataset lm-eval's YAML names."""
    _jsonl(root / "lambada_openai" / "test.jsonl", [
        {"text": "He looked at the sea and the sky, and he knew that the storm would come before the night"},
        {"text": "She opened the old book and began to read the first page of the story"}])
    _jsonl(root / "hellaswag" / "validation.jsonl", [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": "3",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
        {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.", "ctx_b": "the lady",
         "ctx": "A lady walks to a barbell. the lady", "split": "val", "split_type": "zeroshot", "label": "0",
         "endings": ["stands and lifts the weight [title] over her head.", "swings and lands in her arms.",
                     "pulls a rope attached to the barbell.", "sits down."]}])
    _jsonl(root / "arc_easy" / "test.jsonl", [
        {"id": "Q1", "question": "Which gas do plants take in for photosynthesis?", "answerKey": "B",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]}},
        {"id": "Q2", "question": "What keeps mold spores out of the lungs?", "answerKey": "2",
         "choices": {"text": ["goggles", "a breathing mask", "gloves"], "label": ["1", "2", "3"]}}])
    _jsonl(root / "piqa" / "validation.jsonl", [
        {"goal": "How do I dry wet shoes?", "sol1": "Stuff them with newspaper.", "sol2": "Fill them with water.",
         "label": 0},
        {"goal": "Keep bread fresh", "sol1": "leave it in the sun", "sol2": "keep it in a sealed bag", "label": 1}])
    _jsonl(root / "wikitext" / "test.jsonl", [
        {"page": " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . \n"},
        {"page": " = Du Fu = \n Du Fu ( 712 – 770 ) was a prominent Chinese poet of the Tang dynasty . \n"}])
    return root


def _shipped_tasks() -> dict[str, str]:
    """task name -> output type, read from every YAML in tasks/lm_eval/."""
    from lm_eval.tasks._yaml_loader import load_yaml

    out = {}
    for p in sorted(ev.tasks_dir().glob("*.yaml")):
        cfg = load_yaml(p, resolve_func=False)
        if "base" in cfg:
            import lm_eval.tasks

            cfg = {**load_yaml(Path(lm_eval.tasks.__file__).parent / cfg["base"], resolve_func=False), **cfg}
        out[cfg["task"]] = cfg["output_type"]
    return out


EXPECTED = {
    "loglikelihood_rolling": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
    "multiple_choice": {"acc", "acc_norm"},
    "loglikelihood": {"perplexity", "acc"},
}


def test_every_shipped_task_runs_offline_and_lands_in_the_store(tiny, lm, tmp_path, offline):
    tasks = _shipped_tasks()
    assert {"shakespeare_ppl", "shakespeare_cloze", "local_lambada_openai", "local_hellaswag", "local_arc_easy",
            "local_piqa", "local_wikitext"} <= set(tasks)
    assert ev.tasks_dir() == ROOT / "tasks" / "lm_eval" or ev.tasks_dir().is_dir()
    data = _local_data(tmp_path / "data")
    results, errors = ev.run_tasks(lm, list(tasks), limit=3, data_dir=data, log_fn=lambda s: None)
    assert errors == {}
    for task, kind in tasks.items():
        assert EXPECTED[kind] <= set(results[task]), task
        for metric, (value, se) in results[task].items():
            assert math.isfinite(value), (task, metric)
    # multiple-choice answers over 2 documents, stderr of a mean: closed form from lm-eval
    assert results["local_piqa"]["acc"][1] is not None
    # rolling tasks: lm-eval gives no stderr for weighted perplexities; ours comes from the per-document pairs
    assert results["shakespeare_ppl"]["bits_per_byte"][1] > 0
    ev.store_results(tiny.store, tiny.run_id, results)
    ev.store_results(tiny.store, tiny.run_id, results)  # re-evaluating replaces, never duplicates
    names = _metric_names(tiny.store, tiny.run_id, "lmeval/%")
    assert len(names) == len(set(names)) == sum(len(m) for m in results.values())
    assert "lmeval/local_hellaswag/acc_norm" in names and "lmeval/shakespeare_ppl/bits_per_byte" in names


def test_shakespeare_ppl_counts_every_byte_once(lm, offline):
    """Rolling loglikelihood over the shipped documents == bits per byte over exactly their bytes."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=["shakespeare_ppl"], task_manager=ev.task_manager(), limit=2,
                          log_samples=True, bootstrap_iters=0)
    samples = out["samples"]["shakespeare_ppl"]
    ll = sum(s["bits_per_byte"][0] for s in samples)
    nbytes = sum(len(s["doc"]["text"].encode()) for s in samples)
    assert nbytes == sum(s["bits_per_byte"][1] for s in samples)
    direct = sum(lm.loglikelihood_rolling([_req("loglikelihood_rolling", s["doc"]["text"])])[0] for s in samples)
    assert ll == pytest.approx(direct, rel=1e-6)
    assert out["results"]["shakespeare_ppl"]["bits_per_byte,none"] == pytest.approx(-ll / nbytes / math.log(2))


def test_missing_data_names_the_path_and_the_other_tasks_still_run(tmp_path, offline, capsys):
    empty = tmp_path / "nodata"
    t = _make_run(tmp_path, eval_spec=EvalSpec(tasks=("local_piqa", "shakespeare_cloze", "hellaswag"), limit=3,
                                                data_dir=str(empty), batch_size=8))
    res = RunResult(run_id=t.run_id, router="smoe", seed=0, status="finished", step=30)
    results = ev.eval_after_pretraining(t.run, res, t.store, t.runs_dir)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "FAILED" in line]
    assert len(lines) == 2
    assert str(empty / "piqa" / "validation.jsonl") in lines[0]
    assert str(empty / "hellaswag" / "validation.jsonl") in lines[1]
    assert set(results) == {"shakespeare_cloze"}
    names = _metric_names(t.store, t.run_id)
    assert sorted(names) == ["lmeval/shakespeare_cloze/acc", "lmeval/shakespeare_cloze/acc_norm",
                             "lmeval/shakespeare_cloze/n_docs"]
    assert results["shakespeare_cloze"]["n_docs"] == (3.0, None)


def test_shipped_data_missing_is_reported_with_its_path(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mht", ev.tasks_dir() / "moe_harness_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "DATA", tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "shakespeare_cloze.jsonl")):
        mod.shakespeare_cloze()


# -- entry points -------------------------------------------------------------------------------------

def test_simple_evaluate_by_model_name(tiny, offline):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(ev.tasks_dir()), include_defaults=False)
    out = simple_evaluate(model="moe-harness", model_args=f"pretrained={tiny.run_id},store={tiny.store_path}",
                          tasks=["shakespeare_cloze"], task_manager=tm, limit=3, device="cpu", batch_size=2)
    r = out["results"]["shakespeare_cloze"]
    assert 0.0 <= r["acc,none"] <= 1.0 and out["config"]["moe_harness_run_id"] == tiny.run_id


def test_harness_eval_command(tiny, tmp_path, offline, capsys):
    from harness.cli import main

    rc = main(["eval", tiny.run_id[:-2], "--store", str(tiny.store_path), "--tasks", "shakespeare_cloze,piqa",
               "--limit", "3", "--data-dir", str(tmp_path / "empty"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 2  # a task failed for missing data: its one-line error, the rest stored
    assert "lmeval/shakespeare_cloze/acc " in out and f"stored 3 metrics on {tiny.run_id}" in out
    [line] = [x for x in err.splitlines() if x.startswith("harness: error:")]
    assert "local_piqa" in line and str(tmp_path / "empty" / "piqa" / "validation.jsonl") in line
    assert sorted(_metric_names(tiny.store, tiny.run_id, "lmeval/shakespeare_cloze/%")) == [
        "lmeval/shakespeare_cloze/acc", "lmeval/shakespeare_cloze/acc_norm", "lmeval/shakespeare_cloze/n_docs"]


def test_lm_eval_cli_passthrough(tiny, monkeypatch, offline, capsys):
    from lm_eval.tasks import TaskManager

    from harness.cli import main

    # lm-eval's CLI always indexes its ~15k built-in task YAMLs (half a minute on a busy CPU); what is
    # under test here is our plumbing, so index only the include path
    real_init = TaskManager.__init__

    def init(self, *a, **kw):
        kw["include_defaults"] = False
        real_init(self, *a, **kw)

    monkeypatch.setattr(TaskManager, "__init__", init)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    rc = main(["lm-eval", "--model", "moe-harness", "--model_args", f"pretrained={tiny.model_pt}",
               "--tasks", "shakespeare_cloze", "--limit", "2", "--device", "cpu", "--batch_size", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "shakespeare_cloze" in out and "acc_norm" in out
    assert sys.argv == ["pytest"]


def test_shipped_shakespeare_data_is_what_the_script_builds():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_shakespeare_cloze as mk
    finally:
        sys.path.pop(0)
    assert mk.main(["--check"]) == 0
    from harness.data.text import load_corpus

    docs = [json.loads(x) for x in (ev.tasks_dir() / "data" / "shakespeare_ppl.jsonl").read_text().splitlines()]
    joined = "".join(d["text"] for d in sorted(docs, key=lambda d: d["offset"])).encode()
    assert joined == bytes(load_corpus("shakespeare").test)
    items = [json.loads(x) for x in (ev.tasks_dir() / "data" / "shakespeare_cloze.jsonl").read_text().splitlines()]
    assert all(len(i["choices"]) == 4 == len(set(i["choices"])) and i["context"].endswith("\n") for i in items)
    assert {i["work"] for i in items} == {"othello_gut", "tempest_gut"}


def test_import_is_cheap_and_does_not_load_lm_eval_models():
    import subprocess

    code = ("import sys, harness.lmeval; "
            "print(int('lm_eval.api.model' in sys.modules), int('torch' in sys.modules)); "
            "from lm_eval.api.registry import get_model; print(get_model('moe-harness').__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # the lazy registry entry loads the model module only when lm-eval asks for the model
    assert out.stdout.split() == ["0", "0", "harness.lmeval.model"], out.stderr


def test_lm_eval_cli_adds_the_shipped_tasks_and_an_auto_device(monkeypatch):
    import lm_eval.__main__

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    assert ev.lm_eval_cli(["--model", "moe-harness", "--tasks", "shakespeare_cloze"]) == 0
    assert seen[-1] == ["lm-eval", "--model", "moe-harness", "--tasks", "shakespeare_cloze",
                        "--include_path", str(ev.tasks_dir()), "--device", "auto"]
    ev.lm_eval_cli(["--", "--model=moe-harness", "--device=cpu", "--include_path", "/x"])
    assert seen[-1] == ["lm-eval", "--model=moe-harness", "--device=cpu", "--include_path", "/x"]
    ev.lm_eval_cli(["--model", "hf", "--tasks", "t"])  # another model: lm-eval's own defaults
    assert "--device" not in seen[-1]


def test_eval_spec_defaults_are_shipped_tasks_and_plain_names_resolve():
    names = set(_shipped_tasks())
    assert set(EvalSpec().tasks) <= names
    assert ev.resolve_task_name("hellaswag", names) == "local_hellaswag"
    assert ev.resolve_task_name("shakespeare_ppl", names) == "shakespeare_ppl"
