"""What every FFN of the harness shares: the activation by name and THE initialisation rule.

The dense baseline (:mod:`.dense`), every routed expert (:mod:`.experts`) and the shared experts
all start from :func:`ffn_init_`, so a one-expert MoE layer starts exactly where the dense FFN does.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}") from None


def ffn_init_(weight: Tensor, bias: Tensor | None, fan_in: int) -> None:
    """THE initialisation of every FFN linear map: the dense baseline's and every expert's.

    ``nn.Linear``'s default: weight and bias uniform in +-1/sqrt(fan_in). The weight bound is
    computed exactly as ``nn.init.kaiming_uniform_(a=sqrt(5))`` computes it, so the dense
    baseline (draws in the order fc1.weight, fc1.bias, fc2.weight, fc2.bias) gets the same
    numbers as a plain ``nn.Linear`` pair. Layout-free: ``weight`` may be ``[out, in]`` (Linear)
    or ``[E, in, out]`` (an expert bank); only ``fan_in`` matters. Experts once had zero biases
    and so started (and, with the biases decayed, trained) worse than the dense FFN they
    generalise (issue 21); biases stay out of weight decay through ``no_weight_decay``.
    """
    std = nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in)
    w_bound = math.sqrt(3.0) * std
    b_bound = 1 / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-w_bound, w_bound)
        if bias is not None:
            bias.uniform_(-b_bound, b_bound)
