"""Expert choice: each expert takes its top-C tokens (Zhou et al. 2022, arXiv 2202.09368, "EC").

Equations (Sec. 3.2 of the paper; we had the equations from a summary of the paper, not its full
text, so the numbers are as read there):

* Token-to-expert affinity (eq. 1): S = Softmax(X · W_g), X in R^{n x d}, W_g in R^{d x e}; the
  softmax is over the e experts of each token. Here in fp32 from fp32 weights with autocast off
  (``fp32_linear``), as flaxformer computes router probabilities ("For remainder of routing
  computation we use float32").
* Selection (eq. 2): G, I = TopK(S^T, C), P = one-hot(I): expert i takes the C tokens with the
  highest affinity to it (I[i, j]: its j-th token, G[i, j]: that affinity).
* Capacity: C = n · c / e with n the tokens of the batch and c the capacity factor; the paper trains
  mostly with c = 2 ("EC-CF2"), which matches the compute of top-2 token choice: e · C = c · n
  slots, i.e. c experts per token on average. Hyper-parameter ``ec_capacity_factor`` (the name
  ``capacity_factor`` is the layer's token-choice drop capacity); ``None`` (default) = the suite's
  ``top_k``, so the run has the same active FLOPs as every other router at that k (top_k = 2: the
  paper's EC-CF2). C = round(c · n / e) (Python ``round``, as flaxformer's ``MoeLayer``:
  ``int(round(capacity_factor * tokens_per_group / num_experts))``), at least 1 and at most n.
* Combine (eqs. 3-5): X_out[t] = sum_{i, j: I[i, j] = t} G[i, j] · FFN_i(X[t]); a token takes 0..e
  experts, and a token no expert took gets 0 (the residual carries it). No balance loss: every
  expert gets exactly C tokens (flaxformer: "we don't need an auxiliary loading balancing loss for
  expert choice routing", ``auxiliary_loss = 0.0``).

Reference code followed: google/flaxformer ``flaxformer/architectures/moe/routing.py``
``ExpertsChooseMaskedRouter._compute_routing_instructions`` (``router_probs`` transposed per group,
``_top_k(router_probs_t, k=expert_capacity)``, combine array = the selected probabilities, no
auxiliary loss) with ``Router._compute_router_probabilities`` (``softmax(router_logits)`` in fp32) and
``RouterWeights`` (kernel init N(0, 0.02), bias on, zero-initialised); and
``flaxformer/architectures/moe/moe_layers.py`` ``MoeLayer.__call__`` for the capacity. Not copied from
it: groups (we select over the whole batch, the paper's n), flaxformer's ``min_expert_capacity = 4``
(ours 1: tiny batches), its optional multiplicative jitter noise, and its router z-loss, which
flaxformer computes for every router (``z_loss_weight``, default 0: the paper uses no auxiliary loss).

Causality (the ``selection`` hyper-parameter). Top-C over all n tokens of a batch makes a token's
routing depend on every other token of the batch, later ones included. In a decoder LM that leaks the
future: whether expert i takes token t depends on the affinities of tokens after t (flaxformer's
docstring: "experts choose routing should not be used in decoder blocks because it breaks the
autoregressive behavior -- the model will learn to cheat by using future token information"). So:

* ``"batch"``: the paper's rule, top-C over the whole batch (the default outside a causal model: the
  vision suite; images in a batch are independent, though a token's routing still depends on the other
  images of its batch, as in the paper).
* ``"prefix"``: causal. Token t at position p of its sequence goes to expert i iff it would be among
  expert i's C(p + 1) = round(c · (p + 1) / e) picks of the sequence *cut after t*: its rank
  1 + #{q < p in the same sequence: S[q, i] >= S[t, i]} is at most C(p + 1) (ties go to the earlier
  token). It reads S only at positions <= p of t's own sequence, and S there depends only on tokens
  <= p (causal attention), so changing any later token, or any other sequence of the batch, does not
  change the routing of t: the same in training, evaluation, lm-eval's right-padded batches and
  generation. The last token of a sequence is routed exactly as batch-wide expert choice over that
  sequence alone would route it. What it gives up: an expert's load is c / e of the tokens only on
  average (not exactly C), and the first positions of a sequence get more experts (position 0 is
  every expert's best so far: all e experts; about c from position ~e / c on). Sequences are found
  from ``ctx.positions`` (0 starts one); without positions the T tokens are one sequence.
* ``"auto"`` (default): ``"prefix"`` when ``ctx.causal`` (set by the LM model), else ``"batch"``.
  The LM suite therefore runs the causal rule: a batch-wide rule would score the LM on leaked
  future tokens (its evaluation windows are consecutive, so the next sequence of a batch *is* the
  future of this one) and could not be evaluated one sequence at a time. ``expert_choice@batch``
  runs the paper's rule in the LM anyway, to measure the leak, not as a fair entry.

Per-position selection across the batch's sequences (each expert takes its top-(B·c/e) tokens at
every position) is causal in time and exactly balanced, but not used: it makes a token's routing
depend on the other sequences of its batch, which are the future of this one in the LM suite's
consecutive evaluation windows, and it is undefined for a batch of one.

Readings offered as variants: ``normalize=True`` (``expert_choice@normalized``): a token's weights
renormalised to sum to 1 over the experts that took it (the paper combines with the raw G); and
``max_experts_per_token`` b (``expert_choice@cap2``): a token keeps only its b strongest experts. The
paper's own capped variant (Sec. 3.3, "expert choice with additional constraint") instead solves an
entropy-regularised linear program so that every expert still fills C slots; the paper reports it did
not help, and it is not reproduced: our cap simply drops the weaker picks (those experts process fewer
than C tokens).

Contract: a variable-k router (``variable_k = True``): ``Routing.indices`` / ``weights`` are [T, S]
slots, S = E (b when capped), a token's experts strongest first, weight exactly 0 in unused slots
(``harness.routing.router.slots_from_dense``); the MoE layer drops unused slots before dispatch.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from harness.routing.losses import router_z_loss
from harness.routing.registry import register_router
from harness.routing.router import RouteContext, Router, Routing, check_choice, check_range, fp32_linear, slots_from_dense

_NAME = "expert_choice"
_CHUNK = 1 << 24  # comparisons per block of the prefix rank (bounds its memory)


def expert_capacity(n: int, factor: float, num_experts: int) -> int:
    """C = round(c · n / e), clamped to [1, n] (0 for n = 0)."""
    if n <= 0:
        return 0
    return min(n, max(1, int(round(factor * n / num_experts))))


def batch_choice(probs: Tensor, capacity: int) -> Tensor:
    """[T, E] bool: expert i takes the ``capacity`` tokens with the highest ``probs[:, i]`` (eq. 2)."""
    T, E = probs.shape
    top = probs.t().topk(capacity, dim=1).indices  # [E, C]: I
    return torch.zeros(E, T, dtype=torch.bool, device=probs.device).scatter_(1, top, True).t()


def _prefix_choice_equal(probs: Tensor, caps: Tensor) -> Tensor:
    """[B, L, E] affinities of B sequences of length L, ``caps`` [L] = C(p + 1) -> [B, L, E] bool (prefix rule)."""
    B, L, E = probs.shape
    out = torch.empty(B, L, E, dtype=torch.bool, device=probs.device)
    step = max(1, _CHUNK // max(1, B * L * E))
    q = torch.arange(L, device=probs.device)
    for p0 in range(0, L, step):
        p = torch.arange(p0, min(L, p0 + step), device=probs.device)
        cur = probs[:, p]                                           # [B, P, E]
        ge = probs.unsqueeze(1) >= cur.unsqueeze(2)                 # [B, P, L(q), E]
        earlier = (q.unsqueeze(0) < p.unsqueeze(1))[None, :, :, None]
        rank = 1 + (ge & earlier).sum(2)                            # [B, P, E]
        out[:, p] = rank <= caps[p].view(1, -1, 1)
    return out


def prefix_choice(probs: Tensor, positions: Tensor | None, factor: float) -> Tensor:
    """[T, E] bool: the causal prefix rule of the module docstring, per sequence of ``positions``."""
    T, E = probs.shape
    dev = probs.device
    if positions is None:
        positions = torch.arange(T, device=dev)
    positions = positions.reshape(-1).to(dev)
    if positions.numel() != T:
        raise ValueError(f"router {_NAME!r}: got {positions.numel()} positions for {T} tokens")
    starts = (positions == 0).nonzero().squeeze(1).tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [T]
    lengths = {b - a for a, b in zip(bounds[:-1], bounds[1:])}

    def caps(n: int) -> Tensor:
        return torch.tensor([expert_capacity(m, factor, E) for m in range(1, n + 1)], device=dev)

    if len(lengths) == 1:  # B sequences of one length (the LM): one batched pass
        L = lengths.pop()
        return _prefix_choice_equal(probs.reshape(-1, L, E), caps(L)).reshape(T, E)
    out = torch.empty(T, E, dtype=torch.bool, device=dev)
    for a, b in zip(bounds[:-1], bounds[1:]):
        out[a:b] = _prefix_choice_equal(probs[a:b].unsqueeze(0), caps(b - a))[0]
    return out


@register_router(_NAME)
class ExpertChoiceRouter(Router):
    """Each expert takes its top-C tokens by softmax affinity; a token gets 0..E experts (variable k)."""

    description = ("Expert choice (Zhou et al. 2022): each expert takes its top-C tokens, C = T*c/E, c = top_k; "
                   "causal prefix rule in the LM, batch-wide in vision")
    variable_k = True
    variants = {
        "batch": {"selection": "batch"},              # the paper's batch-wide top-C also in a causal LM (leaks)
        "prefix": {"selection": "prefix"},            # the causal rule everywhere
        "normalized": {"normalize": True},            # a token's weights sum to 1
        "cap2": {"max_experts_per_token": 2},         # at most 2 experts per token (greedy cap, not Sec. 3.3)
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        ec_capacity_factor: float | None = None,
        selection: str = "auto",
        normalize: bool = False,
        max_experts_per_token: int | None = None,
        z_loss_weight: float = 0.0,
        gate_bias: bool = True,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        check_range(_NAME, "ec_capacity_factor", ec_capacity_factor, 0, num_experts, lo_open=True, optional=True,
                    note=f"(c experts per token on average; c = num_experts = {num_experts} takes every token)")
        check_choice(_NAME, "selection", selection, ("auto", "batch", "prefix"))
        check_choice(_NAME, "normalize", normalize, (True, False))
        check_range(_NAME, "max_experts_per_token", max_experts_per_token, 1, num_experts, integer=True, optional=True)
        check_range(_NAME, "z_loss_weight", z_loss_weight, 0)
        check_choice(_NAME, "gate_bias", gate_bias, (True, False))
        self.ec_capacity_factor = ec_capacity_factor
        self.selection = selection
        self.normalize = normalize
        self.max_experts_per_token = max_experts_per_token
        self.z_loss_weight = z_loss_weight
        self.gate = nn.Linear(d_model, num_experts, bias=gate_bias)
        nn.init.normal_(self.gate.weight, std=0.02)  # flaxformer RouterWeights: normal(stddev=2e-2), bias zeros
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)

    @property
    def factor(self) -> float:
        """The capacity factor c (default: top_k)."""
        return float(self.top_k if self.ec_capacity_factor is None else self.ec_capacity_factor)

    @property
    def num_slots(self) -> int:
        return self.max_experts_per_token or self.num_experts

    def rule(self, ctx: RouteContext) -> str:
        """The selection rule for this context: ``"batch"`` or ``"prefix"``."""
        if self.selection != "auto":
            return self.selection
        return "prefix" if getattr(ctx, "causal", False) else "batch"

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        logits = fp32_linear(x, self.gate.weight, self.gate.bias)    # [T, E] fp32
        probs = logits.softmax(-1)                                   # S, eq. 1
        T, E = probs.shape
        with torch.no_grad():
            if T == 0:
                chosen = torch.zeros(0, E, dtype=torch.bool, device=x.device)
            elif self.rule(ctx) == "prefix":
                chosen = prefix_choice(probs.detach(), ctx.positions, self.factor)
            else:
                chosen = batch_choice(probs.detach(), expert_capacity(T, self.factor, E))
        dense = probs * chosen                                       # G scattered to [T, E]
        if self.normalize:
            dense = dense / dense.sum(-1, keepdim=True).clamp_min(1e-9)
        idx, w = slots_from_dense(dense, chosen, self.num_slots)
        aux: dict[str, Tensor] = {}
        if self.z_loss_weight:
            aux["z_loss"] = self.z_loss_weight * router_z_loss(logits)
        used = (w.detach() != 0).sum(-1).float()
        stats = {"experts_per_token": float(used.mean()) if T else 0.0,
                 "unrouted_tokens": float((used == 0).float().mean()) if T else 0.0}
        return Routing(indices=idx, weights=w, logits=logits, aux_losses=aux, stats=stats)
