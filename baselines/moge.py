"""MoGE: Mixture of Group Experts (Kang et al. 2025, "Mixture of Group Experts for
Learning Invariant Representations", arXiv 2504.09265).

MoGE keeps vanilla top-k routing and adds a *group-sparse regulariser* on the
routing scores of each token, laid out as a 2D topographic map so that
neighbouring experts form soft, overlapping groups (verified from the abstract).
Every default below is taken from the official code, GitHub ``wangyuankl123/MoGE``
(``Language_Modeling/`` is the LM reading, the default; ``Image_Classification/``
the ViT reading, variant ``moge@vit``). The paper body was not available to us,
so no equation numbers are cited; ``moge@paper`` keeps this harness's earlier
reading of the design notes (unverified against the paper text). See docs/routers.md.

* Gate (``Language_Modeling/custom_gates.py``, ``CustomNaiveGate_Balance_SMoE``):
  z = x W_r + b (``nn.Linear(d_model, E)``, with bias: ``gate_bias=True``), top-k
  of z, combine weights softmax over the k selected logits (= the renormalised
  top-k probabilities, as ``smoe``). Computed in fp32.
* Penalised tensor (``custom_gates.py`` ``set_group_sparsity``: ``score = F.softmax(gate)``):
  the softmax of the gate logits over all E experts (``penalize="probs"``);
  ``"logits"`` penalises the raw logits (the earlier reading).
* Map (``loss_group_sparsity.py`` ``transform_to_2d_map``): the E scores are
  reshaped row-major to R x C with R the largest divisor of E not above sqrt(E)
  (16 -> 4x4, 32 -> 4x8, 8 -> 2x4, prime E -> 1 x E).
* Window (``cal_group_sparsity_gaussian_weight``): a W x W Gaussian
  exp(-(dr^2 + dc^2) / (2 sigma^2)) over offsets ``arange(W) - W // 2``,
  normalised to sum 1; W = 3 in the LM code (``window_size=3``) and the ViT configs
  (``GS_WINDOW_SIZE: 3``). ``kernel_size=None`` (default) uses min(3, R, C), so a
  valid convolution fits the map: a 2x2 window for E = 8 (the LM code, run as is,
  fails there: a 3x3 window does not fit a 2x4 map). Even windows follow the
  code's offsets (W = 2: offsets -1, 0).
* Penalty (``loss_group_sparsity.py`` ``group_sparsity_loss``):
      L_gs = (1 / P) * sum_t sum_{positions} sqrt( conv2d(p_t^2, G_sigma, padding=0) + 1e-8 )
  a *valid* convolution (``padding="valid"``; a 4x4 map and W = 3 give P = 2x2
  positions), summed over tokens and positions, divided by the number of
  positions P (``reduction="sum"``). The ViT code also divides by W^2
  (``reduction="sum_window"``); ``"mean"`` averages over tokens instead of summing
  (the earlier reading). ``padding="same"`` zero-pads (the earlier reading).
* sigma schedule (``Language_Modeling/sigmascheduler.py``):
  sigma(t) = sigma_max - (sigma_max - sigma_min) * t^power, t = step / total_steps,
  with the LM scripts' values sigma_max = 10 (``SIGMA_INIT``), sigma_min = 1
  (``SIGMA_END``), power = 0.2 (``SIGMA_GAMMA``) (``scripts/smoe-s.sh``, ``smoe-m.sh``);
  ``sigma_schedule="power"``; "cosine" and "linear" are options.
* Weight: the LM scripts pass ``GROUP_SPARSE_LOSS_WEIGHT=1e-5`` and
  ``trainer.py`` multiplies every gate loss by ``--load_balance 0.01``, so the
  effective weight is 1e-5 * 0.01 = 1e-7 (``group_weight``), on a loss *summed*
  over the tokens of a micro-batch. The ViT config
  (``configs/vitmoe/vit_moge_small_patch16_224_32expert_4gpu_1k_last2_C4.yaml``)
  uses ``GS_LOSS_WEIGHT: 0.003`` times the model's ``aux_loss_weight 0.01``
  (``models/vision_transformer_moge.py``: ``l_aux * self.aux_loss_weight``) = 3e-5.
* Balance: in the LM code ``g_blance`` is off, so the group-sparsity loss
  *replaces* the balance loss (``keep_balance_loss=False``). The ViT
  (``Image_Classification/tutel/impls/loss_group_sparsity.py``) adds Tutel's
  load-importance loss (``balance_loss="load_importance"``, ``harness.routing.losses``), weighted by
  ``aux_loss_weight`` 0.01, with the ViT gate's noise ``gate_noise=1.0``
  (``models/vision_transformer_moge.py`` ``MoEMlp(gate_noise=1.0)``; Tutel
  ``moe_layer.py``: ``logits + gate_noise * randn / E`` in training, top-k of the
  noisy softmax, the penalties on the noise-free softmax) and a bias-free gate
  (Tutel ``gates/top.py``). ``balance_loss="switch"`` is the Switch loss. No z-loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.routing.losses import load_importance_loss
from harness.routing.registry import register_router
from harness.routing.router import RouteContext, Router, Routing, check_choice, check_gate_options, check_range, fp32_linear

from .smoe import softmax_topk

_NAME = "moge"
SIGMA_SCHEDULES = ("power", "cosine", "linear")
REDUCTIONS = ("sum", "sum_window", "mean")


def map_shape(num_experts: int) -> tuple[int, int]:
    """Near-square R x C layout: R = largest divisor of E with R <= sqrt(E), C = E / R."""
    rows = max(r for r in range(1, math.isqrt(num_experts) + 1) if num_experts % r == 0)
    return rows, num_experts // rows


def default_window(rows: int, cols: int) -> int:
    """The code's window 3, shrunk so that a valid convolution fits the R x C map (E = 8 -> 2)."""
    return max(1, min(3, rows, cols))


