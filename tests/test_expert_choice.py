"""Expert choice (baselines/expert_choice.py) and the variable-k contract: hand-computed routing, the causal
prefix rule (no leak from later tokens or other sequences), the layer dropping unused slots, health, bench, CLI."""
from __future__ import annotations

import math

import pytest
import torch

from baselines.expert_choice import ExpertChoiceRouter, batch_choice, expert_capacity, prefix_choice
from harness.layers.moe import MoELayer, build_ffn
from harness.models.lm import MoEDecoderLM
from harness.routing.registry import create_router, get_router
from harness.routing.router import RouteContext, slots_from_dense
from harness.training.health import first_choice

# Affinities S (rows sum to 1) for T = 4 tokens, E = 3 experts. With c = 1.5, C = round(1.5 * 4 / 3) = 2:
#   expert 0 column .46 .10 .44 .34 -> tokens {0, 2};  expert 1: .44 .46 .10 .33 -> {1, 0};
#   expert 2: .10 .44 .46 .33 -> {2, 1};  token 3 is nobody's top-2: 0 experts; the others get 2.
P = torch.tensor([[0.46, 0.44, 0.10],
                  [0.10, 0.46, 0.44],
                  [0.44, 0.10, 0.46],
                  [0.34, 0.33, 0.33]])


def _router(**kw) -> ExpertChoiceRouter:
    """d = E = 3, identity gate, no bias: the logits are the input, so x = log P gives S = P."""
    r = ExpertChoiceRouter(3, 3, 2, ec_capacity_factor=1.5, gate_bias=False, **kw)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(3))
    return r


def _chosen(routing) -> list[dict[int, float]]:
    """Per token: {expert: weight} over the used slots (weight != 0)."""
    out = []
    for idx, w in zip(routing.indices.tolist(), routing.weights.tolist()):
        out.append({e: round(v, 6) for e, v in zip(idx, w) if v != 0})
    return out


def test_capacity_formula():
    assert expert_capacity(4, 1.5, 3) == 2
    assert expert_capacity(24, 2, 4) == 12          # conformance's T, k = 2, E = 4
    assert expert_capacity(3, 0.1, 8) == 1          # at least 1
    assert expert_capacity(4, 8, 4) == 4            # at most T
    assert expert_capacity(0, 2, 4) == 0
    r = create_router("expert_choice", 8, 4, 2)
    assert r.factor == 2.0 and r.num_slots == 4 and r.variable_k   # c defaults to top_k
    assert create_router("expert_choice", 8, 4, 1, ec_capacity_factor=0.5).factor == 0.5
    assert create_router("expert_choice@cap2", 8, 4, 2).num_slots == 2
    with pytest.raises(ValueError, match="ec_capacity_factor"):
        create_router("expert_choice", 8, 4, 2, ec_capacity_factor=0)
    with pytest.raises(ValueError, match="max_experts_per_token"):
        create_router("expert_choice", 8, 4, 2, max_experts_per_token=5)
    with pytest.raises(ValueError, match="selection"):
        create_router("expert_choice", 8, 4, 2, selection="future")


def test_batch_rule_by_hand():
    r = _router()
    out = r(P.log(), RouteContext(causal=False))
    assert r.rule(RouteContext(causal=False)) == "batch"
    assert _chosen(out) == [{0: 0.46, 1: 0.44}, {1: 0.46, 2: 0.44}, {2: 0.46, 0: 0.44}, {}]
    # slots: strongest first, then the unused experts in expert order with weight exactly 0
    assert out.indices.tolist() == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert out.weights[:, 2].tolist() == [0.0] * 4 and out.weights[3].tolist() == [0.0] * 3
    assert out.aux_losses == {}
    assert out.stats["experts_per_token"] == pytest.approx(1.5) and out.stats["unrouted_tokens"] == 0.25
    torch.testing.assert_close(out.logits, P.log())


