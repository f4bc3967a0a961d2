"""Generator step vs its peer and the machine's limit, for VAE/cVAE/GAN (unified) at several batches.

Side by side in one run (the machine may be shared: only ratios measured together are claims):
- the store's step (``train_batch``: stacked parameters, custom grouped backward, fused AdamW);
- the peer: one plain ``nn.Module`` per role trained the textbook way (forward, ``backward()``,
  ``torch.optim.AdamW(fused=True)``) doing the same update (for the GAN the same alternating
  schedule, loss and R1 penalty);
- FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``: *useful* = what the plain step
  executes, *executed* = what the store's step executes (their ratio shows wasted gradient work);
- the float32 GEMM rate of this machine at the very GEMM shapes of the plain step (each recorded
  matmul replayed alone), and the share of it the store's step reaches per useful FLOP.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

from common import MovingAverage, extra_noise, make_batch, make_store
from feda2v.models.generators import gaussian_params
from feda2v.models.losses import vae_kl_per_sample, vae_kl_to_prior_per_sample

_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
          torch.ops.aten.baddbmm.default, torch.ops.aten.bmm.out}  # .out: the store's weight gradients


class _RecordGemms(TorchDispatchMode):
    """Records (op, argument shapes) of every matrix multiply that runs inside it."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS:
            out = kwargs.get("out")
            self.calls.append((func, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)],
                               None if out is None else tuple(out.shape)))
        return func(*args, **kwargs)


def replay_gemms(calls):
    """A function running the recorded GEMMs alone on random operands of their shapes (an ``out=``
    call into a buffer of its own, kept like the store keeps its gradient buffers)."""
    ops = [(op, [torch.randn(s) for s in shapes], {} if out is None else {"out": torch.empty(out)})
           for op, shapes, out in calls]
    return lambda: [op(*args, **kw) for op, args, kw in ops]


def _adamw(params, spec):
    o = spec.optimizer
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=True)


class PlainStep:
    """The peer: one key of the store (unified by default) as plain modules with their own fused
    torch AdamW; like the store's step it reports its losses (``.item()``, a textbook loop's log)."""

    def __init__(self, store, key: str = "unified"):
        self.spec = store.spec
        self.mods = {r: copy.deepcopy(store.module(key, r)) for r in store.roles}
        self.opts = {r: _adamw(m.parameters(), store.spec) for r, m in self.mods.items()}
        self.ema = MovingAverage(store.spec, self.mods["generator"].parameters())  # what the store samples
        self.steps = 0

    def _update(self, role, loss):
        self.opts[role].zero_grad(set_to_none=True)
        loss.backward()
        self.opts[role].step()
        if role == "generator":
            self.ema.update()

    def __call__(self, x, c, z, extra=()):
        """One step on (x, c) with noise z; ``extra``: the noise of the GAN's later updates
        (``common.extra_noise``), used in the store's order."""
        s = self.spec
        if s.type != "gan":
            m = self.mods["generator"]
            recon, mu, logvar = m(x, c if s.type == "cvae" else None, eps=z)
            rec = (recon - x).pow(2).sum(1).mean()
            kl = _kl_per_sample(m, mu, logvar, lambda: gaussian_params(m.prior(c))).mean()
            beta = s.beta_max * min(1.0, self.steps / s.beta_warmup_steps) if s.beta_warmup_steps else s.beta_max
            loss = rec + beta * kl
            self._update("generator", loss)
            self.losses = (loss.item(), rec.item(), kl.item())
        else:
            _check_schedule(s)
            G, D, gamma = self.mods["generator"], self.mods["discriminator"], s.gan.r1_gamma
            noise = iter(extra)
            for i in range(s.gan.d_steps):  # D updates; the last one's fakes keep G's graph for G's step
                last = i == s.gan.d_steps - 1
                with torch.set_grad_enabled(last):
                    fake = G(z if i == 0 else next(noise), c)
                real = x.detach().requires_grad_(gamma > 0)
                real_logit, fake_logit = D(real, c), D(fake.detach(), c)
                d_loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
                if gamma > 0:
                    (g,) = torch.autograd.grad(real_logit.sum(), real, create_graph=True)
                    d_loss = d_loss + gamma / 2 * g.pow(2).sum(1).mean()
                self._update("discriminator", d_loss)
            for p in D.parameters():
                p.requires_grad_(False)  # the G step takes no D weight gradients
            for j in range(s.gan.g_steps):
                g_loss = F.softplus(-D(fake if j == 0 else G(next(noise), c), c)).mean()
                self._update("generator", g_loss)
            for p in D.parameters():
                p.requires_grad_(True)
            self.losses = (g_loss.item(), d_loss.item())
        self.steps += 1


