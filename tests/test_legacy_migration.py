"""Migration of the published system's checkpoint dicts (layouts of lucapalazzo/fedgfe)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from feda2v.checkpoint import inspect_checkpoint, migrate_legacy, read_checkpoint
from feda2v.checkpoint.legacy import map_parameters
from feda2v.cli.ckpt import main as ckpt_main
from feda2v.errors import CheckpointError


# Modules with the published generators' layer layout (parameter names are what matters).
class LegacyVAE(nn.Module):
    def __init__(self, d=12, h=10, z=3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Dropout(0.2), nn.Linear(h, h), nn.ReLU(),
                                     nn.Dropout(0.2), nn.Linear(h, 2 * z))
        self.decoder = nn.Sequential(nn.Linear(z, h), nn.ReLU(), nn.Dropout(0.2), nn.Linear(h, h), nn.ReLU(),
                                     nn.Dropout(0.2), nn.Linear(h, d))


class LegacyCVAE(nn.Module):
    def __init__(self, d=12, c=6, h=10, z=3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d + c, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2))
        self.fc_mu = nn.Linear(h, z)
        self.fc_logvar = nn.Linear(h, z)
        self.decoder = nn.Sequential(nn.Linear(z + c, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2),
                                     nn.Linear(h, d), nn.Tanh())


class LegacyGANG(nn.Module):
    def __init__(self, z=4, h=10, d=12):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(z, h), nn.ReLU(True), nn.Linear(h, h), nn.ReLU(True), nn.Linear(h, d))


class LegacyGAND(nn.Module):
    def __init__(self, d=12, h=10):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(d, h), nn.LeakyReLU(0.2), nn.Dropout(0.2), nn.Linear(h, h),
                                   nn.LeakyReLU(0.2), nn.Dropout(0.2), nn.Linear(h, 1))


def trained(module: nn.Module, steps: int = 2, seed: int = 0, **opt):
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    o = torch.optim.AdamW(module.parameters(), lr=opt.get("lr", 2e-3), weight_decay=opt.get("weight_decay", 0.05),
                          betas=(0.5, 0.99), amsgrad=opt.get("amsgrad", False))
    for _ in range(steps):
        o.zero_grad()
        sum((p ** 2).sum() * (i + 1) for i, p in enumerate(module.parameters())).backward()
        o.step()
    return module, o


CLASSES = ["piano", "violin", "flute"]


def server_unified_vae():
    g, o = trained(LegacyVAE())
    return {"checkpoint_type": "server", "is_global": True, "round": 4, "timestamp": "2025-01-01T00:00:00",
            "generator_type": "vae", "federated_classes": CLASSES, "num_clients": 2,
            "client_metadata": [{"client_id": 0, "dataset": "vgg", "selected_classes": ["piano"]}],
            "generator_state_dict": g.state_dict(), "optimizer_state_dict": o.state_dict()}, g, o


def save(tmp_path, obj, name="legacy.pt"):
    p = tmp_path / name
    torch.save(obj, p)
    return p


def strip(tensors, prefix="store/server/"):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_server_unified_vae(tmp_path):
    from feda2v.store import GeneratorStore

    obj, g, o = server_unified_vae()
    out = tmp_path / "m.ckpt"
    header = migrate_legacy(save(tmp_path, obj), out)
    tensors, h = read_checkpoint(out)
    assert h["keys"] == ["unified"] and h["roles"] == ["generator"] and h["round"] == 4
    assert h["optimizers"] == {"unified/generator": {"step": 2, "lr": 2e-3, "weight_decay": 0.05}}
    assert h["config"]["generator"]["type"] == "vae"
    assert h["config"]["generator"]["optimizer"]["betas"] == [0.5, 0.99]
    assert h["migration"]["legacy_metadata"]["timestamp"] == "2025-01-01T00:00:00"
    sd = g.state_dict()
    pre = "store/server/unified/generator/"
    for legacy_name, name in [("encoder.0", "encoder.0"), ("encoder.3", "encoder.2"), ("encoder.6", "encoder.4"),
                              ("decoder.0", "decoder.0"), ("decoder.3", "decoder.2"), ("decoder.6", "decoder.4")]:
        for w in ("weight", "bias"):
            assert torch.equal(tensors[f"{pre}param/{name}.{w}"], sd[f"{legacy_name}.{w}"])
    params = list(g.parameters())
    st = o.state_dict()["state"]
    legacy_names = list(sd)
    for i, p in enumerate(params):
        name = {"encoder.3": "encoder.2", "encoder.6": "encoder.4", "decoder.3": "decoder.2",
                "decoder.6": "decoder.4"}.get(legacy_names[i].rsplit(".", 1)[0], legacy_names[i].rsplit(".", 1)[0])
        name += "." + legacy_names[i].rsplit(".", 1)[1]
        assert torch.equal(tensors[f"{pre}optim/{name}/exp_avg"], st[i]["exp_avg"])
        assert torch.equal(tensors[f"{pre}optim/{name}/exp_avg_sq"], st[i]["exp_avg_sq"])
        assert tensors[f"{pre}optim/{name}/step"].item() == 2
    # the migrated store loads and its optimizer carries the legacy moments and hyper-parameters
    store = GeneratorStore.from_state(strip(tensors), h["stores"]["server"])
    assert store.step_count("unified") == 2
    opt = store.optimizer("unified")
    assert opt.param_groups[0]["lr"] == 2e-3 and opt.param_groups[0]["weight_decay"] == 0.05
    enc2 = dict(store.module("unified").named_parameters())["encoder.2.weight"]
    assert torch.equal(opt.state[enc2]["exp_avg"], st[legacy_names.index("encoder.3.weight")]["exp_avg"])
    info = inspect_checkpoint(out)
    assert info["optimizers"]["unified/generator"]["step"] == 2
    assert header["sha256"] if "sha256" in header else True


def test_migration_is_deterministic(tmp_path):
    obj, _, _ = server_unified_vae()
    p = save(tmp_path, obj)
    migrate_legacy(p, tmp_path / "a.ckpt")
    migrate_legacy(p, tmp_path / "b.ckpt")
    assert (tmp_path / "a.ckpt").read_bytes() == (tmp_path / "b.ckpt").read_bytes()


def test_server_multi_per_class_and_per_group(tmp_path):
    gens, opts = {}, {}
    for i, c in enumerate(CLASSES):
        g, o = trained(LegacyVAE(), steps=i + 1, seed=i)
        gens[c], opts[c] = g.state_dict(), o.state_dict()
    obj = {"checkpoint_type": "server", "round": 2, "generator_type": "vae", "federated_classes": CLASSES,
           "prompt_generators": gens, "generator_optimizers": opts, "generator_keys": CLASSES,
           "use_conditioned_vae": False, "num_generators": 3}
    out = tmp_path / "pc.ckpt"
    migrate_legacy(save(tmp_path, obj), out)
    t, h = read_checkpoint(out)
    assert h["keys"] == [f"class/{c}" for c in CLASSES]
    assert h["config"]["generator"]["granularity"] == "per_class"
    assert [h["optimizers"][f"class/{c}/generator"]["step"] for c in CLASSES] == [1, 2, 3]
    assert torch.equal(t["store/server/class/violin/generator/param/encoder.4.weight"], gens["violin"]["encoder.6.weight"])

    # the same keys as groups: the file cannot say so, the user must
    groups = {"keys": ["piano"], "strings": ["violin"], "winds": ["flute"]}
    obj2 = dict(obj, prompt_generators={g: gens[cs[0]] for g, cs in groups.items()},
                generator_optimizers={g: opts[cs[0]] for g, cs in groups.items()}, generator_keys=list(groups))
    p2 = save(tmp_path, obj2, "groups.pt")
    with pytest.raises(CheckpointError, match="pass generator.granularity=per_class or per_group"):
        migrate_legacy(p2, tmp_path / "g.ckpt")
    with pytest.raises(CheckpointError, match="does not record its class groups"):
        migrate_legacy(p2, tmp_path / "g.ckpt", overrides=["generator.granularity=per_group"])
    migrate_legacy(p2, tmp_path / "g.ckpt", overrides=[
        "generator.granularity=per_group", "generator.class_groups={keys:[piano],strings:[violin],winds:[flute]}"])
    _, hg = read_checkpoint(tmp_path / "g.ckpt")
    assert hg["keys"] == ["group/keys", "group/strings", "group/winds"]


def test_unified_gan_with_discriminator(tmp_path):
    g, og = trained(LegacyGANG(), steps=3)
    d, od = trained(LegacyGAND(), steps=3, lr=5e-4)
    obj = {"checkpoint_type": "server", "round": 1, "generator_type": "gan", "federated_classes": CLASSES,
           "generator_clip_state_dict": g.state_dict(), "generator_t5_state_dict": None,
           "discriminator_clip_state_dict": d.state_dict(), "discriminator_t5_state_dict": None,
           "generator_optimizer_state_dict": og.state_dict(), "discriminator_optimizer_state_dict": od.state_dict()}
    out = tmp_path / "gan.ckpt"
    migrate_legacy(save(tmp_path, obj), out)
    t, h = read_checkpoint(out)
    assert h["roles"] == ["generator", "discriminator"]
    assert h["optimizers"]["unified/discriminator"] == {"step": 3, "lr": 5e-4, "weight_decay": 0.05}
    w = t["store/server/unified/generator/param/net.0.weight"]
    assert torch.equal(w[:, :4], g.state_dict()["model.0.weight"])
    assert torch.count_nonzero(w[:, 4:]) == 0  # condition inputs start with zero weight
    m = t["store/server/unified/generator/optim/net.0.weight/exp_avg"]
    assert torch.equal(m[:, :4], og.state_dict()["state"][0]["exp_avg"]) and torch.count_nonzero(m[:, 4:]) == 0
    assert torch.equal(t["store/server/unified/discriminator/param/net.2.weight"], d.state_dict()["model.3.weight"])
    assert any("unconditional" in n for n in h["migration"]["notes"])


def test_client_files(tmp_path):
    g, o = trained(LegacyVAE())
    base = {"client_id": 3, "node_id": 3, "round": 5, "generator_type": "vae", "dataset_name": "vgg",
            "selected_classes": CLASSES, "generator_state_dict": g.state_dict()}
    # per_group client file with optimizer state
    obj = dict(base, generator_granularity="per_group", generator_key="strings", group_name="strings",
               class_name=None, generator_classes=["violin", "cello"], optimizer_state_dict=o.state_dict())
    migrate_legacy(save(tmp_path, obj, "c1.pt"), tmp_path / "c1.ckpt")
    _, h = read_checkpoint(tmp_path / "c1.ckpt")
    assert h["keys"] == ["group/strings"] and h["round"] == 5
    assert h["stores"]["server"]["spec"]["classes"] == ["violin", "cello"]
    assert h["optimizers"]["group/strings/generator"]["step"] == 2
    # per_class client file without optimizer state: migrates with a fresh optimizer, said so
    obj = dict(base, generator_granularity="per_class", generator_key="piano", class_name="piano",
               group_name=None, generator_classes=["piano"])
    migrate_legacy(save(tmp_path, obj, "c2.pt"), tmp_path / "c2.ckpt")
    t, h = read_checkpoint(tmp_path / "c2.ckpt")
    assert h["keys"] == ["class/piano"]
    assert h["optimizers"]["class/piano/generator"]["step"] == 0
    assert not any("/optim/" in k for k in t)
    assert any("no optimizer state" in n for n in h["migration"]["notes"])


def test_conditioned_vae_mapping_and_missing_conditions(tmp_path):
    g, o = trained(LegacyCVAE())
    sd = g.state_dict()
    mapped = map_parameters(sd, "ConditionedVAEGenerator", 0, "generator_state_dict")
    assert torch.equal(mapped["encoder.4.weight"], torch.cat([sd["fc_mu.weight"], sd["fc_logvar.weight"]]))
    assert torch.equal(mapped["encoder.4.bias"], torch.cat([sd["fc_mu.bias"], sd["fc_logvar.bias"]]))
    assert torch.equal(mapped["decoder.4.weight"], sd["decoder.4.weight"])
    obj = {"checkpoint_type": "server", "round": 1, "federated_classes": CLASSES,
           "generator_state_dict": sd, "optimizer_state_dict": o.state_dict()}
    with pytest.raises(CheckpointError, match="pass --prepared DIR whose conditions match \\(condition_dim 6\\)"):
        migrate_legacy(save(tmp_path, obj), tmp_path / "c.ckpt")
    assert not (tmp_path / "c.ckpt").exists()


def _vae_obj(**extra):
    obj, g, o = server_unified_vae()
    obj.update(extra)
    return obj, g, o


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _vae_obj(adapter_state_dict={"w": torch.zeros(2)})[0], "legacy key 'adapter_state_dict' holds tensors"),
        (lambda: _vae_obj(generator_t5_state_dict={"w": torch.zeros(2)})[0], "'generator_t5_state_dict' holds a T5"),
        (lambda: {**_vae_obj()[0], "generator_state_dict": {**_vae_obj()[1].state_dict(), "upsampler.0.weight": torch.zeros(2, 2, 3)}},
         "'generator_state_dict.upsampler.0.weight' has no counterpart"),
        (lambda: {**_vae_obj()[0], "generator_state_dict": {k: v for k, v in _vae_obj()[1].state_dict().items() if k != "decoder.6.bias"}},
         "unknown layer layout"),
        (lambda: {**_vae_obj()[0], "optimizer_state_dict": trained(LegacyGANG())[1].state_dict()},
         "covers 6 parameters but 'generator_state_dict' has 12"),
        (lambda: {**_vae_obj()[0], "optimizer_state_dict": trained(LegacyVAE(), amsgrad=True)[1].state_dict()}, "amsgrad"),
        (lambda: {**_vae_obj()[0], "generator_type": "gan"}, "'generator_type' says 'gan'"),
        (lambda: {k: v for k, v in _vae_obj()[0].items() if k not in ("federated_classes", "client_metadata")},
         "lists no classes"),
        (lambda: {"round": 1, "optimizer_state_dict": _vae_obj()[2].state_dict()}, "no generator to attach it to"),
        (lambda: {"round": 1}, "has no generator state"),
        (lambda: [1, 2, 3], "holds a list"),
        (lambda: _vae_obj(generator_optimizer_state_dict=_vae_obj()[2].state_dict())[0],
         "'generator_optimizer_state_dict' does not belong"),
        (lambda: {"round": 1, "prompt_generators": {"a": _vae_obj()[1].state_dict()},
                  "optimizer_state_dict": _vae_obj()[2].state_dict(), "generator_granularity": "per_class"},
         "'optimizer_state_dict' does not belong"),
        (lambda: {**_vae_obj()[0], "timestamp": 1 + 2j}, "'timestamp' is a complex"),
    ],
)
def test_unmappable_input_is_a_clear_error(tmp_path, make, match):
    p = save(tmp_path, make())
    out = tmp_path / "out.ckpt"
    with pytest.raises(CheckpointError, match=match) as e:
        migrate_legacy(p, out)
    assert "\n" not in str(e.value)
    assert not out.exists()  # never a partial result


def test_shape_lie_in_optimizer_state(tmp_path):
    obj, g, o = server_unified_vae()
    osd = o.state_dict()
    osd["state"][0]["exp_avg"] = torch.zeros(3, 3)
    obj["optimizer_state_dict"] = osd
    with pytest.raises(CheckpointError, match="optimizer_state_dict.state.0' moments do not match"):
        migrate_legacy(save(tmp_path, obj), tmp_path / "o.ckpt")


def test_existing_output_is_not_overwritten(tmp_path):
    obj, _, _ = server_unified_vae()
    out = tmp_path / "o.ckpt"
    out.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="already exists"):
        migrate_legacy(save(tmp_path, obj), out)
    assert out.read_bytes() == b"precious"


def test_cli_migrate_then_inspect(tmp_path, capsys):
    obj, _, _ = server_unified_vae()
    p = save(tmp_path, obj)
    out = tmp_path / "m.ckpt"
    with pytest.raises(SystemExit) as e:
        ckpt_main(["migrate", str(p), str(out)])
    assert e.value.code == 0
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        ckpt_main(["inspect", str(out)])
    assert e.value.code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["keys"] == ["unified"] and info["round"] == 4
    assert info["optimizers"]["unified/generator"] == {"step": 2, "lr": 0.002, "weight_decay": 0.05}


@pytest.fixture(scope="module")
def digits_prepared(tmp_path_factory):
    from feda2v.config import load_config
    from feda2v.data import prepare

    d = tmp_path_factory.mktemp("prep") / "prepared"
    cfg = load_config({"data": {"name": "digits", "condition": "onehot", "prepared_dir": str(d), "nodes": 2,
                                "partition": {"scheme": "iid"}}})
    return prepare(cfg)


def test_conditioned_vae_with_prepared_conditions(tmp_path, digits_prepared):
    from feda2v.data import load_prepared
    from feda2v.store import GeneratorStore

    prep = load_prepared(digits_prepared)
    g, o = trained(LegacyCVAE(d=prep.feature_dim, c=prep.condition_dim))
    obj = {"checkpoint_type": "server", "round": 6, "generator_type": "vae", "use_conditioned_vae": True,
           "generator_state_dict": g.state_dict(), "optimizer_state_dict": o.state_dict()}
    p = save(tmp_path, obj)
    out = tmp_path / "cvae.ckpt"
    migrate_legacy(p, out, prepared_dir=digits_prepared)
    t, h = read_checkpoint(out)
    assert h["config"]["generator"]["type"] == "cvae"
    assert h["data_manifest_hash"] == prep.manifest_hash
    assert torch.equal(t["store/server/conditions"], prep.conditions)
    sd = g.state_dict()
    assert torch.equal(t["store/server/unified/generator/param/encoder.4.weight"],
                       torch.cat([sd["fc_mu.weight"], sd["fc_logvar.weight"]]))
    st = o.state_dict()["state"]
    names = list(sd)
    mu, lv = names.index("fc_mu.weight"), names.index("fc_logvar.weight")
    assert torch.equal(t["store/server/unified/generator/optim/encoder.4.weight/exp_avg_sq"],
                       torch.cat([st[mu]["exp_avg_sq"], st[lv]["exp_avg_sq"]]))
    store = GeneratorStore.from_state({k[13:]: v for k, v in t.items() if k.startswith("store/server/")},
                                      h["stores"]["server"])
    assert store.keys == ["unified"] and store.step_count("unified") == 2
    # the merged last encoder layer gives [fc_mu(h), fc_logvar(h)], in the order encode() splits it
    hdn = torch.randn(5, 10)
    with torch.no_grad():
        mu_new, lv_new = store.module("unified").encoder[4](hdn).chunk(2, dim=-1)
        assert torch.allclose(mu_new, g.fc_mu(hdn)) and torch.allclose(lv_new, g.fc_logvar(hdn))
    # wrong condition size is refused by name
    g2, o2 = trained(LegacyCVAE(d=prep.feature_dim, c=7))
    p2 = save(tmp_path, dict(obj, generator_state_dict=g2.state_dict(), optimizer_state_dict=o2.state_dict()), "c7.pt")
    with pytest.raises(CheckpointError, match="condition_dim 10 but the legacy conditioned VAE expects 7"):
        migrate_legacy(p2, tmp_path / "c7.ckpt", prepared_dir=digits_prepared)


def test_per_class_missing_a_prepared_class_is_refused(tmp_path, digits_prepared):
    gens = {c: trained(LegacyVAE(d=64))[0].state_dict() for c in ["zero", "one"]}
    obj = {"checkpoint_type": "server", "round": 1, "prompt_generators": gens, "generator_keys": ["zero", "one"],
           "federated_classes": ["zero", "one"]}
    with pytest.raises(CheckpointError, match="no generator for class 'two' of the prepared data"):
        migrate_legacy(save(tmp_path, obj), tmp_path / "o.ckpt", prepared_dir=digits_prepared)