def test_normalized_and_capped_variants():
    out = _router(normalize=True)(P.log(), RouteContext())
    torch.testing.assert_close(out.weights.sum(-1), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(out.weights[0, :2], torch.tensor([0.46, 0.44]) / 0.90)
    capped = _router(max_experts_per_token=1)(P.log(), RouteContext())
    assert capped.indices.shape == (4, 1)
    assert _chosen(capped) == [{0: 0.46}, {1: 0.46}, {2: 0.46}, {}]


def test_prefix_rule_by_hand():
    # one sequence; C(n) = max(1, round(1.5 n / 3)) = 1, 1, 2, 2 for n = 1..4; rank = 1 + #{earlier >= own}
    r = _router()
    ctx = RouteContext(causal=True, positions=torch.arange(4))
    assert r.rule(ctx) == "prefix"
    out = r(P.log(), ctx)
    assert _chosen(out) == [
        {0: 0.46, 1: 0.44, 2: 0.10},   # position 0: every expert's best so far
        {1: 0.46, 2: 0.44},            # e0: .10 < .46 (rank 2 > C = 1)
        {2: 0.46, 0: 0.44},            # e0 rank 2 <= 2, e1 rank 3, e2 rank 1
        {},                            # rank 3 for every expert, C = 2: as the batch rule
    ]


def test_prefix_last_token_is_batch_expert_choice_over_its_sequence():
    g = torch.Generator().manual_seed(0)
    for L in (5, 12, 31):
        probs = torch.randn(L, 4, generator=g).softmax(-1)
        pre = prefix_choice(probs, torch.arange(L), 2.0)
        full = batch_choice(probs, expert_capacity(L, 2.0, 4))
        assert torch.equal(pre[-1], full[-1])
        for p in range(L):  # each position is the batch rule on its prefix, last token's decision
            assert torch.equal(pre[p], batch_choice(probs[:p + 1], expert_capacity(p + 1, 2.0, 4))[-1])


def test_prefix_rule_is_per_sequence_and_batch_independent():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 4, generator=g).softmax(-1), torch.randn(7, 4, generator=g).softmax(-1)
    together = prefix_choice(torch.cat([a, b]), torch.arange(7).repeat(2), 2.0)
    assert torch.equal(together[:7], prefix_choice(a, torch.arange(7), 2.0))
    assert torch.equal(together[7:], prefix_choice(b, torch.arange(7), 2.0))
    # sequences of different lengths (positions restart at 0) take the per-sequence path
    c = torch.randn(3, 4, generator=g).softmax(-1)
    mixed = prefix_choice(torch.cat([a, c]), torch.cat([torch.arange(7), torch.arange(3)]), 2.0)
    assert torch.equal(mixed[7:], prefix_choice(c, torch.arange(3), 2.0))
    assert torch.equal(prefix_choice(a, None, 2.0), prefix_choice(a, torch.arange(7), 2.0))


def test_slots_from_dense():
    w = torch.tensor([[0.1, 0.0, 0.7], [0.2, 0.3, 0.5]])
    chosen = torch.tensor([[True, False, True], [False, False, False]])
    idx, ws = slots_from_dense(w, chosen)
    assert idx.tolist() == [[2, 0, 1], [0, 1, 2]]
    assert ws.tolist() == [[pytest.approx(0.7), pytest.approx(0.1), 0.0], [0.0, 0.0, 0.0]]
    idx2, ws2 = slots_from_dense(w, chosen, 1)
    assert idx2.tolist() == [[2], [0]] and ws2[1, 0] == 0


def test_layer_drops_unused_slots_and_a_token_without_experts_gets_zero():
    torch.manual_seed(0)
    layer = MoELayer(3, 8, _router())
    x = P.log()
    y, routing = layer(x, RouteContext())
    assert torch.equal(y[3], torch.zeros(3))                         # no expert took token 3
    ref = torch.zeros(4, 3)
    for t, experts in enumerate(_chosen(routing)):
        for e, w in experts.items():
            ref[t] += w * layer.experts.expert(e, x[t:t + 1])[0]
    torch.testing.assert_close(y, ref)
    # loads: the used slots only (each expert exactly C = 2), not the T * E = 12 slots
    assert layer.last_counts.tolist() == [2, 2, 2]
    d = layer.permute(x, routing, RouteContext())
    assert d.order.numel() == 6 and d.counts.tolist() == [2, 2, 2]
    # the all-expert-outputs path (unused slots weigh 0) combines to the same output
    ctx = RouteContext()
    layer.route(x, ctx)
    ctx.all_expert_outputs()
    d_all = layer.permute(x, routing, ctx)
    assert d_all.from_all_outputs and d_all.counts.tolist() == [2, 2, 2]
    torch.testing.assert_close(layer.combine(x, d_all, ctx.all_expert_outputs()), y)


def test_default_capacity_gives_every_expert_T_c_over_E_tokens():
    torch.manual_seed(3)
    layer = build_ffn("expert_choice", 16, 32, 4, 2)
    x = torch.randn(24, 16)
    y, routing = layer(x, RouteContext())
    assert layer.last_counts.tolist() == [12, 12, 12, 12]
    assert routing.stats["experts_per_token"] == pytest.approx(2.0)
    (y.square().mean()).backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def _lm(router: str, seed: int = 0) -> MoEDecoderLM:
    torch.manual_seed(seed)
    return MoEDecoderLM(router, vocab_size=256, d_model=16, n_layers=2, n_heads=2, d_ff=32, num_experts=4,
                        top_k=2, context=16).eval()


