"""Stacked (batched-over-keys) evaluation of the models' MLPs.

A store trains K keys in one computation: the K keys' parameters are stacked into ``[K, ...]``
tensors and inputs are laid out ``[K, n, features]``. Each ``Linear`` becomes one batched matmul
``b[K, 1, out] + x[K, n, in] @ W^T[K, in, out]``; activations are elementwise and apply unchanged.
The unstacked ``nn.Module.forward`` of every model is independent code (plain ``nn.Sequential``),
which lets tests check one against the other.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn


def stacked_sequential(seq: nn.Sequential, prefix: str, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Apply ``seq``'s structure with stacked parameters ``params[f"{prefix}.{i}.weight"]`` ([K, out, in])."""
    for i, layer in enumerate(seq):
        if isinstance(layer, nn.Linear):
            w = params[f"{prefix}.{i}.weight"]
            b = params[f"{prefix}.{i}.bias"]
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
        else:
            x = layer(x)
    return x
