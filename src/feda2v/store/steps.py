"""The training step of each generator kind: one grouped computation over all active keys.

Each step function receives the store and a batch already laid out per key ([K, n_max, ...],
see ``grouping.py``), computes the losses for every active key at once from the keys' stacked
parameters, takes gradients w.r.t. those stacked tensors, checks them finite, and updates every
key's own optimizer(s) with one fused Adam(W) call per role. The store owns the modules, the
optimizers and the parameter banks; these functions only read them through the store.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from feda2v.errors import NonFiniteLossError
from feda2v.models.losses import (
    beta_schedule,
    gan_d_loss_per_sample,
    gan_g_loss_per_sample,
    r1_per_sample,
    vae_kl_per_sample,
    vae_recon_per_sample,
)
from feda2v.store.grouping import Grouping
from feda2v.store.optim import step_tensor
# `GeneratorStore` appears in annotations only (never evaluated): store.py imports this module.


GENERATOR, DISCRIMINATOR = "generator", "discriminator"


def raise_non_finite(values: Tensor, keys: Sequence[str], node: str, round_: int, what: str) -> None:
    finite = torch.isfinite(values)
    if finite.dim() > 1:
        finite = finite.all(dim=1)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0, 0])
        raise NonFiniteLossError(keys[bad], node, round_, what)


def stacked_grads(loss: Tensor, stacked: Mapping[str, Tensor], keys: Sequence[str], node: str, round_: int,
                  retain_graph: bool = False) -> list[Tensor]:
    """Gradients w.r.t. the stacked [K, ...] tensors (one per name, not one per leaf, in the
    role's parameter order), checked finite, laid out for the fused update (contiguous)."""
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
    # torch's fused CPU Adam reads memory linearly and silently mixes elements of a
    # non-contiguous grad, so each is laid out like its parameter (a no-op for ours).
    return [g.contiguous() for g in gs]


def _step_or_zero(store: GeneratorStore, key: str, role: str) -> Tensor:
    t = step_tensor(store._optims[key, role])
    return torch.zeros((), dtype=torch.float32, device=store.device) if t is None else t.to(torch.float32)


def vae_step(store: GeneratorStore, grp: Grouping, keys: list[str], xs: Tensor, cs: Tensor, eps: Tensor,
             node: str, round_: int, *, gen: torch.Generator | None = None) -> dict[str, dict[str, float]]:
    with record_function("generator_step/forward"):
        template = store._modules[keys[0], GENERATOR]
        params = store._stacked(grp.active, GENERATOR)
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
        store._apply_update(GENERATOR, grp.active, grads)
    stats = torch.stack([loss, rec, kl, beta], dim=1).detach().tolist()
    return {k: {"loss": s[0], "recon": s[1], "kl": s[2], "beta": s[3]} for k, s in zip(keys, stats)}


def gan_step(store: GeneratorStore, grp: Grouping, keys: list[str], xs: Tensor, cs: Tensor, zs: Tensor,
             node: str, round_: int, *, gen: torch.Generator | None = None) -> dict[str, dict[str, float]]:
    """One GAN update of every active key, by the spec's schedule (``spec.gan``).

    Alternating (the default, as in Goodfellow et al. 2014 and every common implementation):
    ``d_steps`` discriminator updates, then ``g_steps`` generator updates against the UPDATED
    discriminator. The first D step uses the batch's noise ``zs``; later steps draw fresh noise
    from ``gen`` (the node's noise stream, so resume stays exact). The last D step's fakes are
    kept with their generator graph, so the first G step re-scores those same samples with the
    new D instead of running G again. Each gradient pass takes only what its update needs: the D
    step differentiates w.r.t. D's weights (fakes detached, real inputs constant except for R1's
    input gradient); the G step w.r.t. G's weights through D's input gradient, with D's weights
    constant, so no D weight gradient is computed there (see ``functional.py``).
    Every loss is checked finite before its own update; the D update is applied before the G loss
    exists, so a G loss that becomes non-finite only through that D update leaves it applied.
    """
    if store.spec.gan.schedule == "simultaneous":
        return _gan_simultaneous(store, grp, keys, xs, cs, zs, node, round_, gen)
    return _gan_alternating(store, grp, keys, xs, cs, zs, node, round_, gen)


def _fresh_noise(store: GeneratorStore, grp: Grouping, gen: torch.Generator | None) -> Tensor:
    if gen is None:
        raise ValueError("more than one GAN step per batch needs the noise generator (gen=)")
    return grp.pad(store._noise(grp.batch, gen))


def _d_step(store: GeneratorStore, grp: Grouping, keys: list[str], xs: Tensor, cs: Tensor, zs: Tensor,
            node: str, round_: int, keep_fake: bool, gen: torch.Generator | None):
    """One discriminator update; returns (d_loss [K], fakes with G's graph and G's stacked params or None)."""
    gs = store.spec.gan
    g_tmpl, d_tmpl = store._modules[keys[0], GENERATOR], store._modules[keys[0], DISCRIMINATOR]
    n = xs.shape[1]
    with record_function("generator_step/forward"):
        g_params = store._stacked(grp.active, GENERATOR, grad=keep_fake)
        if keep_fake:
            fake = g_tmpl.forward_stacked(g_params, zs, cs, gen=gen)
        else:
            with torch.no_grad():
                fake = g_tmpl.forward_stacked(g_params, zs, cs, gen=gen)
        d_params = store._stacked(grp.active, DISCRIMINATOR)  # a StackedParams (input_grads_only below)
        if gs.r1_gamma > 0:  # real and fake apart: R1's input-gradient pass then runs over the real half only
            real = xs.detach().requires_grad_(True)
            real_logit = d_tmpl.forward_stacked(d_params, real, cs, gen=gen)
            fake_logit = d_tmpl.forward_stacked(d_params, fake.detach(), cs, gen=gen)
        else:  # one D forward over both halves
            logits = d_tmpl.forward_stacked(d_params, torch.cat([xs, fake.detach()], 1), torch.cat([cs, cs], 1), gen=gen)
            real_logit, fake_logit = logits[:, :n], logits[:, n:]
        per_sample = gan_d_loss_per_sample(real_logit, fake_logit, gs.loss)
        if gs.r1_gamma > 0:
            # R1 (Mescheder et al., 2018): penalise D's gradient on real data, which pulls D's
            # landscape flat around the data and makes the alternating game converge locally.
            d_params.input_grads_only = True  # this pass needs D's input gradient, not its weights'
            try:
                (grad_real,) = torch.autograd.grad((real_logit * grp.mask).sum(), real, create_graph=True)
            finally:
                d_params.input_grads_only = False
            per_sample = per_sample + (0.5 * gs.r1_gamma) * r1_per_sample(grad_real)
        d_loss = grp.masked_mean(per_sample)
    raise_non_finite(d_loss, keys, node, round_, "discriminator loss")
    with record_function("generator_step/backward"):
        d_grads = stacked_grads(d_loss.sum(), d_params, keys, node, round_)
    with record_function("generator_step/optimizer"):
        store._apply_update(DISCRIMINATOR, grp.active, d_grads)
    return d_loss.detach(), ((fake, g_params) if keep_fake else None)


def _g_step(store: GeneratorStore, grp: Grouping, keys: list[str], cs: Tensor, zs: Tensor | None,
            node: str, round_: int, kept, gen: torch.Generator | None) -> Tensor:
    """One generator update against the current D; ``kept`` = (fakes, G params) from the D step."""
    g_tmpl, d_tmpl = store._modules[keys[0], GENERATOR], store._modules[keys[0], DISCRIMINATOR]
    with record_function("generator_step/forward"):
        if kept is None:
            g_params = store._stacked(grp.active, GENERATOR)
            fake = g_tmpl.forward_stacked(g_params, zs, cs, gen=gen)
        else:
            fake, g_params = kept
        d_params = store._stacked(grp.active, DISCRIMINATOR, grad=False)  # D constant: no D weight grads
        logit = d_tmpl.forward_stacked(d_params, fake, cs, gen=gen)
        g_loss = grp.masked_mean(gan_g_loss_per_sample(logit, store.spec.gan.loss))
    raise_non_finite(g_loss, keys, node, round_, "generator loss")
    with record_function("generator_step/backward"):
        g_grads = stacked_grads(g_loss.sum(), g_params, keys, node, round_)
    with record_function("generator_step/optimizer"):
        store._apply_update(GENERATOR, grp.active, g_grads)
    return g_loss.detach()


def _gan_alternating(store, grp, keys, xs, cs, zs, node, round_, gen) -> dict[str, dict[str, float]]:
    gs = store.spec.gan
    kept = None
    for i in range(gs.d_steps):
        z = zs if i == 0 else _fresh_noise(store, grp, gen)
        d_loss, kept = _d_step(store, grp, keys, xs, cs, z, node, round_, i == gs.d_steps - 1, gen)
    for j in range(gs.g_steps):
        g_loss = _g_step(store, grp, keys, cs, None if j == 0 else _fresh_noise(store, grp, gen),
                         node, round_, kept if j == 0 else None, gen)
    stats = torch.stack([g_loss, d_loss], dim=1).tolist()
    return {k: {"g_loss": s[0], "d_loss": s[1]} for k, s in zip(keys, stats)}


def _gan_simultaneous(store, grp, keys, xs, cs, zs, node, round_, gen) -> dict[str, dict[str, float]]:
    # Both roles' losses and gradients are computed (and checked) before either optimizer steps
    # (so a non-finite loss changes nothing), from one D forward over real and fake samples.
    gs = store.spec.gan
    with record_function("generator_step/forward"):
        g_tmpl, d_tmpl = store._modules[keys[0], GENERATOR], store._modules[keys[0], DISCRIMINATOR]
        g_params = store._stacked(grp.active, GENERATOR)
        d_params = store._stacked(grp.active, DISCRIMINATOR)
        fake = g_tmpl.forward_stacked(g_params, zs, cs, gen=gen)
        n = xs.shape[1]
        logits = d_tmpl.forward_stacked(d_params, torch.cat([xs, fake], 1), torch.cat([cs, cs], 1), gen=gen)
        real_logit, fake_logit = logits[:, :n], logits[:, n:]
        d_loss = grp.masked_mean(gan_d_loss_per_sample(real_logit, fake_logit, gs.loss))
        g_loss = grp.masked_mean(gan_g_loss_per_sample(fake_logit, gs.loss))
    raise_non_finite(torch.stack([g_loss, d_loss], 1), keys, node, round_, "loss")
    with record_function("generator_step/backward"):
        # D's gradient holds the fake samples fixed (= detached); G's holds D fixed.
        d_grads = stacked_grads(d_loss.sum(), d_params, keys, node, round_, retain_graph=True)
        g_grads = stacked_grads(g_loss.sum(), g_params, keys, node, round_)
    with record_function("generator_step/optimizer"):
        store._apply_update(DISCRIMINATOR, grp.active, d_grads)
        store._apply_update(GENERATOR, grp.active, g_grads)
    stats = torch.stack([g_loss, d_loss], dim=1).detach().tolist()
    return {k: {"g_loss": s[0], "d_loss": s[1]} for k, s in zip(keys, stats)}
