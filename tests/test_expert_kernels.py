"""Every expert kernel (``model.experts_impl``: loop, loop_recompute, padded_bmm, grouped_mm, auto) against a naive
per-token reference: outputs and the gradients of x, every expert weight, the router and the shared
experts; fp32 (tight) and bf16 (loose); empty experts, capacity drops, shared experts, autocast, the
expert-parallel layer in one process; plus the switch's plumbing (spec, hash, build_ffn, bench).
CUDA tests (names contain ``cuda``) skip without a GPU: ``scripts/gpu_check.sh`` runs them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.layers import kernels
from harness.layers.build import build_ffn
from harness.layers.experts import ExpertBank
from harness.layers.moe_layer import MoELayer
from harness.routing.router import RouteContext, Router, Routing
from harness.spec import SpecError, load_suite

IMPLS = ("loop", "loop_recompute", "fused", "padded_bmm", "grouped_mm", "auto")
CUDA = torch.cuda.is_available()


class TableRouter(Router):
    """Routes by a fixed [T, k] table; weights are a softmax of fp32 logits, so x and the router get gradients."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, table: torch.Tensor) -> None:
        super().__init__(d_model, num_experts, top_k)
        self.table = table
        self.proj = torch.nn.Parameter(torch.randn(d_model, num_experts) / math.sqrt(d_model))

    def forward(self, x, ctx):
        logits = x.float() @ self.proj.float()
        w = torch.softmax(logits, -1).gather(1, self.table.to(x.device))
        return Routing(indices=self.table.to(x.device), weights=w, logits=logits)


