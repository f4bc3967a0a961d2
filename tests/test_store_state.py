"""GeneratorStore state: contract names, bit-exact round trip, strict loading, parameter exchange."""
from __future__ import annotations

import json

import pytest
import torch

from feda2v.errors import CheckpointError, ConfigError
from feda2v.store import GeneratorStore, StoreSpec

CLASSES = ["a", "b", "c", "d"]
D, C, Z, H = 6, 4, 3, 8
GROUPS = {"low": ["a", "b"], "high": ["c", "d"]}


def make_store(type_="cvae", granularity="per_class", **kw) -> GeneratorStore:
    args = dict(type=type_, granularity=granularity, classes=CLASSES, feature_dim=D, condition_dim=C,
                latent_dim=Z, hidden_dim=H, class_groups=GROUPS, beta_warmup_steps=3, seed=11)
    args.update(kw)
    cond = torch.randn(len(CLASSES), C, generator=torch.Generator().manual_seed(5))
    return GeneratorStore(StoreSpec(**args), cond)


def batch(seed: int, classes=(0, 1, 2, 3), n: int = 12):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    y[: len(classes)] = torch.tensor(classes)
    return torch.randn(n, D, generator=g) + y.unsqueeze(1).float(), y


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_identical(a: GeneratorStore, b: GeneratorStore) -> None:
    (ta, ma), (tb, mb) = a.state_dict(), b.state_dict()
    assert ma == mb
    assert sorted(ta) == sorted(tb)
    for n in ta:
        assert ta[n].dtype == tb[n].dtype and torch.equal(ta[n], tb[n]), n


@pytest.mark.parametrize("type_", ["vae", "cvae", "gan"])
@pytest.mark.parametrize("granularity", ["unified", "per_class", "per_group"])
def test_round_trip_then_k_steps_is_bit_identical(type_, granularity):
    s = make_store(type_, granularity)
    first_key = s.keys[0]
    s.observe_classes(first_key, s.classes_of_key(first_key)[:1], node="n0", round=0, policy="changed")
    for i in range(2):
        s.train_batch(*batch(i, (0, 1, 2)), gen=gen(i), node="n0", round=0)  # class d never seen yet
    s.observe_classes(first_key, s.classes_of_key(first_key), node="n1", round=1, policy="changed")
    s.train_batch(*batch(2, (0, 1)), gen=gen(2), node="n1", round=1)
    tensors, meta = s.state_dict()
    meta = json.loads(json.dumps(meta))  # the meta must survive JSON (checkpoint header)
    if granularity != "unified":
        assert meta["optimizers"][f"{s.keys[-1]}/generator"]["step"] == 0 or granularity == "per_group"
    rebuilt = GeneratorStore.from_state(tensors, meta)
    fresh = make_store(type_, granularity)
    fresh.load_state_dict(tensors, meta)
    assert_identical(s, rebuilt)
    assert_identical(s, fresh)
    assert rebuilt.events == s.events and rebuilt.reset_counts == s.reset_counts
    for k in range(3):
        x, y = batch(10 + k, (0, 1, 2, 3) if k else (3,))
        outs = [st.train_batch(x, y, gen=gen(10 + k), node="n2", round=2) for st in (s, rebuilt, fresh)]
        assert outs[0] == outs[1] == outs[2]
    assert_identical(s, rebuilt)
    assert_identical(s, fresh)
    torch.testing.assert_close(s.sample(torch.arange(4), gen=gen(0)), rebuilt.sample(torch.arange(4), gen=gen(0)),
                               rtol=0, atol=0)


