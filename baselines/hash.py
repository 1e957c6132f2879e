"""Hash layers: a fixed, balanced hash of the token id decides the expert (Roller et al. 2021, arXiv 2106.04426).

Equations (Sec. 3 of the paper, as we read it; the search corpus held no copy of the
paper's body nor of its ParlAI code, so nothing here is verified against them):

* Routing: h_t = sum_{i in H(x_t)} FFN_i(h_t) — the expert is a fixed function H of the
  *token id* x_t, not of the hidden state; no learned gate, no gate value (weight 1.0).
* The paper's hash functions: "Random Hash" (a fixed random map of the vocabulary to
  the experts, built once) and "Balanced assignment" (bucketing tokens so that every
  expert gets about the same share of the training tokens, by frequency), among
  others (bigram, clustered, dispersed, oracle). Ours is a *balanced random hash*:
  a fixed random permutation p of the vocabulary (seeded by ``hash_seed``, built at
  init, stored as a buffer), expert(v) = p(v) mod E — every expert receives
  floor(V/E) or ceil(V/E) vocabulary entries (balanced over the vocabulary, not over
  token frequencies: the frequency-balanced variant needs corpus counts the router
  does not have).
* k > 1: the paper's *MultiHash* layer splits the FFN into N segments, each chosen by
  its own hash, and concatenates them. A sum of k experts of width d_ff with weight 1
  is exactly a (d_ff * k)-wide FFN whose hidden-unit segments are chosen by k hashes,
  so ``weight="one"`` (default) with k hashes is that layer at the dense baseline's
  active width. Each further hash uses its own permutation (seed ``hash_seed + j``);
  a token whose j-th hash collides with an earlier choice takes the next free expert
  (e + 1 mod E, ...), so its k experts are distinct. ``weight="mean"`` uses 1/k.
* Vision (no token ids): ``ctx.positions`` (the patch index) is hashed instead, so
  ``vocab_size`` must cover the number of patches (as ``stablemoe`` does); an id
  outside [0, vocab_size) is a one-line error naming the hyper-parameter.
* ``Routing.logits``: one-hot scores (1 for the chosen experts, 0 elsewhere, fp32), so
  ``indices`` are their top-k and diagnostics work. No aux losses.
"""
from __future__ import annotations

import torch
from torch import Tensor

from harness.routing.registry import register_router
from harness.routing.router import RouteContext, Router, Routing, check_choice, check_range

_NAME = "hash"


def balanced_hash_table(vocab_size: int, num_experts: int, top_k: int, seed: int) -> Tensor:
    """[V, k] long: the k distinct experts of every token id (see the module docstring)."""
    table = torch.empty(vocab_size, top_k, dtype=torch.long)
    for j in range(top_k):
        g = torch.Generator().manual_seed(seed + j)
        perm = torch.randperm(vocab_size, generator=g)
        e = perm % num_experts  # expert of token v: p_j(v) mod E  (balanced: V/E ids per expert)
        for _ in range(num_experts):  # linear probing: distinct experts per token (k <= E: a free one exists)
            clash = torch.zeros(vocab_size, dtype=torch.bool)
            for q in range(j):
                clash |= table[:, q] == e
            if not clash.any():
                break
            e = torch.where(clash, (e + 1) % num_experts, e)
        table[:, j] = e
    return table


@register_router(_NAME)
class HashRouter(Router):
    """Fixed balanced random hash of the token id (patch position for vision); no gate, weight 1."""

    description = "Hash layers (Roller et al. 2021): fixed balanced random hash of the token id, no gate, weight 1"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        vocab_size: int = 256,
        hash_seed: int = 0,
        weight: str = "one",
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        check_range(_NAME, "vocab_size", vocab_size, 1, integer=True)
        check_range(_NAME, "hash_seed", hash_seed, 0, integer=True)
        check_choice(_NAME, "weight", weight, ("one", "mean"))
        self.vocab_size = vocab_size
        self.hash_seed = hash_seed
        self.weight = weight
        # fixed at init, independent of the model seed; a buffer so it travels with checkpoints
        self.register_buffer("table", balanced_hash_table(vocab_size, num_experts, top_k, hash_seed))

    def _ids(self, ctx: RouteContext, num_tokens: int) -> Tensor:
        ids = ctx.token_ids if ctx.token_ids is not None else ctx.positions
        if ids is None:
            raise ValueError(f"router {_NAME!r} needs token ids (or patch positions for vision) in the RouteContext")
        ids = ids.reshape(-1).long()
        if ids.numel() != num_tokens:
            raise ValueError(f"router {_NAME!r}: got {ids.numel()} token ids for {num_tokens} tokens")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"router {_NAME!r}: token id out of range [0, vocab_size={self.vocab_size}); set the "
                             f"vocab_size hyper-parameter to the tokenizer's (or the number of patches for vision)")
        return ids

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        T = x.shape[0]
        ids = self._ids(ctx, T).to(self.table.device)
        idx = self.table.index_select(0, ids)  # [T, k]
        w = torch.full((T, self.top_k), 1.0 if self.weight == "one" else 1.0 / self.top_k,
                       device=x.device, dtype=torch.float32)
        logits = torch.zeros(T, self.num_experts, device=x.device, dtype=torch.float32).scatter_(1, idx, 1.0)
        return Routing(indices=idx, weights=w, logits=logits)
