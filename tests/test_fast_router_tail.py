"""The fused router tail (harness/routing/router_tail.py, csrc/router_tail.cpp) against the composite it replaces
(baselines/smoe.py ``composite_softmax_topk``): the same experts, ties included; weights, losses and gradients
within 1e-6 of the float64 answer or as close as the composite gets; float64 gradcheck; the same bits at any
thread count; and everything it does not cover (T = 0, non-finite scores, autocast, float64, the global balance
scope, given indices, a replaced ``gate_weights``, no compiler) runs the composite unchanged."""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import baselines.smoe as smoe
from baselines.smoe import composite_softmax_topk, renormalizes, softmax_gate, softmax_topk
from harness.routing import router_tail
from harness.routing.losses import GlobalBalance, global_balance
from harness.routing.registry import create_router
from harness.routing.router import RouteContext

pytestmark = pytest.mark.usefixtures("one_thread")

needs_kernel = pytest.mark.skipif(not router_tail.available(), reason="the router tail extension is not built here")

# (balance_weight, balance_fraction, z_loss_weight): every loss on and off, every f_i convention
LOSSES = [(0.0, "first", 0.0), (0.0, "first", 1e-3)] + [
    (0.01, frac, zw) for frac in ("first", "slots", "k_slots") for zw in (0.0, 1e-3)]
MODES = ("scores", "noisy", "probs")  # smoe's softmax inside; scores = logits + noise; probabilities given (xmoe, moge)


def test_the_extension_builds_here():
    # scripts/install.sh builds it; HARNESS_NO_FUSED_ROUTER=1 (or HARNESS_NO_CPP=1, every extension) turns it off
    # on purpose, and is then what is checked
    if os.environ.get("HARNESS_NO_FUSED_ROUTER") or os.environ.get("HARNESS_NO_CPP"):
        assert not router_tail.available()
    else:
        assert router_tail.available(), ("the router tail kernel did not build: is a C++ compiler installed? "
                                         "(HARNESS_NO_FUSED_ROUTER=1 runs the composite instead)")


def _is_fused(t: torch.Tensor) -> bool:
    return t.grad_fn is not None and "RouterTail" in t.grad_fn.name()


def _run(mode, leaf, noise, k, renormalize, bw, frac, zw, gw, composite, indices=None):
    """(idx, weights, losses, d leaf, fused?) of the tail on ``leaf`` through the public entry points, or the
    composite (with ``indices``: those experts)."""
    leaf.grad = None
    if mode == "probs":
        probs, logits = leaf.softmax(-1), leaf * 1.5
        if composite:
            idx, w, aux = composite_softmax_topk(probs, logits, k, renormalize, bw, frac, zw, indices)
        else:
            idx, w, aux = softmax_topk(probs, logits, k, renormalize, bw, frac, zw)
    else:
        scores = leaf if mode == "scores" else leaf + noise
        if composite:
            idx, w, aux = composite_softmax_topk(scores.softmax(-1), leaf, k, renormalize, bw, frac, zw, indices)
        else:
            idx, w, aux = softmax_gate(scores, leaf, k, renormalize, bw, frac, zw)
    fused = _is_fused(w)
    loss = (w * gw).sum() + sum((3.0 + i) * a for i, a in enumerate(aux.values()))
    if loss.requires_grad:
        loss.backward()
    grad = leaf.grad.clone() if leaf.grad is not None else torch.zeros_like(leaf)
    return idx, w.detach(), {name: a.detach() for name, a in aux.items()}, grad, fused


