"""The one optimizer factory, and the grouped update that steps many keys' optimizers in one call.

Every (key, role) owns a real ``torch.optim`` optimizer built by ``make_optimizer``; its ``.state``
holds that key's moments and step. ``grouped_step`` performs exactly the update those optimizers'
``step()`` would, but for all active keys in one call of torch's fused functional Adam(W)
(one vectorised pass per tensor; on CPU ~3x faster than the foreach path, which matters because a
per_class store has K times the parameters of a unified one), reading and writing each
optimizer's own state entries.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from feda2v.config.schema import LR_SCHEDULES
from feda2v.errors import ConfigError



_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
# The cosine schedule's last-round lr, as a fraction of the configured one: the decay averages
# out the late steps' noise in the weights, and the floor keeps the last rounds learning.
COSINE_FINAL_FRACTION = 0.1


def lr_scale(schedule: str, round_: int, rounds: int) -> float:
    """The factor on the configured lr for the steps of round ``round_`` of ``rounds`` (1-based).

    Per round, not per step: every key of a store, whatever its own step count (a per_class key
    steps only where its class is), and every node of the round, with one fused update per step,
    get the same lr; and a resumed run knows it from the round alone. ``cosine``: half a cosine
    from 1 down to COSINE_FINAL_FRACTION, read at the round's middle."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ConfigError(f"generator.optimizer.schedule: {schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    t = (min(max(int(round_), 1), int(rounds)) - 0.5) / int(rounds)
    return COSINE_FINAL_FRACTION + (1 - COSINE_FINAL_FRACTION) * 0.5 * (1 + math.cos(math.pi * t))


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


def _hyper(opt: torch.optim.Optimizer) -> tuple:
    """The param group's update hyper-parameters (what decides whether two optimizers can share
    one fused call); refuses what the fused path does not implement."""
    g = opt.param_groups[0]
    if len(opt.param_groups) != 1 or g["amsgrad"] or g["maximize"] or not g["fused"]:
        raise ValueError("grouped_step supports the factory's optimizers only (one group, no amsgrad)")
    beta1, beta2 = g["betas"]
    return (float(g["lr"]), float(beta1), float(beta2), float(g["eps"]), float(g["weight_decay"]),
            bool(g["decoupled_weight_decay"]))


def _fused_call(hyper: tuple, ps: list, gs: list, ms: list, vs: list, steps: list, found_inf: Tensor | None,
                count_steps: bool = True, lr_scale: float = 1.0) -> None:
    """Exactly what ``torch.optim.adam.adam(fused=True)`` does for one device and dtype (steps += 1,
    then torch's fused kernel, then steps -= found_inf), without its per-call regrouping of the
    lists by device and dtype (the store's tensors are all float32 on one device).
    ``count_steps=False``: the caller has already added ``1 - found_inf`` to the steps (the same
    values where it matters: the kernel reads them only when found_inf is 0).
    ``lr_scale``: the schedule's factor on the group's lr (``lr_scale()``); the optimizers keep the
    configured lr, so a reset or a checkpoint holds the factory's hyper-parameters in every round."""
    lr, beta1, beta2, eps, wd, decoupled = hyper
    lr = lr * lr_scale
    if count_steps:
        torch._foreach_add_(steps, 1)
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel(ps, gs, ms, vs, [], steps, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps,
           maximize=False, grad_scale=None, found_inf=found_inf)
    if count_steps and found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


@torch.no_grad()
def grouped_step(items: Sequence[tuple[torch.optim.Optimizer, Sequence[Tensor], Sequence[Tensor]]],
                 found_inf: Tensor | None = None, lr_scale: float = 1.0) -> None:
    """One fused Adam(W) update for many optimizers: ``items`` = [(optimizer, params, grads), ...].

    Optimizers whose param-group hyper-parameters are equal (the normal case: one factory) are
    updated in a single fused call; differing ones (e.g. after a user changed an lr) get their own.
    ``found_inf`` (a 0-d float tensor, 1.0 = skip): torch's fused semantics, no update and no step.
    (The store's training step uses ``FusedUpdate``, which builds these lists once.)
    """
    buckets: dict[tuple, tuple[list, list, list, list, list]] = {}
    for opt, params, grads in items:
        b = buckets.setdefault(_hyper(opt), ([], [], [], [], []))
        for p, grad in zip(params, grads):
            st = _state(opt, p)
            b[0].append(p)
            b[1].append(grad.contiguous())  # fused Adam mis-reads non-contiguous grads (torch 2.13)
            b[2].append(st["exp_avg"])
            b[3].append(st["exp_avg_sq"])
            b[4].append(st["step"])
    for hyper, (ps, gs, ms, vs, steps) in buckets.items():
        _fused_call(hyper, ps, gs, ms, vs, steps, found_inf, lr_scale=lr_scale)