def naive_reference(layer: MoELayer, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each token through its experts one at a time (fp32), with the layer's capacity rule.

    Capacity: an expert keeps its first ``cap`` slots in k-major order (all first choices,
    then all second choices, ...), the rest contribute 0.
    """
    ex = layer.experts
    T, k = idx.shape
    cap = layer.capacity(T)
    seen = [0] * ex.num_experts
    kept = [[True] * k for _ in range(T)]
    for j in range(k):
        for t in range(T):
            e = int(idx[t, j])
            kept[t][j] = cap is None or seen[e] < cap
            seen[e] += 1
    f32 = [p.float() for p in (ex.w1, ex.b1, ex.w2, ex.b2)]
    w1, b1, w2, b2 = f32
    rows = []
    for t in range(T):
        acc = torch.zeros(ex.d_model, dtype=torch.float32, device=x.device)
        for j in range(k):
            if kept[t][j]:
                e = int(idx[t, j])
                h = ex.act(x[t].float() @ w1[e] + b1[e])
                acc = acc + w[t, j].float() * (h @ w2[e] + b2[e])
        rows.append(acc)
    y = torch.stack(rows)
    if layer.shared_expert is not None:
        s = layer.shared_expert
        y = y + s.act(x.float() @ s.w1[0].float() + s.b1[0].float()) @ s.w2[0].float() + s.b2[0].float()
    return y


def make_layer(T, E, k, d=8, f=12, table=None, seed=0, capacity_factor=None, shared=0, impl="loop"):
    g = torch.Generator().manual_seed(seed)
    if table is None:
        table = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    torch.manual_seed(seed)
    layer = MoELayer(d, f, TableRouter(d, E, k, table), capacity_factor=capacity_factor, shared_experts=shared,
                     experts_impl=impl)
    x = torch.randn(T, d, generator=g)
    up = torch.randn(T, d, generator=g)  # a fixed cotangent, so every gradient is non-trivial
    return layer, x, up


def params(layer: MoELayer) -> dict[str, torch.Tensor]:
    return dict(layer.named_parameters())


def run(layer: MoELayer, x: torch.Tensor, up: torch.Tensor, impl: str, dtype=torch.float32):
    """Output and gradients (of x and every parameter, as fp32) with the kernel ``impl``."""
    layer.experts.experts_impl = impl
    for p in layer.parameters():
        p.grad = None
    xi = x.detach().to(dtype).requires_grad_()
    y, routing = layer(xi, RouteContext())
    (y.float() * up).sum().backward()
    grads = {n: (p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
             for n, p in layer.named_parameters()}
    return y.detach().float(), xi.grad.float(), grads, routing


def reference(layer: MoELayer, x: torch.Tensor, up: torch.Tensor):
    for p in layer.parameters():
        p.grad = None
    xi = x.detach().float().requires_grad_()
    ctx = RouteContext()
    routing = layer.router(xi, ctx)
    y = naive_reference(layer, xi, routing.indices, routing.weights)
    (y * up).sum().backward()
    grads = {n: (p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
             for n, p in layer.named_parameters()}
    return y.detach(), xi.grad, grads


def assert_close_all(got, ref, tight: bool) -> None:
    y, gx, gp, _ = got
    ry, rgx, rgp = ref
    if tight:
        kw = dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y, ry, **kw)
        torch.testing.assert_close(gx, rgx, **kw)
        for n in rgp:
            torch.testing.assert_close(gp[n], rgp[n], **kw, msg=lambda m: f"grad of {n}: {m}")
    else:  # bf16: relative error of the whole tensor
        for name, a, b in [("y", y, ry), ("x.grad", gx, rgx), *[(n, gp[n], rgp[n]) for n in rgp]]:
            err = (a - b).norm() / b.norm().clamp_min(1e-6)
            assert err < 3e-2, f"{name}: relative error {err:.3g}"


# -- fp32 and bf16 against the per-token reference ---------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["plain", "empty_experts", "capacity", "shared", "one_token"])
def test_kernel_matches_per_token_reference_fp32(impl, case):
    T, E, k = (1, 4, 2) if case == "one_token" else (23, 6, 2)
    table = None
    if case == "empty_experts":  # experts 1, 2, 4, 5 get nothing; 0 and 3 everything
        table = torch.stack([torch.zeros(T, dtype=torch.long), torch.full((T,), 3)], 1)
    layer, x, up = make_layer(T, E, k, table=table, seed=sum(map(ord, case)),
                              capacity_factor=0.5 if case == "capacity" else None, shared=1 if case == "shared" else 0)
    got = run(layer, x, up, impl)
    if case == "capacity":
        assert got[3].stats["dropped_tokens"] > 0
    assert_close_all(got, reference(layer, x, up), tight=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["plain", "empty_experts", "capacity", "shared"])
def test_kernel_matches_per_token_reference_bf16(impl, case):
    T, E, k = 29, 5, 2
    table = None
    if case == "empty_experts":
        table = torch.stack([torch.ones(T, dtype=torch.long), torch.full((T,), 4)], 1)
    layer, x, up = make_layer(T, E, k, d=16, f=24, table=table, seed=7,
                              capacity_factor=0.75 if case == "capacity" else None, shared=1 if case == "shared" else 0)
    layer.to(torch.bfloat16)
    layer.router.float()  # routers decide in fp32
    got = run(layer, x, up, impl, dtype=torch.bfloat16)
    assert_close_all(got, reference(layer, x.to(torch.bfloat16), up), tight=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_under_cpu_autocast_bf16(impl):
    """train.dtype=bfloat16 runs the layer under autocast with fp32 weights: every kernel casts."""
    layer, x, up = make_layer(19, 4, 2, d=16, f=16, seed=3)
    layer.experts.experts_impl = impl
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(xi, RouteContext())
    assert y.dtype == torch.float32  # combine scatters into x's dtype; the GEMMs ran in bf16
    (y.float() * up).sum().backward()
    ry, rgx, _ = reference(layer, x, up)
    assert (y.float() - ry).norm() / ry.norm() < 3e-2
    assert (xi.grad - rgx).norm() / rgx.norm() < 3e-2
    assert layer.experts.w1.grad.dtype == torch.float32 and layer.experts.w1.grad.abs().sum() > 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 24), E=st.integers(1, 7), k=st.integers(1, 3), seed=st.integers(0, 10**6),
       cf=st.sampled_from([None, 0.3, 1.0]), skew=st.booleans())
def test_random_shapes_and_counts_all_kernels_agree_with_reference(T, E, k, seed, cf, skew):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    if skew:  # heavy imbalance: most slots on expert 0, many experts empty
        table = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(E - 1, generator=g)[:k - 1]])
                             for _ in range(T)]) if E > 1 else torch.zeros(T, k, dtype=torch.long)
    else:
        table = None
    layer, x, up = make_layer(T, E, k, table=table, seed=seed, capacity_factor=cf)
    ref = reference(layer, x, up)
    for impl in IMPLS:
        assert_close_all(run(layer, x, up, impl), ref, tight=True)


def test_kernels_called_directly_on_sorted_rows_and_zero_rows():
    torch.manual_seed(0)
    bank = ExpertBank(5, 8, 12)
    counts = [3, 0, 4, 0, 2]
    xs = torch.randn(sum(counts), 8)
    ref = bank.forward_segments(xs, counts)
    for impl in ("padded_bmm", "grouped_mm"):
        for c in (counts, torch.tensor(counts)):
            torch.testing.assert_close(kernels.KERNELS[impl](bank, xs, c), ref, rtol=1e-5, atol=1e-5)
    for impl in IMPLS:
        bank.experts_impl = impl
        out = bank.forward_sorted(xs[:0], [0] * 5)
        assert out.shape == (0, 8)


# -- the default is today's kernel, bit for bit ------------------------------------------------------

def test_loop_default_is_forward_segments_bit_for_bit():
    layer, x, up = make_layer(31, 8, 2, d=16, f=32, seed=11)
    assert layer.experts.experts_impl == "loop"
    xi = x.clone().requires_grad_()
    y, _ = layer(xi, RouteContext())
    # what MoELayer.run_experts did before the switch existed
    d = layer.permute(xi, layer.route(xi, RouteContext()), RouteContext())
    old = layer.combine(xi, d, layer.experts.forward_segments(d.rows(), d.counts.tolist()))
    assert torch.equal(y, old)


def test_auto_picks_loop_on_cpu_and_by_device_on_cuda():
    cpu = torch.device("cpu")
    for d in (64, 128, 256):  # the measured CPU crossover (harness/layers/kernels.py, docs/speed.md)
        assert kernels.pick(cpu, torch.float32, d, 4 * d, 16384, 8) == "loop"
    # grouped_mm while mean rows per expert x d_ff <= 256 x 128; padded_bmm never on CPU
    assert kernels.pick(cpu, torch.float32, 64, 128, 2048, 8) == "grouped_mm"  # 256 x 128
    assert kernels.pick(cpu, torch.float32, 64, 128, 2056, 8) == "loop"
    assert kernels.pick(cpu, torch.float32, 64, 512, 512, 8) == "grouped_mm"  # 64 x 512
    assert kernels.pick(cpu, torch.float32, 64, 512, 1024, 8) == "loop"       # 128 x 512
    assert kernels.pick(cpu, torch.float32, 64, 256, 0, 8) == "loop"
    if CUDA:
        dev = torch.device("cuda")
        assert kernels.pick(dev, torch.float32, 64, 256, 1024, 8) == "padded_bmm"
        want = "grouped_mm" if torch.cuda.get_device_capability()[0] >= 8 else "padded_bmm"
        assert kernels.pick(dev, torch.bfloat16, 64, 256, 1024, 8) == want
        assert kernels.pick(dev, torch.bfloat16, 60, 256, 1024, 8) == "padded_bmm"  # misaligned for grouped_mm


def test_auto_runs_fused_on_cpu_in_float32_where_it_is_built(monkeypatch):
    from harness.layers import fused_experts

    bank = ExpertBank(8, 64, 128, "gelu", experts_impl="auto")
    x = torch.randn(2048, 64)
    monkeypatch.setattr(fused_experts, "available", lambda: True)
    assert kernels.resolve("auto", bank, x) == "fused"
    assert kernels.resolve("auto", bank, x.double()) == "grouped_mm"  # not float32: pick's rule
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.resolve("auto", bank, x) == "grouped_mm"
    assert kernels.resolve("loop", bank, x) == "loop"
    monkeypatch.setattr(fused_experts, "available", lambda: False)  # no compiler: pick's rule
    assert kernels.resolve("auto", bank, x) == "grouped_mm"


# -- expert parallelism, one process --------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_expert_parallel_layer_single_process_uses_the_kernel(impl, tmp_path):
    from harness.layers.expert_parallel import ExpertParallelMoELayer

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        layer, x, up = make_layer(17, 4, 2, seed=5, capacity_factor=1.0, impl=impl)
        ep = ExpertParallelMoELayer.from_layer(layer)
        assert ep.experts.experts_impl == impl
        ref = reference(layer, x, up)
        got = run(ep, x, up, impl)
        y, gx, gp, _ = got
        torch.testing.assert_close(y, ref[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gx, ref[1], rtol=1e-4, atol=1e-5)
        for n in ("experts.w1", "experts.b1", "experts.w2", "experts.b2", "router.proj"):
            torch.testing.assert_close(gp[n], ref[2][n], rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()


# -- the switch: spec, hash, build_ffn, models ---------------------------------------------------------

def test_spec_field_default_hash_unchanged_and_validated():
    base = load_suite("lm", preset="tiny", routers=["smoe"]).runs()[0]
    loop = load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.experts_impl=loop"]).runs()[0]
    pad = load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.experts_impl=padded_bmm"]).runs()[0]
    assert base.spec_hash == loop.spec_hash != pad.spec_hash
    assert base.to_dict()["model"]["experts_impl"] == "loop"
    with pytest.raises(SpecError, match="experts_impl"):
        load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.experts_impl=fast"])


def test_build_ffn_and_models_pass_the_switch_through():
    from harness.models.lm import MoEDecoderLM
    from harness.suites.lm import build_lm

    assert build_ffn("smoe", 8, 16, 4, 2, experts_impl="padded_bmm").experts.experts_impl == "padded_bmm"
    assert build_ffn("smoe", 8, 16, 4, 2).experts.experts_impl == "loop"
    build_ffn("dense", 8, 16, 4, 2, experts_impl="grouped_mm")  # the dense FFN has no kernel to pick
    with pytest.raises(ValueError, match="experts_impl"):
        build_ffn("smoe", 8, 16, 4, 2, experts_impl="fast")
    m = MoEDecoderLM("smoe", d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4, experts_impl="grouped_mm")
    assert [b.ffn.experts.experts_impl for b in m.blocks] == ["grouped_mm"]
    run_spec = load_suite("lm", preset="tiny", routers=["smoe"], overrides=["model.experts_impl=auto"]).runs()[0]
    assert {layer.experts.experts_impl for layer in build_lm(run_spec).moe_layers()} == {"auto"}


def test_lm_forward_backward_bit_identical_between_loop_and_default():
    """Same seed: an LM built with the default and one built with experts_impl=loop agree exactly."""
    from harness.models.lm import MoEDecoderLM

    outs = []
    for kw in ({}, {"experts_impl": "loop"}):
        torch.manual_seed(0)
        m = MoEDecoderLM("smoe", d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, context=8, **kw)
        idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
        logits, _ = m(idx)
        logits.square().mean().backward()
        outs.append((logits.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_bench_rows_per_kernel():
    from harness import bench as P

    cfg = P.LayerConfig(tokens=64, d_model=8, d_ff=16, num_experts=4, top_k=2)
    cands = P.build_candidates(cfg, ["smoe", "dense"], naive=True, log=lambda m: None,
                               experts_impls=["padded_bmm", "loop", "grouped_mm", "auto"])
    by = {c.label: c for c in cands}
    assert {"smoe", "dense", "naive", "smoe:padded_bmm", "smoe:grouped_mm", "smoe:auto"} <= set(by)
    assert by["smoe"].experts_impl == "loop" and by["smoe:padded_bmm"].module.experts.experts_impl == "padded_bmm"
    assert "auto -> grouped_mm" in by["smoe:auto"].note  # 64 tokens x k=2 over 4 experts: 32 rows each
    inp = P.Inputs.make(cfg.tokens, cfg.d_model, torch.float32, torch.device("cpu"), 0)
    for label in ("smoe:padded_bmm", "smoe:grouped_mm", "smoe:auto"):
        assert P.verify_impl(by[label], inp) is None
    b = P.run_layer_bench(cfg, ["smoe"], naive=False, repeats=5, warmup=0, mem_repeats=1, router_inner=1,
                          log=lambda m: None, experts_impls=["padded_bmm"])
    assert "ratio_vs_dense" in b.stats["smoe:padded_bmm"] and "ratio_vs_smoe" in b.stats["smoe:padded_bmm"]
    rows = P.layer_rows(b, "id", None, None)
    assert {r["config"].get("experts_impl") for r in rows if r["router"] == "smoe"} == {"loop", "padded_bmm"}
    assert any(t["candidate"] == "smoe:padded_bmm" for t in P.check_targets(b))
    # every candidate has a same-run GEMM roofline fraction; two kernels timed: the crossover line
    assert all(0 < b.stats[lab]["roofline_frac"].median for lab in ("smoe", "smoe:padded_bmm", "dense"))
    assert b.roofline_gflops and b.roofline_gflops > 0
    from harness.bench.report import kernel_crossover
    line = kernel_crossover(b)
    assert line is not None and "fastest here:" in line and "auto picks grouped_mm" in line
    assert ("agrees" in line) == ("fastest here: grouped_mm" in line)


# -- CUDA (skipped here; scripts/gpu_check.sh runs them) ------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference(impl, dtype):
    if impl == "grouped_mm" and dtype == torch.float32:
        pytest.skip("grouped_mm on CUDA is bfloat16 only (auto picks padded_bmm there)")
    layer, x, up = make_layer(257, 8, 2, d=64, f=128, seed=2, capacity_factor=1.25, shared=1)
    layer.cuda().to(dtype)
    layer.router.float()
    got = run(layer, x.cuda(), up.cuda(), impl, dtype=dtype)
    assert_close_all(got, reference(layer, x.cuda().to(dtype), up.cuda()), tight=dtype == torch.float32)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_autocast_bf16_kernels(impl):
    layer, x, up = make_layer(300, 16, 2, d=64, f=64, seed=4)
    layer.cuda()
    layer.experts.experts_impl = impl
    xi = x.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = layer(xi, RouteContext())
    (y.float() * up.cuda()).sum().backward()
    ry, rgx, _ = reference(layer, x.cuda(), up.cuda())
    assert (y.float() - ry).norm() / ry.norm() < 3e-2
    assert (xi.grad - rgx).norm() / rgx.norm() < 3e-2


def test_grouped_mm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "_grouped_mm_fn", lambda: (_ for _ in ()).throw(RuntimeError("needs grouped_mm")))
    bank = ExpertBank(2, 4, 4, experts_impl="grouped_mm")
    with pytest.raises(RuntimeError, match="grouped_mm"):
        bank.forward_sorted(torch.randn(3, 4), [1, 2])
