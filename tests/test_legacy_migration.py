"""Migration of every layout the published FedA2V server and client write (lucapalazzo/fedgfe).

Each case builds the legacy file(s) with ``torch.save`` from replicas of the published modules
(tests/legacy_replicas.py), migrates, and checks: parameters and optimizer state bit-identical,
the migrated store computing the published function (eval mode, same inputs and noise: outputs
equal), and the store training on (one grouped step continues the legacy optimizer state).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import legacy_replicas as R
from feda2v.checkpoint import read_checkpoint
from feda2v.checkpoint.legacy import migrate_legacy
from feda2v.errors import CheckpointError

D_IN, SEQ, CLIP, T5 = 32, 2, 5, 6  # features 64 = 2 x 32 (digits), conditions 10 = 2 x 5 (one-hot)
H, Z, ZG, FUSION = 10, 3, 4, 7
LOW, HIGH = ["zero", "one", "two", "three", "four"], ["five", "six", "seven", "eight", "nine"]
CLASSES = LOW + HIGH
GROUPS_OVERRIDE = "generator.class_groups={low:[zero,one,two,three,four],high:[five,six,seven,eight,nine]}"


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    from feda2v.config import load_config
    from feda2v.data import load_prepared, prepare

    d = tmp_path_factory.mktemp("prep") / "prepared"
    prepare(load_config({"data": {"name": "digits", "condition": "onehot", "prepared_dir": str(d), "nodes": 2,
                                  "partition": {"scheme": "iid"}}}))
    return load_prepared(d), str(d)


def vae(seed=0, opt=True, **kw):
    g, o = R.trained(R.VAEGenerator(D_IN, H, Z, SEQ), seed=seed, steps=seed % 3 + 1, **kw)
    return g, (o if opt else None)


def cvae(seed=0, opt=True):
    g, o = R.trained(R.ConditionedVAEGenerator(D_IN, H, Z, CLIP, SEQ), seed=seed, steps=2)
    return g, (o if opt else None)


def multimodal(seed=0, opt=True):
    clip_only = lambda n: not n.startswith(("t5_projection", "fusion"))  # noqa: E731 - an SD (CLIP-only) run
    g, o = R.trained(R.MultiModalVAEGenerator(D_IN, H, Z, CLIP, T5, FUSION, SEQ), seed=seed, steps=2, used=clip_only)
    return g, (o if opt else None)


def gan_g(seed=0, opt=True):
    g, o = R.trained(R.GANGenerator(ZG, H, 2 * D_IN), seed=seed, steps=3)
    return g, (o if opt else None)


def gan_d(seed=0):
    return R.trained(R.GANDiscriminator(2 * D_IN, H), seed=seed + 100, steps=3, lr=5e-4)


SERVER = {"checkpoint_type": "server", "is_global": True, "round": 4, "timestamp": "2025-01-01T00:00:00",
          "diffusion_type": "sd", "federated_classes": CLASSES, "num_clients": 2}
CLIENT = {"client_id": 1, "node_id": 1, "round": 5, "diffusion_type": "sd", "dataset_name": "digits",
          "selected_classes": CLASSES, "sequence_length": SEQ, "visual_dim": CLIP}


def opt_sd(o):
    return None if o is None else o.state_dict()


@dataclass
class Case:
    files: list  # [dict to torch.save]
    expect: dict  # store key -> {role: (module, optimizer | None)}
    overrides: list = field(default_factory=list)
    flags: dict = field(default_factory=dict)
    prepared: bool = False
    fresh: tuple = ()  # (key, role) started fresh on purpose


def server_unified_vae(opt=True):
    g, o = vae(opt=opt)
    return Case([{**SERVER, "generator_type": "vae", "generator_state_dict": g.state_dict(),
                  "optimizer_state_dict": opt_sd(o)}], {"unified": {"generator": (g, o)}})


def server_unified_cvae():
    g, o = cvae()
    return Case([{**SERVER, "generator_type": "vae", "use_conditioned_vae": True,
                  "generator_state_dict": g.state_dict(), "optimizer_state_dict": o.state_dict()}],
                {"unified": {"generator": (g, o)}}, prepared=True)


def server_unified_gan():
    (g, og), (d, od) = gan_g(), gan_d()
    return Case([{**SERVER, "generator_type": "gan", "generator_clip_state_dict": g.state_dict(),
                  "generator_t5_state_dict": None, "discriminator_clip_state_dict": d.state_dict(),
                  "discriminator_t5_state_dict": None, "generator_optimizer_state_dict": og.state_dict(),
                  "discriminator_optimizer_state_dict": od.state_dict()}],
                {"unified": {"generator": (g, og), "discriminator": (d, od)}})


def _server_multi(modules: dict, optims: dict | None, **extra):
    return {**SERVER, "generator_type": "vae", "prompt_generators": {k: m.state_dict() for k, m in modules.items()},
            "generator_optimizers": optims, "generator_keys": list(modules), "num_generators": len(modules),
            "use_conditioned_vae": False, "sequence_length": SEQ, **extra}


def server_per_class_vae(opt=True):
    mods = {c: vae(seed=i, opt=opt) for i, c in enumerate(CLASSES)}
    optims = {c: o.state_dict() for c, (_, o) in mods.items()} if opt else None
    return Case([_server_multi({c: g for c, (g, _) in mods.items()}, optims)],
                {f"class/{c}": {"generator": m} for c, m in mods.items()})


def server_per_class_cvae():
    mods = {c: cvae(seed=i, opt=False) for i, c in enumerate(CLASSES)}
    return Case([_server_multi({c: g for c, (g, _) in mods.items()}, None, use_conditioned_vae=True)],
                {f"class/{c}": {"generator": m} for c, m in mods.items()}, prepared=True)


def server_per_group_vae():
    mods = {"low": vae(seed=1), "high": vae(seed=2)}
    return Case([_server_multi({k: g for k, (g, _) in mods.items()}, {k: o.state_dict() for k, (_, o) in mods.items()})],
                {f"group/{k}": {"generator": m} for k, m in mods.items()},
                overrides=["generator.granularity=per_group", GROUPS_OVERRIDE])


def server_per_group_shared():
    # the server's real per_group re-save: each group's one generator object registered under
    # every class of the group; the optimizers keyed by group
    mods = {"low": vae(seed=1), "high": vae(seed=2)}
    by_class = {c: mods["low"][0] for c in LOW} | {c: mods["high"][0] for c in HIGH}
    return Case([_server_multi(by_class, {k: o.state_dict() for k, (_, o) in mods.items()})],
                {f"group/{k}": {"generator": m} for k, m in mods.items()}, overrides=[GROUPS_OVERRIDE])


def server_unified_shared():
    # a unified generator loaded by the server is registered under every class, re-saved per class
    g, o = vae(seed=3)
    return Case([_server_multi({c: g for c in CLASSES}, {"unified": o.state_dict()})], {"unified": {"generator": (g, o)}})


def server_unified_key():
    # prompt_generators keyed 'unified' (the server's generator_key default), migrated as unified
    g, o = vae(seed=4)
    return Case([_server_multi({"unified": g}, {"unified": o.state_dict()})], {"unified": {"generator": (g, o)}},
                overrides=["generator.granularity=unified"])


def _client(gran, key, sd_field, sd, o=None, **extra):
    d = {**CLIENT, "generator_type": "gan" if sd_field == "generator_clip_state_dict" else "vae",
         "generator_granularity": gran, "generator_key": key,
         "class_name": key if gran == "per_class" else None, "group_name": key if gran == "per_group" else None,
         "generator_classes": [key] if gran == "per_class" else extra.pop("classes", None), sd_field: sd, **extra}
    if o is not None:
        d["optimizer_state_dict"] = o.state_dict()
    return d


def client_unified_vae(opt=False):
    g, o = vae(opt=opt)
    return Case([_client("unified", None, "generator_state_dict", g.state_dict(), o)], {"unified": {"generator": (g, o)}})


def client_unified_cvae():
    g, o = cvae(opt=False)
    return Case([_client("unified", None, "generator_state_dict", g.state_dict(), use_conditioned_vae=True)],
                {"unified": {"generator": (g, o)}}, prepared=True)


def client_per_class_vae_files():
    mods = {c: vae(seed=i, opt=False) for i, c in enumerate(CLASSES)}
    return Case([_client("per_class", c, "generator_state_dict", g.state_dict()) for c, (g, _) in mods.items()],
                {f"class/{c}": {"generator": m} for c, m in mods.items()})


def client_per_group_multimodal_files(opt=True):
    mods = {"low": multimodal(seed=1, opt=opt), "high": multimodal(seed=2, opt=opt)}
    files = [_client("per_group", k, "generator_state_dict", g.state_dict(), o, use_conditioned_vae=True,
                     classes=LOW if k == "low" else HIGH) for k, (g, o) in mods.items()]
    return Case(files, {f"group/{k}": {"generator": m} for k, m in mods.items()}, prepared=True)


def client_per_class_gan_files():
    mods = {c: gan_g(seed=i, opt=False) for i, c in enumerate(CLASSES)}
    return Case([_client("per_class", c, "generator_clip_state_dict", g.state_dict()) for c, (g, _) in mods.items()],
                {f"class/{c}": {"generator": m} for c, m in mods.items()}, flags={"fresh_discriminator": True},
                fresh=tuple((f"class/{c}", "discriminator") for c in CLASSES))


def client_per_group_vae_files():
    mods = {"low": vae(seed=1, opt=False), "high": vae(seed=2, opt=False)}
    files = [_client("per_group", k, "generator_state_dict", g.state_dict(), classes=LOW if k == "low" else HIGH)
             for k, (g, _) in mods.items()]
    return Case(files, {f"group/{k}": {"generator": m} for k, m in mods.items()})


def client_per_group_gan_files():
    mods = {"low": gan_g(seed=1, opt=False), "high": gan_g(seed=2, opt=False)}
    files = [_client("per_group", k, "generator_clip_state_dict", g.state_dict(), classes=LOW if k == "low" else HIGH)
             for k, (g, _) in mods.items()]
    return Case(files, {f"group/{k}": {"generator": m} for k, m in mods.items()}, flags={"fresh_discriminator": True},
                fresh=(("group/low", "discriminator"), ("group/high", "discriminator")))


def client_unified_gan():
    g, _ = gan_g(opt=False)
    return Case([_client("unified", None, "generator_clip_state_dict", g.state_dict())],
                {"unified": {"generator": (g, None)}}, flags={"fresh_discriminator": True},
                fresh=(("unified", "discriminator"),))


CASES = {
    "server-unified-vae": server_unified_vae,
    "server-unified-vae-no-optimizer": lambda: server_unified_vae(opt=False),
    "server-unified-cvae": server_unified_cvae,
    "server-unified-gan": server_unified_gan,
    "server-per_class-vae": server_per_class_vae,
    "server-per_class-vae-no-optimizer": lambda: server_per_class_vae(opt=False),
    "server-per_class-cvae": server_per_class_cvae,
    "server-per_group-vae": server_per_group_vae,
    "server-per_group-shared": server_per_group_shared,
    "server-unified-shared-under-classes": server_unified_shared,
    "server-unified-key": server_unified_key,
    "client-unified-vae": client_unified_vae,
    "client-unified-vae-optimizer": lambda: client_unified_vae(opt=True),
    "client-unified-cvae": client_unified_cvae,
    "client-per_class-vae-files": client_per_class_vae_files,
    "client-per_group-multimodal-files": client_per_group_multimodal_files,
    "client-per_group-multimodal-files-no-optimizer": lambda: client_per_group_multimodal_files(opt=False),
    "client-per_class-gan-files": client_per_class_gan_files,
    "client-per_group-vae-files": client_per_group_vae_files,
    "client-per_group-gan-files": client_per_group_gan_files,
    "client-unified-gan": client_unified_gan,
}


def save_case(tmp_path: Path, case: Case) -> list[Path]:
    paths = []
    for i, obj in enumerate(case.files):
        p = tmp_path / f"legacy{i}.pt"
        torch.save(obj, p)
        paths.append(p)
    return paths


def run_case(tmp_path, case: Case, prep):
    paths = save_case(tmp_path, case)
    out = tmp_path / "migrated.ckpt"
    done = migrate_legacy(paths, out, overrides=case.overrides, prepared_dir=prep[1] if case.prepared else None,
                          **case.flags)
    return out, done


def store_of(out):
    from feda2v.store import GeneratorStore

    tensors, header = read_checkpoint(out)
    pre = "store/server/"
    st = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
    return GeneratorStore.from_state(st, header["stores"]["server"]), st, header


def _inputs(module, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SEQ, D_IN, generator=g)
    return x


def assert_same_function(key_module, legacy, store, key, prep):
    """Eval mode, same inputs and noise: the migrated module's outputs equal the published module's."""
    legacy.eval()
    key_module.eval()
    classes = store.classes_of_key(key)
    ci = store.spec.classes.index(classes[0])
    n = 6
    with torch.no_grad():
        if isinstance(legacy, R.GANGenerator):
            z = torch.randn(n, ZG, generator=torch.Generator().manual_seed(1))
            assert torch.equal(key_module(z, store.conditions[[ci] * n]), legacy(z))
            # sampling through the store (the grouped path) draws z from its generator the same way
            got = store.sample(torch.tensor([ci] * n), gen=torch.Generator().manual_seed(5))
            z = torch.randn(n, ZG, generator=torch.Generator().manual_seed(5))
            assert torch.equal(got, legacy(z))
            return
        if isinstance(legacy, R.GANDiscriminator):
            x = torch.randn(n, 2 * D_IN, generator=torch.Generator().manual_seed(2))
            assert torch.equal(key_module(x, store.conditions[[ci] * n]), legacy(x).squeeze(-1))
            return
        x = _inputs(key_module)
        cond_rows = store.conditions[[ci] * n]
        torch.manual_seed(11)
        if isinstance(legacy, R.VAEGenerator):
            recon, mu, logvar = legacy(x)
        elif isinstance(legacy, R.ConditionedVAEGenerator):
            recon, mu, logvar = legacy(x, store.conditions[ci].view(SEQ, CLIP))
        else:
            recon, mu, logvar = legacy(x, store.conditions[ci].view(SEQ, CLIP))
        torch.manual_seed(11)
        eps = torch.randn(n, Z)
        r2, mu2, lv2 = key_module(x.view(n, -1), cond_rows, eps=eps)
        assert torch.equal(mu2, mu) and torch.equal(lv2, logvar)
        assert torch.equal(r2, recon.view(n, -1))
        # the store's sampler decodes prior noise with the published decoder
        got = store.sample(torch.tensor([ci] * n), gen=torch.Generator().manual_seed(5))
        z = torch.randn(n, Z, generator=torch.Generator().manual_seed(5))
        if isinstance(legacy, R.VAEGenerator):
            want = legacy.decode(z)
        else:
            want = legacy.decode(z, store.conditions[ci].view(SEQ, CLIP))
        assert torch.equal(got, want.reshape(n, -1))


@pytest.mark.parametrize("name", list(CASES))
def test_published_layout_migrates_exactly(tmp_path, prep, name):
    case = CASES[name]()
    out, done = run_case(tmp_path, case, prep)
    store, st, header = store_of(out)
    assert sorted(store.keys) == sorted(case.expect)
    assert header["config"]["generator"]["arch"] in ("fedgfe", "fedgfe_multimodal")
    assert header["round"] == case.files[0]["round"]
    for key, roles in case.expect.items():
        for role, (module, opt) in roles.items():
            kr = f"{key}/{role}"
            legacy_sd = module.state_dict()
            own = dict(store.module(key, role).named_parameters())
            for name_, p in own.items():  # every parameter bit-identical
                assert torch.equal(st[f"{kr}/param/{name_}"], legacy_sd[name_]), name_
                assert torch.equal(p.detach(), legacy_sd[name_])
            kept = [n for n in legacy_sd if not n.startswith(("t5_projection", "fusion"))]
            assert sorted(own) == sorted(kept)
            meta = header["stores"]["server"]["optimizers"][kr]
            if opt is None:
                assert meta["step"] == 0 and not any(k.startswith(f"{kr}/optim/") for k in st)
            else:
                osd = opt.state_dict()
                group = osd["param_groups"][0]
                assert (meta["lr"], meta["weight_decay"], meta["eps"]) == (group["lr"], group["weight_decay"], group["eps"])
                assert meta["betas"] == list(group["betas"])
                torch_opt = store.optimizer(key, role)
                assert torch_opt.param_groups[0]["lr"] == group["lr"]
                assert torch_opt.param_groups[0]["weight_decay"] == group["weight_decay"]
                names = list(legacy_sd)
                for i, s in osd["state"].items():
                    n = names[i]
                    for f in ("exp_avg", "exp_avg_sq"):
                        assert torch.equal(st[f"{kr}/optim/{n}/{f}"], s[f]), (n, f)
                        assert torch.equal(torch_opt.state[own[n]][f], s[f])
                    assert st[f"{kr}/optim/{n}/step"].item() == s["step"].item() == meta["step"]
            if role == "generator" or isinstance(module, R.GANDiscriminator):
                assert_same_function(store.module(key, role), module, store, key, prep)
    for key, role in case.fresh:
        assert any(f"{key}/{role}" in n and "fresh" in n for n in done.notes)
    if header["config"]["generator"]["type"] == "gan":  # trains on with the published update rule
        g = header["config"]["generator"]["gan"]
        assert (g["schedule"], g["d_steps"], g["g_steps"], g["loss"], g["r1_gamma"]) == \
            ("alternating", 1, 1, "nonsaturating", 0.0)
    # the optimizer factory (resets) gets the legacy generator optimizer's settings
    gen_opts = [opt for roles in case.expect.values() for role, (_, opt) in roles.items()
                if role == "generator" and opt is not None]
    factory = header["config"]["generator"]["optimizer"]
    if gen_opts:
        g0 = gen_opts[0].state_dict()["param_groups"][0]
        assert (factory["lr"], factory["weight_decay"], factory["betas"]) == (g0["lr"], g0["weight_decay"], list(g0["betas"]))
    else:
        assert any("no optimizer state" in n for n in done.notes)
    # it trains on: one grouped step per key continues each key's legacy optimizer state
    before = {kr: o["step"] for kr, o in header["stores"]["server"]["optimizers"].items()}
    y = torch.arange(len(store.spec.classes)).repeat(2)
    x = torch.rand(len(y), store.spec.feature_dim, generator=torch.Generator().manual_seed(3)) * 2 - 1
    stats = store.train_batch(x, y, gen=torch.Generator().manual_seed(4), node="node0", round=header["round"] + 1)
    assert set(stats) == set(store.keys)
    for key in store.keys:
        for role in store.roles:
            assert store.step_count(key, role) == before[f"{key}/{role}"] + 1
    for v in stats.values():
        assert all(torch.isfinite(torch.tensor(list(v.values()))))


def test_migration_is_deterministic(tmp_path, prep):
    case = server_per_group_shared()
    paths = save_case(tmp_path, case)
    migrate_legacy(paths, tmp_path / "a.ckpt", overrides=case.overrides)
    migrate_legacy(paths, tmp_path / "b.ckpt", overrides=case.overrides)
    assert (tmp_path / "a.ckpt").read_bytes() == (tmp_path / "b.ckpt").read_bytes()


def test_file_order_does_not_matter_for_merged_files(tmp_path, prep):
    case = client_per_class_vae_files()
    paths = save_case(tmp_path, case)
    migrate_legacy(paths, tmp_path / "a.ckpt")
    migrate_legacy(list(reversed(paths)), tmp_path / "b.ckpt")
    assert (tmp_path / "a.ckpt").read_bytes() == (tmp_path / "b.ckpt").read_bytes()
    _, h = read_checkpoint(tmp_path / "a.ckpt")
    assert h["keys"] == [f"class/{c}" for c in sorted(CLASSES)]


# ------------------------------------------------------------------------------------------
# refusals: one line, naming the key, nothing written


def _refuse(tmp_path, objs, match, **kw):
    paths = []
    for i, obj in enumerate(objs):
        p = tmp_path / f"bad{i}.pt"
        torch.save(obj, p)
        paths.append(p)
    out = tmp_path / "out.ckpt"
    with pytest.raises(CheckpointError, match=match) as e:
        migrate_legacy(paths, out, **kw)
    assert "\n" not in str(e.value)
    assert not out.exists()  # never a partial result


def _vae_server(**extra):
    return {**server_unified_vae().files[0], **extra}


REFUSALS = {
    "prompt_generators + granularity=unified (separate generators)": (
        lambda: server_per_class_vae().files, "'unified/generator' would have no legacy source",
        {"overrides": ["generator.granularity=unified"]}),
    "shared per_group without group names": (
        lambda: [{k: v for k, v in server_per_group_shared().files[0].items()}], "pass generator.class_groups",
        {}),
    "shared generator split per class": (
        lambda: server_per_group_shared().files, "would split the generator shared by keys 'zero'",
        {"overrides": ["generator.granularity=per_class"]}),
    "GAN without discriminator, no flag": (
        lambda: client_unified_gan().files, "'unified/discriminator'.*--fresh-discriminator", {}),
    "float64 without --to-float32": (
        lambda: [_vae_server(generator_state_dict={k: v.double() for k, v in vae()[0].state_dict().items()},
                             optimizer_state_dict=None)],
        r"'generator_state_dict\..*' is torch.float64.*largest rounding error.*--to-float32", {}),
    "two files for one key": (
        lambda: [client_per_class_vae_files().files[0]] * 2, "'bad0.pt' and 'bad1.pt' both hold generator key 'zero'",
        {}),
    "files of different runs": (
        lambda: [client_per_class_vae_files().files[0], {**client_per_class_vae_files().files[1], "round": 9}],
        "'bad0.pt' and 'bad1.pt' are from different runs or rounds \\(round 5 vs 9\\)", {}),
    "a unified file among several": (
        lambda: [client_per_class_vae_files().files[0], client_unified_vae().files[0]],
        "'bad1.pt' holds a unified generator", {}),
    "a server file among several": (
        lambda: [server_unified_vae().files[0], client_unified_vae().files[0]], "'bad0.pt' is a server checkpoint", {}),
    "T5 GAN": (lambda: [{**server_unified_gan().files[0], "generator_t5_state_dict": gan_g()[0].state_dict()}],
               "'generator_t5_state_dict' holds a T5", {}),
    "multimodal of a FLUX run": (
        lambda: [{**f, "diffusion_type": "flux"} for f in client_per_group_multimodal_files().files],
        "'diffusion_type' is 'flux'", {"prepared": True}),
    "multimodal with a trained T5 branch": (
        lambda: [_client("unified", None, "generator_state_dict", *(lambda g, o: (g.state_dict(), o))(
            *R.trained(R.MultiModalVAEGenerator(D_IN, H, Z, CLIP, T5, FUSION, SEQ))), use_conditioned_vae=True)],
        "has optimizer state for 'generator_state_dict.t5_projection.0.weight'", {"prepared": True}),
    "one client file of a per_class run, with --prepared": (
        lambda: client_per_class_vae_files().files[:1], "no generator for class 'one' of the prepared data",
        {"prepared": True}),
    "conditioned VAE without conditions": (lambda: server_unified_cvae().files, "pass --prepared DIR", {}),
    "unknown tensors": (lambda: [_vae_server(adapter_state_dict={"w": torch.zeros(2)})],
                        "legacy key 'adapter_state_dict' holds tensors", {}),
    "learned upsampler": (
        lambda: [_vae_server(generator_state_dict={**vae()[0].state_dict(), "upsampler.0.weight": torch.zeros(2, 2, 3)},
                             optimizer_state_dict=None)],
        "'generator_state_dict.upsampler.0.weight' has no counterpart", {}),
    "amsgrad": (lambda: [_vae_server(optimizer_state_dict=vae(amsgrad=True)[1].state_dict())], "amsgrad", {}),
    "optimizer of another module": (lambda: [_vae_server(optimizer_state_dict=gan_g()[1].state_dict())],
                                    "covers 6 parameters but 'generator_state_dict' has 12", {}),
    "generator_type lies": (lambda: [_vae_server(generator_type="gan")], "'generator_type' says 'gan'", {}),
    "optimizer beside prompt_generators": (
        lambda: [{**server_per_class_vae().files[0], "optimizer_state_dict": vae()[1].state_dict()}],
        "'optimizer_state_dict' does not belong", {}),
    "two optimizers for one shared generator": (
        lambda: [_server_multi(dict.fromkeys(CLASSES[:2], vae()[0]), {c: vae()[1].state_dict() for c in CLASSES[:2]})],
        "'generator_optimizers.zero' and 'generator_optimizers.one' are two optimizers of one shared generator", {}),
    "stray optimizer key": (
        lambda: [_server_multi({c: vae(seed=i)[0] for i, c in enumerate(CLASSES)}, {"winds": vae()[1].state_dict()})],
        "'generator_optimizers.winds' has no generator", {}),
    "no generator": (lambda: [{"round": 1}], "has no generator state", {}),
    "not a dict": (lambda: [[1, 2, 3]], "holds a list", {}),
    "non-JSON metadata": (lambda: [_vae_server(timestamp=1 + 2j)], "'timestamp' is a complex", {}),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusal_is_one_line_naming_the_key(tmp_path, prep, name):
    make, match, kw = REFUSALS[name]
    kw = dict(kw)
    if kw.pop("prepared", False):
        kw["prepared_dir"] = prep[1]
    _refuse(tmp_path, make(), match, **kw)


def test_float64_converted_on_request_reports_rounding(tmp_path, prep):
    g, o = R.trained(R.VAEGenerator(D_IN, H, Z, SEQ), dtype=torch.float64)
    p = tmp_path / "f64.pt"
    torch.save({**SERVER, "generator_type": "vae", "generator_state_dict": g.state_dict(),
                "optimizer_state_dict": o.state_dict()}, p)
    done = migrate_legacy(p, tmp_path / "o.ckpt", to_float32=True)
    note = next(n for n in done.notes if "float32" in n)
    worst = max(float((t.float().double() - t).abs().max()) for t in g.state_dict().values())
    assert "torch.float64" in note and "largest rounding error" in note and worst > 0
    t, _ = read_checkpoint(tmp_path / "o.ckpt")
    assert torch.equal(t["store/server/unified/generator/param/encoder.0.weight"], g.state_dict()["encoder.0.weight"].float())


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.parametrize("where", ["metadata", "state_dict", "optimizer", "prompt_generators", "client"])
def test_pickle_payload_never_runs(tmp_path, where):
    marker = tmp_path / "ran"
    bad = _Payload(marker)
    if where == "metadata":
        obj = _vae_server(client_metadata=[bad])
    elif where == "state_dict":
        obj = _vae_server(generator_state_dict={**vae()[0].state_dict(), "x": bad})
    elif where == "optimizer":
        osd = vae()[1].state_dict()
        osd["param_groups"][0]["lr"] = bad
        obj = _vae_server(optimizer_state_dict=osd)
    elif where == "prompt_generators":
        obj = {**server_per_class_vae().files[0], "generator_optimizers": {"zero": bad}}
    else:
        obj = {**client_per_class_vae_files().files[0], "generator_classes": bad}
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        torch.save(obj, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="needs unpickling of arbitrary objects") as e:
        migrate_legacy(p, tmp_path / "o.ckpt")
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_existing_output_is_not_overwritten(tmp_path):
    p = save_case(tmp_path, server_unified_vae())
    out = tmp_path / "o.ckpt"
    out.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="already exists"):
        migrate_legacy(p, out)
    assert out.read_bytes() == b"precious"


def test_grouped_step_draws_dropout_from_the_batch_generator(prep, monkeypatch):
    """The published VAE's dropout is active in the store's grouped step, its masks come from the
    batch's generator (same generator state, same update), and eval/sampling has none."""
    import feda2v.models.published as published
    from feda2v.config import load_config
    from feda2v.store import GeneratorStore, StoreSpec

    calls = []
    real = published._dropout
    monkeypatch.setattr(published, "_dropout", lambda x, p, gen: calls.append(p) or real(x, p, gen))
    cfg = load_config({"generator": {"type": "vae", "arch": "fedgfe", "granularity": "per_class", "hidden_dim": 8,
                                     "latent_dim": 3}, "data": {"condition": "onehot"}})

    def one_step(seed):
        spec = StoreSpec.from_config(cfg, classes=CLASSES, feature_dim=64, condition_dim=10)
        store = GeneratorStore(spec, torch.eye(10))
        y = torch.arange(10).repeat(3)
        x = torch.rand(len(y), 64, generator=torch.Generator().manual_seed(0))
        store.train_batch(x, y, gen=torch.Generator().manual_seed(seed), node="node0", round=1)
        return store.state_dict()[0]

    a, b, c = one_step(1), one_step(1), one_step(2)
    assert calls and set(calls) == {0.2}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "/param/" in k)
    calls.clear()
    spec = StoreSpec.from_config(cfg, classes=CLASSES, feature_dim=64, condition_dim=10)
    GeneratorStore(spec, torch.eye(10)).sample(torch.arange(10), gen=torch.Generator().manual_seed(0))
    assert calls == []