class FusedUpdate:
    """The fused Adam(W) update of one role for a fixed list of keys (a step's active keys), with
    its argument lists built once and reused by every later step over the same keys.

    Built from each key's optimizer and its parameters (one list per key, the same names in the
    same order for every key); called with the gradients as the stacked per-name tensors
    ``[K, ...]`` the step's backward produced, so a step does no per-key Python work beyond
    ``valid()``. The lists stay right while every key's optimizer keeps the same state objects
    (a reset clears them, a load or ``to()`` replaces them) and the same hyper-parameters;
    ``valid()`` checks both, one state entry per key (the store replaces a key's state whole).

    ``step_bank`` ([K_all, n params], float32, on the parameters' device) and ``rows`` (the keys'
    rows in it): each state's ``step`` becomes the 0-d view ``step_bank[row, j]`` (its value
    copied in), so counting a step is one operation on the bank instead of one per parameter,
    and the optimizers still hold one step tensor per parameter, as torch's own.
    """

    def __init__(self, optims: Sequence[torch.optim.Optimizer], params: Sequence[Sequence[Tensor]],
                 step_bank: Tensor | None = None, rows: Sequence[int] | None = None):
        self._optims = list(optims)
        self._hypers = [_hyper(o) for o in self._optims]
        k, n = len(self._optims), len(params[0])
        # name-major, like the gradients: entry j * k + i is key i's parameter j
        flat_p = [params[i][j] for j in range(n) for i in range(k)]
        flat_st = [_state(self._optims[i], params[i][j]) for j in range(n) for i in range(k)]
        self._bank = step_bank
        if step_bank is not None:
            rows = list(rows)
            for j in range(n):
                for i in range(k):
                    st, view = flat_st[j * k + i], step_bank[rows[i], j]
                    if st["step"].data_ptr() != view.data_ptr():
                        view.copy_(st["step"])
                        st["step"] = view
            self._all_rows = len(rows) == step_bank.shape[0]
            self._rows_idx = torch.tensor(rows, device=step_bank.device)
            self._ones = torch.ones(k, n, dtype=step_bank.dtype, device=step_bank.device)
        self._first = [(params[i][0], flat_st[i], flat_st[i]["step"]) for i in range(k)]
        self._row_cache: dict[int, tuple[Tensor, Sequence[Tensor]]] = {}
        groups: dict[tuple, list[int]] = {}
        for i, h in enumerate(self._hypers):
            groups.setdefault(h, []).append(i)
        self._calls = []
        for hyper, keys in groups.items():
            pos = None if len(groups) == 1 else [j * k + i for j in range(n) for i in keys]
            pick = (lambda xs: xs) if pos is None else (lambda xs, pos=pos: [xs[q] for q in pos])
            self._calls.append((hyper, pos, pick(flat_p), [st["exp_avg"] for st in pick(flat_st)],
                                [st["exp_avg_sq"] for st in pick(flat_st)], [st["step"] for st in pick(flat_st)]))

    def _rows(self, g: Tensor, kept: set[int]) -> Sequence[Tensor]:
        # a gradient buffer the caller reuses step after step (``kept``) arrives as the same tensor
        # object: its per-key row views are made once; any other gradient is split afresh
        if id(g) not in kept:
            return g.unbind(0)
        cached = self._row_cache.get(id(g))
        if cached is not None and cached[0] is g:
            return cached[1]
        rows = g.unbind(0)
        self._row_cache[id(g)] = (g, rows)
        return rows

    def first_steps(self) -> Tensor | None:
        """[K] float32: each key's step count (its first parameter's, as ``step_tensor``), read
        from the step bank in one operation (None without a bank)."""
        if self._bank is None:
            return None
        bank = self._bank if self._all_rows else self._bank.index_select(0, self._rows_idx)
        return bank[:, 0].clone() if bank is self._bank else bank[:, 0]

    def rows_index(self) -> Tensor | None:
        """The keys' rows in the store's banks as a device index tensor, made once with the update;
        None when the update covers every row (the banks themselves need no indexing)."""
        return None if self._all_rows else self._rows_idx

    def valid(self) -> bool:
        for opt, hyper, (p, st, step) in zip(self._optims, self._hypers, self._first):
            if opt.state.get(p) is not st or st.get("step") is not step or _hyper(opt) != hyper:
                return False
        return True

    @torch.no_grad()
    def __call__(self, grads: Sequence[Tensor], found_inf: Tensor | None = None,
                 kept: Iterable[Tensor] = (), lr_scale: float = 1.0) -> None:
        """``grads``: per parameter name, the stacked gradient [K, ...] (contiguous: torch's fused
        CPU Adam reads memory linearly and would mix elements of a non-contiguous one); ``kept``:
        the caller's gradient buffers, the same objects at every step."""
        kept_ids = {id(t) for t in kept}
        flat = [row for g in grads for row in self._rows(g, kept_ids)]
        banked = self._bank is not None and len(self._calls) == 1
        if banked:  # every active key's steps += 1 - found_inf, in one operation
            one = 1 if found_inf is None else 1 - found_inf
            if self._all_rows:
                self._bank.add_(one)
            else:
                self._bank.index_add_(0, self._rows_idx, self._ones if found_inf is None else self._ones * one)
        for hyper, pos, ps, ms, vs, steps in self._calls:
            gs = flat if pos is None else [flat[q] for q in pos]
            _fused_call(hyper, ps, gs, ms, vs, steps, found_inf, count_steps=not banked, lr_scale=lr_scale)