def _kl_per_sample(module, mu, logvar, prior_out):
    """The KL term the store's VAE step takes: to N(0, I), or, with a conditional prior, to p(z | c)
    (``prior_out()``: its (mean, log-variance), bounded as the model bounds them)."""
    if not module.conditional_prior:
        return vae_kl_per_sample(mu, logvar)
    return vae_kl_to_prior_per_sample(mu, logvar, *prior_out())


def _check_schedule(spec):
    # the peers are written for the default objective; another one would time a different update
    if spec.gan.schedule != "alternating" or spec.gan.loss != "nonsaturating":
        raise ValueError("the peers implement the alternating schedule with the non-saturating loss")


class LoopStep:
    """Peer: the naive loop (what the published system does): per key its own modules and its own
    AdamW, a Python loop over the keys in the batch, each trained on its own samples."""

    def __init__(self, store, key_of_sample):
        self.keys = [PlainStep(store, k) for k in store.keys]
        self.rows = [torch.nonzero(key_of_sample == i).squeeze(1) for i in range(len(store.keys))]

    def __call__(self, x, c, z, extra=()):
        for step, rows in zip(self.keys, self.rows):
            if rows.numel():
                step(x[rows], c[rows], z[rows], [e[rows] for e in extra])

    def first_generator(self):
        return dict(self.keys[0].mods["generator"].named_parameters())


class VmapStep:
    """Peer: the keys' modules stacked by ``torch.func.stack_module_state``, evaluated by
    ``vmap(functional_call)`` on the batch laid out per key ([K, n_max, ...], masked, as the store
    lays it out), one fused torch AdamW over the stacked parameters per role."""

    def __init__(self, store, grp):
        self.spec, self.mask, self.counts = store.spec, grp.mask, grp.counts
        self.params, self.base, self.opts = {}, {}, {}
        for r in store.roles:
            mods = [copy.deepcopy(store.module(k, r)) for k in store.keys]
            self.params[r], _ = torch.func.stack_module_state(mods)
            self.base[r] = copy.deepcopy(mods[0]).to("meta")
            self.opts[r] = _adamw(list(self.params[r].values()), store.spec)
        self.ema = MovingAverage(store.spec, self.params["generator"].values())
        self.steps = 0

    def _call(self, role, params, *args, **kwargs):
        base = self.base[role]
        return torch.func.vmap(lambda p, *a: torch.func.functional_call(base, p, a, kwargs))(params, *args)

    def _mean(self, per_sample):  # per key over its real samples, summed over keys: each key's own mean
        return ((per_sample * self.mask).sum(1) / self.counts).sum()

    def _update(self, role, loss):
        self.opts[role].zero_grad(set_to_none=True)
        loss.backward()
        self.opts[role].step()
        if role == "generator":
            self.ema.update()

    def __call__(self, xs, cs, zs, extra=()):
        """One step on the padded batch; ``extra``: the GAN's later noise, padded like ``zs``."""
        s = self.spec
        if s.type != "gan":
            p, base = self.params["generator"], self.base["generator"]
            cond = cs if s.type == "cvae" else None
            recon, mu, logvar = torch.func.vmap(
                lambda p, x, c, z: torch.func.functional_call(base, p, (x, c), {"eps": z}),
                in_dims=(0, 0, 0 if cond is not None else None, 0))(p, xs, cond, zs)
            rec = (recon - xs).pow(2).sum(-1)
            pp = {n[len("prior."):]: t for n, t in p.items() if n.startswith("prior.")}  # p(z | c), per key
            kl = _kl_per_sample(base, mu, logvar, lambda: gaussian_params(torch.func.vmap(
                lambda p, c: torch.func.functional_call(base.prior, p, (c,)))(pp, cs)))
            beta = s.beta_max * min(1.0, self.steps / s.beta_warmup_steps) if s.beta_warmup_steps else s.beta_max
            self._update("generator", self._mean(rec) + beta * self._mean(kl))
        else:
            _check_schedule(s)
            pg, pd, gamma = self.params["generator"], self.params["discriminator"], s.gan.r1_gamma
            noise = iter(extra)
            for i in range(s.gan.d_steps):
                with torch.set_grad_enabled(i == s.gan.d_steps - 1):
                    fake = self._call("generator", pg, zs if i == 0 else next(noise), cs)
                real = xs.detach().requires_grad_(gamma > 0)
                real_logit = self._call("discriminator", pd, real, cs)
                fake_logit = self._call("discriminator", pd, fake.detach(), cs)
                d_ps = F.softplus(-real_logit) + F.softplus(fake_logit)
                if gamma > 0:
                    (g,) = torch.autograd.grad((real_logit * self.mask).sum(), real, create_graph=True)
                    d_ps = d_ps + gamma / 2 * g.pow(2).sum(-1)
                self._update("discriminator", self._mean(d_ps))
            frozen = {n: t.detach() for n, t in pd.items()}  # the G step takes no D weight gradients
            for j in range(s.gan.g_steps):
                f = fake if j == 0 else self._call("generator", pg, next(noise), cs)
                self._update("generator", self._mean(F.softplus(-self._call("discriminator", frozen, f, cs))))
        self.steps += 1

    def first_generator(self):
        return {n: t[0] for n, t in self.params["generator"].items()}


