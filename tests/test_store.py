"""GeneratorStore: keys, one optimizer per (key, role), shared relay, reset policy, grouped training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from feda2v.config import load_config
from feda2v.errors import ConfigError, DataError, NonFiniteLossError
from feda2v.store import GeneratorStore, ResetEvent, StoreSpec

CLASSES = ["a", "b", "c", "d"]
D, C, Z, H = 6, 4, 3, 8
GROUPS = {"low": ["a", "b"], "high": ["c", "d"]}


def make_store(type_="cvae", granularity="per_class", **kw) -> GeneratorStore:
    args = dict(type=type_, granularity=granularity, classes=CLASSES, feature_dim=D, condition_dim=C,
                latent_dim=Z, hidden_dim=H, class_groups=GROUPS, beta_warmup_steps=4, seed=7)
    args.update(kw)
    cond = torch.randn(len(CLASSES), C, generator=torch.Generator().manual_seed(123))
    return GeneratorStore(StoreSpec(**args), cond)


def batch(seed: int, classes=(0, 1, 2, 3), n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    y[: len(classes)] = torch.tensor(classes)  # every listed class present
    x = torch.randn(n, D, generator=g) + y.unsqueeze(1).float()
    return x, y


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def clone(store: GeneratorStore) -> GeneratorStore:
    return GeneratorStore.from_state(*store.state_dict())


def params_of(store, key, role="generator"):
    return {n: p.detach().clone() for n, p in store.module(key, role).named_parameters()}


def first_state(store, key, role="generator"):
    opt = store.optimizer(key, role)
    return opt.state[opt.param_groups[0]["params"][0]]


# -- keys and construction ------------------------------------------------------------------------
def test_keys_per_granularity_in_contract_order():
    assert make_store(granularity="unified").keys == ["unified"]
    assert make_store(granularity="per_class").keys == ["class/a", "class/b", "class/c", "class/d"]
    s = make_store(granularity="per_group", class_groups={"high": ["c", "d"], "low": ["a", "b"]})
    assert s.keys == ["group/high", "group/low"]
    assert s.key_for_class("a") == "group/low" and s.key_for_class("d") == "group/high"
    assert make_store(granularity="unified").key_for_class("c") == "unified"


def test_per_group_class_in_no_group_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="class 'c'"):
        make_store(granularity="per_group", class_groups={"low": ["a", "b"]})
    s = make_store(granularity="per_group", class_groups={"low": ["a", "b"]}, default_group="rest")
    assert s.keys == ["group/low", "group/rest"]
    assert s.key_for_class("c") == s.key_for_class("d") == "group/rest"
    with pytest.raises(ConfigError, match="unknown class 'z'"):
        make_store(granularity="per_group", class_groups={"low": ["a", "z"]}, default_group="rest")
    with pytest.raises(ConfigError, match="'a' is in two groups"):
        make_store(granularity="per_group", class_groups={"x": ["a"], "y": ["a", "b", "c", "d"]})


def test_spec_from_config_uses_config_names():
    cfg = load_config({"seed": 3, "generator": {"type": "gan", "granularity": "per_group",
                                                "class_groups": {"g": ["a", "b", "c", "d"]},
                                                "optimizer": {"lr": 0.005, "weight_decay": 0.0, "name": "adam"}}})
    spec = StoreSpec.from_config(cfg, classes=CLASSES, feature_dim=D, condition_dim=C)
    assert (spec.type, spec.granularity, spec.seed, spec.optimizer.lr, spec.optimizer.name) == \
        ("gan", "per_group", 3, 0.005, "adam")
    assert StoreSpec.from_json(spec.to_json()) == spec
    store = GeneratorStore(spec, torch.zeros(4, C))
    opt = store.optimizer("group/g", "discriminator")
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 0.005


def test_one_optimizer_per_key_and_role_from_the_factory():
    s = make_store("gan", "per_class", optimizer={"name": "adamw", "lr": 0.002, "betas": [0.5, 0.9],
                                                   "eps": 1e-6, "weight_decay": 0.03})
    assert s.roles == ("generator", "discriminator")
    opts = [s.optimizer(k, r) for k in s.keys for r in s.roles]
    assert len({id(o) for o in opts}) == len(s.keys) * 2
    for k in s.keys:
        for r in s.roles:
            opt = s.optimizer(k, r)
            assert type(opt) is torch.optim.AdamW
            g = opt.param_groups[0]
            assert (g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]) == (0.002, (0.5, 0.9), 1e-6, 0.03)
            assert {id(p) for p in g["params"]} == {id(p) for p in s.module(k, r).parameters()}
    assert make_store("vae").roles == ("generator",)


def test_same_spec_same_store_and_no_global_rng_use():
    before = torch.random.get_rng_state()
    a, b = make_store("gan"), make_store("gan")
    a.train_batch(*batch(0), gen=gen(1), node="n0", round=0)
    a.sample(torch.tensor([0, 1]), gen=gen(2))
    assert torch.equal(before, torch.random.get_rng_state())
    b.train_batch(*batch(0), gen=gen(1), node="n0", round=0)
    ta, tb = a.state_dict()[0], b.state_dict()[0]
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
    # distinct keys start from distinct parameters
    assert not torch.equal(params_of(a, "class/a")["net.0.weight"], params_of(a, "class/b")["net.0.weight"])


# -- shared relay ---------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["unified", "per_class", "per_group"])
def test_shared_relay_one_optimizer_steps_sum_and_moments_continue(granularity):
    # beta fixed (warm-up 0) so a fresh-state replay sees the same gradient as the shared store.
    s = make_store("cvae", granularity, beta_warmup_steps=0)
    opt_ids = {(k, r): id(s.optimizer(k, r)) for k in s.keys for r in s.roles}
    node_classes = {"node0": (0, 1), "node1": (1, 2), "node2": (0, 1, 2, 3)}
    expected = {k: 0 for k in s.keys}
    beta1 = s.spec.optimizer.betas[0]
    for r in range(2):
        for i, (node, classes) in enumerate(node_classes.items()):
            for step in range(2):
                x, y = batch(100 * r + 10 * i + step, classes)
                present = {s.key_for_class(CLASSES[c]) for c in classes}
                prev = {k: first_state(s, k)["exp_avg"].clone() for k in present if s.step_count(k)}
                fresh = clone(s)
                for k in present:
                    fresh.optimizer(k).state.clear()
                s.train_batch(x, y, gen=gen(i), node=node, round=r)
                fresh.train_batch(x, y, gen=gen(i), node=node, round=r)
                for k in present:
                    expected[k] += 1
                    got = first_state(s, k)["exp_avg"]
                    zero_start = first_state(fresh, k)["exp_avg"]  # = (1 - beta1) * grad
                    if k in prev:  # continues from the previous node's value, not from zero
                        torch.testing.assert_close(got, beta1 * prev[k] + zero_start, rtol=1e-5, atol=1e-7)
                        assert not torch.allclose(got, zero_start)
    assert {k: s.step_count(k) for k in s.keys} == expected
    assert opt_ids == {(k, r): id(s.optimizer(k, r)) for k in s.keys for r in s.roles}


def test_keys_absent_from_a_batch_do_not_step():
    s = make_store("cvae", "per_class")
    before_b = params_of(s, "class/b")
    out = s.train_batch(*batch(0, (0, 2)), gen=gen(0), node="n", round=0)
    assert sorted(out) == ["class/a", "class/c"]
    assert s.step_count("class/a") == 1 and s.step_count("class/b") == 0
    assert len(s.optimizer("class/b").state) == 0
    assert all(torch.equal(before_b[n], p) for n, p in params_of(s, "class/b").items())


def test_gan_discriminator_optimizers_are_keyed_shared_and_preserved():
    s = make_store("gan", "per_class")
    for r, node in enumerate(["n0", "n1", "n0"]):
        s.train_batch(*batch(r, (0, 1)), gen=gen(r), node=node, round=r)
    for k in ("class/a", "class/b"):
        # d_steps D updates, then the G update, per batch (default d_steps 2)
        assert s.step_count(k, "discriminator") == 3 * s.spec.gan.d_steps == 6 and s.step_count(k, "generator") == 3
        assert first_state(s, k, "discriminator")["exp_avg"].abs().sum() > 0
    assert s.step_count("class/c", "discriminator") == 0
    d_prev = first_state(s, "class/a", "discriminator")["exp_avg"].clone()
    assert s.observe_classes("class/a", ["a"], node="n0", round=3, policy="changed") is None
    assert s.observe_classes("class/a", ["a"], node="n1", round=4, policy="changed") is None
    assert torch.equal(first_state(s, "class/a", "discriminator")["exp_avg"], d_prev)
    s.reset("class/a", node="n1", round=4)
    assert len(s.optimizer("class/a", "discriminator").state) == 0
    assert len(s.optimizer("class/a", "generator").state) == 0
    assert s.step_count("class/b", "discriminator") == 6  # other keys untouched


# -- reset policy ---------------------------------------------------------------------------------
def test_reset_exactly_when_class_set_changes_in_place_with_configured_hyperparameters():
    s = make_store("cvae", "per_group")
    key = "group/low"
    module, opt = s.module(key), s.optimizer(key)
    param_ids = [id(p) for p in module.parameters()]
    assert s.observe_classes(key, ["a"], node="n0", round=0, policy="changed") is None  # first: never
    s.train_batch(*batch(0, (0,)), gen=gen(0), node="n0", round=0)
    assert s.observe_classes(key, ["a"], node="n1", round=1, policy="changed") is None  # same set
    s.train_batch(*batch(1, (0,)), gen=gen(1), node="n1", round=1)
    assert s.step_count(key) == 2 and s.events == []
    opt.param_groups[0]["lr"] = 123.0  # a drifted hyper-parameter must not survive a reset
    before = params_of(s, key)
    other_before = params_of(s, "group/high")
    ev = s.observe_classes(key, ["b", "a"], node="n2", round=2, policy="changed")
    assert ev == ResetEvent(key, "n2", 2) and s.events == [ev] and s.reset_counts[key] == 1
    assert s.module(key) is module and s.optimizer(key) is opt
    assert [id(p) for p in module.parameters()] == param_ids
    assert all(not torch.equal(before[n], p) for n, p in params_of(s, key).items())
    assert len(opt.state) == 0 and s.step_count(key) == 0
    g, want = opt.param_groups[0], s.spec.optimizer
    assert (g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]) == (want.lr, want.betas, want.eps,
                                                                          want.weight_decay)
    assert all(torch.equal(other_before[n], p) for n, p in params_of(s, "group/high").items())
    # the next node trains the reset objects: state starts again from step 1
    s.train_batch(*batch(2, (0, 1)), gen=gen(2), node="n3", round=2)
    assert s.step_count(key) == 1
    # same set again -> no reset; policy off -> change recorded but no reset
    assert s.observe_classes(key, ["a", "b"], node="n3", round=3, policy="changed") is None
    assert s.observe_classes(key, ["a"], node="n3", round=4, policy="never") is None
    assert s.trained_classes(key) == ["a"] and s.step_count(key) == 1 and len(s.events) == 1


def test_reset_is_seeded_and_differs_from_initial_parameters():
    a, b = make_store("gan", "unified"), make_store("gan", "unified")
    init = params_of(a, "unified", "discriminator")
    for s in (a, b):
        s.reset("unified", node="n", round=0)
    pa, pb = params_of(a, "unified", "discriminator"), params_of(b, "unified", "discriminator")
    assert all(torch.equal(pa[n], pb[n]) and not torch.equal(pa[n], init[n]) for n in pa)
    a.reset("unified", node="n", round=1)  # second reset: another seed
    assert not torch.equal(params_of(a, "unified", "discriminator")["net.0.weight"], pa["net.0.weight"])


def test_observe_rejects_classes_of_another_key():
    s = make_store("cvae", "per_group")
    with pytest.raises(ConfigError, match="'c' belongs to generator key 'group/high'"):
        s.observe_classes("group/low", ["a", "c"], node="n", round=0, policy="changed")
    with pytest.raises(ConfigError, match="unknown generator key"):
        s.observe_classes("group/nope", ["a"], node="n", round=0, policy="changed")


# -- beta warm-up ---------------------------------------------------------------------------------
def test_beta_warmup_continues_across_rounds_nodes_and_state_round_trip():
    s = make_store("vae", "unified", beta_max=2.0, beta_warmup_steps=4)
    betas = []
    for r in range(3):
        s.observe_classes("unified", ["a", "b", "c", "d"], node=f"n{r}", round=r, policy="changed")
        betas.append(s.train_batch(*batch(r), gen=gen(r), node=f"n{r}", round=r)["unified"]["beta"])
    s = clone(s)
    for r in range(3, 6):
        betas.append(s.train_batch(*batch(r), gen=gen(r), node="n0", round=r)["unified"]["beta"])
    assert betas == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0])
    s.reset("unified", node="n0", round=6)  # a fresh model warms up again
    assert s.train_batch(*batch(6), gen=gen(6), node="n0", round=6)["unified"]["beta"] == 0.0


# -- grouped training == per-key training -----------------------------------------------------------
def _reference_step(ref: GeneratorStore, x, y, g: torch.Generator) -> dict:
    """Per key, separately: the module's plain forward on that key's samples, torch's own opt.step()."""
    spec = ref.spec
    noise = torch.randn(len(y), spec.latent_dim, generator=g)  # the store draws noise per sample, in order
    cond = ref.conditions[y]
    key_of = [ref.key_for_class(CLASSES[int(c)]) for c in y]
    out = {}
    for key in ref.keys:
        idx = torch.tensor([i for i, k in enumerate(key_of) if k == key], dtype=torch.long)
        if len(idx) == 0:
            continue
        xk, ck, zk = x[idx], cond[idx], noise[idx]
        if spec.type == "gan":
            G, Dm = ref.module(key, "generator"), ref.module(key, "discriminator")
            fake = G(zk, ck)
            d_loss = (F.binary_cross_entropy_with_logits(Dm(xk, ck), torch.ones(len(idx)))
                      + F.binary_cross_entropy_with_logits(Dm(fake.detach(), ck), torch.zeros(len(idx))))
            g_loss = F.binary_cross_entropy_with_logits(Dm(fake, ck), torch.ones(len(idx)))
            d_grads = torch.autograd.grad(d_loss, list(Dm.parameters()))
            g_grads = torch.autograd.grad(g_loss, list(G.parameters()))
            for m, grads, role in ((Dm, d_grads, "discriminator"), (G, g_grads, "generator")):
                for p, gr in zip(m.parameters(), grads):
                    p.grad = gr
                ref.optimizer(key, role).step()
                ref.optimizer(key, role).zero_grad(set_to_none=True)
            out[key] = {"g_loss": g_loss.item(), "d_loss": d_loss.item()}
        else:
            m = ref.module(key)
            recon, mu, logvar = m(xk, ck, eps=zk)
            rec = ((recon - xk) ** 2).sum(1).mean()
            if m.conditional_prior:  # KL(N(mu, s^2) || N(pm, ps^2)) of the learned p(z | c), written out
                pm, plv = m.prior(ck).chunk(2, dim=-1)
                kl = (0.5 * (plv - logvar + (logvar.exp() + (mu - pm) ** 2) / plv.exp() - 1).sum(1)).mean()
            else:
                kl = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)).mean()
            beta = spec.beta_max * min(1.0, ref.step_count(key) / spec.beta_warmup_steps)
            loss = rec + beta * kl
            objective = loss
            if m.output_variance:  # the learned per-feature variance's Gaussian NLL on the detached residual
                lv = 8.0 * m.output_scaled_log_var  # log sigma^2 (stored divided by 8)
                objective = loss + (0.5 * ((recon.detach() - xk) ** 2 / lv.exp() + lv).sum(1)).mean()
            opt = ref.optimizer(key)
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            out[key] = {"loss": loss.item(), "recon": rec.item(), "kl": kl.item(), "beta": beta}
    return out


