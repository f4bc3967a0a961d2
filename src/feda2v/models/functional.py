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
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, passes: "StackedParams | None" = None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.passes = passes
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        # needs_input_grad is fixed at forward time; a pass w.r.t. the inputs only (R1's gradient
        # at the real samples) says so through the parameters' ``input_grads_only`` flag.
        weights = not (ctx.passes is not None and ctx.passes.input_grads_only)
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(g.transpose(1, 2), x) if weights and ctx.needs_input_grad[1] else None
        gb = g.sum(1) if weights and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class StackedParams(dict):
    """Stacked parameters ({name: [K, ...]}) whose layers can be told, for one backward pass, that
    only input gradients are wanted: set ``input_grads_only`` around an ``autograd.grad`` w.r.t.
    the inputs (the weight gradients that pass would otherwise compute are never read)."""

    input_grads_only: bool = False


def stacked_linear(x: Tensor, w: Tensor, b: Tensor, passes: StackedParams | None = None) -> Tensor:
    """x [K, n, in], w [K, out, in], b [K, out] -> [K, n, out]."""
    return _StackedLinear.apply(x, w, b, passes)


def stacked_sequential(seq: nn.Sequential, prefix: str, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Apply ``seq``'s structure with stacked parameters ``params[f"{prefix}.{i}.weight"]`` ([K, out, in])."""
    passes = params if isinstance(params, StackedParams) else None
    for i, layer in enumerate(seq):
        if isinstance(layer, nn.Linear):
            x = stacked_linear(x, params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"], passes)
        else:
            x = layer(x)
    return x
