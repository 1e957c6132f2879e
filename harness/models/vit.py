"""timm's VisionTransformer whose MLPs are harness FFNs: MoE layers of any registered router, or dense.

The one door in is timm's ``create_model``::

    import harness.models.vit  # registers the models with timm
    model = timm.create_model("vit_moe_tiny_patch4_32", router="moge", num_experts=16)
    logits, routings = model(images, step=s, total_steps=n)

How the harness plugs into timm (1.0.x): ``VisionTransformer`` takes an
``mlp_layer`` class and builds one per block as ``mlp_layer(in_features=...,
hidden_features=int(dim * mlp_ratio), act_layer=..., drop=..., ...)``. We pass a
factory that returns a :class:`HarnessMlp`: a thin adapter that wraps
``harness.layers.moe.build_ffn`` (the same ``MoELayer`` / ``DenseFFN`` the LM uses, so
every router runs on the same expert kernels in both suites) and hands it a
:class:`~harness.routing.router.RouteContext`. Everything else -- patch embedding, class
token, attention, LayerScale, drop-path, the head -- is timm's unchanged.

Per-forward routing context. ``forward(x, step, total_steps)`` opens a *routing
scope* shared by all blocks: one ``shared`` dict per forward pass (CompeteSMoE's
"at most n competing layers per step"), the step numbers, the input images, the
token positions, and a list that collects each MoE layer's :class:`~harness.routing.router.Routing`;
the forward returns ``(logits, routings)`` like ``MoEDecoderLM``. Called through
timm's own entry points outside that scope (``forward_features``,
``forward_intermediates``), layers still route -- with step 0, a fresh ``shared``
dict each, nothing collected and no ``ctx.patches`` (a router that reads them, as the
default StableMoE does, raises a ValueError saying to call the model itself).

What a router sees of each token. An image has no vocabulary: ``token_ids`` stays
None. ``ctx.positions`` ([B*N] long, matching the layer's flattening of ``[B, N, d]``)
is each token's *position in the sequence*: 0 for the class token (and 1..r for
register tokens), then the patches in row-major order; a router with a
``vocab_size`` hyper-parameter gets ``vocab_size = N`` unless the spec sets it.

``ctx.patches`` ([B*N, C*p*p]) is each token's *content*, the pixels its patch
embedding saw: ``F.unfold(images, p, stride=p)`` -- within a patch channel, then
row, then column (the order of the conv weight, so ``patches @ proj.weight.flatten(1).T
+ proj.bias`` is timm's patch embedding), patches in the row-major order of the conv
output's flatten -- with zero rows for the class and register tokens. Routers that
read it (StableMoE's distilled router: the token of an image is its patch) declare a
``patch_dim`` hyper-parameter; the model sets ``patch_dim = in_chans * p * p`` unless
the spec sets it. Only their layers get ``ctx.patches`` (a router that declares
``patch_dim`` without reading the pixels sets ``reads_patches = False``; see
:class:`HarnessMlp`); the others get None, so they cost no unfold. The scope unfolds
once per forward, at the first layer that asks, from that forward's images; outside
the scope (``forward_features`` called directly) ``patches`` is None. timm's dynamic
image size (``dynamic_img_size``, with or without ``dynamic_img_pad``) keeps every
patch a token, in order, and works; patch dropout (``patch_drop_rate > 0``) does not,
and is a ValueError for a layer that reads patches.

Which blocks route: ``moe_every`` and ``moe_last`` as in the LM
(:meth:`harness.layers.config.MoEConfig.is_moe_block`) -- block i (0-based, of ``depth``) is MoE when
``(depth - 1 - i) % moe_every == 0``, so the last block always routes, and, with ``moe_last`` > 0,
when it is one of the last ``moe_last`` blocks (MoGE's ViT-MoGE-S/16: ``moe_last=2`` of 8);
the others get the equal-active-FLOP dense FFN (width ``d_ff * top_k``).

Expert width: ``d_ff`` is the width of ONE expert; when not given it is timm's
MLP width ``int(embed_dim * mlp_ratio)`` (V-MoE's convention: an expert is a
full ViT MLP).

Initialisation: timm's ``init_weights`` re-initialises every ``nn.Linear`` of
the model (truncated normal, std 0.02). The harness FFNs -- experts, routers,
dense baseline -- keep the initialisation they are constructed with, the same
as in every other suite, so a router's init is its author's and the dense
baseline is initialised like the experts; see :meth:`MoEVisionTransformer.init_weights`.

Routers restricted to some top-k (StableMoE is top-1 only): the model uses the
nearest supported k (:func:`effective_top_k`) and records it as ``model.top_k``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..layers.build import build_ffn
from ..layers.config import MOE_CONFIG_KEYS, MoEConfig
from ..layers.moe_layer import MoELayer
from ..layers.streams import base_seed
from ..routing.registry import get_router
from ..routing.router import RouteContext, Router, Routing
from .base import routing_layers, step_routers

__all__ = ["MoEVisionTransformer", "HarnessMlp", "effective_top_k", "vit_moe_tiny_patch4_32",
           "vit_moe_small_patch16_224", "VIT_MODELS"]


def effective_top_k(router_cls: type[Router], top_k: int) -> int:
    """The k this router runs at (``Router.effective_top_k``; also the rule of ``RunSpec.model``)."""
    return router_cls.effective_top_k(top_k)


class _RoutingScope:
    """State of one ``MoEVisionTransformer.forward``, read by every :class:`HarnessMlp`.

    The patch geometry (``patch_size``, ``num_prefix_tokens``, ``dynamic_img_pad``) is set by the
    model once timm has built its patch embedding.
    """

    def __init__(self) -> None:
        self.active = False
        self.step, self.total_steps = 0, 1
        self.shared: dict[str, Any] = {}
        self.routings: list[Routing] = []
        self.images: Tensor | None = None
        self.patch_size: tuple[int, int] = (1, 1)
        self.num_prefix_tokens = 0
        self.dynamic_img_pad = False
        self._positions: tuple[tuple, Tensor] | None = None
        self._patches: tuple[tuple, Tensor] | None = None

    def begin(self, step: int, total_steps: int, images: Tensor | None = None) -> None:
        self.active = True
        self.step, self.total_steps = step, total_steps
        self.shared, self.routings, self._positions, self._patches = {}, [], None, None
        self.images = images

    def end(self) -> list[Routing]:
        routings = self.routings
        self.active, self.shared, self.routings, self._positions, self._patches = False, {}, [], None, None
        self.images = None  # the scope must not keep a batch alive (nor hand it to a later forward)
        return routings

    def positions(self, x: Tensor) -> Tensor:
        """[B*N] position of each token of ``x`` ([B, N, d]) in its sequence, row-major like the layer's flatten."""
        B, N = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
        key = (B, N, x.device)
        if self._positions is None or self._positions[0] != key:
            self._positions = (key, torch.arange(N, device=x.device).repeat(B))
        return self._positions[1]

    def patches(self, x: Tensor) -> Tensor | None:
        """[B*N, C*ph*pw] pixels of each token's patch (zeros for prefix tokens); None outside a forward's scope.

        Computed once per forward from that forward's images (the first layer that asks pays for the unfold).
        Detached: like a token id, the raw input carries no gradient back from the router.
        """
        if not self.active or self.images is None:
            return None
        B, N = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
        key = (B, N, x.device)
        if self._patches is None or self._patches[0] != key:
            self._patches = (key, self._unfold(B, N, x.device))
        return self._patches[1]

    def _unfold(self, B: int, N: int, device: torch.device) -> Tensor:
        images = self.images.detach()
        ph, pw = self.patch_size
        if self.dynamic_img_pad:  # timm's PatchEmbed pads right and bottom with zeros to whole patches
            H, W = images.shape[-2:]
            images = F.pad(images, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        cols = F.unfold(images, kernel_size=(ph, pw), stride=(ph, pw)).transpose(1, 2)  # [B, L, C*ph*pw]
        P, L = self.num_prefix_tokens, cols.shape[1]
        if cols.shape[0] != B or P + L != N:
            raise ValueError(
                f"ViT routing on patch pixels: the layer has {B} x {N} tokens but the images give {cols.shape[0]} x "
                f"({P} prefix + {L} patches); every patch must stay a token, in order (set patch_drop_rate=0)")
        out = torch.cat([cols.new_zeros(B, P, cols.shape[2]), cols], dim=1)
        return out.reshape(B * N, -1).to(device)


class HarnessMlp(nn.Module):
    """timm ``mlp_layer`` adapter: ``y = drop(ffn(x, ctx)[0])``; the routing goes to the scope.

    ``reads_patches``: the layer's router routes on patch pixels -- it declares a ``patch_dim``
    hyper-parameter and does not set its own ``reads_patches`` attribute to False (StableMoE's
    position reading does) -- so the layer asks the scope for ``ctx.patches``; other layers pass
    None and cost no unfold.
    """

    def __init__(self, ffn: nn.Module, layer_index: int, scope: _RoutingScope, drop: float = 0.0,
                 reads_patches: bool = False) -> None:
        super().__init__()
        self.ffn = ffn
        self.layer_index = layer_index
        self.reads_patches = reads_patches
        self.drop = nn.Dropout(drop)
        object.__setattr__(self, "_scope", scope)  # plain reference: not a submodule, not in the state dict

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x: Tensor) -> Tensor:
        scope = self._scope
        ctx = RouteContext(training=self.training, step=scope.step if scope.active else 0,
                           total_steps=scope.total_steps if scope.active else 1, positions=scope.positions(x),
                           patches=scope.patches(x) if self.reads_patches else None,
                           layer_index=self.layer_index, shared=scope.shared if scope.active else {})
        y, routing = self.ffn(x, ctx)
        if routing is not None and scope.active:
            scope.routings.append(routing)
        return self.drop(y)


