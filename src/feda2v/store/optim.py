"""The one optimizer factory, and the grouped update that steps many keys' optimizers in one call.

Every (key, role) owns a real ``torch.optim`` optimizer built by ``make_optimizer``; its ``.state``
holds that key's moments and step. ``grouped_step`` performs exactly the update those optimizers'
``step()`` would, but for all active keys in one call of torch's fused functional Adam(W)
(one vectorised pass per tensor; on CPU ~3x faster than the foreach path, which matters because a
per_class store has K times the parameters of a unified one), reading and writing each
optimizer's own state entries.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor
from torch.optim.adam import adam as functional_adam
from torch.optim.optimizer import _get_scalar_dtype

from feda2v.errors import ConfigError



_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


# `OptimizerSpec` appears in annotations only (never evaluated): spec.py sits above this module.
def make_optimizer(params: Iterable[torch.nn.Parameter], spec: OptimizerSpec) -> torch.optim.Optimizer:
    """The ONE factory: every optimizer, at construction and reset alike, gets these settings.

    ``fused=True`` is torch's fused Adam(W) kernel on CPU and CUDA alike (the parameters' device)."""
    cls = _OPTIMIZERS.get(spec.name)
    if cls is None:
        raise ConfigError(f"generator.optimizer.name: {spec.name!r} is not one of {', '.join(_OPTIMIZERS)}")
    return cls(list(params), lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps,
               weight_decay=spec.weight_decay, fused=True)


def reset_param_groups(opt: torch.optim.Optimizer, spec: OptimizerSpec) -> None:
    """Give ``opt`` exactly the factory's param groups and defaults (every setting, not only the
    configured ones: e.g. a drifted ``decoupled_weight_decay`` goes too), in place: the optimizer
    object and its group dicts stay the ones everybody holds."""
    fresh = make_optimizer([p for g in opt.param_groups for p in g["params"]], spec)
    if len(opt.param_groups) != 1:
        raise ValueError("the store's optimizers have one param group")
    group = opt.param_groups[0]
    params = group["params"]
    group.clear()
    group.update(fresh.param_groups[0])
    group["params"] = params
    opt.defaults = dict(fresh.defaults)


def step_tensor(opt: torch.optim.Optimizer) -> Tensor | None:
    """The step tensor of the optimizer's first parameter (all its parameters step together)."""
    p = opt.param_groups[0]["params"][0]
    st = opt.state.get(p)
    return None if not st else st["step"]


def _state(opt: torch.optim.Optimizer, p: Tensor) -> dict:
    st = opt.state[p]
    if len(st) == 0:
        # Lazy initialisation exactly as torch's fused Adam does it (step on the parameter's device).
        st["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return st


@torch.no_grad()
def grouped_step(items: Sequence[tuple[torch.optim.Optimizer, Sequence[Tensor], Sequence[Tensor]]],
                 found_inf: Tensor | None = None) -> None:
    """One fused Adam(W) update for many optimizers: ``items`` = [(optimizer, params, grads), ...].

    Optimizers whose param-group hyper-parameters are equal (the normal case: one factory) are
    updated in a single fused call; differing ones (e.g. after a user changed an lr) get their own.
    ``found_inf`` (float32 scalar on the params' device, as torch's GradScaler passes it): where it
    is 1 the kernel changes nothing (parameters, moments, step counts); the veto never leaves the device.
    """
    buckets: dict[tuple, tuple[list, list, list, list, list]] = {}
    for opt, params, grads in items:
        g = opt.param_groups[0]
        if len(opt.param_groups) != 1 or g["amsgrad"] or g["maximize"] or not g["fused"]:
            raise ValueError("grouped_step supports the factory's optimizers only (one group, no amsgrad)")
        beta1, beta2 = g["betas"]
        hkey = (float(g["lr"]), float(beta1), float(beta2), float(g["eps"]), float(g["weight_decay"]),
                bool(g["decoupled_weight_decay"]))
        b = buckets.setdefault(hkey, ([], [], [], [], []))
        for p, grad in zip(params, grads):
            st = _state(opt, p)
            b[0].append(p)
            b[1].append(grad.contiguous())  # fused Adam mis-reads non-contiguous grads (torch 2.13)
            b[2].append(st["exp_avg"])
            b[3].append(st["exp_avg_sq"])
            b[4].append(st["step"])
    for (lr, beta1, beta2, eps, wd, decoupled), (ps, gs, ms, vs, steps) in buckets.items():
        functional_adam(
            ps, gs, ms, vs, [], steps,
            foreach=False, capturable=False, differentiable=False, fused=True,
            grad_scale=None, found_inf=found_inf, has_complex=False, decoupled_weight_decay=decoupled,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd, eps=eps, maximize=False,
        )
