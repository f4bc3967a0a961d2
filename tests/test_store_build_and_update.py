"""The store's build and cached fused updates (store/optim.py FusedUpdate) are exact.

A store reuses one update plan per (role, active key set) across steps. Everything that replaces an
optimizer's state or changes its hyper-parameters between steps (a reset, a load, a user's lr
change, a move) must make the next step use the new state: the cached store must train the same
bits as one that rebuilds its update lists at every step (cache size 0)."""
from __future__ import annotations

import pytest
import torch

import feda2v.store.store as store_module
from feda2v.store import GeneratorStore, StoreSpec
from feda2v.store.kinds import KINDS

CLASSES = ["a", "b", "c", "d"]


def _store(typ: str) -> GeneratorStore:
    spec = StoreSpec(type=typ, granularity="per_class", classes=CLASSES, feature_dim=6, condition_dim=4,
                     latent_dim=3, hidden_dim=8, seed=5)
    return GeneratorStore(spec, torch.randn(len(CLASSES), 4, generator=torch.Generator().manual_seed(2)))


def _batch(i: int, classes):
    g = torch.Generator().manual_seed(100 + i)
    y = torch.tensor(classes)[torch.arange(12) % len(classes)]
    return torch.randn(12, 6, generator=g), y


def _train(typ: str, monkeypatch, cache: int) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(store_module, "_UPDATE_CACHE", cache)
    s = _store(typ)
    other = _store(typ)
    gen = torch.Generator().manual_seed(0)
    events = {
        2: lambda: s.reset("class/b", node="n", round=1),  # clears b's state: fresh moments
        4: lambda: s.optimizer("class/a", "generator").param_groups[0].__setitem__("lr", 3e-3),
        6: lambda: s.load_state_dict(*other.state_dict()),  # every key's state replaced
        8: lambda: s.to("cpu"),
    }
    for i in range(10):
        if i in events:
            events[i]()
        for classes in ([0, 1, 2, 3], [1, 2], [0, 1, 2, 3]):  # the same key sets again and again
            x, y = _batch(i, classes)
            s.train_batch(x, y, gen=gen, node="n", round=1)
            if i == 5:
                other.train_batch(x, y, gen=gen, node="m", round=1)
    return s.state_dict()[0]


@pytest.mark.parametrize("typ", ["cvae", "gan"])
def test_cached_updates_train_the_same_bits_as_fresh_ones(typ, monkeypatch):
    cached, fresh = _train(typ, monkeypatch, 32), _train(typ, monkeypatch, 0)
    assert cached.keys() == fresh.keys()
    for name in cached:
        assert torch.equal(cached[name], fresh[name]), name


def test_a_cached_update_is_reused_while_valid(monkeypatch):
    s = _store("cvae")
    gen = torch.Generator().manual_seed(0)
    x, y = _batch(0, [0, 1, 2, 3])
    s.train_batch(x, y, gen=gen, node="n", round=1)
    (update,) = s._updates.values()
    s.train_batch(x, y, gen=gen, node="n", round=1)
    assert list(s._updates.values()) == [update]  # same object: no lists rebuilt
    s.reset("class/a", node="n", round=1)
    assert not update.valid()


@pytest.mark.parametrize("typ,arch", [(t, a) for t, k in KINDS.items() for a in k.archs])
def test_keys_are_built_in_their_banks_with_the_architectures_own_seeded_values(typ, arch):
    """The store allocates each role's banks once and initialises every key in place: the values are
    exactly what the architecture's constructor draws from the key's seed, and each Parameter is a
    row of its bank from the start (no per-key copy to stack)."""
    from feda2v.models import build_model
    from feda2v.store.store import _seeded

    spec = StoreSpec(type=typ, granularity="per_class", classes=CLASSES, feature_dim=6, condition_dim=4,
                     latent_dim=3, hidden_dim=8, seed=5, arch=arch)
    s = GeneratorStore(spec, torch.randn(len(CLASSES), 4))
    for role in s.roles:
        cls, kwargs = s._role_arch[role]
        for row, key in enumerate(s.keys):
            ref = dict(build_model(cls, kwargs, gen=_seeded(5, "init", key, role)).named_parameters())
            mine = dict(s.module(key, role).named_parameters())
            assert mine.keys() == ref.keys()
            for name, p in mine.items():
                assert torch.equal(p, ref[name]), (key, role, name)
                bank = s._banks[role][name]
                assert p.data_ptr() == bank[row].data_ptr(), (key, role, name)


@pytest.mark.parametrize("typ,gan", [("cvae", {}), ("gan", {}), ("gan", {"r1_gamma": 0.0}),
                                     ("gan", {"schedule": "simultaneous"}), ("gan", {"d_steps": 2, "g_steps": 2})])
def test_gradient_buffers_change_no_bit(typ, gan, monkeypatch):
    """Weight and bias gradients written into the store's reused buffers train exactly what freshly
    allocated gradients train, for every schedule (two backward passes over one graph, a weight
    used by two layer calls, several steps per batch)."""
    from feda2v.models.functional import StackedParams

    def train(use_buffers: bool):
        taken = []
        real_take = StackedParams.take_grad_buffer

        def take(self, name, layer):
            buf = real_take(self, name, layer) if use_buffers else None
            taken.append(buf is not None)
            return buf

        monkeypatch.setattr(StackedParams, "take_grad_buffer", take)
        spec = StoreSpec(type=typ, granularity="per_class", classes=CLASSES, feature_dim=6, condition_dim=4,
                         latent_dim=3, hidden_dim=8, seed=5, gan=gan)
        s = GeneratorStore(spec, torch.randn(len(CLASSES), 4, generator=torch.Generator().manual_seed(2)))
        gen = torch.Generator().manual_seed(0)
        for i in range(4):
            for classes in ([0, 1, 2, 3], [1, 2]):
                s.train_batch(*_batch(i, classes), gen=gen, node="n", round=1)
        return s.state_dict()[0], any(taken)

    (with_buffers, used), (fresh, _) = train(True), train(False)
    assert used  # the buffers were really written
    for name in fresh:
        assert torch.equal(with_buffers[name], fresh[name]), name


def test_step_counts_live_in_one_bank_and_count_each_keys_own_steps():
    """Counting a step is one operation on the role's step bank; every parameter's state still
    has its own step tensor (a view into the bank) holding exactly the steps its key took."""
    s = _store("cvae")
    gen = torch.Generator().manual_seed(0)
    for classes in ([0, 1, 2, 3], [1, 2], [1, 2], [3]):
        s.train_batch(*_batch(0, classes), gen=gen, node="n", round=1)
    assert [s.step_count(k) for k in s.keys] == [1, 3, 3, 2]
    bank = s._step_banks["generator"]
    for row, key in enumerate(s.keys):
        opt = s.optimizer(key)
        for j, (_, p) in enumerate(s._params[key, "generator"]):
            step = opt.state[p]["step"]
            assert step.data_ptr() == bank[row, j].data_ptr() and float(step) == [1, 3, 3, 2][row]
    s.reset("class/b", node="n", round=1)  # fresh state: re-banked at 0 by its next step
    s.train_batch(*_batch(1, [1]), gen=gen, node="n", round=1)
    assert s.step_count("class/b") == 1 and s.step_count("class/c") == 3