class MoEVisionTransformer(VisionTransformer):
    """timm ViT with harness FFNs. ``logits, routings = model(x, step=s, total_steps=n)``.

    Harness arguments (the rest go to timm's ``VisionTransformer``):
      moe:             the :class:`~harness.layers.config.MoEConfig` of its FFNs (``build_vit`` passes the run's),
                       or, without it, the keyword form:
      router:          registered router name (``dense`` for the dense baseline), and the config's other fields
                       as keywords: num_experts, top_k, d_ff (width of one expert; default timm's
                       ``embed_dim * mlp_ratio``), moe_every, moe_last, capacity_factor, activation, router_kwargs,
                       shared_experts, experts_impl, zero_experts, copy_experts, constant_experts, balance_scope,
                       balance_window (``harness.layers.config``).
    """

    def __init__(self, router: str = "smoe", moe: MoEConfig | None = None, depth: int = 12, **kwargs: Any) -> None:
        ffn_keys = MOE_CONFIG_KEYS & set(kwargs)
        if moe is not None and (ffn_keys or router != "smoe"):
            raise TypeError(f"MoEVisionTransformer(moe=config): {', '.join(sorted(ffn_keys)) or 'router'} belong "
                            f"in the MoEConfig")
        config = moe if moe is not None else MoEConfig(router=router, **{k: kwargs.pop(k) for k in ffn_keys})
        vit_kwargs = {k: v for k, v in kwargs.items() if k not in MOE_CONFIG_KEYS}
        for key in ("mlp_layer", "block_fn"):
            if key in vit_kwargs:
                raise TypeError(f"MoEVisionTransformer sets {key} itself (harness FFNs); do not pass it")
        if vit_kwargs.get("fix_init"):
            raise ValueError("fix_init rescales mlp.fc2, which harness FFNs do not have")
        router_cls = get_router(config.router)
        config = config.replace(top_k=effective_top_k(router_cls, config.top_k))
        scope = _RoutingScope()
        built: list[HarnessMlp] = []
        seed = base_seed()  # every FFN (and its router) draws from its own stream: harness.layers.streams

        def mlp_layer(in_features: int, hidden_features: int | None = None, drop: float = 0.0, **_: Any) -> HarnessMlp:
            # called by timm once per block, in block order, after the patch embedding exists
            i = len(built)
            block = config.for_block(i, depth)
            width = config.d_ff or hidden_features or 4 * in_features
            ffn = build_ffn(self._with_table_sizes(block, router_cls, vit_kwargs), in_features, width,
                            init_stream=(seed, f"blocks.{i}.mlp"))
            # a router declaring patch_dim reads ctx.patches unless it says otherwise (StableMoE's position reading)
            is_moe = block is config
            hparams = router_cls.hparam_names()
            reads = is_moe and bool(getattr(getattr(ffn, "router", None), "reads_patches", "patch_dim" in hparams))
            built.append(HarnessMlp(ffn, i, scope, drop, reads_patches=reads))
            return built[-1]

        super().__init__(depth=depth, mlp_layer=mlp_layer, **vit_kwargs)
        scope.patch_size = tuple(self.patch_embed.patch_size)
        scope.num_prefix_tokens = self.num_prefix_tokens
        scope.dynamic_img_pad = bool(getattr(self.patch_embed, "dynamic_img_pad", False))
        self._scope = scope
        self.moe_config = config
        self.router_name = config.router
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.moe_every, self.moe_last = config.moe_every, config.moe_last

    def _with_table_sizes(self, block: MoEConfig, router_cls: type[Router], vit_kwargs: dict[str, Any]) -> MoEConfig:
        """A routing block's config with the router's ``vocab_size`` (the sequence length) and ``patch_dim``
        (pixels per patch) filled in from the patch embedding, unless the spec sets them."""
        if block.is_dense:
            return block
        kwargs = dict(block.router_kwargs)
        hparams = router_cls.hparam_names()
        if "vocab_size" in hparams and "vocab_size" not in kwargs:
            kwargs["vocab_size"] = self.patch_embed.num_patches + self.num_prefix_tokens
        if "patch_dim" in hparams and "patch_dim" not in kwargs:
            ph, pw = self.patch_embed.patch_size
            kwargs["patch_dim"] = vit_kwargs.get("in_chans", 3) * ph * pw  # timm's in_chans default: 3
        return block.replace(router_kwargs=kwargs)

    # -- harness interface (the MoEModel protocol, as MoEDecoderLM) ------------------------------
    def harness_mlps(self) -> list[HarnessMlp]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, HarnessMlp)]

    def moe_layers(self) -> list[MoELayer]:
        """FFNs that route, in block order (dense baseline blocks excluded)."""
        return routing_layers(m.ffn for m in self.harness_mlps())

    def on_step(self, step: int, total_steps: int) -> None:
        step_routers(self, step, total_steps)

    def forward(self, x: Tensor, step: int = 0, total_steps: int = 1, **kwargs: Any) -> tuple[Tensor, list[Routing]]:
        self._scope.begin(step, total_steps, x)  # the images: ctx.patches is unfolded from them
        try:
            logits = super().forward(x, **kwargs)
        finally:
            routings = self._scope.end()
        return logits, routings

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's init for everything except the harness FFNs, which keep their own (see module doc).

        The FFNs are taken out of the module tree while timm draws: re-initialising them and restoring them
        afterwards would still consume the main stream for every ``nn.Linear`` a router has, and move every
        weight drawn after it with the router (harness.layers.streams)."""
        blocks = [b for b in getattr(self, "blocks", []) if isinstance(getattr(b, "mlp", None), HarnessMlp)]
        mlps = [b.mlp for b in blocks]
        for b in blocks:
            b.mlp = nn.Identity()
        try:
            super().init_weights(mode, needs_reset)
        finally:
            for b, m in zip(blocks, mlps):
                b.mlp = m


# -- timm registration ------------------------------------------------------------------------

def _cfg(**kwargs: Any) -> dict[str, Any]:
    # no url / hf_hub_id: these models have no pretrained weights and nothing is ever downloaded
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj", "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "vit_moe_tiny_patch4_32": _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0),
    "vit_moe_small_patch16_224": _cfg(),
})


def _create(variant: str, pretrained: bool, defaults: dict[str, Any], **kwargs: Any) -> MoEVisionTransformer:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights: moe-harness trains from scratch and never downloads")
    return build_model_with_cfg(MoEVisionTransformer, variant, pretrained=False, **{**defaults, **kwargs})


@register_model
def vit_moe_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """CPU-sized ViT for 32x32 images: embed 64, depth 4, 4 heads, patch 4 (64 patches + class token)."""
    defaults = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0, num_classes=10)
    return _create("vit_moe_tiny_patch4_32", pretrained, defaults, **kwargs)


@register_model
def vit_moe_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """ViT-S/16 (embed 384, depth 12, 6 heads, MLP ratio 4) at 224px, drop-path 0.1 as in DeiT-S."""
    defaults = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                    num_classes=1000, drop_path_rate=0.1)
    return _create("vit_moe_small_patch16_224", pretrained, defaults, **kwargs)


VIT_MODELS = ("vit_moe_tiny_patch4_32", "vit_moe_small_patch16_224")