def _lm_routing(model, idx):
    with torch.no_grad():
        logits, routings = model(idx)
    B, L = idx.shape
    return logits, [(r.indices.reshape(B, L, -1), r.weights.reshape(B, L, -1)) for r in routings]


def test_lm_sets_ctx_causal_and_the_vit_does_not():
    seen = []
    model = _lm("expert_choice")
    for layer in model.moe_layers():
        layer.router.register_forward_pre_hook(lambda mod, args: seen.append(args[1].causal))
    model(torch.randint(0, 256, (2, 8)))
    assert seen == [True, True]
    from harness.models import vit

    seen.clear()
    v = vit.MoEVisionTransformer(router="expert_choice", num_experts=4, top_k=2, d_ff=32, depth=1, img_size=8,
                                 patch_size=4, embed_dim=16, num_heads=2, num_classes=3)
    for m in v.modules():
        if isinstance(m, ExpertChoiceRouter):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[1].causal))
    v(torch.randn(2, 3, 8, 8))
    assert seen == [False]


def test_causal_lm_no_leak_from_later_tokens_or_other_sequences():
    model = _lm("expert_choice")
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 256, (3, 16), generator=g)
    j = 9
    changed = idx.clone()
    changed[:, j:] = torch.randint(0, 256, (3, 16 - j), generator=g)   # every later token of every sequence
    la, ra = _lm_routing(model, idx)
    lb, rb = _lm_routing(model, changed)
    torch.testing.assert_close(la[:, :j], lb[:, :j], rtol=0, atol=1e-6)
    for (ia, wa), (ib, wb) in zip(ra, rb):
        assert torch.equal(ia[:, :j], ib[:, :j]) and torch.equal(wa[:, :j] != 0, wb[:, :j] != 0)
        torch.testing.assert_close(wa[:, :j], wb[:, :j], rtol=0, atol=1e-6)
    # a sequence routes the same alone as in its batch
    l0, r0 = _lm_routing(model, idx[1:2])
    torch.testing.assert_close(l0[0], la[1], rtol=0, atol=1e-6)
    assert all(torch.equal(a[0][0], b[0][1]) for a, b in zip(r0, ra))


def test_batch_rule_in_the_lm_leaks_the_future():
    """The paper's batch-wide rule (expert_choice@batch) is not causal: later tokens change earlier routing."""
    model = _lm("expert_choice@batch")
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 256, (3, 16), generator=g)
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 256, (3, 7), generator=g)
    _, ra = _lm_routing(model, idx)
    _, rb = _lm_routing(model, changed)
    assert any(not torch.equal(wa[:, :9] != 0, wb[:, :9] != 0) for (_, wa), (_, wb) in zip(ra, rb))


def test_health_probe_marks_tokens_without_experts():
    torch.manual_seed(0)
    layer = MoELayer(3, 8, _router())
    layer(P.log(), RouteContext())
    assert first_choice(layer).tolist() == [0, 1, 2, -1]
    smoe = build_ffn("smoe", 3, 8, 3, 2)
    _, r = smoe(P.log(), RouteContext())
    assert torch.equal(first_choice(smoe), r.indices[:, 0])


def test_bench_times_a_variable_k_router():
    """The bench times expert choice like any router: its [T, E] weights get their own upstream gradient."""
    from harness.bench import LayerConfig, run_layer_bench

    assert get_router("expert_choice").variable_k and not get_router("smoe").variable_k
    bench = run_layer_bench(LayerConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, tokens=64),
                            ["expert_choice"], naive=False, repeats=5, warmup=0, phases=False, mem_repeats=1,
                            log=lambda s: None)
    assert any(bench.info[lab]["router"] == "expert_choice" for lab in bench.stats)
    ec = [res for res in bench.results if res.router == "expert_choice"]
    assert ec and all(len(res.samples["fwd_bwd"]) == 5 and min(res.samples["fwd_bwd"]) > 0 for res in ec)


@pytest.mark.parametrize("suite", ["lm", "vision"])
def test_tiny_runs_finish(tmp_path, suite):
    from harness.cli import main

    store = tmp_path / "h.duckdb"
    args = ["run", "--suite", suite, "--preset", "tiny", "--routers", "expert_choice", "--store", str(store),
            "--quiet"] + (["--no-eval"] if suite == "lm" else [])
    assert main(args) == 0
    import duckdb

    con = duckdb.connect(str(store), read_only=True)
    try:
        status = con.execute("SELECT router, status FROM runs").fetchall()
        loads = con.execute("SELECT step, layer, sum(load) FROM routing GROUP BY step, layer").fetchall()
    finally:
        con.close()
    assert status == [("expert_choice", "finished")]
    assert loads and all(math.isclose(s, 1.0, abs_tol=1e-6) for *_, s in loads)
