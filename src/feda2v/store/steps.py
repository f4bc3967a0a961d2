"""The training step of each generator kind: one grouped computation over all active keys.

Each step function receives the store and a batch already laid out per key ([K, n_max, ...],
see ``grouping.py``), computes the losses for every active key at once from the keys' stacked
parameters, takes gradients w.r.t. those stacked tensors, checks them finite, and updates every
key's own optimizer(s) with one fused Adam(W) call per role. The store owns the modules, the
optimizers and the parameter banks; these functions only read them through the store.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from feda2v.errors import NonFiniteLossError
from feda2v.models.losses import (
    bce_logits_per_sample,
    beta_schedule,
    vae_kl_per_sample,
    vae_recon_per_sample,
)
from feda2v.store.grouping import Grouping
from feda2v.store.optim import grouped_step, step_tensor

if TYPE_CHECKING:
    from feda2v.store.store import GeneratorStore

GENERATOR, DISCRIMINATOR = "generator", "discriminator"


def raise_non_finite(values: Tensor, keys: Sequence[str], node: str, round_: int, what: str) -> None:
    finite = torch.isfinite(values)
    if finite.dim() > 1:
        finite = finite.all(dim=1)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0, 0])
        raise NonFiniteLossError(keys[bad], node, round_, what)


def stacked_grads(loss: Tensor, stacked: Mapping[str, Tensor], keys: Sequence[str], node: str, round_: int,
                  retain_graph: bool = False) -> list[list[Tensor]]:
    """Gradients w.r.t. the stacked [K, ...] tensors (one per name, not one per leaf), checked
    finite, then split per key (views): grads[k] follows that key's parameter order."""
    names = list(stacked)
    gs = torch.autograd.grad(loss, [stacked[n] for n in names], retain_graph=retain_graph)
    # A bias gradient is the sum of its layer's output gradients, so it is non-finite iff one of
    # them is; the weight gradients are those same output gradients times finite inputs. Checking
    # the (tiny) bias gradients therefore catches a non-finite backward without a pass over
    # every weight gradient (which would cost as much as the optimizer's read of them).
    bias = [g.flatten(1).sum(1) for n, g in zip(names, gs) if n.endswith(".bias")]
    if bias:
        per_key = torch.stack(bias, dim=1)
        if not bool(torch.isfinite(per_key).all()):
            raise_non_finite(per_key, keys, node, round_, "gradient")
    # Weight grads arrive transposed (from x @ W^T); torch's fused CPU Adam reads memory linearly
    # and silently mixes elements of a non-contiguous grad, so lay them out like the params.
    split = [g.contiguous().unbind(0) for g in gs]
    return [[split[j][i] for j in range(len(names))] for i in range(len(keys))]


def _step_or_zero(store: GeneratorStore, key: str, role: str) -> Tensor:
    t = step_tensor(store._optims[key, role])
    return torch.zeros((), dtype=torch.float32) if t is None else t.to(torch.float32)


def _update_items(store: GeneratorStore, keys: Sequence[str], role: str, grads: Sequence[Sequence[Tensor]]):
    return [(store._optims[k, role], [p for _, p in store._params[k, role]], g) for k, g in zip(keys, grads)]


def vae_step(store: GeneratorStore, grp: Grouping, keys: list[str], xs: Tensor, cs: Tensor, eps: Tensor,
             node: str, round_: int, *, gen: torch.Generator | None = None) -> dict[str, dict[str, float]]:
    with record_function("generator_step/forward"):
        template = store._modules[keys[0], GENERATOR]
        params = store._stacked(keys, GENERATOR)
        # gen: the batch's generator, for architectures with dropout (drawn after the noise)
        recon, mu, logvar = template.forward_stacked(params, xs, cs, eps, gen=gen)
        rec = grp.masked_mean(vae_recon_per_sample(recon, xs))
        kl = grp.masked_mean(vae_kl_per_sample(mu, logvar))
        steps = torch.stack([_step_or_zero(store, k, GENERATOR) for k in keys]).to(rec.device)
        beta = beta_schedule(steps, store.spec.beta_max, store.spec.beta_warmup_steps)
        loss = rec + beta * kl
    raise_non_finite(loss, keys, node, round_, "loss")
    with record_function("generator_step/backward"):
        grads = stacked_grads(loss.sum(), params, keys, node, round_)
    with record_function("generator_step/optimizer"):
        grouped_step(_update_items(store, keys, GENERATOR, grads))
    stats = torch.stack([loss, rec, kl, beta], dim=1).detach().tolist()
    return {k: {"loss": s[0], "recon": s[1], "kl": s[2], "beta": s[3]} for k, s in zip(keys, stats)}


def gan_step(store: GeneratorStore, grp: Grouping, keys: list[str], xs: Tensor, cs: Tensor, zs: Tensor,
             node: str, round_: int, *, gen: torch.Generator | None = None) -> dict[str, dict[str, float]]:
    # Simultaneous update: both roles' losses and gradients are computed (and checked) before
    # either role's optimizer steps, so a non-finite loss changes nothing.
    with record_function("generator_step/forward"):
        g_tmpl, d_tmpl = store._modules[keys[0], GENERATOR], store._modules[keys[0], DISCRIMINATOR]
        g_params = store._stacked(keys, GENERATOR)
        d_params = store._stacked(keys, DISCRIMINATOR)
        fake = g_tmpl.forward_stacked(g_params, zs, cs, gen=gen)
        n = xs.shape[1]
        logits = d_tmpl.forward_stacked(d_params, torch.cat([xs, fake], 1), torch.cat([cs, cs], 1), gen=gen)
        real_logit, fake_logit = logits[:, :n], logits[:, n:]
        d_loss = grp.masked_mean(bce_logits_per_sample(real_logit, 1.0) + bce_logits_per_sample(fake_logit, 0.0))
        g_loss = grp.masked_mean(bce_logits_per_sample(fake_logit, 1.0))  # non-saturating
    raise_non_finite(torch.stack([g_loss, d_loss], 1), keys, node, round_, "loss")
    with record_function("generator_step/backward"):
        # D's gradient holds the fake samples fixed (= detached); G's holds D fixed.
        d_grads = stacked_grads(d_loss.sum(), d_params, keys, node, round_, retain_graph=True)
        g_grads = stacked_grads(g_loss.sum(), g_params, keys, node, round_)
    with record_function("generator_step/optimizer"):
        grouped_step(_update_items(store, keys, DISCRIMINATOR, d_grads))
        grouped_step(_update_items(store, keys, GENERATOR, g_grads))
    stats = torch.stack([g_loss, d_loss], dim=1).detach().tolist()
    return {k: {"g_loss": s[0], "d_loss": s[1]} for k, s in zip(keys, stats)}
