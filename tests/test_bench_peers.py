"""The benchmark's peers do the store's update, so its ratios compare like with like.

`make bench` quotes the store's step against plain modules, vmap and the naive loop "doing the same
update". When a default changes (the GAN's D updates per batch, the cVAE's learned prior), a peer
left behind times a different update and every ratio against it is wrong while the bench still
runs: these tests train each peer beside the store with the defaults and compare parameters and
FLOP counts.
"""
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_generator import PlainStep, _flops, _max_diff, per_class_contenders  # noqa: E402
from common import extra_noise, make_batch, make_store, role_updates  # noqa: E402


@pytest.mark.parametrize("gtype", ["vae", "cvae", "gan"])
def test_per_class_peers_train_like_the_store(gtype):
    store = make_store(gtype, "per_class", classes=4, feature_dim=16, condition_dim=8, hidden_dim=16)
    x, y = make_batch(24, classes=4, feature_dim=16)
    steps, vmap, loop, gen = per_class_contenders(store, x, y)  # the very setup the bench times
    for _ in range(3):
        gen.manual_seed(1)
        for step in steps:
            step()
    for k, key in enumerate(store.keys):
        ours = dict(store.module(key).named_parameters())
        assert _max_diff(ours, {n: t[k] for n, t in vmap.params["generator"].items()}) < 1e-5, key
        assert _max_diff(ours, dict(loop.keys[k].mods["generator"].named_parameters())) < 1e-5, key
        # and the moving average the store samples with
        avg = {n: t for n, t in store.state_dict()[0].items() if n.startswith(f"{key}/generator/ema/")}
        names = [n for n, _ in store.module(key).named_parameters()]
        if not store.spec.ema_decay:  # the VAE samples its trained weights: nobody keeps an average
            assert not avg and not vmap.ema.avg and not loop.keys[k].ema.avg
            continue
        assert len(avg) == len(names) == len(vmap.ema.avg) == len(loop.keys[k].ema.avg)
        assert _max_diff(avg, {f"{key}/generator/ema/{n}": t[k] for n, t in zip(names, vmap.ema.avg)}) < 1e-5
        assert _max_diff(avg, {f"{key}/generator/ema/{n}": t for n, t in zip(names, loop.keys[k].ema.avg)}) < 1e-5
    if gtype == "gan":
        d = dict(store.module(store.keys[0], "discriminator").named_parameters())
        assert _max_diff(d, dict(loop.keys[0].mods["discriminator"].named_parameters())) < 1e-5


@pytest.mark.parametrize("gtype", ["vae", "cvae", "gan"])
def test_plain_peer_does_the_stores_update_and_flops(gtype):
    store = make_store(gtype, feature_dim=16, condition_dim=8, hidden_dim=16)
    plain = PlainStep(store)
    x, y = make_batch(32, feature_dim=16)
    c = store.conditions[y]
    gen, zgen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    step = lambda: store.train_batch(x, y, gen=gen, node="n", round=0)  # noqa: E731
    peer = lambda: plain(x, c, torch.randn(32, store.spec.latent_dim, generator=zgen),  # noqa: E731
                         extra_noise(store.spec, 32, zgen))
    # executed == useful: the store computes no gradient the plain step does not
    assert _flops(step) == _flops(peer)
    for _ in range(2):
        step()
        peer()
    for role in store.roles:
        assert _max_diff(dict(store.module("unified", role).named_parameters()),
                         dict(plain.mods[role].named_parameters())) < 1e-5, role
    avg = {n: t for n, t in store.state_dict()[0].items() if n.startswith("unified/generator/ema/")}
    names = [n for n, _ in plain.mods["generator"].named_parameters()]
    assert len(avg) == len(plain.ema.avg) and bool(avg) == bool(store.spec.ema_decay)  # (none for the VAE)
    if avg:
        assert _max_diff(avg, {f"unified/generator/ema/{n}": t for n, t in zip(names, plain.ema.avg)}) < 1e-5
    for role in store.roles:
        assert int(store.optimizer("unified", role).state_dict()["state"][0]["step"]) == \
            int(plain.opts[role].state_dict()["state"][0]["step"]), role


def test_role_updates_follow_the_schedule():
    assert role_updates(make_store("cvae").spec) == ["generator"]
    spec = make_store("gan").spec
    assert role_updates(spec) == ["discriminator"] * spec.gan.d_steps + ["generator"] * spec.gan.g_steps
    assert spec.gan.d_steps == 2  # the default the peers must follow (a D step more than before)
