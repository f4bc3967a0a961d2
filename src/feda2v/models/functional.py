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


class _StackedLinear(torch.autograd.Function):
    """y = b + x @ W^T for K stacked layers, with gradients laid out like the parameters.

    Autograd's own backward of ``x @ W.transpose`` returns the weight gradient as a transposed
    (non-contiguous) view, which would cost a copy per step before the optimizer; computing
    ``g^T @ x`` directly yields ``[K, out, in]`` contiguous.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(g.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        gb = g.sum(1) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


def stacked_linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """x [K, n, in], w [K, out, in], b [K, out] -> [K, n, out]."""
    return _StackedLinear.apply(x, w, b)


def stacked_sequential(seq: nn.Sequential, prefix: str, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Apply ``seq``'s structure with stacked parameters ``params[f"{prefix}.{i}.weight"]`` ([K, out, in])."""
    for i, layer in enumerate(seq):
        if isinstance(layer, nn.Linear):
            x = stacked_linear(x, params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"])
        else:
            x = layer(x)
    return x