def test_layouts_name_exactly_the_published_architectures_parameters():
    from feda2v.checkpoint.legacy import LAYOUTS
    from feda2v.models import build_model

    kw = {"feature_dim": 4, "condition_dim": 2, "latent_dim": 2, "hidden_dim": 3, "fusion_dim": 5}
    for lay in LAYOUTS.values():
        from feda2v.models import ARCHITECTURES, constructor_args

        args = {a: kw[a] for a in constructor_args(ARCHITECTURES[lay.cls])}
        own = list(build_model(lay.cls, args).state_dict())
        published = [n for n in lay.param_names() if n.split(".", 1)[0] not in lay.unused]
        assert sorted(own) == sorted(published), lay.name
        assert lay.kind()[1].startswith("fedgfe")


def test_cli_without_prepared_says_how_to_resume(tmp_path, capsys):
    import json

    from feda2v.cli.ckpt import main as ckpt_main

    paths = save_case(tmp_path, server_per_group_vae())
    out = tmp_path / "m.ckpt"
    # flags and overrides around the files
    with pytest.raises(SystemExit) as e:
        ckpt_main(["migrate", "generator.granularity=per_group", str(paths[0]), str(out), GROUPS_OVERRIDE])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "migrate with --prepared DIR" in printed
    assert not (tmp_path / "m.ckpt.overrides").exists()
    with pytest.raises(SystemExit) as e:
        ckpt_main(["inspect", str(out)])
    info = json.loads(capsys.readouterr().out)
    assert info["keys"] == ["group/low", "group/high"] and info["round"] == 4
    with pytest.raises(SystemExit) as e:
        ckpt_main(["migrate", str(paths[0]), str(tmp_path / "x.ckpt"), "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("feda2v: error: ") and err.count("\n") == 1 and "--bogus" in err


def test_published_vae_initialises_like_published_also_on_reset():
    """FedgfeVAE's init (construction and store resets) is the published one: Xavier-normal(gain 0.1)
    weights, zero biases; the other published classes use torch's default bounds, as this project does."""
    from feda2v.config import load_config
    from feda2v.store import GeneratorStore, StoreSpec

    cfg = load_config({"generator": {"type": "vae", "arch": "fedgfe", "hidden_dim": 256, "latent_dim": 8},
                       "data": {"condition": "onehot"}})
    store = GeneratorStore(StoreSpec.from_config(cfg, classes=CLASSES, feature_dim=512, condition_dim=10), torch.eye(10))
    before = None
    for state in ("built", "reset"):
        m = store.module("unified")
        w, b = m.encoder[0].weight.detach().clone(), m.encoder[0].bias.detach()
        assert torch.count_nonzero(b) == 0
        want = 0.1 * (2.0 / (512 + 256)) ** 0.5
        assert abs(float(w.std()) / want - 1) < 0.02 and abs(float(w.mean())) < want / 10
        assert before is None or not torch.equal(before, w)  # a reset redraws (seeded)
        before = w
        store.reset("unified", node="node0", round=1)