@pytest.mark.parametrize("type_", ["vae", "cvae", "gan", "cvae+output_variance", "vae+output_variance",
                                   "cvae+no_conditional_prior", "cvae+film", "cvae+no_film"])
@pytest.mark.parametrize("granularity", ["unified", "per_class", "per_group"])
def test_grouped_step_equals_separate_per_key_training(type_, granularity):
    # GAN: the simultaneous schedule without R1 (the alternating default: tests/test_gan_schedule.py)
    extra = {"gan": {"schedule": "simultaneous", "r1_gamma": 0.0}} if type_ == "gan" else {}
    type_, _, ov = type_.partition("+")
    if ov:  # "+name": that option on; "+no_name": off (where the type's default has it on)
        extra[ov.removeprefix("no_")] = not ov.startswith("no_")
    s = make_store(type_, granularity, ema_decay=0.995, **extra)  # (the VAE's default is 0)
    ref = clone(s)
    # the generator's moving average, by hand: after each of a key's steps t, avg += w (p - avg),
    # w = 1 - min(d, (1 + t) / (10 + t)); it starts at the initial weights
    d = s.spec.ema_decay
    avg = {n: t.clone() for n, t in ref.state_dict()[0].items() if "/generator/ema/" in n}
    assert avg and len(avg) == len([n for n in ref.state_dict()[0] if "/generator/param/" in n])
    for step, classes in enumerate([(0, 1, 2, 3), (0, 2), (1, 2, 3), (0, 1, 2, 3)]):
        x, y = batch(step, classes, n=13)  # unbalanced groups -> padding and masking are exercised
        got = s.train_batch(x, y, gen=gen(step), node="n", round=0)
        want = _reference_step(ref, x, y, gen(step))
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5)
            t = ref.step_count(k)
            w = 1 - min(d, (1 + t) / (10 + t))
            for name, p in ref.module(k).named_parameters():
                avg[f"{k}/generator/ema/{name}"] += w * (p.detach() - avg[f"{k}/generator/ema/{name}"])
    ts, tr = s.state_dict()[0], ref.state_dict()[0]
    assert sorted(ts) == sorted(tr)
    for n in ts:
        torch.testing.assert_close(ts[n], avg[n] if "/ema/" in n else tr[n], rtol=1e-4, atol=1e-6, msg=n)
    untrained = [k for k in s.keys if s.step_count(k) == 0]
    for k in untrained:  # a key never stepped: its average is still its initial weights
        for name, p in s.module(k).named_parameters():
            assert torch.equal(ts[f"{k}/generator/ema/{name}"], p.detach())