def test_state_dict_names_and_meta_follow_the_contract():
    s = make_store("gan", "per_class")
    s.train_batch(*batch(0, (0,)), gen=gen(0), node="n", round=0)
    s.reset("class/b", node="n", round=0)
    tensors, meta = s.state_dict()
    assert tensors["conditions"].shape == (4, C)
    assert "class/a/generator/param/net.0.weight" in tensors
    assert "class/a/discriminator/param/out.0.bias" in tensors  # ProjectionDiscriminator
    step = tensors["class/a/discriminator/optim/net.0.weight/step"]
    assert step.shape == () and step.dtype == torch.float32 and step.item() == s.spec.gan.d_steps == 2  # D steps first
    assert tensors["class/a/generator/optim/net.0.weight/step"].item() == s.spec.gan.g_steps == 1
    assert tensors["class/a/generator/optim/net.0.weight/exp_avg"].shape == (H, Z + C)
    assert "class/a/generator/optim/net.0.weight/exp_avg_sq" in tensors
    assert not any(n.startswith("class/b/generator/optim/") for n in tensors)  # never stepped: no state
    assert set(meta) == {"spec", "keys", "roles", "arch", "optimizers", "trained_classes", "events", "reset_counts"}
    assert meta["keys"] == s.keys and meta["roles"] == ["generator", "discriminator"]
    assert meta["arch"]["class/a/discriminator"] == {
        "class": "ProjectionDiscriminator", "kwargs": {"feature_dim": D, "condition_dim": C, "hidden_dim": H}}
    assert meta["optimizers"]["class/a/generator"] == {
        "name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2, "step": 1}
    assert meta["events"] == [{"key": "class/b", "node": "n", "round": 0}]
    assert meta["reset_counts"]["class/b"] == 1 and meta["trained_classes"]["class/a"] is None


def test_state_dict_is_a_copy():
    s = make_store()
    s.train_batch(*batch(0), gen=gen(0), node="n", round=0)
    tensors, _ = s.state_dict()
    saved = {n: t.clone() for n, t in tensors.items()}
    s.train_batch(*batch(1), gen=gen(1), node="n", round=0)
    assert all(torch.equal(saved[n], tensors[n]) for n in saved)


def _trained(type_="cvae"):
    s = make_store(type_, "per_class")
    s.train_batch(*batch(0), gen=gen(0), node="n", round=0)
    return s


def _unchanged_after_failed_load(bad_tensors, bad_meta, exc, match):
    target = make_store()
    before_t, before_m = target.state_dict()
    with pytest.raises(exc, match=match):
        target.load_state_dict(bad_tensors, bad_meta)
    after_t, after_m = target.state_dict()
    assert after_m == before_m and all(torch.equal(before_t[n], after_t[n]) for n in before_t)


def test_strict_load_names_missing_tensor():
    tensors, meta = _trained().state_dict()
    del tensors["class/c/generator/optim/decoder.2.weight/exp_avg_sq"]
    _unchanged_after_failed_load(tensors, meta, CheckpointError,
                                 "missing tensor 'class/c/generator/optim/decoder.2.weight/exp_avg_sq'")
    tensors, meta = _trained().state_dict()
    del tensors["class/a/generator/param/encoder.0.bias"]
    with pytest.raises(CheckpointError, match="'class/a/generator/param/encoder.0.bias'"):
        GeneratorStore.from_state(tensors, meta)


def test_strict_load_names_extra_tensor():
    tensors, meta = _trained().state_dict()
    tensors["class/a/generator/param/encoder.9.weight"] = torch.zeros(1)
    _unchanged_after_failed_load(tensors, meta, CheckpointError, "unexpected tensor 'class/a/generator/param/encoder.9")
    # optimizer state for a key the meta says never stepped is extra too
    s = make_store()
    s.train_batch(*batch(0, (0,)), gen=gen(0), node="n", round=0)
    tensors, meta = s.state_dict()
    tensors["class/b/generator/optim/encoder.0.weight/step"] = torch.tensor(1.0)
    with pytest.raises(CheckpointError, match="unexpected tensor 'class/b/generator/optim/encoder.0.weight/step'"):
        make_store().load_state_dict(tensors, meta)


def test_strict_load_names_mis_shaped_tensor_and_wrong_dtype():
    tensors, meta = _trained().state_dict()
    tensors["class/d/generator/optim/encoder.2.weight/exp_avg"] = torch.zeros(H, H + 1)
    _unchanged_after_failed_load(tensors, meta, CheckpointError,
                                 r"'class/d/generator/optim/encoder.2.weight/exp_avg' has shape \[8, 9\]")
    tensors, meta = _trained().state_dict()
    tensors["class/a/generator/param/decoder.4.bias"] = tensors["class/a/generator/param/decoder.4.bias"].double()
    _unchanged_after_failed_load(tensors, meta, CheckpointError, "'class/a/generator/param/decoder.4.bias' is torch.float64")


def test_strict_load_rejects_other_spec_keys_and_meta():
    tensors, meta = _trained().state_dict()
    with pytest.raises(ConfigError, match="differs in: hidden_dim"):
        make_store(hidden_dim=H + 1).load_state_dict(tensors, meta)
    with pytest.raises(ConfigError, match="granularity"):
        make_store(granularity="unified").load_state_dict(tensors, meta)
    bad = dict(meta, keys=meta["keys"][:-1])
    _unchanged_after_failed_load(tensors, bad, CheckpointError, "keys")
    bad = {k: v for k, v in meta.items() if k != "events"}
    _unchanged_after_failed_load(tensors, bad, CheckpointError, "missing events")
    bad = json.loads(json.dumps(meta))
    bad["optimizers"]["class/a/generator"]["step"] = 7
    _unchanged_after_failed_load(tensors, bad, CheckpointError, "'class/a/generator': meta step 7")
    bad = json.loads(json.dumps(meta))
    bad["arch"]["class/a/generator"]["class"] = "VAE"
    _unchanged_after_failed_load(tensors, bad, CheckpointError, "architecture of 'class/a/generator'")
    bad = json.loads(json.dumps(meta))
    del bad["spec"]["seed"]
    with pytest.raises(CheckpointError, match="seed"):
        GeneratorStore.from_state(tensors, bad)


def test_load_restores_hyperparameters_and_counters():
    s = _trained("gan")
    s.optimizer("class/a", "discriminator").param_groups[0]["lr"] = 0.5
    s.observe_classes("class/a", ["a"], node="n", round=1, policy="changed")
    s.reset("class/c", node="n3", round=4)
    t = GeneratorStore.from_state(*s.state_dict())
    assert t.optimizer("class/a", "discriminator").param_groups[0]["lr"] == 0.5
    assert t.optimizer("class/a", "generator").param_groups[0]["lr"] == 1e-3
    assert t.trained_classes("class/a") == ["a"] and t.reset_counts["class/c"] == 1
    assert [e.key for e in t.events] == ["class/c"]
    assert t.step_count("class/b", "discriminator") == t.spec.gan.d_steps and t.step_count("class/c") == 0
    # the next reset of a restored key uses the next seed, as the original would
    s.reset("class/c", node="n", round=5)
    t.reset("class/c", node="n", round=5)
    assert_identical(s, t)


def test_parameter_tensors_round_trip_and_averaging():
    a, b = _trained(), make_store()
    b.train_batch(*batch(7), gen=gen(7), node="n", round=0)
    pa, pb = a.parameter_tensors(), b.parameter_tensors()
    assert sorted(pa) == sorted(n for n in a.state_dict()[0] if "/param/" in n or "/ema/" in n)
    assert any("/generator/ema/" in n for n in pa)  # the moving averages travel (and average) with them
    opt_state_before = {n: t for n, t in a.state_dict()[0].items() if "/optim/" in n}
    avg = {n: (pa[n] + pb[n]) / 2 for n in pa}
    ids = [id(p) for p in a.module("class/a").parameters()]
    a.load_parameter_tensors(avg)
    assert ids == [id(p) for p in a.module("class/a").parameters()]
    assert all(torch.equal(a.parameter_tensors()[n], avg[n]) for n in avg)
    after = a.state_dict()[0]
    assert all(torch.equal(after[n], t) for n, t in opt_state_before.items())  # optimizer state untouched
    pa["class/a/generator/param/encoder.0.weight"] += 1.0  # a copy: the store does not change
    assert not torch.equal(a.parameter_tensors()["class/a/generator/param/encoder.0.weight"],
                           pa["class/a/generator/param/encoder.0.weight"])
    missing = dict(avg)
    missing.pop("class/b/generator/param/decoder.0.bias")
    with pytest.raises(CheckpointError, match="missing tensor 'class/b/generator/param/decoder.0.bias'"):
        a.load_parameter_tensors(missing)
    shaped = dict(avg)
    shaped["class/b/generator/param/decoder.0.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="'class/b/generator/param/decoder.0.bias' has shape"):
        a.load_parameter_tensors(shaped)


# Keys added to the generator after checkpoints existed, each with a layer of its own: a state
# written before the key (its spec without the field, its model without the layer) rebuilds as
# that same model (the same sample bytes); a store with the layer keeps and restores it.
# (type, key, how stores were before, the layer's name fragment, a store with it, its granularity,
# the tensors it must have)
ADDED_LAYERS = [
    ("vae", "output_variance", {}, "output_log_var", {"output_variance": True}, "unified",
     ["unified/generator/param/output_scaled_log_var"]),
    ("cvae", "output_variance", {}, "output_log_var", {"output_variance": True}, "unified",
     ["unified/generator/param/output_scaled_log_var"]),
    ("cvae", "conditional_prior", {"conditional_prior": False}, "prior", {"conditional_prior": True}, "per_class",
     ["class/a/generator/param/prior.0.weight"]),
    ("cvae", "film", {"film": False}, "modulation", {}, "unified",
     ["unified/generator/param/modulation.0.weight", "unified/generator/ema/modulation.0.weight"]),
]


@pytest.mark.parametrize("type_,key,before,layer,kw,granularity,names", ADDED_LAYERS,
                         ids=[f"{c[0]}-{c[1]}" for c in ADDED_LAYERS])
def test_state_from_before_an_added_layer_loads_as_that_model(type_, key, before, layer, kw, granularity, names):
    old = make_store(type_, "unified", **before)
    old.train_batch(*batch(0), gen=gen(0), node="n0", round=0)
    tensors, meta = old.state_dict()
    meta = json.loads(json.dumps(meta))
    assert key not in meta["arch"]["unified/generator"]["kwargs"]  # recorded as before
    assert not any(layer in n for n in tensors)
    del meta["spec"][key]
    rebuilt = GeneratorStore.from_state(tensors, meta)
    assert getattr(rebuilt.spec, key) is False
    assert torch.equal(rebuilt.sample(torch.tensor([0, 2]), gen=gen(3)), old.sample(torch.tensor([0, 2]), gen=gen(3)))
    new = make_store(type_, granularity, **kw)  # the layer is state, kept and restored
    new.train_batch(*batch(0), gen=gen(0), node="n0", round=0)
    t2, m2 = new.state_dict()
    assert m2["arch"][names[0].split("/param/")[0]]["kwargs"][key] is True
    assert all(n in t2 for n in names)
    assert_identical(GeneratorStore.from_state(t2, json.loads(json.dumps(m2))), new)


def test_hidden_dim_null_is_the_types_width():
    from feda2v.store.spec import StoreSpec

    def spec(type_, granularity="unified", **kw):
        return StoreSpec(type=type_, granularity=granularity, classes=("a", "b"), feature_dim=4, condition_dim=3,
                         class_groups={"g": ("a", "b")} if granularity == "per_group" else {}, **kw)

    assert spec("cvae").hidden_dim == 512 and spec("vae").hidden_dim == 128 and spec("gan").hidden_dim == 256
    # a cVAE key serving several classes is wider than one serving one
    assert spec("cvae", "per_group").hidden_dim == 512 and spec("cvae", "per_class").hidden_dim == 256
    assert spec("gan", "per_class").hidden_dim == 256 and spec("vae", "per_class").hidden_dim == 128
    assert spec("cvae", arch="fedgfe").hidden_dim == 128  # the published architectures keep their width
    assert spec("cvae", hidden_dim=32).hidden_dim == 32 and spec("cvae", "per_class", hidden_dim=512).hidden_dim == 512
    for granularity, width in (("unified", 512), ("per_class", 256)):
        s = spec("cvae", granularity)
        assert StoreSpec.from_json(s.to_json()).hidden_dim == width  # recorded resolved
        store = GeneratorStore(s, torch.zeros(2, 3))
        assert store.module(store.keys[0]).encoder[0].weight.shape[0] == width


def test_conditional_prior_is_the_cvae_default_and_refused_where_no_architecture_has_one():
    assert make_store("cvae", "unified").spec.conditional_prior is True  # None (config null): the type's default
    assert make_store("cvae", "unified", conditional_prior=False).spec.conditional_prior is False
    for type_, arch in (("vae", "default"), ("gan", "default"), ("cvae", "fedgfe")):
        assert make_store(type_, "unified", arch=arch).spec.conditional_prior is False  # they have none
    for type_, arch in (("vae", "default"), ("gan", "default"), ("cvae", "fedgfe")):
        with pytest.raises(ConfigError, match=f"generator.conditional_prior=true needs .*type {type_} arch {arch}"):
            make_store(type_, "unified", conditional_prior=True, arch=arch)


def test_film_is_the_default_for_keys_of_several_classes_and_refused_where_none_exists():
    assert make_store("cvae", "unified").spec.film is True  # None (config null): the type's default
    assert make_store("gan", "unified").spec.film is True and make_store("gan", "per_class").spec.film is False
    assert make_store("gan", "unified", arch="concat").spec.film is False  # the older GAN stores' variant
    assert make_store("cvae", "per_group").spec.film is True
    assert make_store("cvae", "per_class").spec.film is False  # one condition per key: nothing to modulate
    assert make_store("cvae", "per_class", film=True).spec.film is True
    assert make_store("cvae", "unified", film=False).spec.film is False
    for type_, arch in (("vae", "default"), ("gan", "fedgfe"), ("cvae", "fedgfe")):
        assert make_store(type_, "unified", arch=arch).spec.film is False  # they have none
        with pytest.raises(ConfigError, match=f"generator.film=true needs .*type {type_} arch {arch}"):
            make_store(type_, "unified", film=True, arch=arch)


def test_the_several_classes_defaults_follow_one_predicate_over_every_granularity():
    # FiLM, the wider cVAE and its cosine lr all belong to keys serving several classes: one
    # predicate decides them, for every granularity the config accepts, so a new granularity cannot
    # split them
    from feda2v.config.schema import CHOICES
    from feda2v.store.spec import holds_several_classes, resolve_lr_schedule

    granularities = CHOICES["generator.granularity"]
    assert {g: holds_several_classes(g) for g in granularities} == {
        "unified": True, "per_class": False, "per_group": True}
    for g in granularities:
        spec = make_store("cvae", g, hidden_dim=None).spec  # null: the type's width
        assert spec.film is holds_several_classes(g)
        assert spec.hidden_dim == (512 if holds_several_classes(g) else 256)
        assert resolve_lr_schedule(None, "cvae", "default", g) == ("cosine" if holds_several_classes(g) else "constant")


def test_output_variance_is_opt_in_and_refused_where_no_architecture_has_one():
    assert make_store("cvae", "unified").spec.output_variance is False
    assert make_store("cvae", "unified", output_variance=True).spec.output_variance is True
    with pytest.raises(ConfigError, match="generator.output_variance=true needs"):
        make_store("gan", "unified", output_variance=True)
    with pytest.raises(ConfigError, match="arch fedgfe"):
        make_store("cvae", "unified", output_variance=True, arch="fedgfe")


def test_state_from_before_the_moving_average_loads_sampling_the_trained_weights():
    # a state written before generator.ema_decay existed: no average, its spec without the field;
    # it rebuilds as that same store (sampling its trained weights, the same bytes)
    old = make_store("cvae", "unified", ema_decay=0.0)
    old.train_batch(*batch(0), gen=gen(0), node="n0", round=0)
    tensors, meta = old.state_dict()
    meta = json.loads(json.dumps(meta))
    assert not any("/ema/" in n for n in tensors)
    del meta["spec"]["ema_decay"]
    rebuilt = GeneratorStore.from_state(tensors, meta)
    assert rebuilt.spec.ema_decay == 0.0
    assert_identical(rebuilt, old)
    with pytest.raises(ConfigError, match="differs in: ema_decay"):  # not silently given a fresh average
        make_store("cvae", "unified").load_state_dict(tensors, meta)


@pytest.mark.parametrize("granularity", ["unified", "per_class"])
def test_moving_average_is_state_kept_restored_and_reset(granularity):
    s = make_store("gan", granularity)
    assert s.spec.ema_decay == 0.995
    for step in range(3):
        s.train_batch(*batch(step), gen=gen(step), node="n0", round=0)
    tensors, meta = s.state_dict()
    names = [n for n in tensors if "/ema/" in n]
    assert names and all("/generator/ema/" in n for n in names)  # the generator's only: D is never sampled
    assert any(not torch.equal(tensors[n], tensors[n.replace("/ema/", "/param/")]) for n in names)
    t = GeneratorStore.from_state(tensors, json.loads(json.dumps(meta)))
    assert_identical(t, s)
    for step in range(3, 5):  # and continues bit for bit
        for x in (s, t):
            x.train_batch(*batch(step), gen=gen(step), node="n0", round=0)
    assert_identical(t, s)
    key = s.keys[-1]
    s.reset(key, node="n", round=1)  # the average starts again at the re-initialised weights
    after = s.state_dict()[0]
    for name, p in s.module(key).named_parameters():
        assert torch.equal(after[f"{key}/generator/ema/{name}"], p.detach())
    other = [n for n in names if not n.startswith(key + "/")]
    assert all(torch.equal(after[n], t.state_dict()[0][n]) for n in other)


def test_ema_decay_null_is_the_types_and_off_for_the_published_architectures():
    from feda2v.store.spec import StoreSpec

    def spec(type_, **kw):
        return StoreSpec(type=type_, granularity="unified", classes=("a", "b"), feature_dim=4, condition_dim=3, **kw)

    assert spec("cvae").ema_decay == spec("gan").ema_decay == 0.995
    assert spec("vae").ema_decay == 0.0  # per class it lost on every seed (README, generator comparison)
    assert spec("cvae", arch="fedgfe").ema_decay == 0.0 and spec("gan", arch="fedgfe").ema_decay == 0.0
    assert spec("cvae", ema_decay=0.9).ema_decay == 0.9
    assert StoreSpec.from_json(spec("gan").to_json()).ema_decay == 0.995  # recorded resolved
    with pytest.raises(ConfigError, match="ema_decay must be in"):
        spec("cvae", ema_decay=1.0)