def _side_by_side(fns, repeats: int, warmup: int = 2, cpu: list | None = None,
                  rounds: list | None = None) -> list[float]:
    """Median wall seconds of each fn, their runs interleaved (a load change hits all of them
    alike); with ``cpu`` (a list) also each fn's median CPU seconds of this process, appended to
    it: on a machine shared with other work, CPU time leaves out the waits for the cores; with
    ``rounds`` (a list) also every round's (wall seconds, CPU seconds) per fn, appended to it."""
    times = [[] for _ in fns]
    cpus = [[] for _ in fns]
    for i in range(warmup + repeats):
        for f, ts, cs in zip(fns, times, cpus):
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            if i >= warmup:
                ts.append(time.perf_counter() - t0)
                cs.append(time.process_time() - c0)
    if cpu is not None:
        cpu.extend(statistics.median(cs) for cs in cpus)
    if rounds is not None:
        rounds.extend(zip(times, cpus))
    return [statistics.median(ts) for ts in times]


def _flops(fn) -> int:
    """FlopCounterMode's count of ``fn``. Its dispatch mode only: the module tracker it also enters
    hooks every nn.Module, which breaks the R1 penalty's ``autograd.grad(create_graph=True)``."""
    fc = FlopCounterMode(display=False)
    with _FlopCounterMode(fc):
        fn()
    return int(fc.get_total_flops())


def _gemm_replay(fn):
    """(replay, flops): the float32 GEMMs ``fn`` executes, at their shapes, each run alone."""
    rec = _RecordGemms()
    with rec:
        fn()
    replay = replay_gemms(rec.calls)
    return replay, _flops(replay)


def run(quick: bool = False) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(previous)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[n].detach() - b[n].detach()).abs().max()) for n in a)


def per_class_contenders(store, x, y):
    """(steps, vmap peer, loop peer, gen) for a per_class store on the batch (x, y): ``steps`` =
    [store step, vmap step, loop step], the peers given the store's very noise (drawn from a
    generator seeded 1, as the store draws from ``gen``); ``gen.manual_seed(1)`` before a round
    of the three steps replays that noise."""
    from feda2v.store.grouping import Grouping

    key_of_sample = store._class_key_idx[y]
    grp = Grouping(key_of_sample, len(store.keys))
    vmap, loop = VmapStep(store, grp), LoopStep(store, key_of_sample)
    c = store.conditions[y]
    zgen = torch.Generator().manual_seed(1)
    z = torch.randn(len(y), store.spec.latent_dim, generator=zgen)
    extra = extra_noise(store.spec, len(y), zgen)
    xs, cs, zs, extras = grp.pad(x), grp.pad(c), grp.pad(z), [grp.pad(e) for e in extra]
    gen = torch.Generator().manual_seed(1)
    steps = [lambda: store.train_batch(x, y, gen=gen, node="bench", round=0),
             lambda: vmap(xs, cs, zs, extras), lambda: loop(x, c, z, extra)]
    return steps, vmap, loop, gen


