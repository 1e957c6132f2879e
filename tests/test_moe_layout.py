"""Which blocks route: ``model.moe_every`` and ``model.moe_last`` (MoGE's and V-MoE's "Last2"), one rule
(:func:`harness.layers.build.is_moe_block`) for the LM and the ViT."""
from __future__ import annotations

import pytest

from harness.layers.moe import is_moe_block
from harness.spec import SpecError, load_suite


@pytest.mark.parametrize("depth,every,last,expected", [
    (4, 1, 0, [1, 1, 1, 1]),
    (4, 2, 0, [0, 1, 0, 1]),            # every other block, the last one routes
    (8, 1, 2, [0, 0, 0, 0, 0, 0, 1, 1]),  # MoGE's ViT-MoGE-S/16: MoE in the last 2 of 8 blocks
    (8, 2, 4, [0, 0, 0, 0, 0, 1, 0, 1]),  # every other block among the last 4
    (3, 1, 3, [1, 1, 1]),
])
def test_is_moe_block(depth, every, last, expected):
    assert [int(is_moe_block(i, depth, every, last)) for i in range(depth)] == expected


def _ffn_kinds(model) -> list[str]:
    blocks = model.blocks
    out = []
    for b in blocks:
        ffn = b.mlp.ffn if hasattr(b, "mlp") else b.ffn
        out.append("moe" if hasattr(ffn, "experts") else "dense")
    return out


def test_lm_moe_last_keeps_moe_to_the_last_blocks():
    from harness.suites.lm import build_lm

    spec = load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.n_layers=4", "model.moe_last=1"])
    run = spec.runs()[0]
    assert _ffn_kinds(build_lm(run)) == ["dense", "dense", "dense", "moe"]
    plain = load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.n_layers=4"]).runs()[0]
    assert _ffn_kinds(build_lm(plain)) == ["moe"] * 4
    assert "moe_last" not in plain.to_dict()["model"] or plain.to_dict()["model"]["moe_last"] == 0
    assert run.spec_hash != plain.spec_hash


def test_moe_last_leaves_earlier_spec_hashes_alone():
    """Hashed only when set: every stored run's spec hash stays valid."""
    a = load_suite("lm", preset="tiny", routers=["smoe"]).runs()[0]
    b = load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.moe_last=0"]).runs()[0]
    assert a.spec_hash == b.spec_hash


@pytest.mark.parametrize("value", ["-1", "9"])
def test_moe_last_out_of_range_is_a_spec_error(value):
    with pytest.raises(SpecError, match="model.moe_last"):
        load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.n_layers=2", f"model.moe_last={value}"])


def test_vit_moe_last_keeps_moe_to_the_last_blocks():
    """The moge preset's layout: 8 blocks, MoE (32 experts, top-1, capacity factor 4) in the last 2 only."""
    import torch

    from harness.suites.vision import build_vit

    spec = load_suite("vision", preset="moge", routers=["moge@vit"], overrides=["model.d_model=16", "model.n_heads=2"])
    run = spec.runs()[0]
    m = run.model
    assert (m.n_layers, m.num_experts, m.top_k, m.capacity_factor, m.moe_last) == (8, 32, 1, 4.0, 2)
    model = build_vit(run)
    assert _ffn_kinds(model) == ["dense"] * 6 + ["moe"] * 2
    logits, routings = model(torch.randn(2, 1, 28, 28).expand(2, 3, 28, 28).contiguous(), step=0, total_steps=1)
    assert logits.shape == (2, 10) and len(routings) == 2
