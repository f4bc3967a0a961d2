"""Seeded parameter initialisation that never touches the global torch RNG."""
from __future__ import annotations

import math

import torch
from torch import nn


def linear(in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised Linear whose construction draws no global RNG (``init_parameters`` fills it,
    seeded): built on the meta device, then given empty CPU parameters. Not ``skip_init``: its
    ``to_empty`` runs torch's Python reference of ``empty_like``, which imports torch.fx's symbolic
    shapes (sympy, 0.4-0.9 s) on first use, paid by Flower's per-message ClientApp process."""
    lin = nn.Linear(in_features, out_features, device="meta")
    lin.weight = nn.Parameter(torch.empty(out_features, in_features))
    lin.bias = nn.Parameter(torch.empty(out_features))
    return lin


def clone_structure(module: nn.Module) -> nn.Module:
    """A new module of the same classes and attributes whose parameter (and buffer) slots still
    hold the originals' tensors, for the caller to replace: an architecture copied without its
    data (``copy.deepcopy`` would copy every tensor). Every container attribute (hooks,
    parameter, module dicts) is a fresh copy, so nothing registered on the clone reaches the original."""
    clone = object.__new__(type(module))
    state = {n: (type(v)(v) if isinstance(v, dict) else v) for n, v in vars(module).items()}
    state["_modules"] = {n: None if m is None else clone_structure(m) for n, m in module._modules.items()}
    object.__setattr__(clone, "__dict__", state)
    return clone


@torch.no_grad()
def init_parameters(module: nn.Module, gen: torch.Generator) -> None:
    """Re-initialise every Linear (and LayerNorm) of ``module`` in place (same Parameter objects).

    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases: the bound of torch's default init,
    but drawn from an explicit generator so two stores built from one spec are identical.
    Values are drawn on CPU (the generator's device) and copied, so any module device works.
    An architecture with its own initialisation (the published VAE's) defines ``init_from(gen)``.
    """
    own = getattr(module, "init_from", None)
    if callable(own):
        own(gen)
        return
    init_linears(module, gen)


@torch.no_grad()
def init_linears(module: nn.Module, gen: torch.Generator) -> None:
    """``init_parameters``' default: every Linear (and LayerNorm) of ``module``, in module order."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            bound = 1.0 / math.sqrt(sub.in_features)
            for p in (sub.weight, sub.bias):
                if p is None:
                    continue
                if p.device == gen.device and p.is_contiguous():
                    p.uniform_(-bound, bound, generator=gen)  # in place: the same draws, no temporary
                else:
                    draw = torch.empty(p.shape, dtype=p.dtype, device=gen.device)
                    draw.uniform_(-bound, bound, generator=gen)
                    p.copy_(draw)
        elif isinstance(sub, nn.LayerNorm) and sub.elementwise_affine:
            # (the published multimodal VAE) back to the identity affine map torch builds it with
            sub.weight.fill_(1.0)
            if sub.bias is not None:
                sub.bias.zero_()
