"""Real GeneratorStore state through the container: every granularity x generator type."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from feda2v.checkpoint import read_checkpoint, verify_checkpoint, write_checkpoint
from feda2v.checkpoint.container import RESERVED
from feda2v.errors import CheckpointError

CLASSES = ["a", "b", "c", "d"]
GROUPS = {"g1": ["a", "c"], "g2": ["b", "d"]}


def build_store(gtype: str, granularity: str, seed: int = 0):
    from feda2v.store import GeneratorStore, StoreSpec

    spec = StoreSpec(type=gtype, granularity=granularity, classes=CLASSES, feature_dim=6, condition_dim=3,
                     latent_dim=2, hidden_dim=8, class_groups=GROUPS if granularity == "per_group" else {},
                     seed=seed)
    conditions = torch.randn(len(CLASSES), 3, generator=torch.Generator().manual_seed(1))
    store = GeneratorStore(spec, conditions)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 6, generator=g)
    y = torch.arange(16) % 3  # class 'd' never trained: its key keeps empty optimizer state
    for r in range(2):
        store.train_batch(x, y, gen=torch.Generator().manual_seed(10 + r), node="0", round=r)
    return store


def federation_checkpoint(path, store, granularity, gtype):
    tensors, meta = store.state_dict()
    all_t = {f"store/server/{k}": v for k, v in tensors.items()}
    header = {"round": 2, "stores": {"server": meta}, "keys": meta["keys"],
              "roles": meta["roles"],
              "config": {"generator": {"granularity": granularity, "type": gtype}},
              "optimizers": {kr: {"step": o["step"], "lr": o["lr"], "weight_decay": o["weight_decay"]}
                             for kr, o in meta["optimizers"].items()}}
    write_checkpoint(path, all_t, header)
    return tensors, meta


def load_store(path):
    from feda2v.store import GeneratorStore

    t, h = read_checkpoint(path)
    inner = {k[len("store/server/"):]: v for k, v in t.items()}
    return GeneratorStore.from_state(inner, h["stores"]["server"]), t, h


@pytest.mark.parametrize("gtype", ["vae", "cvae", "gan"])
@pytest.mark.parametrize("granularity", ["unified", "per_class", "per_group"])
def test_store_round_trip(tmp_path, gtype, granularity):
    store = build_store(gtype, granularity)
    tensors, meta = federation_checkpoint(tmp_path / "a.ckpt", store, granularity, gtype)
    assert any("/optim/" in k for k in tensors)  # real optimizer moments are in there
    loaded, t, h = load_store(tmp_path / "a.ckpt")
    t2, meta2 = loaded.state_dict()
    assert meta2 == meta
    assert sorted(t2) == sorted(tensors)
    for k in tensors:
        assert tensors[k].dtype == t2[k].dtype and torch.equal(tensors[k], t2[k]), k
    for key in store.keys:
        for role in store.roles:
            assert loaded.step_count(key, role) == store.step_count(key, role)
    # save -> load -> save: byte-identical
    federation_checkpoint(tmp_path / "b.ckpt", loaded, granularity, gtype)
    assert (tmp_path / "a.ckpt").read_bytes() == (tmp_path / "b.ckpt").read_bytes()


@pytest.fixture(scope="module")
def per_class_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("pc") / "pc.ckpt"
    federation_checkpoint(p, build_store("cvae", "per_class"), "per_class", "cvae")
    return p


def _rewrite(src, dst, edit):
    t, h = read_checkpoint(src)
    edit(t, h)
    write_checkpoint(dst, t, {k: v for k, v in h.items() if k not in RESERVED})


def test_missing_store_tensor_is_rejected_by_name(tmp_path, per_class_file):
    name = "store/server/class/a/generator/optim/encoder.0.weight/exp_avg"
    _rewrite(per_class_file, tmp_path / "m.ckpt", lambda t, h: t.pop(name))
    verify_checkpoint(tmp_path / "m.ckpt")  # a well-formed container ...
    with pytest.raises(CheckpointError, match="missing tensor 'class/a/generator/optim/encoder.0.weight/exp_avg'"):
        load_store(tmp_path / "m.ckpt")  # ... that the store refuses, naming the tensor


def test_extra_store_tensor_is_rejected_by_name(tmp_path, per_class_file):
    _rewrite(per_class_file, tmp_path / "x.ckpt", lambda t, h: t.__setitem__("store/server/class/z/generator/param/w", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'class/z/generator/param/w'"):
        load_store(tmp_path / "x.ckpt")


def test_file_of_another_granularity_is_refused(tmp_path, per_class_file):
    from feda2v.store import GeneratorStore, StoreSpec

    from feda2v.checkpoint import check_resumable, read_run_state

    with pytest.raises(CheckpointError, match="generator.granularity is 'per_class' there, 'unified' here"):
        check_resumable({"generator": {"granularity": "unified", "type": "cvae"}},
                        read_run_state(per_class_file), None, per_class_file)
    # and the store itself refuses the state if a caller skips the header check
    t, h = read_checkpoint(per_class_file)
    inner = {k[len("store/server/"):]: v for k, v in t.items()}
    spec = StoreSpec(type="cvae", granularity="unified", classes=CLASSES, feature_dim=6, condition_dim=3,
                     latent_dim=2, hidden_dim=8)
    unified = GeneratorStore(spec, torch.zeros(4, 3))
    from feda2v.errors import Feda2vError

    with pytest.raises(Feda2vError) as e:
        unified.load_state_dict(inner, h["stores"]["server"])
    assert "granularity" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["output_variance", "conditional_prior", "film"])  # runstate.ADDED_CONFIG_KEYS
def test_checkpoint_from_before_a_key_resumes_with_it_off(tmp_path, per_class_file, key):
    from feda2v.checkpoint import check_resumable, read_run_state

    state = dataclasses.replace(read_run_state(per_class_file),
                                config={"generator": {"granularity": "per_class", "type": "cvae"}})  # before the key
    base = {"granularity": "per_class", "type": "cvae"}
    check_resumable({"generator": {**base, key: False}}, state, None, per_class_file)
    with pytest.raises(CheckpointError, match=f"generator.{key} is False there, True here"):
        check_resumable({"generator": {**base, key: True}}, state, None, per_class_file)


def test_null_conditional_prior_is_recorded_as_the_type_default(per_class_file):
    # null (the default) means the type's own default; the checkpoint records what it resolved to,
    # so a run from before the key (no conditional prior) resumes where null means none (vae, gan)
    # and is refused, naming the key, where null now means one (cvae)
    from pathlib import Path

    from feda2v.checkpoint import check_resumable, read_run_state, state_config
    from feda2v.config import load_config
    from feda2v.config.files import compose_conf

    conf = Path(__file__).resolve().parents[1] / "conf"
    for type_, want in (("cvae", True), ("vae", False), ("gan", False)):
        cfg = load_config(compose_conf(conf, [f"generator={type_}"]))
        assert cfg.generator.conditional_prior is None
        mine = state_config(cfg)
        assert mine["generator"]["conditional_prior"] is want
        old = json.loads(json.dumps(mine))
        del old["generator"]["conditional_prior"]  # written before the key existed
        state = dataclasses.replace(read_run_state(per_class_file), config=old, data_manifest_hash=None)
        if want:
            with pytest.raises(CheckpointError, match="generator.conditional_prior is False there, True here"):
                check_resumable(mine, state, None, per_class_file)
        else:
            check_resumable(mine, state, None, per_class_file)
    explicit = load_config(compose_conf(conf, ["generator.conditional_prior=false"]))
    assert state_config(explicit)["generator"]["conditional_prior"] is False


def test_derived_config_keys_are_the_type_default_keys():
    from feda2v.checkpoint.runstate import DERIVED_CONFIG_KEYS
    from feda2v.store.spec import TYPE_DEFAULT_KEYS

    assert DERIVED_CONFIG_KEYS == tuple(f"generator.{k}" for k in TYPE_DEFAULT_KEYS)


def test_null_hidden_dim_is_recorded_as_the_type_width(per_class_file):
    # null (the default) is the type's width; checkpoints record it resolved, so a run from before
    # (every type 128) resumes where null still means 128 (vae, published architectures) and
    # is refused, naming the key, where it now means more (cvae 512 for keys of several classes, 256
    # per class; gan 256), and resumes with it set to 128
    from pathlib import Path

    from feda2v.checkpoint import check_resumable, read_run_state, state_config
    from feda2v.config import load_config
    from feda2v.config.files import compose_conf

    conf = Path(__file__).resolve().parents[1] / "conf"
    for overrides, want in ((["generator=cvae"], 512), (["generator=cvae", "generator.granularity=per_class"], 256),
                            (["generator=vae"], 128), (["generator=gan"], 256),
                            (["generator=cvae", "generator.arch=fedgfe"], 128)):
        cfg = load_config(compose_conf(conf, overrides))
        assert cfg.generator.hidden_dim is None
        mine = state_config(cfg)
        assert mine["generator"]["hidden_dim"] == want
        old = json.loads(json.dumps(mine))
        old["generator"]["hidden_dim"] = 128  # what every run before recorded
        state = dataclasses.replace(read_run_state(per_class_file), config=old, data_manifest_hash=None)
        if want != 128:
            with pytest.raises(CheckpointError, match=f"generator.hidden_dim is 128 there, {want} here"):
                check_resumable(mine, state, None, per_class_file)
            pinned = state_config(load_config(compose_conf(conf, [*overrides, "generator.hidden_dim=128"])))
            check_resumable(pinned, state, None, per_class_file)
        else:
            check_resumable(mine, state, None, per_class_file)
    # a config recorded unresolved (format-1 headers held the whole config) resolves the same way
    # (with its granularity: a cVAE key of several classes is wider)
    for granularity, width in (("per_class", 256), ("unified", 512)):
        unresolved = dataclasses.replace(read_run_state(per_class_file), data_manifest_hash=None, config={
            "generator": {"type": "cvae", "granularity": granularity, "hidden_dim": None}})
        check_resumable({"generator": {"type": "cvae", "granularity": granularity, "hidden_dim": width}},
                        unresolved, None, per_class_file)
        with pytest.raises(CheckpointError, match=f"generator.hidden_dim is {width} there, 128 here"):
            check_resumable({"generator": {"type": "cvae", "granularity": granularity, "hidden_dim": 128}},
                            unresolved, None, per_class_file)


def test_null_ema_decay_is_recorded_resolved_and_binds_a_resume(per_class_file):
    # a run from before the moving average (recorded without the key: ADDED_CONFIG_KEYS, 0) is
    # refused, naming it, under today's default, and resumes with generator.ema_decay=0
    from pathlib import Path

    from feda2v.checkpoint import check_resumable, read_run_state, state_config
    from feda2v.config import load_config
    from feda2v.config.files import compose_conf

    conf = Path(__file__).resolve().parents[1] / "conf"
    for overrides, want in ((["generator=cvae"], 0.995), (["generator=gan"], 0.995),
                            (["generator=cvae", "generator.arch=fedgfe"], 0.0)):
        mine = state_config(load_config(compose_conf(conf, overrides)))
        assert mine["generator"]["ema_decay"] == want
        old = json.loads(json.dumps(mine))
        del old["generator"]["ema_decay"]
        state = dataclasses.replace(read_run_state(per_class_file), config=old, data_manifest_hash=None)
        if want:
            with pytest.raises(CheckpointError, match="generator.ema_decay is 0.0 there, 0.995 here"):
                check_resumable(mine, state, None, per_class_file)
            check_resumable(state_config(load_config(compose_conf(conf, [*overrides, "generator.ema_decay=0"]))),
                            state, None, per_class_file)
        else:
            check_resumable(mine, state, None, per_class_file)


def test_null_film_is_recorded_resolved_per_granularity_and_binds_a_resume(per_class_file):
    # null means the type's default for keys of several classes, off per class: the checkpoint
    # records what it resolved to; a run from before the key (recorded without it: False) is
    # refused, naming it, where null now means on, and resumes with generator.film=false
    from pathlib import Path

    from feda2v.checkpoint import check_resumable, read_run_state, state_config
    from feda2v.config import load_config
    from feda2v.config.files import compose_conf

    conf = Path(__file__).resolve().parents[1] / "conf"
    for overrides, want in ((["generator=cvae"], True), (["generator=gan"], True), (["generator=vae"], False),
                            (["generator=cvae", "generator.granularity=per_class"], False),
                            (["generator=cvae", "generator.arch=fedgfe"], False)):
        mine = state_config(load_config(compose_conf(conf, overrides)))
        assert mine["generator"]["film"] is want, overrides
        old = json.loads(json.dumps(mine))
        del old["generator"]["film"]
        state = dataclasses.replace(read_run_state(per_class_file), config=old, data_manifest_hash=None)
        if want:
            with pytest.raises(CheckpointError, match="generator.film is False there, True here"):
                check_resumable(mine, state, None, per_class_file)
            check_resumable(state_config(load_config(compose_conf(conf, [*overrides, "generator.film=false"]))),
                            state, None, per_class_file)
        else:
            check_resumable(mine, state, None, per_class_file)
    # a config recorded unresolved (a format-1 header) resolves with its own granularity
    for granularity, want in (("unified", True), ("per_class", False)):
        unresolved = dataclasses.replace(read_run_state(per_class_file), data_manifest_hash=None, config={
            "generator": {"type": "cvae", "granularity": granularity, "film": None}})
        check_resumable({"generator": {"type": "cvae", "granularity": granularity, "film": want}},
                        unresolved, None, per_class_file)
        with pytest.raises(CheckpointError, match=f"generator.film is {want} there, {not want} here"):
            check_resumable({"generator": {"type": "cvae", "granularity": granularity, "film": not want}},
                            unresolved, None, per_class_file)


def test_gan_settings_bind_a_gan_run_only(per_class_file):
    # generator.gan.* trains nothing but a GAN: a cVAE run resumes across a change of the GAN's
    # defaults; a GAN run is refused naming the GAN key; another type is refused naming the type
    from feda2v.checkpoint import check_resumable, read_run_state

    def cfg(type_, d_steps):
        return {"generator": {"granularity": "per_class", "type": type_, "gan": {"d_steps": d_steps}}}

    def state(c):
        return dataclasses.replace(read_run_state(per_class_file), config=c)

    check_resumable(cfg("cvae", 2), state(cfg("cvae", 1)), None, per_class_file)
    with pytest.raises(CheckpointError, match="generator.gan.d_steps is 1 there, 2 here"):
        check_resumable(cfg("gan", 2), state(cfg("gan", 1)), None, per_class_file)
    with pytest.raises(CheckpointError, match="generator.type is 'cvae' there, 'gan' here"):
        check_resumable(cfg("gan", 2), state(cfg("cvae", 1)), None, per_class_file)


def test_null_lr_schedule_is_recorded_resolved_and_binds_a_resume_and_its_rounds(per_class_file):
    # null means the type's schedule (cvae keys of several classes: cosine at 3e-3; per class, vae,
    # gan and the published architectures: constant). A run from before the key (recorded without
    # it: constant, with an lr null that ran the constant default) is refused, naming it, where null
    # now means cosine, and resumes with generator.optimizer.schedule=constant at the lr it had.
    # A cosine run decays over decay_rounds (null: federation.rounds, recorded resolved), so it
    # resumes with more rounds only with its horizon pinned; a constant one, which has none, with any.
    from pathlib import Path

    from feda2v.checkpoint import check_resumable, read_run_state, state_config
    from feda2v.config import load_config
    from feda2v.config.files import compose_conf
    from feda2v.store import StoreSpec

    conf = Path(__file__).resolve().parents[1] / "conf"
    for overrides, want, lr in ((["generator=cvae"], "cosine", 3e-3), (["generator=vae"], "constant", 2e-3),
                                (["generator=cvae", "generator.granularity=per_class"], "constant", 2e-3),
                                (["generator=gan"], "constant", 1e-3),
                                (["generator=cvae", "generator.arch=fedgfe"], "constant", 2e-3)):
        cfg = load_config(compose_conf(conf, overrides))
        assert cfg.generator.optimizer.schedule is None
        mine = state_config(cfg)
        assert mine["generator"]["optimizer"]["schedule"] == want, overrides
        spec = StoreSpec.from_config(cfg, classes=CLASSES, feature_dim=6, condition_dim=3).optimizer
        horizon = cfg.federation.rounds if want == "cosine" else 1
        assert (spec.schedule, spec.lr, spec.decay_rounds) == (want, lr, horizon)
        old = json.loads(json.dumps(mine))
        del old["generator"]["optimizer"]["schedule"], old["generator"]["optimizer"]["decay_rounds"]
        state = dataclasses.replace(read_run_state(per_class_file), config=old, data_manifest_hash=None)
        if want == "cosine":
            with pytest.raises(CheckpointError,
                               match="generator.optimizer.schedule is 'constant' there, 'cosine' here"):
                check_resumable(mine, state, None, per_class_file)
            pinned = load_config(compose_conf(conf, [*overrides, "generator.optimizer.schedule=constant"]))
            check_resumable(state_config(pinned), state, None, per_class_file)
            assert StoreSpec.from_config(pinned, classes=CLASSES, feature_dim=6, condition_dim=3).optimizer.lr == 2e-3
        else:
            check_resumable(mine, state, None, per_class_file)
        rounds = cfg.federation.rounds  # the default run's horizon, recorded resolved
        assert mine["generator"]["optimizer"]["decay_rounds"] == (rounds if want == "cosine" else None)
        ran = dataclasses.replace(read_run_state(per_class_file), config=mine, data_manifest_hash=None)
        longer = state_config(load_config(compose_conf(conf, [*overrides, "federation.rounds=40"])))
        if want == "cosine":
            with pytest.raises(CheckpointError, match=f"generator.optimizer.decay_rounds is {rounds} there, 40 here"):
                check_resumable(longer, ran, None, per_class_file)
            pinned = load_config(compose_conf(conf, [*overrides, "federation.rounds=40",
                                                     f"generator.optimizer.decay_rounds={rounds}"]))
            check_resumable(state_config(pinned), ran, None, per_class_file)
        else:
            check_resumable(longer, ran, None, per_class_file)