def gaussian_kernel(sigma: float, kernel_size: int, device=None, dtype=torch.float32) -> Tensor:
    """[W, W] Gaussian exp(-(dr^2 + dc^2) / (2 sigma^2)) at offsets ``arange(W) - W // 2``, summing to 1."""
    r = torch.arange(kernel_size, device=device, dtype=dtype) - kernel_size // 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * sigma * sigma))
    return g / g.sum()


def group_sparsity_penalty(
    z: Tensor, rows: int, cols: int, sigma: float, kernel_size: int = 3, eps: float = 1e-8,
    padding: str = "valid", reduction: str = "sum",
) -> Tensor:
    """MoGE penalty of [T, E] scores (unweighted), see the module docstring.

    ``sum``: sum over tokens and positions of sqrt(conv(z^2, G_sigma) + eps), divided
    by the number of positions; ``sum_window``: also divided by W^2; ``mean``: the
    ``sum`` value divided by T. 0 for an empty batch.
    """
    T, E = z.shape
    if rows * cols != E:
        raise ValueError(f"map {rows}x{cols} does not hold {E} experts")
    if T == 0:
        return z.float().sum() * 0.0
    if padding == "valid" and (kernel_size > rows or kernel_size > cols):
        raise ValueError(f"a {kernel_size}x{kernel_size} window does not fit the {rows}x{cols} expert map with valid padding")
    sq = z.float().pow(2).reshape(T, 1, rows, cols)
    k = gaussian_kernel(sigma, kernel_size, device=z.device).reshape(1, 1, kernel_size, kernel_size)
    if padding == "same":
        # zero padding keeping R x C positions (odd windows centre; even ones pad like the code's offsets)
        lo, hi = kernel_size // 2, kernel_size - 1 - kernel_size // 2
        sq = F.pad(sq, (lo, hi, lo, hi))
    pooled = F.conv2d(sq, k).reshape(T, -1)
    positions = pooled.shape[1]
    total = torch.sqrt(pooled + eps).sum() / positions
    if reduction == "sum_window":
        total = total / (kernel_size * kernel_size)
    elif reduction == "mean":
        total = total / T
    return total