def _peers(quick: bool) -> list[dict]:
    """per_class store step vs the vmap peer and the naive loop, every key with samples."""
    rows = []
    for gtype in ("vae", "cvae", "gan"):
        for keys in ((10,) if quick else (10, 50, 200)):
            for b in ((256,) if quick else (256, 1024)):
                store = make_store(gtype, "per_class", classes=keys)
                x, y = make_batch(b, classes=keys)
                (store_step, vmap_step, loop_step), vmap, loop, gen = per_class_contenders(store, x, y)
                for _ in range(3):  # three steps each from the same state on the same batch and noise
                    gen.manual_seed(1)
                    for f in (store_step, vmap_step, loop_step):
                        f()
                first = {n: p for n, p in store.module(store.keys[0]).named_parameters()}
                diffs = (_max_diff(first, vmap.first_generator()), _max_diff(first, loop.first_generator()))
                repeats = 3 if quick or keys >= 200 else 7
                # (the three agreement steps above were the warm-up)
                cpu = []
                t_store, t_vmap, t_loop = _side_by_side([store_step, vmap_step, loop_step], repeats, warmup=0, cpu=cpu)
                rows.append({"type": gtype, "keys": keys, "batch": b, "store_ms": t_store * 1e3,
                             "vmap_fused_ms": t_vmap * 1e3, "loop_ms": t_loop * 1e3,
                             "store_over_vmap": t_store / t_vmap, "store_over_loop": t_store / t_loop,
                             "store_over_vmap_cpu": cpu[0] / cpu[1], "store_over_loop_cpu": cpu[0] / cpu[2],
                             "max_diff_vmap_3_steps": diffs[0], "max_diff_loop_3_steps": diffs[1]})
    return rows


def _run(quick: bool) -> dict:
    batches = [64, 256] if quick else [64, 256, 1024, 2048]
    repeats = 3 if quick else 15
    table = []
    for gtype in ("vae", "cvae", "gan"):
        for b in batches:
            store = make_store(gtype)
            plain = PlainStep(store)
            gen = torch.Generator().manual_seed(0)
            x, y = make_batch(b)
            zgen = torch.Generator().manual_seed(1)
            store_step = lambda: store.train_batch(x, y, gen=gen, node="bench", round=0)  # noqa: E731
            # like the store's step, the peer's looks its conditions up and draws its noise
            plain_step = lambda: plain(x, store.conditions[y], torch.randn(  # noqa: E731
                b, store.spec.latent_dim, generator=zgen), extra_noise(store.spec, b, zgen))
            executed, useful = _flops(store_step), _flops(plain_step)
            replay, gemm_flops = _gemm_replay(plain_step)
            cpu = []
            t_store, t_plain, t_gemm = _side_by_side([store_step, plain_step, replay], repeats, cpu=cpu)
            rate = gemm_flops / t_gemm / 1e9
            table.append({"type": gtype, "batch": b, "store_ms": t_store * 1e3, "plain_ms": t_plain * 1e3,
                          "store_over_plain": t_store / t_plain, "store_over_plain_cpu": cpu[0] / cpu[1],
                          "useful_gflop": useful / 1e9,
                          "executed_gflop": executed / 1e9, "executed_over_useful": executed / useful,
                          "useful_gflops_per_s": useful / t_store / 1e9, "gemm_rate_same_shapes": rate,
                          "share_of_gemm_rate": useful / t_store / 1e9 / rate})
    largest = [r for r in table if r["batch"] == batches[-1]]
    summary = ("One thread, side by side, wall time (CPU time). Store step / plain module + fused AdamW "
               "(same update): "
               + ", ".join(f"{r['type']}@{r['batch']} {r['store_over_plain']:.2f}x ({r['store_over_plain_cpu']:.2f}x)"
                           for r in table)
               + f". Executed / useful FLOPs (FlopCounterMode): "
               + ", ".join(f"{r['type']} {r['executed_over_useful']:.3f}" for r in largest)
               + f". At batch {batches[-1]} per useful FLOP the step reaches "
               + ", ".join(f"{r['type']} {r['share_of_gemm_rate']:.0%}" for r in largest)
               + " of the GEMM rate measured at the same shapes.")
    peers = _peers(quick)
    def worst(t, col):
        return max(r[col] for r in peers if r["type"] == t)

    summary += (" per_class (K keys, all with samples) store step / vmap(functional_call) + fused AdamW, worst "
                "cell: " + ", ".join(f"{t} {worst(t, 'store_over_vmap'):.2f}x ({worst(t, 'store_over_vmap_cpu'):.2f}x)"
                                     for t in ("vae", "cvae", "gan"))
                + "; / naive loop (K modules, K AdamWs): "
                + f"{min(r['store_over_loop'] for r in peers):.2f}-{max(r['store_over_loop'] for r in peers):.2f}x "
                + f"({min(r['store_over_loop_cpu'] for r in peers):.2f}-{max(r['store_over_loop_cpu'] for r in peers):.2f}x)"
                + f"; after three steps from the same state the peers' parameters agree with the store's to "
                + f"{max(max(r['max_diff_vmap_3_steps'], r['max_diff_loop_3_steps']) for r in peers):.1e}.")
    return {"summary": summary, "table": table, "tables": {"per_class peers": peers}}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
