"""The GAN's training schedule (store/steps.py) against per-key plain modules and torch's AdamW.

The reference trains, for every key separately, a deep copy of the store's initial generator and
discriminator with plain ``nn.Module.forward`` calls, ``loss.backward()`` and its own
``torch.optim.AdamW`` (torch's default, non-fused implementation), on the same batches and the
same noise: the store's grouped, stacked, fused computation must agree to float32 rounding.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from feda2v.errors import ConfigError
from feda2v.store import GeneratorStore, StoreSpec
from feda2v.store.spec import GanSpec

CLASSES = ["a", "b", "c", "d"]
D, C, Z, H = 6, 4, 3, 8
GROUPS = {"low": ["a", "b"], "high": ["c", "d"]}


def make_store(granularity: str, film: bool | None = None, **gan) -> GeneratorStore:
    # eps well above float32 rounding of a zero gradient: the hinge loss's output-bias gradient is
    # exactly 0 at init (as many real as fake terms active), and Adam with eps=1e-8 would turn the
    # rounding residue of that 0 (different in any two summation orders) into a +-lr step.
    spec = StoreSpec(type="gan", granularity=granularity, classes=CLASSES, feature_dim=D, condition_dim=C,
                     latent_dim=Z, hidden_dim=H, class_groups=GROUPS, seed=3,
                     optimizer={"lr": 1e-2, "betas": (0.5, 0.99), "weight_decay": 1e-2, "eps": 1e-4}, gan=gan,
                     film=film)
    cond = torch.randn(len(CLASSES), C, generator=torch.Generator().manual_seed(11))
    return GeneratorStore(spec, cond)


def batch(seed: int, classes, n: int = 13):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    y[: len(classes)] = torch.tensor(classes)
    return torch.randn(n, D, generator=g) + y.unsqueeze(1).float(), y


class PlainKey:
    """One key trained the textbook way: its own modules, its own torch.optim.AdamW per role."""

    def __init__(self, store: GeneratorStore, key: str):
        o, self.gan = store.spec.optimizer, store.spec.gan
        self.G = copy.deepcopy(store.module(key, "generator"))
        self.D = copy.deepcopy(store.module(key, "discriminator"))
        self.opt = {m: torch.optim.AdamW(m.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                         weight_decay=o.weight_decay) for m in (self.G, self.D)}

    def _d_loss(self, real, fake, c):
        loss_kind, gamma = self.gan.loss, self.gan.r1_gamma
        real = real.detach().requires_grad_(gamma > 0)
        real_logit, fake_logit = self.D(real, c), self.D(fake.detach(), c)
        if loss_kind == "hinge":
            loss = F.relu(1 - real_logit).mean() + F.relu(1 + fake_logit).mean()
        else:
            loss = (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                    + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))
        if gamma > 0:
            (g,) = torch.autograd.grad(real_logit.sum(), real, create_graph=True)
            loss = loss + gamma / 2 * g.pow(2).sum(1).mean()
        return loss

    def _g_loss(self, fake, c):
        logit = self.D(fake, c)
        if self.gan.loss == "hinge":
            return -logit.mean()
        return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))

    def _step(self, module, loss):
        self.opt[module].zero_grad(set_to_none=True)
        loss.backward()
        self.opt[module].step()

    def train(self, x, c, noises):
        """noises: the batch's noise rows of this key, one per step in the store's draw order."""
        it = iter(noises)
        for _ in range(self.gan.d_steps):
            z = next(it)
            fake = self.G(z, c)
            d_loss = self._d_loss(x, fake, c)
            self._step(self.D, d_loss)
            for p in self.D.parameters():  # the G step below must not leave D gradients behind
                p.grad = None
        self.D.requires_grad_(False)  # the G step needs D's input gradient only
        for j in range(self.gan.g_steps):
            if j > 0:
                fake = self.G(next(it), c)
            g_loss = self._g_loss(fake, c)
            self._step(self.G, g_loss)
        self.D.requires_grad_(True)
        return {"g_loss": g_loss.item(), "d_loss": d_loss.item()}


@pytest.mark.parametrize("granularity", ["unified", "per_class", "per_group"])
@pytest.mark.parametrize("gan", [{}, {"d_steps": 2, "g_steps": 2}, {"loss": "hinge", "r1_gamma": 0.0},
                                 {"r1_gamma": 5.0, "d_steps": 3}, {"film": True}, {"film": False}])
def test_alternating_schedule_equals_plain_modules_with_torch_adamw(granularity, gan):
    s = make_store(granularity, **gan)
    plain = {k: PlainKey(s, k) for k in s.keys}
    spec = s.spec.gan
    draws = spec.d_steps + spec.g_steps - 1  # the batch's noise, then one draw per extra step
    for step, classes in enumerate([(0, 1, 2, 3), (0, 2), (1, 2, 3), (0, 1, 2, 3), (3,)]):
        x, y = batch(step, classes)
        got = s.train_batch(x, y, gen=torch.Generator().manual_seed(100 + step), node="n", round=0)
        g = torch.Generator().manual_seed(100 + step)
        noise = [torch.randn(len(y), Z, generator=g) for _ in range(draws)]
        key_of = [s.key_for_class(CLASSES[int(c)]) for c in y]
        want = {}
        for k, ref in plain.items():
            idx = torch.tensor([i for i, kk in enumerate(key_of) if kk == k], dtype=torch.long)
            if len(idx):
                want[k] = ref.train(x[idx], s.conditions[y[idx]], [z[idx] for z in noise])
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), (step, k)
    for k, ref in plain.items():
        for role, m in (("generator", ref.G), ("discriminator", ref.D)):
            for (name, p), (_, q) in zip(s.module(k, role).named_parameters(), m.named_parameters()):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6, msg=f"{k}/{role}/{name}")
            st, rst = s.optimizer(k, role).state, ref.opt[m].state
            for p, q in zip(s.module(k, role).parameters(), m.parameters()):
                if q in rst:
                    assert int(st[p]["step"]) == int(rst[q]["step"])
                    # atol 3e-7: the hinge loss's gradients that are 0 at init (make_store) leave a
                    # rounding residue of ~1e-7 in the moments of the FiLM layer's shift bias
                    torch.testing.assert_close(st[p]["exp_avg"], rst[q]["exp_avg"], rtol=1e-4, atol=3e-7)
                    torch.testing.assert_close(st[p]["exp_avg_sq"], rst[q]["exp_avg_sq"], rtol=1e-4, atol=1e-9)
                else:
                    assert p not in st


def test_each_role_steps_once_per_update_and_d_first():
    s = make_store("per_class", d_steps=3, g_steps=2)
    s.train_batch(*batch(0, (0, 1)), gen=torch.Generator().manual_seed(0), node="n", round=0)
    assert s.step_count("class/a", "discriminator") == 3 and s.step_count("class/a", "generator") == 2
    assert s.step_count("class/c", "discriminator") == 0  # keys without samples are untouched


@pytest.mark.parametrize("bad", [{"schedule": "lockstep"}, {"loss": "wasserstein"}, {"d_steps": 0},
                                 {"r1_gamma": -1.0}])
def test_bad_gan_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="generator.gan"):
        GanSpec(**bad)


def test_type_override_and_group_choice_compose_the_same_training():
    """`generator.type=gan` and `generator=gan` are one choice: the type's defaults come with the type."""
    from pathlib import Path

    from feda2v.config import load_config
    from feda2v.config.files import compose_conf

    conf = Path(__file__).resolve().parents[1] / "conf"
    a, b = compose_conf(conf, ["generator.type=gan"]), compose_conf(conf, ["generator=gan"])
    assert a == b
    specs = [StoreSpec.from_config(load_config(c), classes=CLASSES, feature_dim=D, condition_dim=C) for c in (a, b)]
    assert specs[0] == specs[1]
    assert specs[0].optimizer.betas == (0.5, 0.99) and specs[0].gan.schedule == "alternating"
    cvae = StoreSpec.from_config(load_config(compose_conf(conf, [])), classes=CLASSES, feature_dim=D, condition_dim=C)
    assert cvae.optimizer.betas == (0.9, 0.999)
    # an explicit setting wins over the type's default, for every type
    lr = compose_conf(conf, ["generator=gan", "generator.optimizer.lr=0.003"])
    assert StoreSpec.from_config(load_config(lr), classes=CLASSES, feature_dim=D, condition_dim=C).optimizer.lr == 0.003