# -- non-finite losses ------------------------------------------------------------------------------
@pytest.mark.parametrize("type_", ["cvae", "gan"])
def test_non_finite_loss_raises_before_any_change(type_):
    s = make_store(type_, "per_class")
    s.train_batch(*batch(0, (0, 1)), gen=gen(0), node="n0", round=0)
    before_t, before_m = s.state_dict()
    x, y = batch(1, (0, 1, 2))
    x[y == 1] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"'class/b' on node node7 in round 5") as ei:
        s.train_batch(x, y, gen=gen(1), node="node7", round=5)
    assert (ei.value.key, ei.value.node, ei.value.round) == ("class/b", "node7", 5)
    after_t, after_m = s.state_dict()
    assert after_m == before_m and sorted(after_t) == sorted(before_t)
    assert all(torch.equal(before_t[n], after_t[n]) for n in before_t)
    assert len(s.optimizer("class/c").state) == 0  # the never-stepped key got no lazy state either
    x[y == 1] = float("inf")
    with pytest.raises(NonFiniteLossError):
        s.train_batch(x, y, gen=gen(1), node="node7", round=5)
    assert all(torch.equal(before_t[n], s.state_dict()[0][n]) for n in before_t)


# -- sampling, inputs, profiler ranges --------------------------------------------------------------
def test_sample_uses_each_class_key_and_condition():
    s = make_store("cvae", "unified", output_variance=True, ema_decay=0.0)  # samples the weights set below
    out = s.sample(torch.tensor([0, 1, 0]), gen=gen(5))
    assert out.shape == (3, D)
    assert torch.equal(out, s.sample(torch.tensor([0, 1, 0]), gen=gen(5)))
    g = gen(5)
    z = torch.randn(3, Z, generator=g)
    noise = torch.randn(3, D, generator=g)  # the likelihood's noise, drawn after the latents
    with torch.no_grad():
        m = s.module("unified")
        m.output_scaled_log_var.fill_(math.log(0.25) / 8)  # sigma 0.5
        out = s.sample(torch.tensor([0, 1, 0]), gen=gen(5))
        ref = m.decode(z, s.conditions[torch.tensor([0, 1, 0])]) + 0.5 * noise
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    a0, a1 = s.sample(torch.tensor([0]), gen=gen(6)), s.sample(torch.tensor([1]), gen=gen(6))
    assert not torch.allclose(a0, a1)  # same noise, other condition


