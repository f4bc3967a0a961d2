"""The one table of generator kinds (store/kinds.py): the store, the spec, the checkpoint meta and the
config's choices all follow it, and a new kind or architecture variant is one entry there."""
from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch

from feda2v.config import load_config
from feda2v.config.schema import CHOICES
from feda2v.errors import ConfigError
from feda2v.models import ARCHITECTURES, CVAE, GANDiscriminator, constructor_args
from feda2v.store import GeneratorStore, StoreSpec, kinds
from feda2v.store.steps import vae_step

SRC = Path(__file__).resolve().parents[1] / "src" / "feda2v"
CLASSES = ("a", "b", "c")


def spec(**kw) -> StoreSpec:
    args = dict(type="cvae", granularity="per_class", classes=CLASSES, feature_dim=5, condition_dim=3,
                latent_dim=2, hidden_dim=7)
    args.update(kw)
    return StoreSpec(**args)


def test_config_choices_are_the_tables_names():
    assert CHOICES["generator.type"] == kinds.TYPES == ("vae", "cvae", "gan")
    assert CHOICES["generator.arch"] == kinds.ARCHS


@pytest.mark.parametrize("type_", kinds.TYPES)
def test_store_roles_and_architectures_follow_the_table(type_):
    s = GeneratorStore(spec(type=type_), torch.eye(3))
    k = kinds.KINDS[type_]
    assert s.roles == k.roles
    _, meta = s.state_dict()
    for role in k.roles:
        ra = k.archs["default"][role]
        module = s.module("class/a", role)
        assert type(module).__name__ == ra.cls
        # the kwargs a checkpoint records are the module's own constructor arguments
        assert meta["arch"][f"class/a/{role}"] == {"class": ra.cls, "kwargs": module.kwargs()}
        # every constructor argument, except one with a default (added after checkpoints existed)
        # that the module has at its default: older checkpoints record none of those
        params = inspect.signature(ARCHITECTURES[ra.cls].__init__).parameters
        at_default = {n for n in constructor_args(ARCHITECTURES[ra.cls])
                      if params[n].default is not inspect.Parameter.empty and getattr(module, n) == params[n].default}
        assert set(module.kwargs()) == set(constructor_args(ARCHITECTURES[ra.cls])) - at_default


def test_kwargs_come_from_spec_fields_of_the_same_name():
    s = spec(type="gan", feature_dim=11, condition_dim=4, hidden_dim=9, latent_dim=3)
    assert kinds.architecture(s, "discriminator") == (
        "ProjectionDiscriminator", {"feature_dim": 11, "condition_dim": 4, "hidden_dim": 9})
    assert kinds.architecture(s, "generator")[1] == {"feature_dim": 11, "condition_dim": 4, "latent_dim": 3,
                                                     "hidden_dim": 9}


def test_kind_of_class_answers_readers_that_meet_an_architecture_first():
    assert kinds.kind_of_class("CVAE") == ("cvae", "default")
    assert kinds.kind_of_class("GANGenerator") == ("gan", "default")
    assert kinds.kind_of_class("ProjectionDiscriminator", "discriminator") == ("gan", "default")
    assert kinds.kind_of_class("GANDiscriminator", "discriminator") == ("gan", "concat")
    assert kinds.kind_of_class("Transformer") is None


def test_unknown_type_or_arch_is_one_config_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match="generator.type: 'flow' is not one of vae, cvae, gan"):
        GeneratorStore(spec(type="flow"), torch.eye(3))
    with pytest.raises(ConfigError, match="generator.arch: 'huge' is not an architecture of generator.type=cvae"):
        GeneratorStore(spec(arch="huge"), torch.eye(3))
    with pytest.raises(ConfigError, match="generator.arch"):
        load_config({"generator": {"arch": "huge"}})


def test_arch_travels_in_config_spec_and_meta():
    cfg = load_config({"generator": {"arch": "default"}})
    s = StoreSpec.from_config(cfg, classes=CLASSES, feature_dim=5, condition_dim=3)
    assert s.arch == "default" and s.to_json()["arch"] == "default"
    older = s.to_json()
    del older["arch"]  # checkpoints written before the variant existed
    assert StoreSpec.from_json(older) == s


def test_a_new_variant_is_one_table_entry(monkeypatch):
    """A variant registered only in the table is built, trained, saved and rebuilt by the store."""
    class WideCVAE(CVAE):
        def __init__(self, feature_dim, condition_dim, latent_dim, width, gen=None):
            super().__init__(feature_dim, condition_dim, latent_dim, width, gen)
            self.width = width

    monkeypatch.setitem(ARCHITECTURES, "WideCVAE", WideCVAE)
    cvae = kinds.KINDS["cvae"]
    wide = {**cvae.archs, "wide": {"generator": kinds.RoleArch("WideCVAE", {"width": "hidden_dim"})}}
    monkeypatch.setitem(kinds.KINDS, "cvae", kinds.Kind("cvae", cvae.roles, vae_step, wide))
    s = GeneratorStore(spec(arch="wide", hidden_dim=6), torch.eye(3))
    assert type(s.module("class/a")) is WideCVAE and s.module("class/a").hidden_dim == 6
    s.train_batch(torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2]), gen=torch.Generator().manual_seed(0),
                  node="n", round=0)
    tensors, meta = s.state_dict()
    assert meta["arch"]["class/a/generator"]["kwargs"]["width"] == 6
    back = GeneratorStore.from_state(tensors, json.loads(json.dumps(meta, sort_keys=True)))
    assert back.spec.arch == "wide" and back.step_count("class/a") == 1


def test_no_generator_type_branch_outside_the_table():
    """Nothing in src compares generator.type (spec.type, cfg.generator.type) with a kind's name."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "kinds.py" or "legacy" in path.parts or path.name == "legacy.py":
            continue  # the published layouts name the published classes, not our kinds
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [n for n in [node.left, *node.comparators]
                         if isinstance(n, ast.Attribute) and n.attr == "type"]
                consts = [n for n in [node.left, *node.comparators]
                          if isinstance(n, ast.Constant) and n.value in kinds.TYPES]
                if names and consts:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, offenders