def test_a_gan_store_saved_before_the_schedule_existed_still_loads_as_it_trained():
    old = StoreSpec(type="gan", granularity="unified", classes=CLASSES, feature_dim=D, condition_dim=C,
                    latent_dim=Z, hidden_dim=H, arch="concat",
                    # what those stores ran, every field spelled out (today's defaults differ: d_steps)
                    gan={"schedule": "simultaneous", "d_steps": 1, "g_steps": 1, "loss": "nonsaturating",
                         "r1_gamma": 0.0})
    s = GeneratorStore(old, torch.randn(len(CLASSES), C, generator=torch.Generator().manual_seed(1)))
    s.train_batch(*batch(0, (0, 1)), gen=torch.Generator().manual_seed(0), node="n", round=0)
    tensors, meta = s.state_dict()
    spec_json = {k: v for k, v in meta["spec"].items() if k not in ("gan", "arch")}  # the earlier header
    assert StoreSpec.from_json(spec_json) == old
    back = GeneratorStore.from_state(tensors, {**meta, "spec": spec_json})
    assert back.module("unified", "discriminator").__class__.__name__ == "GANDiscriminator"
    assert back.step_count("unified", "discriminator") == 1


@pytest.mark.parametrize("gan", [{}, {"r1_gamma": 0.0}, {"d_steps": 2, "g_steps": 2}, {"loss": "hinge"}])
def test_each_gradient_pass_computes_only_what_its_update_needs(gan):
    """Matmul FLOPs (FlopCounterMode) of the store's alternating step == those of the textbook step
    of the same update: no D weight gradient in the G step, none in R1's input-gradient pass, no
    input gradient of D's first layer in the D step. (The simultaneous option takes both roles'
    gradients from one D forward, so it computes D's weight gradients twice; it is kept as it was.)"""
    from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

    def flops(fn):
        fc = FlopCounterMode(display=False)
        with _FlopCounterMode(fc):  # the dispatch mode alone: its module hooks break create_graph
            fn()
        return fc.get_total_flops()

    s = make_store("unified", **gan)
    ref = PlainKey(s, "unified")
    x, y = batch(0, (0, 1, 2, 3), n=32)
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(len(y), Z, generator=g) for _ in range(s.spec.gan.d_steps + s.spec.gan.g_steps - 1)]
    executed = flops(lambda: s.train_batch(x, y, gen=torch.Generator().manual_seed(5), node="n", round=0))
    useful = flops(lambda: ref.train(x, s.conditions[y], draws))
    assert executed == useful > 0