@pytest.mark.parametrize("type_", ["vae", "gan"])
def test_sample_per_class_uses_that_class_generator(type_):
    s = make_store(type_, "per_class", ema_decay=0.0,  # samples the weights set below
                   **({"output_variance": True} if type_ == "vae" else {}))  # VAE: sampled
    idx = torch.tensor([2, 0, 2, 3])
    g = gen(9)
    z = torch.randn(4, Z, generator=g)
    noise = torch.randn(4, D, generator=g)  # VAE: its likelihood's noise, after the latents
    with torch.no_grad():
        if type_ == "vae":  # each class key its own sigma
            for c in range(len(CLASSES)):
                s.module(f"class/{CLASSES[c]}").output_scaled_log_var.fill_(math.log(0.1 * (c + 1)) / 8)
        out = s.sample(idx, gen=gen(9))
        for i, c in enumerate(idx.tolist()):
            m = s.module(f"class/{CLASSES[c]}")
            if type_ == "vae":
                ref = m.decode(z[i:i + 1]) + math.sqrt(0.1 * (c + 1)) * noise[i:i + 1]
            else:
                ref = m(z[i:i + 1], s.conditions[c:c + 1])
            torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("type_", ["vae", "cvae"])
def test_sample_without_output_variance_is_the_decoder_mean(type_):
    # what stores built before the output variance existed (and output_variance=False) sample
    s = make_store(type_, "unified", output_variance=False, conditional_prior=False)
    assert not any("output_log_var" in n for n, _ in s.module("unified").named_parameters())
    idx = torch.tensor([0, 1, 3])
    out = s.sample(idx, gen=gen(4))
    z = torch.randn(3, Z, generator=gen(4))
    with torch.no_grad():
        m = s.module("unified")
        ref = m.decode(z, s.conditions[idx]) if type_ == "cvae" else m.decode(z)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("type_", ["cvae", "gan"])
