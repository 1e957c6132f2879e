"""StableMoE: two-stage training with a distilled, frozen router (Dai et al. 2022, arXiv 2204.08396).

Equations (Sec. 3 of the paper; numbering as we read arXiv v1 — the search
corpus available when this was written returned only the introduction, so a
reviewer should re-check the numbers; the formulas match the official code
``Hunter-DDM/stablemoe``, ``fairseq/modules/moe_layer.py``):

Stage 1 (the first ``stage1_fraction`` of the updates, paper: 10%):

* Eq. 1, routing: s_{t,i} = E_i^T h_t (centroids E in R^{E x d}, no bias),
  a_t = argmax_i s_{t,i}  (top-1).
* Eq. 2, gate:  h'_t = sigma(s_{t,a_t}) FFN_{a_t}(h_t) + h_t — the layer computes
  ``weight * expert(h)`` and the model adds the residual, so the router returns
  weight = sigmoid(s_{t,a_t}).
* Eq. 3, balance loss: L_bal = alpha * sum_i ((|A_i| - n) / n) * sum_{t in A_i} sigma(s_{t,i}),
  A_i the tokens assigned to expert i, n = T / E, alpha = 0.3. The count factor
  is a constant (no gradient); the gradient raises the scores of under-loaded
  experts and lowers those of over-loaded ones.
* Eq. 4-5, distillation: a light router — a word embedding D(x_t) of dimension 50
  of the *token id* with its own centroids E^ — scores s^_{t,i} = E^_i^T D(x_t)
  and is trained by cross-entropy against the stage-1 assignment a_t (detached),
  weight 0.3. Stage-1 objective: L_task + L_bal + L_dis.

Stage 2 (Eq. 6-7): the distilled router is frozen and decides a^_t = argmax_i
s^_{t,i}; the gate sigma(s_{t,a^_t}) still uses the trainable centroids E and the
current h_t, so it keeps training; L_bal and L_dis are off (objective L_task).

Normalisation. The paper writes L_bal and L_dis as sums over the tokens of a
batch. The official code also sums them, but its criterion divides the whole
objective (task NLL summed over tokens + 0.3 L_bal + 0.3 L_dis) by the number of
tokens, so the effective losses are per-token means. Our task loss is a
per-token mean, so ``loss_reduction="mean"`` (default) divides both sums by T,
which reproduces the code's effective scale; ``"sum"`` uses the literal sums.

Other choices:

* Capacity factor 2 (class attribute), as in the paper; the layer drops overflow.
* Centroids (both) are initialised orthogonally with gain 0.1, as in the code.
  D's init depends on what it embeds (the harness models must not re-initialise
  router parameters; ``harness.conformance`` checks it):
  - token ids (LM) and positions: ``nn.Embedding``'s N(0, 1) (issue 16 reports that
    the fairseq code keeps N(0, 1); we could not open ``Hunter-DDM/stablemoe`` to
    re-check it);
  - patch pixels (vision): ``nn.Linear``'s default, U(+-1/sqrt(f)) for weight and
    bias (f = ``patch_dim``). There is no reference to copy; the default keeps
    D(x)'s scale independent of the patch size (about 1/3 of the pixels' variance
    per entry, the order of the word embedding's N(0, 1)), where N(0, 1) weights
    would give entries of variance ~f (48 at 4x4x3, 768 at 16x16x3) and a
    distillation cross-entropy saturated from the first step.
* Evaluation in stage 1: the code routes with the (still training) distilled
  router whenever it is not training; the paper only uses the distilled router at
  inference after training. Default ``eval_with_distilled=False`` keeps stage-1
  evaluation consistent with stage-1 training (argmax of s); ``True`` is the code.
  In stage 2 the distilled router always decides, in training and evaluation.
* What D embeds: ``distill_input="token"`` (default) embeds the token itself --
  ``ctx.token_ids`` (flattened to [T], ``nn.Embedding(vocab_size, distill_dim)``)
  when ``patch_dim == 0`` (the LM), its patch pixels when ``patch_dim > 0`` (vision,
  below); ``"position"`` embeds ``ctx.positions`` with ``nn.Embedding(vocab_size,
  distill_dim)`` (``stablemoe@position``; in the LM an ablation that routes on the
  position in the sequence). ``patch_dim`` is ignored by the position reading.
* ``Routing.logits`` are the scores that decided the assignment: s in stage 1,
  s^ in stage 2 (so ``indices == logits.argmax(-1)`` always holds).

Vision. An image has no vocabulary: the token of an image is its patch, so the
distilled router embeds the patch's pixels (``ctx.patches``, [T, patch_dim], zero
rows for the class/register tokens) with its own linear patch embedding
``nn.Linear(patch_dim, distill_dim)`` -- the analogue of the paper's own word
embedding D (separate from the model's patch embedding, as D is from the model's
word embedding), frozen in stage 2 like D, so stage-2 routing is a fixed function of
the patch's pixels wherever the patch sits. The bias is on, so the class token's zero
pixels map to a learned vector: the class token has its own embedding, as a word
does. ``harness.models.vit`` sets ``patch_dim = in_chans * patch_size**2`` unless the
spec sets it, and hands ``ctx.patches`` to the routers whose ``reads_patches`` is
true (False for the position reading, which never looks at pixels). This is the
harness' reading, not the paper's (the paper is text-only). The earlier vision
reading, D over the patch *index* (``ctx.positions``), stays available as
``stablemoe@position``: its stage-2 routing is a fixed map from position to
expert, a positional inductive bias the learned routers do not get (on the vision
default it scored 0.700 top-1 against ~0.57 for the others, one seed; the hash
router's vision reading is the same kind of map, fixed from step 0).

Freezing. ``on_step`` switches to stage 2 once ``step >= stage1_fraction * total_steps``
and sets ``requires_grad=False`` **and** ``grad=None`` on the distilled router's
parameters. An optimiser built earlier still holds them, but AdamW skips every
parameter whose ``.grad`` is None, so neither the update nor the weight decay
touches them (pinned by ``tests/test_router_formulas.py`` and, for the patch
embedding, ``tests/test_stablemoe_vision.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.routing.registry import register_router
from harness.routing.router import RouteContext, Router, Routing, check_choice, check_range

_NAME = "stablemoe"


@register_router(_NAME)
class StableMoERouter(Router):
    """Top-1 centroid routing with a sigmoid gate; a distilled token router takes over and freezes."""

    description = "StableMoE: top-1, sigmoid gate, balance 0.3 + distillation 0.3, frozen distilled router after 10%"
    supports_top_k = (1,)
    capacity_factor = 2.0
    variants = {
        "code": {"eval_with_distilled": True},  # the official code routes eval with the distilled router
        "position": {"distill_input": "position"},  # D over the position (vision: patch index), not the token
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        vocab_size: int = 256,
        distill_dim: int = 50,
        balance_weight: float = 0.3,
        distill_weight: float = 0.3,
        stage1_fraction: float = 0.1,
        loss_reduction: str = "mean",
        eval_with_distilled: bool = False,
        distill_input: str = "token",
        patch_dim: int = 0,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        check_range(_NAME, "vocab_size", vocab_size, 1, integer=True)
        check_range(_NAME, "distill_dim", distill_dim, 1, integer=True)
        check_range(_NAME, "balance_weight", balance_weight, 0)
        check_range(_NAME, "distill_weight", distill_weight, 0)
        check_range(_NAME, "stage1_fraction", stage1_fraction, 0, 1)
        check_choice(_NAME, "loss_reduction", loss_reduction, ("mean", "sum"))
        check_choice(_NAME, "eval_with_distilled", eval_with_distilled, (True, False))
        check_choice(_NAME, "distill_input", distill_input, ("token", "position"))
        check_range(_NAME, "patch_dim", patch_dim, 0, integer=True,
                    note="(0: embed token ids; > 0: embed patch pixels, in_chans * patch_size**2)")
        self.vocab_size = vocab_size
        self.distill_input = distill_input
        self.patch_dim = patch_dim
        self.reads_patches = distill_input == "token" and patch_dim > 0
        self.balance_weight = balance_weight
        self.distill_weight = distill_weight
        self.stage1_fraction = stage1_fraction
        self.loss_reduction = loss_reduction
        self.eval_with_distilled = eval_with_distilled

        cent = torch.empty(num_experts, d_model)
        nn.init.orthogonal_(cent, gain=0.1)
        self.centroids = nn.Parameter(cent)  # E, trained in both stages (the gate)
        # D(x), built between the two centroid draws as it always was (the LM's draws are unchanged)
        if self.reads_patches:
            self.distill_patch_embedding = nn.Linear(patch_dim, distill_dim)  # D over patch pixels (vision)
        else:
            self.distill_embedding = nn.Embedding(vocab_size, distill_dim)  # D over token ids or positions
        dcent = torch.empty(num_experts, distill_dim)
        nn.init.orthogonal_(dcent, gain=0.1)
        self.distill_centroids = nn.Parameter(dcent)  # E^
        # persisted so a resumed run stays in stage 2
        self.register_buffer("stage", torch.tensor(1, dtype=torch.long))

    # -- stages --------------------------------------------------------------
    @property
    def in_stage2(self) -> bool:
        return int(self.stage) == 2

    def distilled_parameters(self) -> list[nn.Parameter]:
        """D (whichever embedding this reading built) and E^: what stage 2 freezes."""
        embedding = self.distill_patch_embedding if self.reads_patches else self.distill_embedding
        return [*embedding.parameters(), self.distill_centroids]

    def _freeze_distilled(self) -> None:
        for p in self.distilled_parameters():
            p.requires_grad_(False)
            p.grad = None  # AdamW skips params whose grad is None: no update, no weight decay

    def on_step(self, step: int, total_steps: int) -> None:
        if not self.in_stage2 and step >= self.stage1_fraction * total_steps:
            self.stage.fill_(2)
        if self.in_stage2:
            self._freeze_distilled()

    # -- routing -------------------------------------------------------------
    def _ids(self, ids: Tensor | None, what: str, num_tokens: int) -> Tensor:
        """[T] long ids in [0, vocab_size) for ``nn.Embedding``; ``what`` is "token" or "position"."""
        if ids is None:
            fix = ("the LM passes them; for images set patch_dim (the ViT does) or use stablemoe@position"
                   if what == "token" else "the LM and the ViT pass them")
            field = "token_ids" if what == "token" else "positions"
            raise ValueError(f"router 'stablemoe': distill_input={self.distill_input!r} needs ctx.{field} "
                             f"(its distilled router embeds the {what} id); {fix}")
        ids = ids.reshape(-1).long()
        if ids.numel() != num_tokens:
            raise ValueError(f"router 'stablemoe': got {ids.numel()} {what} ids for {num_tokens} tokens")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            fix = ("the tokenizer's" if what == "token" else
                   "at least the sequence length (the ViT sets it to its tokens per image; a larger image has more)")
            raise ValueError(f"router 'stablemoe': {what} id out of range [0, vocab_size={self.vocab_size}); "
                             f"set the vocab_size hyper-parameter to {fix}")
        return ids

    def _patch_pixels(self, ctx: RouteContext, num_tokens: int) -> Tensor:
        """[T, patch_dim] pixels of each token's patch (``ctx.patches``)."""
        p = ctx.patches
        if p is None:
            raise ValueError(f"router 'stablemoe': patch_dim={self.patch_dim} routes on each token's patch pixels "
                             "(ctx.patches), which this context lacks: call the ViT itself (model(images)), not "
                             "forward_features; in the LM leave patch_dim at 0")
        if p.dim() != 2 or p.shape[1] != self.patch_dim:
            raise ValueError(f"router 'stablemoe': ctx.patches has shape {tuple(p.shape)}, expected [T, "
                             f"patch_dim={self.patch_dim}]; set patch_dim to in_chans * patch_size**2 (or leave it "
                             "unset: the ViT sets it)")
        if p.shape[0] != num_tokens:
            raise ValueError(f"router 'stablemoe': got {p.shape[0]} patch rows for {num_tokens} tokens")
        return p

    def _distill_features(self, ctx: RouteContext, num_tokens: int) -> Tensor:
        """D(x_t), [T, distill_dim] fp32: the distilled router's view of each token (Eq. 4)."""
        if self.reads_patches:
            lin = self.distill_patch_embedding
            return F.linear(self._patch_pixels(ctx, num_tokens).float(), lin.weight.float(), lin.bias.float())
        what = "position" if self.distill_input == "position" else "token"
        ids = self._ids(ctx.positions if what == "position" else ctx.token_ids, what, num_tokens)
        return self.distill_embedding(ids).float()

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        T = x.shape[0]
        if self.in_stage2 and self.distill_centroids.requires_grad:
            self._freeze_distilled()  # e.g. resumed from a stage-2 checkpoint before on_step ran
        training = ctx.training
        use_distilled = self.in_stage2 or (not training and self.eval_with_distilled)
        stage1_losses = training and not self.in_stage2

        with torch.autocast(device_type=x.device.type, enabled=False):
            s = x.float() @ self.centroids.float().t()  # eq. 1, [T, E]
            with torch.set_grad_enabled(torch.is_grad_enabled() and stage1_losses):
                s_hat = self._distill_features(ctx, T) @ self.distill_centroids.float().t()  # eq. 4
            decide = s_hat if use_distilled else s
            idx = decide.detach().argmax(-1, keepdim=True)  # [T, 1]
            weights = torch.sigmoid(s.gather(1, idx))  # eq. 2 / 6: gate on the trainable centroids

            aux: dict[str, Tensor] = {}
            teacher = s.detach().argmax(-1)
            if stage1_losses:
                denom = float(max(T, 1)) if self.loss_reduction == "mean" else 1.0  # T = 0: the sums are 0
                if self.balance_weight:
                    aux["balance"] = self.balance_weight * stablemoe_balance_loss(s, idx[:, 0]) / denom
                if self.distill_weight:
                    aux["distill"] = self.distill_weight * F.cross_entropy(s_hat, teacher, reduction="sum") / denom
            agree = (s_hat.detach().argmax(-1) == teacher).float().mean() if T else torch.tensor(1.0)

        return Routing(
            indices=idx,
            weights=weights,
            logits=decide,
            aux_losses=aux,
            stats={"stage": 2.0 if self.in_stage2 else 1.0, "distill_accuracy": float(agree)},
        )


def stablemoe_balance_loss(scores: Tensor, assignment: Tensor) -> Tensor:
    """StableMoE eq. 3 without alpha: ``sum_i ((|A_i| - n)/n) * sum_{t in A_i} sigmoid(s_{t,i})``, n = T/E.

    ``scores`` [T, E] fp32, ``assignment`` [T] the expert of each token. Summed
    over tokens (the caller divides by T for the per-token normalisation).
    """
    T, E = scores.shape
    if T == 0:
        return scores.sum() * 0.0
    counts = torch.bincount(assignment, minlength=E).to(scores.dtype)
    n = T / E
    coef = (counts - n) / n  # constant: |A_i| has no gradient
    s_assigned = torch.sigmoid(scores.gather(1, assignment.unsqueeze(1)).squeeze(1))
    return (coef[assignment] * s_assigned).sum()
