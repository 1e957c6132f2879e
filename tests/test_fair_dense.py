"""The dense baseline is the one-expert MoE (issue 21, part 1).

One initialisation rule (``harness.layers.moe.ffn_init_``) builds the dense FFN and every expert, and the
experts' biases fall in the dense biases' optimiser group (no weight decay). So a one-expert,
top-1 MoE layer of width d_ff is the dense FFN of width d_ff: from copied initial weights the real
training loop gives the same loss curve, step for step.
"""
from __future__ import annotations

import math

import polars as pl
import pytest
import torch
from torch import nn

from harness.suites.lm import LMSuite
from harness.layers.moe import ExpertBank, ffn_init_
from harness.spec import load_suite
from harness.store import Store
from harness.training.loop import make_optimizer, no_decay_names, train_run

STEPS = 50
WIDTH = 64
# one expert of the dense width, k = 1; z-loss off: with one expert its logsumexp is the raw gate
# logit, whose gradient would reach the residual stream (the balance loss is a constant, 1 * 1 * 1)
OVERRIDES = ["model.num_experts=1", "model.top_k=1", f"model.d_ff={WIDTH}", f"train.steps={STEPS}",
             "train.eval_every=25", "train.ckpt_every=1000", "train.eval_batches=1",
             "router_args.smoe.z_loss_weight=0"]


def dense_to_moe_state(dense_sd: dict[str, torch.Tensor], moe: nn.Module) -> dict[str, torch.Tensor]:
    """The dense model's weights in the one-expert model's layout (its router keeps its own gate)."""
    out = dict(moe.state_dict())
    for k, v in dense_sd.items():
        if ".ffn.fc" not in k:
            out[k] = v
            continue
        block, rest = k.split(".ffn.")
        layer, kind = rest.split(".")  # fc1 / fc2, weight / bias
        i = layer[-1]
        dst = f"{block}.ffn.experts.{'w' if kind == 'weight' else 'b'}{i}"
        out[dst] = (v.t() if kind == "weight" else v).unsqueeze(0).clone()
    return out


class CopiedInit(LMSuite):
    """An LM adapter whose model starts from the dense model's initial weights (same seed)."""

    def __init__(self, dense_run) -> None:
        super().__init__()
        self.dense_run = dense_run

    def build_model(self, run):
        moe = super().build_model(run)
        torch.manual_seed(run.seed)
        dense = super().build_model(self.dense_run)
        moe.load_state_dict(dense_to_moe_state(dense.state_dict(), moe))
        return moe


def loss_curve(store: Store, run_id: str) -> list[float]:
    df = store.query("SELECT step, value FROM curves WHERE run_id = ? AND name = 'train_loss' ORDER BY step",
                     [run_id])
    return df["value"].to_list()


def test_ffn_init_is_nn_linear_default():
    torch.manual_seed(5)
    ref = nn.Linear(12, 20)
    w, b = torch.empty(20, 12), torch.empty(20)
    torch.manual_seed(5)
    ffn_init_(w, b, 12)
    assert torch.equal(w, ref.weight.detach()) and torch.equal(b, ref.bias.detach())
    bank = ExpertBank(4, 12, 20)
    for p, fan_in in ((bank.w1, 12), (bank.b1, 12), (bank.w2, 20), (bank.b2, 20)):
        p = p.detach()
        bound = 1 / math.sqrt(fan_in)
        assert float(p.abs().max()) <= bound * (1 + 1e-6)
        assert float(p.abs().max()) > 0.8 * bound  # drawn, not zeros
        assert abs(float(p.mean())) < 0.3 * bound


def test_expert_biases_are_not_weight_decayed():
    spec = load_suite("lm", preset="tiny", routers=["smoe"])
    run = spec.runs()[0]
    model = LMSuite().build_model(run)
    names = no_decay_names(model)
    assert {"blocks.0.ffn.experts.b1", "blocks.1.ffn.experts.b2"} <= names
    opt = make_optimizer(model, run)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    by_name = dict(model.named_parameters())
    for n, p in by_name.items():
        is_bias = n.endswith((".b1", ".b2", ".bias"))
        if is_bias:
            assert id(p) not in decayed, n
        if n.endswith((".w1", ".w2")):
            assert id(p) in decayed, n
    dense = LMSuite().build_model(load_suite("lm", preset="tiny", routers=["dense"]).runs()[0])
    opt = make_optimizer(dense, run)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for n, p in dense.named_parameters():
        assert (id(p) in decayed) == n.endswith((".fc1.weight", ".fc2.weight", "qkv.weight", "proj.weight",
                                                  "tok_emb.weight", "pos_emb.weight")), n


def test_one_expert_moe_trains_like_dense_from_copied_weights(tmp_path):
    dense_run = load_suite("lm", preset="tiny", overrides=OVERRIDES, routers=["dense"], seeds=[0]).runs()[0]
    moe_run = load_suite("lm", preset="tiny", overrides=OVERRIDES, routers=["smoe"], seeds=[0]).runs()[0]
    store = Store(tmp_path / "h.duckdb")
    res_d = train_run(dense_run, LMSuite(), store, tmp_path / "runs", progress=False, log=lambda s: None)
    res_m = train_run(moe_run, CopiedInit(dense_run), store, tmp_path / "runs", progress=False, log=lambda s: None)
    assert res_d.status == res_m.status == "finished", (res_d.error, res_m.error)
    cd, cm = loss_curve(store, res_d.run_id), loss_curve(store, res_m.run_id)
    assert len(cd) == len(cm) == STEPS
    diff = max(abs(a - b) for a, b in zip(cd, cm))
    assert diff < 1e-5, f"loss curves differ by {diff:.3g}"
    assert cd[-1] < cd[0] - 0.5  # it learned something: the comparison is not between two flat lines
    assert res_m.metrics["val_bpb"] == pytest.approx(res_d.metrics["val_bpb"], abs=1e-5)
