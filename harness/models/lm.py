"""A small decoder-only transformer (bytes or subword tokens: ``vocab_size``) whose FFNs are MoE layers of any registered router.

Pre-LN blocks, causal attention through ``scaled_dot_product_attention``,
learned positions, tied input/output embeddings (nanoGPT's shape). Every
``moe_every``-th block (counting from the last one) uses the router; the others use
the dense equal-FLOP FFN, so "MoE in every other block" matches the CompeteSMoE
large setting; ``moe_last`` keeps MoE to the last blocks only (``harness.layers.config.MoEConfig.is_moe_block``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.build import build_ffn
from ..layers.config import MoEConfig
from ..layers.moe_layer import MoELayer
from ..layers.streams import base_seed
from ..routing.registry import get_router
from ..routing.router import RouteContext, Routing
from .base import routing_layers, step_routers


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, ctx: RouteContext) -> tuple[Tensor, Routing | None]:
        x = x + self.drop(self.attn(self.ln1(x)))
        y, routing = self.ffn(self.ln2(x), ctx)
        return x + self.drop(y), routing


class MoEDecoderLM(nn.Module):
    """``logits, routings = model(idx, step=s, total_steps=n)``; routings has one entry per MoE block.

    ``MoEDecoderLM(moe, vocab_size=..., d_model=..., n_layers=..., n_heads=..., context=..., dropout=...)``
    with ``moe`` the :class:`~harness.layers.config.MoEConfig` of its FFNs (``build_lm`` builds it from the
    spec), or the keyword form ``MoEDecoderLM("smoe", d_ff=128, num_experts=8, top_k=2, ...)`` whose FFN
    keywords (``build_ffn``'s: d_ff, num_experts, top_k, moe_every, moe_last, capacity_factor, activation,
    router_kwargs, shared_experts, experts_impl, zero/copy/constant_experts) make that config.
    """

    def __init__(self, moe: str | MoEConfig, vocab_size: int = 256, d_model: int = 64, n_layers: int = 2,
                 n_heads: int = 4, context: int = 128, dropout: float = 0.0, **ffn: Any) -> None:
        super().__init__()
        if isinstance(moe, MoEConfig):
            if ffn:
                raise TypeError(f"MoEDecoderLM(config, ...): {', '.join(sorted(ffn))} belong in the MoEConfig")
            config = moe
        else:
            config = MoEConfig(router=moe, **{"d_ff": 128, **ffn})
        # a router that reads token ids through a table (hash's map, StableMoE's distilled embedding) declares a
        # vocab_size hyper-parameter: it gets the model's vocabulary unless the spec sets it (the default 256 is
        # the byte tokenizer's, so byte models build exactly as before)
        if "vocab_size" in get_router(config.router).hparam_names() and "vocab_size" not in config.router_kwargs:
            config = config.replace(router_kwargs={**config.router_kwargs, "vocab_size": vocab_size})
        self.moe_config = config
        seed = base_seed()  # every FFN (and its router) draws from its own stream: harness.layers.streams
        self.context = context
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        blocks = []
        for i in range(n_layers):
            ffn_module = build_ffn(config.for_block(i, n_layers), d_model, init_stream=(seed, f"blocks.{i}.ffn"))
            blocks.append(Block(d_model, n_heads, ffn_module, dropout))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied embeddings
        # nanoGPT's N(0, 0.02) for the model's own embeddings only: a router's parameters keep the
        # init its author gave them (StableMoE's distilled word embedding is N(0, 1)); the
        # conformance checks fail a model that re-initialises router parameters.
        for emb in (self.tok_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)

    # -- the MoEModel protocol (harness.models.base) -------------------------------------------------
    def moe_layers(self) -> list[MoELayer]:
        """FFNs that route, in block order (dense baseline blocks excluded)."""
        return routing_layers(b.ffn for b in self.blocks)

    def forward(self, idx: Tensor, step: int = 0, total_steps: int = 1) -> tuple[Tensor, list[Routing]]:
        B, L = idx.shape
        if L > self.context:
            raise ValueError(f"sequence length {L} exceeds the model context {self.context}")
        emb = self.tok_emb(idx)
        x = self.drop(emb + self.pos_emb(torch.arange(L, device=idx.device)))
        shared: dict[str, Any] = {}
        token_ids = idx.reshape(-1)
        positions = torch.arange(L, device=idx.device).repeat(B)  # [B*L] position in its sequence (0 starts one)
        flat_emb = emb.reshape(-1, emb.shape[-1])
        routings: list[Routing] = []
        for i, block in enumerate(self.blocks):
            # causal: a decoder LM; routers that pool over the batch (expert choice) must not let a token's
            # routing depend on later tokens of its sequence
            ctx = RouteContext(training=self.training, step=step, total_steps=total_steps, token_ids=token_ids,
                               embeddings=flat_emb, positions=positions, layer_index=i, shared=shared, causal=True)
            x, routing = block(x, ctx)
            if routing is not None:
                routings.append(routing)
        return self.head(self.ln_f(x)), routings

    def on_step(self, step: int, total_steps: int) -> None:
        step_routers(self, step, total_steps)
