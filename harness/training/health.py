"""Routing health: expert load, dead experts, load entropy, routing fluctuation.

Measured by the harness, identically for every router, on the validation
batches of each evaluation:

* load fractions per layer and expert (share of routing slots), load entropy
  normalised by log(E) (1 = perfectly uniform), max/mean load, dead experts
  (no slot at all during the evaluation);
* combine-weight mass (``weight_sum``): the mean over tokens of the sum of a
  token's combine weights (1 for renormalised top-k softmax; less for Switch's raw
  top-1 probability, StableMoE's sigmoid gate or un-renormalised top-k);
* routing fluctuation between consecutive evaluations: the share of a fixed
  set of probe tokens (the first validation batch) whose top-1 expert changed
  (for a variable-k router such as expert choice: the token's strongest expert,
  slot 0, or "none" (-1) when no expert took it);
* StableMoE's routing fluctuation (Dai et al. 2022, Sec. 2.3): for each probe
  token, the last evaluation step at which its assignment differed from its
  *final* assignment; reported as the mean over tokens, as a fraction of
  training (0 = never changed, 1 = still changing at the end).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def first_choice(layer: Any) -> Tensor:
    """[T] the expert in slot 0 of the layer's last routing; -1 where a variable-k router left it unused."""
    r = layer.last_routing
    first = r.indices[:, 0].detach()
    if getattr(layer.router, "variable_k", False):  # slot 0 holds the strongest expert; weight 0: no expert at all
        first = torch.where(r.weights[:, 0].detach() != 0, first, torch.full_like(first, -1))
    return first.cpu().clone()


class HealthTracker:
    def __init__(self) -> None:
        self.history: list[tuple[int, list[Tensor]]] = []  # (step, per-layer top-1 of probe tokens)
        self._counts: list[Tensor] | None = None
        self._probe: list[Tensor] | None = None
        self._mass: list[list[float]] | None = None  # per layer [sum of combine weights, tokens]

    # -- during one evaluation ------------------------------------------------
    def begin(self) -> None:
        self._counts, self._probe, self._mass = None, None, None

    def observe(self, layers: list[Any]) -> None:
        """Call after each eval forward with the model's MoE layers."""
        counts = [layer.last_counts.detach().cpu().double() for layer in layers]
        mass = [[float(layer.last_routing.weights.detach().float().sum()), layer.last_routing.weights.shape[0]]
                for layer in layers]
        self._mass = mass if self._mass is None else [[a[0] + b[0], a[1] + b[1]] for a, b in zip(self._mass, mass)]
        if self._counts is None:
            self._counts = counts
            self._probe = [first_choice(layer) for layer in layers]
        else:
            self._counts = [a + b for a, b in zip(self._counts, counts)]

    def end(self, step: int) -> tuple[list[tuple[int, int, int, float]], list[tuple[int, int, str, float]]]:
        """Rows for the store: routing (step, layer, expert, load) and health (step, layer, name, value)."""
        if self._counts is None:
            return [], []
        load_rows, health_rows = [], []
        prev = self.history[-1][1] if self.history else None
        for li, c in enumerate(self._counts):
            E = c.numel()
            frac = c / c.sum().clamp_min(1)
            load_rows += [(step, li, e, float(frac[e])) for e in range(E)]
            nz = frac[frac > 0]
            entropy = float(-(nz * nz.log()).sum() / math.log(E)) if E > 1 else 1.0
            health_rows += [
                (step, li, "load_entropy", entropy),
                (step, li, "max_over_mean_load", float(frac.max() * E)),
                (step, li, "dead_experts", float((c == 0).sum())),
            ]
            if self._mass is not None and self._mass[li][1] > 0:
                health_rows.append((step, li, "weight_sum", self._mass[li][0] / self._mass[li][1]))
            if prev is not None and li < len(prev) and prev[li].shape == self._probe[li].shape:
                health_rows.append((step, li, "fluctuation", float((prev[li] != self._probe[li]).float().mean())))
        self.history.append((step, self._probe))
        return load_rows, health_rows

    # -- at the end of training -------------------------------------------------
    def final_fluctuation(self, total_steps: int) -> list[tuple[int, float]]:
        """Per layer: mean over probe tokens of (last step whose assignment != final) / total_steps."""
        if len(self.history) < 2:
            return []
        out = []
        final = self.history[-1][1]
        for li in range(len(final)):
            last_diff = torch.zeros_like(final[li], dtype=torch.float64)
            for step, probe in self.history[:-1]:
                if li < len(probe) and probe[li].shape == final[li].shape:
                    last_diff[probe[li] != final[li]] = float(step)
            out.append((li, float(last_diff.mean()) / max(total_steps, 1)))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