@pytest.mark.parametrize("granularity", ["unified", "per_class"])
def test_sample_reads_the_moving_average_not_the_last_weights(type_, granularity):
    s = make_store(type_, granularity)
    assert s.spec.ema_decay == 0.995  # the type's default (store/kinds.py)
    for step, classes in enumerate([(0, 1, 2, 3), (0, 2), (1, 3)]):
        s.train_batch(*batch(step, classes, n=13), gen=gen(step), node="n", round=0)
    tensors = s.state_dict()[0]
    # the same store sampling its trained weights (ema_decay 0), once with the average loaded as them
    params = {n: t for n, t in tensors.items() if "/param/" in n}
    last = make_store(type_, granularity, ema_decay=0.0)
    last.load_parameter_tensors(params)
    as_avg = make_store(type_, granularity, ema_decay=0.0)
    as_avg.load_parameter_tensors({**params, **{n.replace("/ema/", "/param/"): t for n, t in tensors.items()
                                                if "/ema/" in n}})
    idx = torch.tensor([0, 1, 2, 3, 1])
    out = s.sample(idx, gen=gen(4))
    assert torch.equal(out, as_avg.sample(idx, gen=gen(4)))
    assert not torch.allclose(out, last.sample(idx, gen=gen(4)))  # the average differs from the last weights


