"""StableMoE in vision (issue 29, item 3): the distilled router embeds the token's *content*.

An image has no vocabulary. The default reading (``distill_input="token"``) treats the token of an image as
its patch: the ViT hands every router that declares ``patch_dim`` the pixels of each token's patch
(``ctx.patches``), and the distilled router embeds them with its own ``nn.Linear(patch_dim, distill_dim)``,
frozen in stage 2 -- so stage-2 routing is a fixed function of the pixels. ``stablemoe@position`` keeps the
earlier reading (the patch index through ``nn.Embedding``): stage-2 routing is a fixed map from position to
expert. The LM path (token ids through ``nn.Embedding``) is unchanged.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import harness.models.vit  # noqa: F401 - registers the timm models
from baselines.stablemoe import StableMoERouter
from harness.layers.moe import build_ffn
from harness.models.lm import MoEDecoderLM
from harness.routing.registry import create_router, get_router, router_defaults, variant_args, variant_names
from harness.routing.router import RouteContext

pytestmark = pytest.mark.xdist_group("test_vision")

TINY = dict(embed_dim=16, depth=2, num_heads=2, num_experts=4, d_ff=16)


def _vit(router: str = "stablemoe", **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_moe_tiny_patch4_32", router=router, **{**TINY, **kw})


def _spy_contexts(model) -> list[RouteContext]:
    seen: list[RouteContext] = []
    for layer in model.moe_layers():
        orig = layer.router.forward
        layer.router.forward = lambda x, ctx, orig=orig: (seen.append(ctx), orig(x, ctx))[1]
    return seen


# -- the ViT's ctx.patches ------------------------------------------------------------------------------


@pytest.mark.parametrize("reg_tokens", [0, 1])
def test_vit_patches_are_the_hand_built_unfold(reg_tokens):
    # 2 images of 3 x 8 x 8, patch 4: 4 patches per image (row-major), 1 class token (+ reg_tokens registers)
    model = _vit(img_size=8, reg_tokens=reg_tokens)
    P = 1 + reg_tokens
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    seen = _spy_contexts(model)
    model(images)
    expected = []
    for b in range(2):
        expected += [torch.zeros(48)] * P  # class / register tokens: zero pixels
        for i in range(2):          # patch row
            for j in range(2):      # patch column
                expected.append(images[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1))  # channel, row, column
    expected = torch.stack(expected)
    assert len(seen) == 2 and seen[0].patches.shape == (2 * (P + 4), 48)
    torch.testing.assert_close(seen[0].patches, expected, rtol=0, atol=0)
    assert seen[1].patches is seen[0].patches  # unfolded once per forward, shared by the layers
    # the patch order and the pixel order are timm's patch embedding's: patches @ W^T + b is its output
    proj = model.patch_embed.proj
    emb = seen[0].patches.reshape(2, P + 4, 48)[:, P:] @ proj.weight.flatten(1).t() + proj.bias
    torch.testing.assert_close(emb, model.patch_embed(images), rtol=1e-5, atol=1e-3)
    assert model._scope.images is None  # the scope does not keep the batch after the forward


def test_only_patch_reading_layers_get_patches():
    smoe, pos = _vit("smoe"), _vit("stablemoe@position")
    assert not any(m.reads_patches for m in smoe.harness_mlps() + pos.harness_mlps())
    for model in (smoe, pos):
        seen = _spy_contexts(model)
        model(torch.randn(2, 3, 32, 32))
        assert seen and all(c.patches is None for c in seen)
    stable = _vit()
    assert all(m.reads_patches for m in stable.harness_mlps())
    assert stable.moe_layers()[0].router.patch_dim == 3 * 4 * 4  # set by the ViT: in_chans * patch_size**2
    gray = _vit(in_chans=1)
    assert gray.moe_layers()[0].router.patch_dim == 16


# -- training with each reading ---------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["stablemoe", "stablemoe@position"])
def test_stablemoe_trains_in_a_tiny_vit(router):
    model = _vit(router)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    N, losses = 12, []
    for s in range(N):
        model.on_step(s, N)  # stage 2 from step 2 (10% of 12, rounded up)
        logits, routings = model(x, step=s, total_steps=N)
        loss = F.cross_entropy(logits, y) + sum(v for r in routings for v in r.aux_losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(F.cross_entropy(logits, y).item())
        assert {r.stats["stage"] for r in routings} == {1.0 if s < 2 else 2.0}
    assert losses[-1] < losses[0]  # one fixed batch: it must fit
    router = model.moe_layers()[0].router
    names = {n for n, _ in router.named_parameters()}
    if router.distill_input == "token":
        assert names == {"centroids", "distill_centroids", "distill_patch_embedding.weight",
                         "distill_patch_embedding.bias"}
    else:
        assert names == {"centroids", "distill_centroids", "distill_embedding.weight"}


def _stage2(router: str):
    model = _vit(router)
    model.on_step(5, 10)
    model.eval()
    return model


def _assignments(model, images) -> list[torch.Tensor]:
    """[layers][B, N] the expert of every token."""
    with torch.no_grad():
        _, routings = model(images)
    return [r.indices[:, 0].reshape(images.shape[0], -1) for r in routings]


def _permute_patches(images: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Move patch perm[k] of each 32x32 image (8x8 grid of 4x4 patches, row-major) to slot k."""
    B, C = images.shape[:2]
    grid = images.reshape(B, C, 8, 4, 8, 4).permute(0, 2, 4, 1, 3, 5).reshape(B, 64, C, 4, 4)
    grid = grid[:, perm]
    return grid.reshape(B, 8, 8, C, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(B, C, 32, 32)


def test_stage2_patch_reading_routes_on_the_pixels_wherever_the_patch_is():
    model = _stage2("stablemoe")
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 32, 32, generator=g)
    perm = torch.randperm(64, generator=g)
    b = _permute_patches(a, perm)
    tokens = torch.cat([torch.zeros(1, dtype=torch.long), perm + 1])  # class token stays first
    for ea, eb in zip(_assignments(model, a), _assignments(model, b)):
        assert len(ea.unique()) > 1  # the check below would be vacuous with one expert
        assert torch.equal(eb, ea[:, tokens])  # the same pixels get the same expert: assignments permute
    # and a different image at the same positions is routed differently
    c = torch.randn(2, 3, 32, 32, generator=g)
    assert not torch.equal(_assignments(model, c)[0], _assignments(model, a)[0])


