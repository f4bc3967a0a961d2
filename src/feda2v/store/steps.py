"""The training step of each generator kind: one grouped computation over all active keys.

Each step function receives the store, a batch already laid out per key ([K, n_max, ...], see
``grouping.py``) and the node's ``Visit``; it computes the losses for every active key at once from
the keys' stacked parameters, takes gradients w.r.t. those stacked tensors, checks losses and
gradients finite on the device (``Visit.check``, one check per update), and updates every key's own optimizer(s) with
one fused Adam(W) call per role, which the visit's found-inf flag vetoes. It returns the per-key
losses as one device tensor [K, len(kind.metrics)]. No step reads a device value on the host: a
visit's losses and its non-finite verdict are read once, by ``Visit.finish``. The store owns the
modules, the optimizers and the parameter banks; these functions only read them through the store.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from feda2v.errors import NonFiniteLossError
from feda2v.models.losses import (
    beta_schedule,
    gan_d_loss_per_sample,
    gan_g_loss_per_sample,
    output_nll_per_sample,
    r1_per_sample,
    vae_kl_per_sample,
    vae_kl_to_prior_per_sample,
    vae_recon_per_sample,
)
from feda2v.models.generators import OUTPUT_LOG_VAR, output_log_var
from feda2v.profiling.ranges import step_range
from feda2v.store.grouping import Grouping
from feda2v.store.optim import step_tensor
# `GeneratorStore` appears in annotations only (never evaluated): store.py imports this module.


GENERATOR, DISCRIMINATOR = "generator", "discriminator"
VAE_METRICS = ("loss", "recon", "kl", "beta")  # the columns of vae_step's result, in this order
GAN_METRICS = ("g_loss", "d_loss")  # gan_step's
CHECKS = ("loss", "gradient", "discriminator loss", "generator loss")  # what a failing check names


class Visit:
    """One node's visit to a store: any number of steps (``step``), then one read-back (``finish``).

    Why: on CUDA every read of a device value on the host (``bool(t)``, ``.item()``, ``.tolist()``)
    waits for every queued kernel, so the host cannot queue the next step while the device runs
    this one. A visit keeps on the device what its steps must report:

    - per-key loss sums in float64, added in step order (the same sums Python floats made);
    - ``found_inf``, float32 0/1, handed to every fused Adam(W) update of the visit: the kernel
      leaves parameters, moments and step counts untouched while it is 1. The visit's first
      non-finite loss or gradient sets it and nothing clears it, so from that check on no update
      lands on any key: the store ends the visit as it was before the failing step (an alternating
      GAN step's D update that came before its failing G check excepted, as before);
    - per key, the check of the visit's first failure, and the number of steps that ended with
      the flag set (from which ``finish`` tells the failing step), for the message.

    ``finish()`` copies them to the host at once: per-key mean losses, or NonFiniteLossError naming
    the key(s), the check, the step, the node and the round. A visit that failed still runs its
    remaining steps (their updates vetoed) until the node finishes it.
    """

    def __init__(self, store: GeneratorStore, node: str, round_: int):
        self.store, self.node, self.round = store, str(node), int(round_)
        self.lr_scale = store.spec.optimizer.lr_scale(self.round)  # every update of the visit: one round's lr
        dev, k = store.device, len(store.keys)
        self.metrics: tuple[str, ...] = store._kind.metrics
        m = len(self.metrics)
        # what finish() reads back, in one buffer (one copy to the host, no gathering):
        # [K * m] loss sums | [1] steps that ended flagged
        self._readback = torch.zeros(k * m + 1, dtype=torch.float64, device=dev)
        self._sums = self._readback[:k * m].view(k, m)
        self._flagged_steps = self._readback[-1]
        self.found_inf = torch.zeros((), dtype=torch.float32, device=dev)
        # per check signature, the values of its last check made while nothing had failed yet:
        # the first failing check's are still there when finish() names its keys (see check)
        self._last_clean: dict[tuple, Tensor] = {}
        self._counts = [0] * k  # steps per key (the layout is known on the host)
        self._order: list[int] = []  # key rows in the order they first stepped (the result's order)
        self._spread: Tensor | None = None  # this step: [K_all] rows of [active..., zero row]; None = all active
        self.steps = 0
        self._done = False

    def step(self, x: Tensor, y: Tensor, *, gen: torch.Generator) -> None:
        """One optimizer step for every key with samples in (x, y), queued on the store's device."""
        if self._done:
            raise RuntimeError("this visit is finished; start another with store.visit()")
        self.store._train_step(self, x, y, gen)

    def begin_step(self, rows: Sequence[int]) -> None:
        k_all = len(self._counts)
        if len(rows) == k_all:
            self._spread = None
        else:  # inactive keys read the appended zero row (computed on the host, copied, never waited for)
            pos = [len(rows)] * k_all
            for i, r in enumerate(rows):
                pos[r] = i
            self._spread = torch.tensor(pos).to(self._sums.device, non_blocking=True)
        for r in rows:
            if self._counts[r] == 0:
                self._order.append(r)
            self._counts[r] += 1

    def _full(self, t: Tensor) -> Tensor:
        """[K_active, ...] -> [K_all, ...] (zeros for inactive keys), by a gather: no scatter."""
        if self._spread is None:
            return t
        return torch.cat([t, t.new_zeros((1,) + tuple(t.shape[1:]))]).index_select(0, self._spread)

    def check(self, *groups: tuple[str, Tensor]) -> None:
        """Flag non-finite values on the device, no host read: ``groups`` = (what, values [K] or
        [K, m] per active key), in the order they were once checked one by one, checked in one go.

        The same verdict as checking them in turn: if the flag was already set nothing is named;
        else the first group with a non-finite value names its keys (those non-finite in it) and
        sets the flag. The step pays for the flag only (one fused finiteness check into
        ``found_inf``); the naming is left to ``finish``: each check signature keeps its values
        while the visit had not failed before it, so after a failure exactly one signature holds
        non-finite values, those of the failing check (nothing overwrites them once flagged)."""
        cols = [v.detach() if v.dim() == 2 else v.detach().reshape(v.shape[0], -1) for _, v in groups]
        sig = tuple((what, c.shape[1]) for (what, _), c in zip(groups, cols))
        values = self._full(torch.cat(cols, 1))  # [K_all, sum of widths], a fresh tensor
        prev = self._last_clean.get(sig)
        self._last_clean[sig] = torch.where(self.found_inf.eq(0), values, 0.0 if prev is None else prev)
        # torch's fused check: found_inf = 1 if any value is non-finite, never cleared (it also
        # scales ``values`` in place by 1.0, which changes no finite value)
        torch._amp_foreach_non_finite_check_and_unscale_([values], self.found_inf, self.store._unit(values.device))

    def end_step(self, stats: Tensor) -> None:
        self._sums += self._full(stats.detach().to(torch.float64))
        self._flagged_steps += self.found_inf  # the failing step and every later one
        self.steps += 1

    def finish(self) -> dict[str, dict[str, float]]:
        """Per-key mean losses over the visit's steps ({key: {metric: mean}}, keys in the order they
        first stepped), read back in ONE device-to-host copy; NonFiniteLossError if any loss or
        gradient of the visit was not finite (the store then holds no state from that step on)."""
        if self._done:
            raise RuntimeError("this visit is already finished")
        self._done = True
        if not self.steps:
            return {}
        k, m = self._sums.shape
        host = self._readback.cpu().tolist()  # the visit's one sync
        sums, flagged = host[:k * m], host[-1]
        keys = self.store.keys
        if flagged:  # error path: it may read the device again
            what, failed = self._first_failure()
            self._drop_vetoed_state()
            raise NonFiniteLossError([keys[i] for i in failed], self.node, self.round, what,
                                     step=self.steps - int(flagged) + 1, steps=self.steps)
        return {keys[r]: {name: sums[r * m + j] / self._counts[r] for j, name in enumerate(self.metrics)}
                for r in self._order}

    def _first_failure(self) -> tuple[str, list[int]]:
        """(what the visit's first failing check checked, the rows of its keys non-finite in that
        group): the one check signature whose kept values are non-finite."""
        for sig, values in self._last_clean.items():
            bad = ~values.isfinite()
            if bool(bad.any()):
                start = 0
                for what, width in sig:
                    group = bad[:, start:start + width].any(1)
                    if bool(group.any()):
                        return what, group.nonzero().flatten().tolist()
                    start += width
        raise AssertionError("a flagged visit keeps its failing check's values")

    def _drop_vetoed_state(self) -> None:
        # A vetoed update of a key that had never stepped still made its (zero) optimizer state,
        # lazily, as torch does: drop it, so the store is exactly as before. (Error path: it may read.)
        for opt in self.store._optims.values():
            for p in [p for p, st in opt.state.items() if st and float(st["step"]) == 0]:
                del opt.state[p]


def stacked_grads(loss: Tensor, stacked: Mapping[str, Tensor], retain_graph: bool = False
                  ) -> tuple[list[Tensor], tuple[str, Tensor]]:
    """Gradients w.r.t. the stacked [K, ...] tensors (one per name, not one per leaf, in the
    role's parameter order), laid out for the fused update (contiguous), and the ``Visit.check``
    group that checks them: ("gradient", the bias gradients side by side [K, sum of widths]).

    A bias gradient is the sum of its layer's output gradients, so it is non-finite iff one of
    them is; the weight gradients are those same output gradients times finite inputs. Checking
    the (tiny) bias gradients therefore catches a non-finite backward without a pass over every
    weight gradient (which would cost as much as the optimizer's read of them)."""
    names = list(stacked)
    gs = torch.autograd.grad(loss, [stacked[n] for n in names], retain_graph=retain_graph)
    bias = [g if g.dim() == 2 else g.flatten(1) for n, g in zip(names, gs) if n.endswith(".bias")]
    # torch's fused CPU Adam reads memory linearly and silently mixes elements of a
    # non-contiguous grad, so each is laid out like its parameter (a no-op for ours).
    return [g.contiguous() for g in gs], ("gradient", torch.cat(bias, 1) if bias else gs[0].new_zeros(len(gs[0]), 0))


def _step_or_zero(store: GeneratorStore, key: str, role: str) -> Tensor:
    t = step_tensor(store._optims[key, role])
    return torch.zeros((), dtype=torch.float32, device=store.device) if t is None else t.to(torch.float32)


def vae_step(store: GeneratorStore, grp: Grouping, keys: list[str], xs: Tensor, cs: Tensor, eps: Tensor,
             visit: Visit, *, gen: torch.Generator | None = None) -> Tensor:
    """One VAE update of every active key; [K, 4] = VAE_METRICS per key."""
    with step_range("generator_step/forward"):
        template = store._modules[keys[0], GENERATOR]
        params = store._stacked(grp.active, GENERATOR)
        # gen: the batch's generator, for architectures with dropout (drawn after the noise)
        recon, mu, logvar = template.forward_stacked(params, xs, cs, eps, gen=gen)
        rec = grp.masked_mean(vae_recon_per_sample(recon, xs))
        if getattr(template, "conditional_prior", False):  # KL to the learned p(z | c), trained with the rest
            kl = grp.masked_mean(vae_kl_to_prior_per_sample(mu, logvar, *template.prior_stacked(params, cs)))
        else:
            kl = grp.masked_mean(vae_kl_per_sample(mu, logvar))
        # each key's step count: from the step bank of the keys' cached update in one operation,
        # else (the first step over these keys, after a reset or a load) key by key
        update = store._cached_update(GENERATOR, grp.active)
        steps = None if update is None else update.first_steps()
        if steps is None:
            steps = torch.stack([_step_or_zero(store, k, GENERATOR) for k in keys]).to(rec.device)
        beta = beta_schedule(steps, store.spec.beta_max, store.spec.beta_warmup_steps)
        loss = rec + beta * kl
        objective = loss  # the reported loss stays the ELBO's; the output variance's fit is added to the gradient
        if OUTPUT_LOG_VAR in params:
            objective = loss + grp.masked_mean(
                output_nll_per_sample(recon, xs, output_log_var(params[OUTPUT_LOG_VAR]).unsqueeze(1)))
    with step_range("generator_step/backward"):
        grads, grad_check = stacked_grads(objective.sum(), params)
    visit.check(("loss", objective), grad_check)  # both before the update they veto
    with step_range("generator_step/optimizer"):
        store._apply_update(GENERATOR, grp.active, grads, visit.found_inf, update=update, lr_scale=visit.lr_scale)
    return torch.stack([loss, rec, kl, beta], dim=1).detach()


def gan_step(store: GeneratorStore, grp: Grouping, keys: list[str], xs: Tensor, cs: Tensor, zs: Tensor,
             visit: Visit, *, gen: torch.Generator | None = None) -> Tensor:
    """One GAN update of every active key, by the spec's schedule (``spec.gan``); [K, 2] = GAN_METRICS.

    Alternating (the default, as in Goodfellow et al. 2014 and every common implementation):
    ``d_steps`` discriminator updates, then ``g_steps`` generator updates against the UPDATED
    discriminator. The first D step uses the batch's noise ``zs``; later steps draw fresh noise
    from ``gen`` (the node's noise stream, so resume stays exact). The last D step's fakes are
    kept with their generator graph, so the first G step re-scores those same samples with the
    new D instead of running G again. Each gradient pass takes only what its update needs: the D
    step differentiates w.r.t. D's weights (fakes detached, real inputs constant except for R1's
    input gradient); the G step w.r.t. G's weights through D's input gradient, with D's weights
    constant, so no D weight gradient is computed there (see ``functional.py``).
    Every loss is checked finite before its own update (which the check vetoes); the D update is
    applied before the G loss exists, so a G loss that becomes non-finite only through that D
    update leaves it applied.
    """
    if store.spec.gan.schedule == "simultaneous":
        return _gan_simultaneous(store, grp, keys, xs, cs, zs, visit, gen)
    return _gan_alternating(store, grp, keys, xs, cs, zs, visit, gen)


vae_step.metrics = VAE_METRICS
gan_step.metrics = GAN_METRICS


def _fresh_noise(store: GeneratorStore, grp: Grouping, gen: torch.Generator | None) -> Tensor:
    if gen is None:
        raise ValueError("more than one GAN step per batch needs the noise generator (gen=)")
    return grp.pad(store._noise(grp.batch, gen))


def _d_step(store: GeneratorStore, grp: Grouping, keys: list[str], xs: Tensor, cs: Tensor, zs: Tensor,
            visit: Visit, keep_fake: bool, gen: torch.Generator | None):
    """One discriminator update; returns (d_loss [K], fakes with G's graph and G's stacked params or None)."""
    gs = store.spec.gan
    g_tmpl, d_tmpl = store._modules[keys[0], GENERATOR], store._modules[keys[0], DISCRIMINATOR]
    n = xs.shape[1]
    with step_range("generator_step/forward"):
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
    with step_range("generator_step/backward"):
        d_grads, grad_check = stacked_grads(d_loss.sum(), d_params)
    visit.check(("discriminator loss", d_loss), grad_check)
    with step_range("generator_step/optimizer"):
        store._apply_update(DISCRIMINATOR, grp.active, d_grads, visit.found_inf, lr_scale=visit.lr_scale)
    return d_loss.detach(), ((fake, g_params) if keep_fake else None)


def _g_step(store: GeneratorStore, grp: Grouping, keys: list[str], cs: Tensor, zs: Tensor | None,
            visit: Visit, kept, gen: torch.Generator | None) -> Tensor:
    """One generator update against the current D; ``kept`` = (fakes, G params) from the D step."""
    g_tmpl, d_tmpl = store._modules[keys[0], GENERATOR], store._modules[keys[0], DISCRIMINATOR]
    with step_range("generator_step/forward"):
        if kept is None:
            g_params = store._stacked(grp.active, GENERATOR)
            fake = g_tmpl.forward_stacked(g_params, zs, cs, gen=gen)
        else:
            fake, g_params = kept
        d_params = store._stacked(grp.active, DISCRIMINATOR, grad=False)  # D constant: no D weight grads
        logit = d_tmpl.forward_stacked(d_params, fake, cs, gen=gen)
        g_loss = grp.masked_mean(gan_g_loss_per_sample(logit, store.spec.gan.loss))
    with step_range("generator_step/backward"):
        g_grads, grad_check = stacked_grads(g_loss.sum(), g_params)
    visit.check(("generator loss", g_loss), grad_check)
    with step_range("generator_step/optimizer"):
        store._apply_update(GENERATOR, grp.active, g_grads, visit.found_inf, lr_scale=visit.lr_scale)
    return g_loss.detach()


def _gan_alternating(store, grp, keys, xs, cs, zs, visit, gen) -> Tensor:
    gs = store.spec.gan
    kept = None
    for i in range(gs.d_steps):
        z = zs if i == 0 else _fresh_noise(store, grp, gen)
        d_loss, kept = _d_step(store, grp, keys, xs, cs, z, visit, i == gs.d_steps - 1, gen)
    for j in range(gs.g_steps):
        g_loss = _g_step(store, grp, keys, cs, None if j == 0 else _fresh_noise(store, grp, gen),
                         visit, kept if j == 0 else None, gen)
    return torch.stack([g_loss, d_loss], dim=1)


def _gan_simultaneous(store, grp, keys, xs, cs, zs, visit, gen) -> Tensor:
    # Both roles' losses and gradients are computed (and checked) before either optimizer steps
    # (so a non-finite loss vetoes both), from one D forward over real and fake samples.
    gs = store.spec.gan
    with step_range("generator_step/forward"):
        g_tmpl, d_tmpl = store._modules[keys[0], GENERATOR], store._modules[keys[0], DISCRIMINATOR]
        g_params = store._stacked(grp.active, GENERATOR)
        d_params = store._stacked(grp.active, DISCRIMINATOR)
        fake = g_tmpl.forward_stacked(g_params, zs, cs, gen=gen)
        n = xs.shape[1]
        logits = d_tmpl.forward_stacked(d_params, torch.cat([xs, fake], 1), torch.cat([cs, cs], 1), gen=gen)
        real_logit, fake_logit = logits[:, :n], logits[:, n:]
        d_loss = grp.masked_mean(gan_d_loss_per_sample(real_logit, fake_logit, gs.loss))
        g_loss = grp.masked_mean(gan_g_loss_per_sample(fake_logit, gs.loss))
    with step_range("generator_step/backward"):
        # D's gradient holds the fake samples fixed (= detached); G's holds D fixed.
        d_grads, d_check = stacked_grads(d_loss.sum(), d_params, retain_graph=True)
        g_grads, g_check = stacked_grads(g_loss.sum(), g_params)
    visit.check(("loss", torch.stack([g_loss, d_loss], 1)), d_check, g_check)
    with step_range("generator_step/optimizer"):
        store._apply_update(DISCRIMINATOR, grp.active, d_grads, visit.found_inf, lr_scale=visit.lr_scale)
        store._apply_update(GENERATOR, grp.active, g_grads, visit.found_inf, lr_scale=visit.lr_scale)
    return torch.stack([g_loss, d_loss], dim=1).detach()