@pytest.mark.parametrize("granularity", ["unified", "per_class"])
def test_sample_with_conditional_prior_draws_from_p_z_given_c(granularity):
    s = make_store("cvae", granularity, conditional_prior=True, ema_decay=0.0)  # samples the weights set below
    idx = torch.tensor([0, 1, 3, 1])
    with torch.no_grad():  # a prior other than its N(0, I) start, per key
        for k in s.keys:
            pr = s.module(k).prior[0]
            pr.weight.copy_(torch.randn(pr.weight.shape, generator=gen(11)))
            pr.bias.copy_(torch.linspace(-1.0, 1.0, pr.bias.numel()))
        out = s.sample(idx, gen=gen(4))
        z = torch.randn(4, Z, generator=gen(4))
        for i, c in enumerate(idx.tolist()):
            m = s.module(s.key_for_class(CLASSES[c]))
            cond = s.conditions[c:c + 1]
            pm, plv = m.prior(cond).chunk(2, dim=-1)
            ref = m.decode(pm + torch.exp(0.5 * plv) * z[i:i + 1], cond)
            torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-6)
        plain = make_store("cvae", granularity, conditional_prior=False)  # the N(0, I) prior samples z itself
        assert not torch.allclose(out, plain.sample(idx, gen=gen(4)))