def test_stage2_position_reading_routes_on_the_position_only():
    model = _stage2("stablemoe@position")
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 32, 32, generator=g)
    b = _permute_patches(a, torch.randperm(64, generator=g))
    c = torch.randn(2, 3, 32, 32, generator=g)
    for ea, eb, ec in zip(_assignments(model, a), _assignments(model, b), _assignments(model, c)):
        assert len(ea.unique()) > 1
        assert torch.equal(eb, ea) and torch.equal(ec, ea)  # whatever the pixels: a fixed map position -> expert
        assert torch.equal(ea[0], ea[1])                    # the same for every image of the batch


def test_stage2_freezes_the_distilled_patch_embedding_under_adamw_weight_decay():
    torch.manual_seed(0)
    layer = build_ffn("stablemoe", d_model=8, d_ff=16, num_experts=4, top_k=1, router_kwargs={"patch_dim": 12})
    router: StableMoERouter = layer.router
    assert router.reads_patches and not hasattr(router, "distill_embedding")
    emb = router.distill_patch_embedding
    assert router.distilled_parameters() == [emb.weight, emb.bias, router.distill_centroids]
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    patches = torch.randn(32, 12)
    N = 20

    def step(s: int) -> torch.Tensor:
        router.on_step(s, N)
        y, routing = layer(torch.randn(32, 8), training=True, step=s, total_steps=N, patches=patches)
        loss = y.pow(2).mean() + sum(routing.aux_losses.values())
        opt.zero_grad(set_to_none=False)  # the harsher variant: a zeroed grad would still be decayed
        loss.backward()
        opt.step()
        return routing.indices.clone()

    step(0)  # stage 1: the patch embedding learns from the distillation loss
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    idx_a = step(2)  # stage 2
    assert all(not p.requires_grad and p.grad is None for p in router.distilled_parameters())
    frozen = [p.detach().clone() for p in router.distilled_parameters()]
    idx_b, idx_c = step(3), step(4)
    for before, p in zip(frozen, router.distilled_parameters()):
        torch.testing.assert_close(p, before, rtol=0, atol=0)
    assert torch.equal(idx_a, idx_b) and torch.equal(idx_b, idx_c)  # routing depends on the pixels only


