"""Stacked (batched-over-keys) evaluation of the models' MLPs.

A store trains K keys in one computation: the K keys' parameters are stacked into ``[K, ...]``
tensors and inputs are laid out ``[K, n, features]``. Each ``Linear`` becomes one batched matmul
``b[K, 1, out] + x[K, n, in] @ W^T[K, in, out]``; activations are elementwise and apply unchanged.
The unstacked ``nn.Module.forward`` of every model is independent code (plain ``nn.Sequential``),
which lets tests check one against the other.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn


class _StackedLinear(torch.autograd.Function):
    """y = b + x @ W^T for K stacked layers, with gradients laid out like the parameters.

    Autograd's own backward of ``x @ W.transpose`` returns the weight gradient as a transposed
    (non-contiguous) view, which would cost a copy per step before the optimizer; computing
    ``g^T @ x`` directly yields ``[K, out, in]`` contiguous.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, passes: "StackedParams | None" = None,
                names: tuple[str, str] | None = None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.passes, ctx.names = passes, names
        if passes is not None and names is not None:
            passes.count_use(names[0])
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        # needs_input_grad is fixed at forward time; a pass w.r.t. the inputs only (R1's gradient
        # at the real samples) says so through the parameters' ``input_grads_only`` flag.
        weights = not (ctx.passes is not None and ctx.passes.input_grads_only)
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        # A first-order pass may write the parameter gradients into the caller's buffers (no fresh
        # [K, out, in] tensor to fault in and free per step); a pass that builds a graph may not.
        own = not torch.is_grad_enabled() and ctx.passes is not None and ctx.names is not None
        gw = gb = None
        if weights and ctx.needs_input_grad[1]:
            buf = ctx.passes.take_grad_buffer(ctx.names[0], ctx.names[0]) if own else None
            gw = torch.bmm(g.transpose(1, 2), x) if buf is None else torch.bmm(g.transpose(1, 2), x, out=buf)
        if weights and ctx.needs_input_grad[2]:
            buf = ctx.passes.take_grad_buffer(ctx.names[1], ctx.names[0]) if own else None
            gb = g.sum(1) if buf is None else torch.sum(g, 1, out=buf)
        return gx, gw, gb, None, None


class StackedParams(dict):
    """Stacked parameters ({name: [K, ...]}) whose layers can be told, for one backward pass, that
    only input gradients are wanted: set ``input_grads_only`` around an ``autograd.grad`` w.r.t.
    the inputs (the weight gradients that pass would otherwise compute are never read).

    ``grad_buffers`` ({parameter name: tensor shaped like it}) are where a first-order backward
    writes the gradients of a layer its graph uses once, instead of allocating them. Each is handed out once
    per StackedParams (one graph): a second backward pass over the graph gets a fresh tensor, so no
    gradient is overwritten while still in use. A weight used by several layer calls (the
    discriminator on real and on fake samples) gets fresh tensors, which autograd sums in place
    (a buffer it does not own it would sum into a new tensor). The caller owns the buffers and must
    be done with a step's gradients before it builds the next step's params.
    """

    input_grads_only: bool = False

    def __init__(self, *args, grad_buffers: Mapping[str, Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._grad_buffers = dict(grad_buffers or {})
        self._uses: dict[str, int] = {}

    def count_use(self, name: str) -> None:
        self._uses[name] = self._uses.get(name, 0) + 1

    def take_grad_buffer(self, name: str, layer: str) -> Tensor | None:
        """``name``'s buffer, if its layer (named by its weight) ran once in this graph and the
        buffer was not handed out before."""
        if self._uses.get(layer, 0) != 1:
            return None
        return self._grad_buffers.pop(name, None)


# torch's Function.apply less its Python preamble (functorch bookkeeping, ~3 us a call), for calls
# made outside functorch transforms (the store's steps); inside one, the full apply.
_apply_plain = super(torch.autograd.Function, _StackedLinear).apply
_functorch_active = torch._C._are_functorch_transforms_active


def stacked_linear(x: Tensor, w: Tensor, b: Tensor, passes: StackedParams | None = None,
                   names: tuple[str, str] | None = None) -> Tensor:
    """x [K, n, in], w [K, out, in], b [K, out] -> [K, n, out]; ``names``: (w's, b's) in ``passes``."""
    if not (w.requires_grad or b.requires_grad):
        # No weight gradient wanted (a constant D in the G step, sampling): the custom backward's
        # only work would be x's gradient, bmm(g, w), which is exactly what autograd's own
        # backward of baddbmm computes (w.transpose twice is w's layout): the same kernels and
        # bits, without a Python node in the backward.
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    if _functorch_active():
        return _StackedLinear.apply(x, w, b, passes, names)
    return _apply_plain(x, w, b, passes, names)


def modulate(a: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Feature-wise linear modulation of a layer's output (FiLM, Perez et al., 2018): a (1 + scale)
    + shift, so zero scale and shift leave it unchanged; one expression for the plain and the
    stacked forward, which therefore compute the same bits."""
    return a * (1.0 + scale) + shift


def stacked_sequential(seq: nn.Sequential, prefix: str, params: Mapping[str, Tensor], x: Tensor,
                       modulation: Sequence[tuple[Tensor, Tensor]] = ()) -> Tensor:
    """Apply ``seq``'s structure with stacked parameters ``params[f"{prefix}.{i}.weight"]`` ([K, out, in]).
    ``modulation``: (scale, shift) for the outputs of the first ``len(modulation)`` Linear layers,
    applied by ``modulate`` before the activation that follows each."""
    passes = params if isinstance(params, StackedParams) else None
    linears = 0
    for i, layer in enumerate(seq):
        if isinstance(layer, nn.Linear):
            w, b = f"{prefix}.{i}.weight", f"{prefix}.{i}.bias"
            x = stacked_linear(x, params[w], params[b], passes, (w, b))
            if linears < len(modulation):
                x = modulate(x, *modulation[linears])
            linears += 1
        else:
            x = layer(x)
    return x
