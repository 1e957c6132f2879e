"""Common random numbers: at one seed every router's model starts from the same weights for everything the
models share, and only the router differs (harness/layers/streams.py). Without it a comparison of two routers
carries initialisation noise that has nothing to do with routing."""
from __future__ import annotations

import pytest
import torch

from harness.layers.streams import rng_stream, stream_seed
from harness.spec import load_suite
from harness.suites import get_adapter
from harness.training.loop import seed_everything

LM_ROUTERS = ("smoe", "xmoe", "hash", "moge", "stablemoe", "competesmoe", "auxfree", "sigmoid_smoe", "expert_choice")


def _state(suite: str, router: str, seed: int, preset: str = "default", overrides=()) -> dict[str, torch.Tensor]:
    spec = load_suite(suite, preset=preset, routers=[router], seeds=[seed], overrides=list(overrides))
    (run,) = spec.runs()
    seed_everything(seed)
    return get_adapter(suite).build_model(run).state_dict()


def _shared(a: dict, b: dict) -> list[str]:
    """Tensors both models have under one name and shape, outside the routers."""
    return [k for k in a if k in b and ".router." not in k and a[k].shape == b[k].shape]


def _router_keys(sd: dict) -> list[str]:
    return [k for k in sd if ".router." in k]


@pytest.mark.parametrize("router", [r for r in LM_ROUTERS if r != "smoe"])
def test_lm_models_share_every_tensor_outside_the_router(router):
    ref, sd = _state("lm", "smoe", 0), _state("lm", router, 0)
    shared = _shared(ref, sd)
    # everything outside the router is shared: embeddings, attention, norms, the whole expert bank
    assert set(shared) == {k for k in ref if ".router." not in k} == {k for k in sd if ".router." not in k}
    assert any(".experts." in k for k in shared) and "tok_emb.weight" in shared
    assert [k for k in shared if not torch.equal(ref[k], sd[k])] == []


def test_dense_baseline_equals_the_moe_models_outside_the_ffn():
    ref, dense = _state("lm", "smoe", 1), _state("lm", "dense", 1)
    outside = [k for k in dense if ".ffn." not in k]
    assert outside and set(outside) == {k for k in ref if ".ffn." not in k}
    assert [k for k in outside if not torch.equal(ref[k], dense[k])] == []


def test_seeds_differ_and_a_router_draws_its_own_stream():
    a, b = _state("lm", "smoe", 0), _state("lm", "smoe", 1)
    assert not torch.equal(a["tok_emb.weight"], b["tok_emb.weight"])
    again = _state("lm", "smoe", 0)
    assert all(torch.equal(a[k], again[k]) for k in a)
    # the A/A copy: smoe under another name shares everything outside the router and draws its own router init
    aa = _state("lm", "smoe@aa", 0)
    assert aa.keys() == a.keys() and _router_keys(a)
    assert all(torch.equal(a[k], aa[k]) for k in a if ".router." not in k)
    assert all(not torch.equal(a[k], aa[k]) for k in _router_keys(a))


def test_changing_a_router_hyperparameter_moves_nothing_else():
    base = _state("lm", "xmoe", 0)
    other = _state("lm", "xmoe", 0, overrides=["router_args.xmoe.routing_dim=4"])
    assert base.keys() == other.keys()
    moved = [k for k in base if base[k].shape != other[k].shape or not torch.equal(base[k], other[k])]
    assert moved and all(".router." in k for k in moved)


def test_vit_models_share_every_tensor_outside_the_router():
    ref = _state("vision", "smoe", 0, preset="tiny")
    for router in ("xmoe", "moge", "hash"):
        sd = _state("vision", router, 0, preset="tiny")
        shared = _shared(ref, sd)
        assert set(shared) == {k for k in ref if ".router." not in k}
        assert [k for k in shared if not torch.equal(ref[k], sd[k])] == [], router
    dense = _state("vision", "dense", 0, preset="tiny")
    outside = [k for k in dense if ".mlp." not in k]
    assert outside and [k for k in outside if not torch.equal(ref[k], dense[k])] == []


def test_batches_are_identical_across_routers():
    adapter = get_adapter("lm")
    runs = [load_suite("lm", preset="default", routers=[r], seeds=[2]).runs()[0] for r in ("smoe", "dense", "moge")]
    for step in (0, 7, 999):
        xs = [adapter.train_batch(run, step, torch.device("cpu"))[0] for run in runs]
        assert all(torch.equal(xs[0], x) for x in xs[1:])


def test_stream_seed_is_stable_and_a_stream_leaves_the_caller_untouched():
    # sha256 of "0/blocks.0.ffn": the same in every process (Python's hash() is salted per process)
    assert stream_seed(0, "blocks.0.ffn") == stream_seed(0, "blocks.0.ffn") != stream_seed(1, "blocks.0.ffn")
    assert 0 <= stream_seed("x") < 2**63
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    with rng_stream(0, "anything"):
        inside = torch.rand(1000)
    assert torch.equal(torch.rand(3), want)
    with rng_stream(0, "anything"):
        assert torch.equal(torch.rand(1000), inside)