def test_bad_batches_are_data_errors():
    s = make_store()
    with pytest.raises(DataError, match=r"\[n, 6\]"):
        s.train_batch(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), gen=gen(0), node="n", round=0)
    with pytest.raises(DataError, match="out of range"):
        s.train_batch(torch.zeros(2, D), torch.tensor([0, 9]), gen=gen(0), node="n", round=0)
    with pytest.raises(DataError, match="integer"):
        s.train_batch(torch.zeros(2, D), torch.tensor([0.0, 1.0]), gen=gen(0), node="n", round=0)
    assert s.train_batch(torch.zeros(0, D), torch.zeros(0, dtype=torch.long), gen=gen(0), node="n", round=0) == {}
    with pytest.raises(DataError, match="conditions"):
        GeneratorStore(s.spec, torch.zeros(3, C))


def test_train_batch_emits_profiler_ranges():
    s = make_store("gan", "per_class")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        s.train_batch(*batch(0), gen=gen(0), node="n", round=0)
    names = {e.key for e in prof.key_averages()}
    assert {"generator_step", "generator_step/forward", "generator_step/backward",
            "generator_step/optimizer"} <= names


def test_to_device_keeps_objects_and_state():
    s = make_store("gan", "per_class")
    s.train_batch(*batch(0), gen=gen(0), node="n", round=0)
    ids = [id(p) for p in s.module("class/a").parameters()]
    opt = s.optimizer("class/a")
    assert s.to("cpu") is s
    assert ids == [id(p) for p in s.module("class/a").parameters()] and s.optimizer("class/a") is opt
    assert s.step_count("class/a") == 1


class _NanBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


class _NanGradLayer(torch.nn.Module):
    def forward(self, x):
        return _NanBackward.apply(x)


def test_non_finite_gradient_with_finite_loss_raises_before_any_change():
    s = make_store("cvae", "unified")
    s.train_batch(*batch(0), gen=gen(0), node="n0", round=0)
    before_t, before_m = s.state_dict()
    s.module("unified").encoder[1] = _NanGradLayer()  # forward unchanged in value, backward NaN
    with pytest.raises(NonFiniteLossError, match="non-finite gradient for generator key 'unified'"):
        s.train_batch(*batch(1), gen=gen(1), node="n1", round=1)
    after_t, after_m = s.state_dict()
    assert after_m == before_m and all(torch.equal(before_t[n], after_t[n]) for n in before_t)


def test_parameters_stay_the_trained_ones_after_external_rebinding_and_deepcopy():
    import copy

    s = make_store("gan", "per_class")
    s.train_batch(*batch(0), gen=gen(0), node="n", round=0)
    twin = copy.deepcopy(s)
    p = s.module("class/b").net[0].weight
    p.data = p.data.clone()  # someone re-points a Parameter: the store must train THIS tensor
    before = p.detach().clone()
    s.train_batch(*batch(1), gen=gen(1), node="n", round=0)
    twin.train_batch(*batch(1), gen=gen(1), node="n", round=0)
    assert not torch.equal(before, p)
    assert torch.equal(p, twin.module("class/b").net[0].weight)
    ts, tt = s.state_dict()[0], twin.state_dict()[0]
    assert all(torch.equal(ts[n], tt[n]) for n in ts)


