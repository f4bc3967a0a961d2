"""FedAvg: sample-weighted parameter averages (per generator key, and for the classifier)."""
from __future__ import annotations

import torch


def weighted_average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sum_i w_i * t_i / sum_i w_i, accumulated in float64 then cast back (order-fixed, deterministic)."""
    total = float(sum(weights))
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc += t.to(torch.float64) * (w / total)
    return acc.to(tensors[0].dtype)


def average_state(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    return {name: weighted_average([s[name] for s in states], weights) for name in states[0]}
