"""Shared helpers of the benchmarks: timing medians and a synthetic store/batch."""
from __future__ import annotations

import statistics
import time

import torch


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_store(gtype: str = "cvae", granularity: str = "unified", classes: int = 10, feature_dim: int = 128,
               condition_dim: int = 384, hidden_dim: int = 128, latent_dim: int = 16):
    from feda2v.store import GeneratorStore, StoreSpec

    names = [f"c{i}" for i in range(classes)]
    # film off at every granularity (its default is on for unified cVAE keys only): the
    # per_class cells and the unified ones time the same per-key architecture, as reports/ records
    spec = StoreSpec(type=gtype, granularity=granularity, classes=tuple(names), feature_dim=feature_dim,
                     condition_dim=condition_dim, hidden_dim=hidden_dim, latent_dim=latent_dim,
                     film=False)
    conditions = torch.randn(classes, condition_dim, generator=torch.Generator().manual_seed(1))
    return GeneratorStore(spec, conditions)


def role_updates(spec) -> list[str]:
    """The roles one batch's step updates, in order (a GAN's schedule: ``d_steps`` D updates, then
    ``g_steps`` G updates; simultaneous: one each): what a peer or a floor must do to match a step."""
    if spec.type != "gan":
        return ["generator"]
    if spec.gan.schedule == "simultaneous":
        return ["discriminator", "generator"]
    return ["discriminator"] * spec.gan.d_steps + ["generator"] * spec.gan.g_steps


def extra_noise(spec, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    """The noise a step draws after the batch's own (one per GAN update after the first of its
    role), in the store's order and batch order: peers given it see the store's very samples."""
    updates = role_updates(spec)  # each role's first update uses the batch's noise
    return [torch.randn(batch, spec.latent_dim, generator=gen) for _ in range(len(updates) - len(set(updates)))]


class MovingAverage:
    """A peer's copy of the store's generator moving average (store/store.py ``_update_ema``):
    after the t-th generator update, avg += (1 - min(d, (1 + t) / (10 + t))) (p - avg), one
    foreach lerp over the tensors; nothing where ``spec.ema_decay`` is 0."""

    def __init__(self, spec, params):
        self.decay = spec.ema_decay
        self.params = list(params)
        self.avg = [p.detach().clone() for p in self.params] if self.decay else []
        self.t = 0

    @torch.no_grad()
    def update(self) -> None:
        if self.avg:
            self.t += 1
            torch._foreach_lerp_(self.avg, [p.detach() for p in self.params],
                                 1 - min(self.decay, (1 + self.t) / (10 + self.t)))


def make_batch(batch: int, classes: int = 10, feature_dim: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, feature_dim, generator=g), torch.arange(batch) % classes


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matrix-multiply rate (the ceiling a generator step can approach)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: torch.mm(a, b), repeats)
    return 2 * n**3 / t / 1e9
