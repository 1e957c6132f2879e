"""model.balance_scope (issue 31): the balance loss's f_i over the micro-batch or the global batch.

Hand-computed cases for harness.routing.losses.GlobalBalance, one in a single process (micro-batches of one
optimiser step accumulate, a new step starts afresh) and one on two gloo ranks (the counts are all-reduced),
plus the layer end to end: on two ranks the averaged router gradient under ``global`` is the gradient of the
balance loss of the whole batch in one process.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.layers.moe import build_ffn
from harness.layers.moe_layer import MoELayer, set_balance_scope
from harness.routing.losses import GlobalBalance, global_balance, switch_balance_loss
from harness.spec import SpecError, load_suite

# rank 0's and rank 1's micro-batch: E = 3 experts, top-1
P0 = [[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]]
I0 = [[0], [0]]
P1 = [[0.1, 0.7, 0.2], [0.2, 0.2, 0.6]]
I1 = [[1], [2]]
# global counts [2, 1, 1] of N = 4 -> f = [0.5, 0.25, 0.25]
# rank 0: P = [0.55, 0.25, 0.20] -> micro 3 * 0.55 = 1.65;  global 3 * (0.275 + 0.0625 + 0.05) = 1.1625
# rank 1: P = [0.15, 0.45, 0.40] -> micro 3 * (0.5*0.45 + 0.5*0.4) = 1.275;  global 3 * (0.075 + 0.1125 + 0.1) = 0.8625
MICRO = (1.65, 1.275)
GLOBAL = (1.1625, 0.8625)


def _loss(p, i):
    return float(switch_balance_loss(torch.tensor(p), torch.tensor(i)))


def test_micro_is_the_switch_loss_of_the_batch():
    assert _loss(P0, I0) == pytest.approx(MICRO[0])
    assert _loss(P1, I1) == pytest.approx(MICRO[1])


def test_global_accumulates_the_micro_batches_of_one_step_and_resets_on_the_next():
    g = GlobalBalance(3)
    with global_balance(g, step=5):
        first = _loss(P0, I0)    # only rank-0's batch so far: f = [1, 0, 0], as micro
        second = _loss(P1, I1)   # f over both micro-batches: [2, 1, 1] / 4
    assert first == pytest.approx(MICRO[0])
    assert second == pytest.approx(GLOBAL[1])
    assert g.counts.tolist() == [2.0, 1.0, 1.0] and g.total == 4.0
    with global_balance(g, step=6):  # the next optimiser step starts afresh
        assert _loss(P1, I1) == pytest.approx(MICRO[1])
    assert g.counts.tolist() == [0.0, 1.0, 1.0]


def test_global_fraction_conventions_and_empty_batch():
    # k = 2: "first" counts column 0, "slots" every slot, "k_slots" = k * slots
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    i = torch.tensor([[0, 1], [2, 0]])
    for mode, f in (("first", [0.5, 0.0, 0.5]), ("slots", [0.5, 0.25, 0.25]), ("k_slots", [1.0, 0.5, 0.5])):
        with global_balance(GlobalBalance(3), 0):
            got = float(switch_balance_loss(p, i, mode))
        P = [0.35, 0.25, 0.4]
        assert got == pytest.approx(3 * sum(a * b for a, b in zip(f, P))), mode
        assert got == pytest.approx(float(switch_balance_loss(p, i, mode)))  # one batch: global == micro
    with global_balance(GlobalBalance(3), 0):
        assert float(switch_balance_loss(torch.zeros(0, 3), torch.zeros(0, 1, dtype=torch.long))) == 0.0


def _rank_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        p, i = (P0, I0) if rank == 0 else (P1, I1)
        with global_balance(GlobalBalance(3), 0):
            glob = _loss(p, i)
        micro = _loss(p, i)
        # the layer end to end: each rank half of one batch, smoe's router gradient averaged as DDP does
        torch.manual_seed(0)
        layer = build_ffn("smoe", 8, 16, 4, 2, {"z_loss_weight": 0.0})
        set_balance_scope(layer, "global")
        x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
        xs = x[rank * 6:(rank + 1) * 6]
        _, routing = layer(xs, training=True, step=3)
        routing.aux_losses["balance"].backward()
        g = layer.router.gate.weight.grad.clone()
        dist.all_reduce(g)
        g /= world
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"glob": glob, "micro": micro, "grad": g.tolist(),
                           "counts": layer.global_balance.counts.tolist()}, f)
        dist.barrier()
        if rank == 1:
            with open(out + ".1", "w") as f:
                json.dump({"glob": glob, "micro": micro}, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_all_reduce_the_counts(tmp_path):
    out = str(tmp_path / "r0.json")
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    r0, r1 = json.loads(Path(out).read_text()), json.loads(Path(out + ".1").read_text())
    assert (r0["micro"], r1["micro"]) == pytest.approx(MICRO)
    assert (r0["glob"], r1["glob"]) == pytest.approx(GLOBAL)
    # one process on the whole batch (its balance loss is the global one): the same router gradient
    torch.manual_seed(0)
    layer = build_ffn("smoe", 8, 16, 4, 2, {"z_loss_weight": 0.0})
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    _, routing = layer(x, training=True, step=3)
    routing.aux_losses["balance"].backward()
    assert torch.allclose(torch.tensor(r0["grad"]), layer.router.gate.weight.grad, atol=1e-6)
    assert sum(r0["counts"]) == 12.0  # first choices of both ranks' 6 tokens


def test_layer_single_process_global_equals_micro_and_eval_does_not_accumulate():
    torch.manual_seed(0)
    a = build_ffn("smoe", 8, 16, 4, 2)
    b = build_ffn("smoe", 8, 16, 4, 2)
    b.load_state_dict(a.state_dict())
    set_balance_scope(b, "global")
    x = torch.randn(10, 8)
    _, ra = a(x, training=True, step=0)
    _, rb = b(x, training=True, step=0)
    assert torch.equal(ra.aux_losses["balance"], rb.aux_losses["balance"])
    with torch.no_grad():
        b(x, training=False, step=0)
    assert b.global_balance.total == 10.0  # the evaluation forward added nothing
    with pytest.raises(ValueError, match="balance_scope"):
        set_balance_scope(b, "batch")
    assert isinstance(b, MoELayer)


def test_spec_key_hash_and_bad_value(tmp_path):
    base = load_suite("lm", preset="tiny")
    glob = load_suite("lm", preset="tiny", overrides=["model.balance_scope=global"])
    micro = load_suite("lm", preset="tiny", overrides=["model.balance_scope=micro"])
    assert base.model.balance_scope == "micro"
    h = base.runs()[0].spec_hash
    assert micro.runs()[0].spec_hash == h          # the default is left out of the hash
    assert glob.runs()[0].spec_hash != h
    with pytest.raises(SpecError, match="model.balance_scope='batch' must be one of micro, global"):
        load_suite("lm", preset="tiny", overrides=["model.balance_scope=batch"])


def test_window_keeps_the_counts_of_earlier_steps():
    g = GlobalBalance(3, window=1)
    with global_balance(g, step=0):
        _loss(P0, I0)                      # step 0: counts [2, 0, 0]
    with global_balance(g, step=1):
        got = _loss(P1, I1)                # step 1 + the buffer's step 0: [2, 1, 1] / 4
    assert got == pytest.approx(GLOBAL[1])
    with global_balance(g, step=2):
        got = _loss(P0, I0)                # step 2 [2, 0, 0] + step 1 [0, 1, 1]; step 0 left the buffer
    assert got == pytest.approx(GLOBAL[0])
    assert g.balance_counts[:, 3].tolist() == [2.0, 2.0]  # this step's 2 + step 1's 2


def test_window_spec_rules(tmp_path):
    h = load_suite("lm", preset="tiny", overrides=["model.balance_scope=global"]).runs()[0].spec_hash
    w = load_suite("lm", preset="tiny", overrides=["model.balance_scope=global", "model.balance_window=15"])
    assert w.model.balance_window == 15 and w.runs()[0].spec_hash != h
    with pytest.raises(SpecError, match="model.balance_window=3 needs model.balance_scope=global"):
        load_suite("lm", preset="tiny", overrides=["model.balance_window=3"])
    with pytest.raises(SpecError, match="model.balance_window"):
        load_suite("lm", preset="tiny", overrides=["model.balance_scope=global", "model.balance_window=-1"])


def test_window_sums_are_checkpointed_and_micro_keys_unchanged():
    torch.manual_seed(0)
    a = build_ffn("smoe", 8, 16, 4, 2)
    keys = set(a.state_dict())
    assert not any("balance" in k for k in keys)  # micro (and global without a window): state dict as before
    set_balance_scope(a, "global", 2)
    x0, x1 = torch.randn(10, 8), torch.randn(7, 8)
    a(x0, training=True, step=0)
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    assert "global_balance.balance_counts" in sd and "global_balance.balance_step" in sd
    b = build_ffn("smoe", 8, 16, 4, 2)
    set_balance_scope(b, "global", 2)   # as the trainer does: scope first, then the checkpoint
    b.load_state_dict(sd)
    _, ra = a(x1, training=True, step=1)
    _, rb = b(x1, training=True, step=1)
    assert torch.equal(ra.aux_losses["balance"], rb.aux_losses["balance"])
    assert b.global_balance.balance_counts[:, 4].tolist() == [7.0, 10.0, 0.0]


def test_same_window_keeps_the_sums_a_new_one_starts_afresh():
    g = GlobalBalance(3, window=1)
    with global_balance(g, step=0):
        _loss(P0, I0)
    g.set_window(1)                     # e.g. a cooldown branch readied for training: the sums go on
    assert g.counts.tolist() == [2.0, 0.0, 0.0]
    g.set_window(2)
    assert g.window == 2 and g.counts.tolist() == [0.0, 0.0, 0.0]