def test_a_scheduled_lr_steps_each_round_at_its_factor_as_adamw_at_that_lr_would():
    # cosine over 3 rounds: the grouped update of a round's visit is AdamW's at lr x lr_scale(round),
    # for every key alike; the optimizers keep the configured lr (what a reset or a checkpoint holds)
    from feda2v.store.optim import COSINE_FINAL_FRACTION, lr_scale

    scales = [lr_scale("cosine", r, 3) for r in (1, 2, 3)]
    assert scales == sorted(scales, reverse=True) and scales[0] < 1 and scales[-1] > COSINE_FINAL_FRACTION
    assert lr_scale("cosine", 0, 3) == scales[0] and lr_scale("cosine", 9, 3) == scales[-1]  # clamped to the run
    assert lr_scale("constant", 2, 3) == 1.0
    # (no moving average: the by-hand reference is the grouped-step test's, above)
    s = make_store("cvae", "per_class", ema_decay=0.0, optimizer={"lr": 0.05, "schedule": "cosine", "decay_rounds": 3})
    ref, flat = clone(s), make_store("cvae", "per_class", ema_decay=0.0, optimizer={"lr": 0.05})
    for step, (round_, classes) in enumerate([(1, (0, 1, 2, 3)), (2, (0, 2)), (3, (1, 2, 3)), (3, (0, 1, 2, 3))]):
        x, y = batch(step, classes, n=13)
        s.train_batch(x, y, gen=gen(step), node="n", round=round_)
        flat.train_batch(x, y, gen=gen(step), node="n", round=round_)
        for k in ref.keys:
            ref.optimizer(k).param_groups[0]["lr"] = 0.05 * lr_scale("cosine", round_, 3)
        _reference_step(ref, x, y, gen(step))
        for k in ref.keys:
            ref.optimizer(k).param_groups[0]["lr"] = 0.05
    ts, tr, tf = s.state_dict()[0], ref.state_dict()[0], flat.state_dict()[0]
    assert sorted(ts) == sorted(tr)
    for n in ts:
        torch.testing.assert_close(ts[n], tr[n], rtol=1e-4, atol=1e-6, msg=n)
    # the schedule did something: the constant lr's weights are elsewhere
    assert max((ts[n] - tf[n]).abs().max().item() for n in ts if "/generator/param/" in n) > 1e-3
    assert {s.optimizer(k).param_groups[0]["lr"] for k in s.keys} == {0.05}
    assert GeneratorStore.from_state(*s.state_dict()).spec.optimizer == s.spec.optimizer


@pytest.mark.parametrize("type_", ["vae", "cvae", "gan"])
@pytest.mark.parametrize("granularity", ["unified", "per_class", "per_group"])
def test_a_scheduled_round_is_bit_for_bit_the_constant_lr_of_its_factor(type_, granularity):
    # every update of a round (both GAN roles, every key) takes the round's factor, and nothing else
    # changes: round 2 of 3 under the cosine at lr L is the constant lr L x lr_scale(2) exactly
    from feda2v.store.optim import lr_scale

    lr = 0.01
    scheduled = make_store(type_, granularity, optimizer={"lr": lr, "schedule": "cosine", "decay_rounds": 3})
    constant = make_store(type_, granularity, optimizer={"lr": lr * lr_scale("cosine", 2, 3)})
    for step, classes in enumerate([(0, 1, 2, 3), (0, 2)]):
        x, y = batch(step, classes, n=13)
        for s in (scheduled, constant):
            s.train_batch(x, y, gen=gen(step), node="n", round=2)
    a, b = scheduled.state_dict()[0], constant.state_dict()[0]
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("granularity", ["unified", "per_class"])
def test_a_cvae_whose_posterior_variance_ran_away_trains_back_instead_of_overflowing(granularity):
    # What digits' Dirichlet split did to the unified cVAE at lr 3e-3 (make compare): a visit drove
    # the encoder's log-variance to 27, exp(0.5 * logvar) scaled z by 7e5, and the run
    # went non-finite. Unbounded, a log-variance of 200 overflows float32 at the first step; clamped
    # with a zero gradient outside, the step's other updates push it further out (measured +0.15).
    s = make_store("cvae", granularity)
    key = s.keys[0]
    with torch.no_grad():
        s.module(key).encoder[4].bias[Z:] = 200.0
    x, y = batch(3)

    def raw_logvar() -> float:
        with torch.no_grad():
            return s.module(key).encoder(torch.cat([x, s.conditions[y]], 1))[:, Z:].max().item()

    before = raw_logvar()
    for step in range(30):
        s.train_batch(x, y, gen=gen(step), node="n", round=1)  # NonFiniteLossError unbounded
    assert raw_logvar() < before - 0.1  # its gradient through the bound brings it back