def test_vit_stage2_patch_embedding_gets_no_grad_and_no_update():
    model = _vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for s in (0, 5, 6):  # stage 1, then stage 2 (10% of 10)
        model.on_step(s, 10)
        if s == 5:
            frozen = [[p.detach().clone() for p in m.router.distilled_parameters()] for m in model.moe_layers()]
            cents = [m.router.centroids.detach().clone() for m in model.moe_layers()]
        logits, routings = model(x, step=s, total_steps=10)
        loss = F.cross_entropy(logits, y) + sum(v for r in routings for v in r.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        if s >= 5:
            assert all(p.grad is None for m in model.moe_layers() for p in m.router.distilled_parameters())
        opt.step()
    for m, before, cent in zip(model.moe_layers(), frozen, cents):
        for p, b in zip(m.router.distilled_parameters(), before):
            assert torch.equal(p, b)
        assert not torch.equal(m.router.centroids, cent)  # the sigmoid gate keeps training


# -- registry, LM, errors ---------------------------------------------------------------------------------


def test_position_variant_resolves_through_the_registry():
    assert "stablemoe@position" in variant_names("stablemoe")
    cls = get_router("stablemoe@position")
    assert cls.router_name == "stablemoe@position" and issubclass(cls, StableMoERouter)
    assert variant_args("stablemoe@position") == {"distill_input": "position"}
    assert router_defaults("stablemoe@position")["distill_input"] == "position"
    assert router_defaults("stablemoe")["distill_input"] == "token" and router_defaults("stablemoe")["patch_dim"] == 0
    r = create_router("stablemoe@position", 8, 4, 1, patch_dim=48)  # patch_dim is ignored by the position reading
    assert r.distill_input == "position" and not r.reads_patches and hasattr(r, "distill_embedding")


def test_lm_router_is_unchanged():
    torch.manual_seed(0)
    m = MoEDecoderLM("stablemoe", d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4, top_k=1, context=8)
    router = m.moe_layers()[0].router
    assert list(router.state_dict()) == ["centroids", "distill_centroids", "stage", "distill_embedding.weight"]
    assert router.distill_input == "token" and router.patch_dim == 0 and not router.reads_patches
    assert tuple(router.distill_embedding.weight.shape) == (256, 50)
    assert router.distilled_parameters() == [router.distill_embedding.weight, router.distill_centroids]
    # the LM routes on token ids; ctx.patches stays None there
    seen = _spy_contexts(m)
    m(torch.randint(0, 256, (2, 8)))
    assert seen[0].patches is None and seen[0].token_ids is not None


def test_bad_inputs_are_one_line_value_errors_naming_the_fix():
    x = torch.randn(3, 4)
    patch = StableMoERouter(4, 2, 1, patch_dim=12)
    with pytest.raises(ValueError, match=r"\(ctx\.patches\), which this context lacks: call the ViT itself"):
        patch(x, RouteContext(positions=torch.arange(3)))
    with pytest.raises(ValueError, match=r"expected \[T, patch_dim=12\]; set patch_dim to in_chans \* patch_size\*\*2"):
        patch(x, RouteContext(patches=torch.zeros(3, 48)))
    with pytest.raises(ValueError, match="got 2 patch rows for 3 tokens"):
        patch(x, RouteContext(patches=torch.zeros(2, 12)))
    pos = StableMoERouter(4, 2, 1, vocab_size=3, distill_input="position")
    with pytest.raises(ValueError, match=r"position id out of range \[0, vocab_size=3\); set the vocab_size"):
        pos(x, RouteContext(positions=torch.tensor([0, 1, 3])))
    with pytest.raises(ValueError, match="needs ctx.positions"):
        pos(x, RouteContext(token_ids=torch.arange(3)))
    with pytest.raises(ValueError, match="needs ctx.token_ids.*set patch_dim.*stablemoe@position"):
        StableMoERouter(4, 2, 1)(x, RouteContext(positions=torch.arange(3)))
    with pytest.raises(ValueError, match="distill_input='pixels' must be one of 'token', 'position'"):
        StableMoERouter(4, 2, 1, distill_input="pixels")
    with pytest.raises(ValueError, match="patch_dim"):
        StableMoERouter(4, 2, 1, patch_dim=-1)


def test_vit_geometry_the_patches_support_and_the_ones_they_refuse():
    images = torch.randn(2, 3, 32, 32)
    # outside the model's forward there is no scope and no pixels
    with pytest.raises(ValueError, match=r"call the ViT itself \(model\(images\)\), not forward_features"):
        _vit().forward_features(images)
    # patch dropout drops and reorders patch tokens: no pixels for them
    drop = _vit(patch_drop_rate=0.5)
    with pytest.raises(ValueError, match=r"every patch must stay a token, in order \(set patch_drop_rate=0\)"):
        drop(images)
    # timm's dynamic image size keeps every patch a token, in order: the patch reading works at any size ...
    dyn = _vit(dynamic_img_size=True)
    assert dyn(torch.randn(2, 3, 48, 48))[0].shape == (2, 10)
    padded = _vit(dynamic_img_size=True, dynamic_img_pad=True)
    seen = _spy_contexts(padded)
    padded(torch.randn(2, 3, 30, 30))  # padded to 32 x 32 like timm's PatchEmbed: 64 patches
    assert seen[0].patches.shape == (2 * 65, 48) and seen[0].patches.reshape(2, 65, 3, 4, 4)[:, -1, :, 2:].eq(0).all()
    # ... while the position reading has one embedding per position of the training size
    with pytest.raises(ValueError, match="vocab_size=65"):
        _vit("stablemoe@position", dynamic_img_size=True)(torch.randn(2, 3, 48, 48))