def _close(got: torch.Tensor, comp: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Within 1e-6 (relative to the largest value) of the float64 answer, or as close as the composite is
    (twice its error): where the composite itself only rounds (a gradient that is exactly 0, e.g. through
    renormalised k = 1 weights) both are rounding noise."""
    if ref.numel() == 0:
        return
    ref = ref.double()
    err_got = (got.double() - ref).abs().max().item()
    err_comp = (comp.double() - ref).abs().max().item()
    bound = 1e-6 * ref.abs().max().item() + 2 * err_comp + 1e-30
    assert err_got <= bound, f"{what}: |fused - float64| {err_got:.3g} > {bound:.3g} (composite's {err_comp:.3g})"


@needs_kernel
@pytest.mark.parametrize("T,E,k", [(T, E, k) for T in (0, 1, 7, 1024) for E in (2, 4, 8, 16, 64) for k in (1, 2, 4)
                                   if k <= E])
def test_matches_the_composite(T, E, k):
    gen = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    base = torch.randn(T, E, generator=gen) * 2
    noise = torch.randn(T, E, generator=gen) * 0.5
    gw = torch.randn(T, k, generator=gen)
    for mode, renormalize, (bw, frac, zw) in itertools.product(MODES, ("auto", True, False), LOSSES):
        case = f"T={T} E={E} k={k} {mode} renormalize={renormalize} balance={bw}/{frac} z={zw}"
        leaf = base.clone().requires_grad_()
        f_idx, f_w, f_aux, f_g, fused = _run(mode, leaf, noise, k, renormalize, bw, frac, zw, gw, composite=False)
        c_idx, c_w, c_aux, c_g, _ = _run(mode, leaf, noise, k, renormalize, bw, frac, zw, gw, composite=True)
        # the float64 answer for the same experts (where float64 would choose otherwise it is a near tie)
        leaf64 = base.double().requires_grad_()
        _, r_w, r_aux, r_g, _ = _run(mode, leaf64, noise.double(), k, renormalize, bw, frac, zw, gw.double(),
                                     composite=True, indices=c_idx)
        assert fused == (T > 0), case  # T = 0 is the composite's: exact zeros
        assert f_aux.keys() == c_aux.keys(), case
        assert torch.equal(f_idx, c_idx), case
        _close(f_w, c_w, r_w, f"weights, {case}")
        for name in c_aux:
            _close(f_aux[name], c_aux[name], r_aux[name], f"{name}, {case}")
        _close(f_g, c_g, r_g, f"d scores, {case}")
        if T == 0:
            assert all(float(a) == 0.0 for a in f_aux.values()), case


@needs_kernel
@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (8, 1), (8, 2), (8, 4), (16, 2), (64, 1), (64, 2), (64, 4)])
@pytest.mark.parametrize("mode", ["scores", "probs"])
def test_ties_go_to_the_experts_torch_topk_picks(E, k, mode):
    # equal logits give equal probabilities in both softmaxes; torch.topk's CPU selection (nth_element /
    # partial_sort) does not break such ties by the lower index, and the fused tail copies it
    gen = torch.Generator().manual_seed(E + k)
    if E <= 8:
        logits = torch.tensor(list(itertools.product([0.0, 1.0, 2.0], repeat=E)))[:2000]
    else:
        logits = torch.randint(0, 3, (2000, E), generator=gen).float()
    probs = logits.softmax(-1)
    x = logits if mode == "scores" else probs
    fused = router_tail.fused_tail(x, logits, softmax_inside=mode == "scores", top_k=k, renorm=True,
                                   balance_weight=0.01, balance_fraction="slots", z_loss_weight=1e-3)
    assert fused is not None
    ref = composite_softmax_topk(probs, logits, k, True, 0.01, "slots", 1e-3)
    assert torch.equal(fused[0], ref[0])
    assert torch.equal(fused[0], probs.topk(k, dim=-1).indices)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-6, atol=1e-7)


def test_torch_topk_does_not_break_ties_by_the_lower_index():
    # why router_tail copies ATen's selection instead of taking the lowest index among equals (torch 2.14,
    # CPU: of the 6,561 rows of {0, 1, 2}^8, 5,039 get other top-2 experts or order than "lowest index first")
    rows = torch.tensor(list(itertools.product([0.0, 1.0, 2.0], repeat=8)))
    lowest_first = torch.sort(-rows, dim=-1, stable=True).indices[:, :2]
    assert (rows.topk(2, dim=-1).indices != lowest_first).any(-1).sum() > 0


@needs_kernel
@pytest.mark.parametrize("spread", [1.0, 10.0, 40.0])  # 40: most probabilities subnormal or 0
def test_probabilities_within_a_few_ulp_of_atens(spread):
    # with k = E and no renormalisation the weights are the probabilities, sorted
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(3)) * spread
    got = router_tail.fused_tail(x, x, softmax_inside=True, top_k=8, renorm=False, balance_weight=0.0,
                                 balance_fraction="first", z_loss_weight=0.0)[1].double()
    aten = x.softmax(-1).sort(-1, descending=True).values.double()
    tiny = torch.finfo(torch.float32).tiny
    ulp = torch.where(aten >= tiny, 2.0 ** (torch.floor(torch.log2(aten.clamp_min(tiny))) - 23),
                      torch.full_like(aten, 2.0 ** -149))
    assert ((got - aten).abs() / ulp).max() <= 4


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k,renorm", [(1, False), (2, True), (4, True), (4, False)])
def test_gradcheck_float64(mode, k, renorm):
    gen = torch.Generator().manual_seed(k)
    leaf = (torch.randn(13, 8, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    noise = torch.randn(13, 8, generator=gen, dtype=torch.float64)

    def f(x):
        if mode == "probs":
            xin, logits, inside = x.softmax(-1), x * 1.5, False
        else:
            xin, logits, inside = (x if mode == "scores" else x + noise), x, True
        idx, w, aux = router_tail.fused_tail(xin, logits, softmax_inside=inside, top_k=k, renorm=renorm,
                                             balance_weight=0.3, balance_fraction="slots", z_loss_weight=0.2)
        assert _is_fused(w)
        return w, aux["balance"], aux["z_loss"]

    assert torch.autograd.gradcheck(f, (leaf,), eps=1e-6, atol=1e-8, rtol=1e-6)


@needs_kernel
def test_same_bits_at_one_and_two_threads():
    x = torch.randn(4099, 16, generator=torch.Generator().manual_seed(5))
    gw = torch.randn(4099, 2, generator=torch.Generator().manual_seed(6))
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        leaf = x.clone().requires_grad_()
        idx, w, aux = softmax_gate(leaf, leaf, 2, "auto", 0.01, "first", 1e-3)
        ((w * gw).sum() + aux["balance"] + aux["z_loss"]).backward()
        out.append([idx, w.detach(), aux["balance"].detach(), aux["z_loss"].detach(), leaf.grad])
    torch.set_num_threads(1)
    for a, b in zip(*out):
        assert torch.equal(a, b)


@needs_kernel
def test_double_backward_is_refused_in_one_line():
    leaf = torch.randn(5, 4).requires_grad_()
    idx, w, aux = softmax_gate(leaf, leaf, 2, "auto", 0.01, "first", 1e-3)
    with pytest.raises(RuntimeError, match="no double backward") as ei:
        torch.autograd.grad(w.sum() + aux["balance"], leaf, create_graph=True)
    assert "HARNESS_NO_FUSED_ROUTER=1" in str(ei.value).splitlines()[0]


# -- what the fused tail leaves to the composite ------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_run_the_composite(bad):
    x = torch.randn(6, 4)
    x[2, 1] = bad
    idx, w, aux = softmax_gate(x, x, 2, "auto", 0.01, "first", 1e-3)
    ref = composite_softmax_topk(x.softmax(-1), x, 2, "auto", 0.01, "first", 1e-3)
    assert not _is_fused(w) and torch.equal(idx, ref[0])
    torch.testing.assert_close(w, ref[1], equal_nan=True, rtol=0, atol=0)
    for name in ref[2]:
        torch.testing.assert_close(aux[name], ref[2][name], equal_nan=True, rtol=0, atol=0)


def test_empty_batch_gives_exact_zero_losses():
    for fn, x in ((softmax_gate, torch.zeros(0, 8, requires_grad=True)),
                  (softmax_topk, torch.zeros(0, 8, requires_grad=True))):
        idx, w, aux = fn(x, x, 2, "auto", 0.01, "slots", 1e-3)
        assert idx.shape == (0, 2) and w.shape == (0, 2) and not _is_fused(w)
        assert float(aux["balance"].detach()) == 0.0 and float(aux["z_loss"].detach()) == 0.0
        (aux["balance"] + aux["z_loss"]).backward()
        assert x.grad is not None and x.grad.shape == (0, 8)


def test_outside_its_cases_the_composite_runs(monkeypatch):
    x = torch.randn(32, 8, requires_grad=True)
    args = (2, "auto", 0.01, "first", 1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _is_fused(softmax_gate(x, x, *args)[1])
    assert not _is_fused(softmax_gate(x.double(), x.double(), *args)[1])
    with global_balance(GlobalBalance(8), step=0):
        assert not _is_fused(softmax_gate(x, x, *args)[1])  # the global scope's counts live in GlobalBalance
        if router_tail.available():  # without a balance loss the scope does not matter
            assert _is_fused(softmax_gate(x, x, 2, "auto", 0.0, "first", 1e-3)[1])
    given = torch.tensor([[0, 1]] * 32)
    idx, w, _ = softmax_gate(x, x, *args, indices=given)  # gumbel's second expert
    assert torch.equal(idx, given) and not _is_fused(w)
    # a replaced gate_weights (tests/test_regress.py injects a fault through it) is what computes the weights
    monkeypatch.setattr(smoe, "gate_weights", lambda probs_topk, renormalize, top_k: probs_topk * 0 + 7)
    assert torch.equal(softmax_gate(x, x, *args)[1], torch.full((32, 2), 7.0))
    assert torch.equal(softmax_topk(x.softmax(-1), x, *args)[1], torch.full((32, 2), 7.0))


def test_without_the_extension_the_composite_runs(monkeypatch):
    monkeypatch.setattr(router_tail, "extension", lambda: None)
    x = torch.randn(16, 8, requires_grad=True)
    idx, w, aux = softmax_gate(x, x, 2, "auto", 0.01, "first", 1e-3)
    ref = composite_softmax_topk(x.softmax(-1), x, 2, "auto", 0.01, "first", 1e-3)
    assert not _is_fused(w) and torch.equal(idx, ref[0]) and torch.equal(w, ref[1])
    assert all(torch.equal(aux[n], ref[2][n]) for n in ref[2])


def test_a_failed_build_is_one_logged_line(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(**_kw):
        raise RuntimeError("Error building extension 'harness_router_tail'\nninja: build stopped\n...")

    monkeypatch.delenv("HARNESS_NO_FUSED_ROUTER", raising=False)
    monkeypatch.delenv("HARNESS_NO_CPP", raising=False)
    monkeypatch.setattr(cpp_extension, "load", broken)
    router_tail.extension.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="harness"):
            assert router_tail.extension() is None
        (rec,) = [r for r in caplog.records if "router tail" in r.getMessage()]
        assert "\n" not in rec.getMessage() and "composite" in rec.getMessage()
    finally:
        router_tail.extension.cache_clear()


def test_renormalizes_is_gate_weights_rule():
    assert [renormalizes(r, k) for r in ("auto", True, False) for k in (1, 2)] == [False, True, True, True,
                                                                                    False, False]


# -- the routers that use it ------------------------------------------------------------------------------------

@needs_kernel
@pytest.mark.parametrize("name,kw", [("smoe", {}), ("smoe", {"balance_fraction": "k_slots"}), ("smoe", {"noisy": True}),
                                     ("xmoe", {}), ("moge", {}), ("competesmoe", {})])
def test_routers_route_as_with_the_composite(name, kw, monkeypatch):
    torch.manual_seed(0)
    router = create_router(name, 32, 8, 2, **kw)
    router.train()
    x = torch.randn(256, 32)
    params = [p for p in router.parameters() if p.requires_grad]
    res = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(router_tail, "extension", lambda: None)
        torch.manual_seed(1)  # the same noise draws
        xin = x.clone().requires_grad_()
        r = router(xin, RouteContext(training=True))
        g = torch.randn(r.weights.shape, generator=torch.Generator().manual_seed(2))
        loss = (r.weights * g).sum() + sum(r.aux_losses.values())
        grads = torch.autograd.grad(loss, [r.logits, xin, *params], allow_unused=True)
        res[fused] = (r, grads)
    (a, ga), (b, gb) = res[True], res[False]
    assert _is_fused(a.weights) and not _is_fused(b.weights)
    assert torch.equal(a.indices, b.indices) and a.aux_losses.keys() == b.aux_losses.keys()
    torch.testing.assert_close(a.weights, b.weights, rtol=2e-6, atol=1e-7)
    for n in a.aux_losses:
        torch.testing.assert_close(a.aux_losses[n], b.aux_losses[n], rtol=2e-6, atol=1e-9)
    # d logits, d x, d router parameters: sums over tokens and experts, some cancelling, so relative to the
    # largest element (measured: <= 2.3e-7). An upstream gradient nearly equal across a token's k slots
    # cancels in the renormalisation's backward and scales both paths' rounding up alike (to ~5e-5 of the
    # largest element with torch.linspace; fused closer to float64 than the composite there)
    for u, v in zip(ga, gb):
        if v is not None:
            torch.testing.assert_close(u, v, rtol=0, atol=1e-6 * float(v.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_runs_the_composite():
    x = torch.randn(64, 8, device="cuda", requires_grad=True)
    idx, w, aux = softmax_gate(x, x, 2, "auto", 0.01, "first", 1e-3)
    ref = composite_softmax_topk(x.softmax(-1), x, 2, "auto", 0.01, "first", 1e-3)
    assert not _is_fused(w) and torch.equal(idx, ref[0]) and torch.equal(w, ref[1])