@register_router(_NAME)
class MoGERouter(Router):
    """Softmax top-k routing with a topographic group-sparsity penalty on the routing scores."""

    description = ("MoGE (official LM code): top-k + Gaussian group sparsity on softmax scores over a 2D expert map, "
                   "sigma 10->1 (t^0.2), weight 1e-7 x sum over tokens, no balance loss")
    variants = {
        "code": {},  # the defaults: Language_Modeling/ of wangyuankl123/MoGE
        "vit": {  # Image_Classification/ of wangyuankl123/MoGE (Tutel), see the module docstring
            "reduction": "sum_window", "group_weight": 3e-5, "keep_balance_loss": True, "balance_weight": 0.01,
            "balance_loss": "load_importance", "gate_noise": 1.0, "gate_bias": False,
        },
        # the ViT code's MoE counterpart (configs/vitmoe/vit_moe_small_patch16_224_32expert_4gpu_1k_last2_C4.yaml:
        # the same Tutel gate, noise and load-importance loss, no group sparsity): MoGE's own baseline
        "vitmoe": {
            "reduction": "sum_window", "group_weight": 0.0, "keep_balance_loss": True, "balance_weight": 0.01,
            "balance_loss": "load_importance", "gate_noise": 1.0, "gate_bias": False,
        },
        "paper": {  # this harness's earlier reading of the design notes' summary (unverified against the paper)
            "penalize": "logits", "padding": "same", "reduction": "mean", "sigma_schedule": "cosine",
            "sigma_max": 2.0, "sigma_min": 1.0, "group_weight": 3e-3, "eps": 1e-6, "kernel_size": 3,
            "gate_bias": False,
        },
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        group_weight: float = 1e-7,
        penalize: str = "probs",
        kernel_size: int | None = None,
        padding: str = "valid",
        reduction: str = "sum",
        sigma_max: float = 10.0,
        sigma_min: float = 1.0,
        sigma_schedule: str = "power",
        sigma_power: float = 0.2,
        keep_balance_loss: bool = False,
        balance_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        eps: float = 1e-8,
        gate_bias: bool = True,
        balance_loss: str = "switch",
        gate_noise: float = 0.0,
        balance_fraction: str = "first",
        renormalize: bool | str = "auto",
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        check_range(_NAME, "group_weight", group_weight, 0)
        check_choice(_NAME, "penalize", penalize, ("probs", "logits"))
        check_choice(_NAME, "padding", padding, ("valid", "same"))
        check_choice(_NAME, "reduction", reduction, REDUCTIONS)
        self.map_rows, self.map_cols = map_shape(num_experts)
        check_range(_NAME, "kernel_size", kernel_size, 1, integer=True, optional=True)
        if kernel_size is None:
            kernel_size = default_window(self.map_rows, self.map_cols)
        if padding == "valid" and kernel_size > min(self.map_rows, self.map_cols):
            raise ValueError(
                f"router {_NAME!r}: hyper-parameter kernel_size={kernel_size} does not fit the "
                f"{self.map_rows}x{self.map_cols} map of {num_experts} experts with padding='valid' "
                f"(use kernel_size <= {min(self.map_rows, self.map_cols)}, null, or padding='same')"
            )
        check_range(_NAME, "sigma_min", sigma_min, 0, lo_open=True)
        check_range(_NAME, "sigma_max", sigma_max, sigma_min, note="(sigma_min)")
        check_choice(_NAME, "sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
        check_range(_NAME, "sigma_power", sigma_power, 0, lo_open=True)
        check_choice(_NAME, "keep_balance_loss", keep_balance_loss, (True, False))
        check_choice(_NAME, "gate_bias", gate_bias, (True, False))
        check_range(_NAME, "balance_weight", balance_weight, 0)
        check_range(_NAME, "z_loss_weight", z_loss_weight, 0)
        check_range(_NAME, "eps", eps, 0, lo_open=True)
        check_gate_options(_NAME, balance_fraction, renormalize)
        check_choice(_NAME, "balance_loss", balance_loss, ("switch", "load_importance"))
        check_range(_NAME, "gate_noise", gate_noise, 0)
        if balance_loss == "load_importance" and keep_balance_loss:
            check_range(_NAME, "gate_noise", gate_noise, 0, lo_open=True,
                        note="with balance_loss='load_importance' (Tutel's load term divides by it)")
        self.balance_loss = balance_loss
        self.gate_noise = float(gate_noise)
        self.group_weight = group_weight
        self.penalize = penalize
        self.kernel_size = kernel_size
        self.padding = padding
        self.reduction = reduction
        self.sigma_max = float(sigma_max)
        self.sigma_min = float(sigma_min)
        self.sigma_schedule = sigma_schedule
        self.sigma_power = float(sigma_power)
        self.keep_balance_loss = keep_balance_loss
        self.balance_weight = balance_weight
        self.z_loss_weight = z_loss_weight
        self.eps = eps
        self.balance_fraction = balance_fraction
        self.renormalize = renormalize
        self.gate = nn.Linear(d_model, num_experts, bias=gate_bias)
        self.sigma = self.sigma_max

    def sigma_at(self, step: int, total_steps: int) -> float:
        """sigma at progress t = step / total_steps (clamped to [0, 1]).

        "power" (``sigmascheduler.py``): sigma_max - (sigma_max - sigma_min) t^power;
        "linear": power 1; "cosine": sigma_min + (sigma_max - sigma_min)(1 + cos(pi t)) / 2.
        """
        t = min(max(step / max(total_steps, 1), 0.0), 1.0)
        span = self.sigma_max - self.sigma_min
        if self.sigma_schedule == "power":
            return max(self.sigma_max - span * t ** self.sigma_power, self.sigma_min)
        if self.sigma_schedule == "linear":
            return self.sigma_max - span * t
        return self.sigma_min + 0.5 * span * (1.0 + math.cos(math.pi * t))

    def on_step(self, step: int, total_steps: int) -> None:
        self.sigma = self.sigma_at(step, total_steps)

    def forward(self, x: Tensor, ctx: RouteContext) -> Routing:
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = fp32_linear(x, self.gate.weight, self.gate.bias)
            probs = logits.softmax(-1)  # noise-free: what the penalties see (scores_wo_noise)
            noisy = logits
            if self.gate_noise > 0 and ctx.training:  # Tutel moe_layer.py: logits + gate_noise * randn / E
                noisy = logits + self.gate_noise * torch.randn_like(logits) / self.num_experts
            scores = noisy.softmax(-1) if noisy is not logits else probs
            switch = self.keep_balance_loss and self.balance_loss == "switch"
            idx, weights, base_aux = softmax_topk(scores, logits, self.top_k, self.renormalize,
                                                  self.balance_weight if switch else 0.0,
                                                  self.balance_fraction, self.z_loss_weight)
            if self.keep_balance_loss and self.balance_loss == "load_importance" and self.balance_weight:
                base_aux["balance"] = self.balance_weight * load_importance_loss(
                    probs, noisy.gather(1, idx), self.gate_noise)
            aux = {}
            if self.group_weight:
                z = probs if self.penalize == "probs" else logits
                aux["group_sparsity"] = self.group_weight * group_sparsity_penalty(
                    z, self.map_rows, self.map_cols, self.sigma, self.kernel_size, self.eps,
                    padding=self.padding, reduction=self.reduction,
                )
            aux.update(base_aux)
        return Routing(indices=idx, weights=weights, logits=logits, aux_losses=aux, stats={"sigma": float(self.sigma)})
