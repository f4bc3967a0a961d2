"""Config: schema, conf/ and params.yaml agree; bad keys, types and values name the key."""
import subprocess

import pytest
import yaml

from conftest import ROOT, cli
from feda2v.config import load_config, to_plain
from feda2v.config.files import compose_conf, schema_yaml
from feda2v.errors import ConfigError


def test_params_yaml_is_the_composed_default():
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == compose_conf(ROOT / "conf")


def test_schema_yaml_is_generated_from_the_dataclasses():
    assert (ROOT / "conf" / "schema.yaml").read_text() == schema_yaml()


def test_conf_is_complete_and_valid():
    composed = compose_conf(ROOT / "conf")
    assert to_plain(load_config(composed)) == composed


@pytest.mark.parametrize("override", [
    "data=digits", "data=fashion_mnist", "generator=vae", "generator=gan", "federation=local",
    "federation=fedavg", "federation=full", "tracking=none", "profiler=enabled"])
def test_every_group_option_composes_and_validates(override):
    group, option = override.split("=")
    cfg = load_config(compose_conf(ROOT / "conf", [override]))
    assert cfg[group] is not None
    if group == "data":
        assert cfg.data.name == option


@pytest.mark.parametrize("raw, needle", [
    ({"data": {"nme": "x"}}, "data.nme"),
    ({"federation": {"rounds": "many"}}, "federation.rounds"),
    ({"federation": {"rounds": 0}}, "federation.rounds"),
    ({"generator": {"granularity": "per_klass"}}, "generator.granularity"),
    ({"data": {"partition": {"alpha": 0}}}, "data.partition.alpha"),
    ({"data": {"name": "cifar"}}, "data.name"),
    ({"generator": {"granularity": "per_group"}}, "class_groups"),
    ({"federation": {"fraction": 1.5}}, "federation.fraction"),
    ({"generator": {"optimizer": {"betas": [0.9]}}}, "betas"),
])
def test_bad_config_names_the_key(raw, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(raw)


def test_published_flag_names_are_aliases():
    cfg = load_config({
        "generator_only_mode": True, "shared_generator_in_only_mode": False,
        "generator_granularity": "per_group", "generator_type": "gan",
        "reset_generator_on_class_change": True,
        "generator_class_groups": {"strings": ["violin"], "rest": ["piano"]},
    })
    assert cfg.federation.mode == "generator_only"
    assert cfg.federation.sharing == "local"
    assert cfg.generator.granularity == "per_group"
    assert cfg.generator.type == "gan"
    assert cfg.federation.reset_on_class_change == "new_classes"  # the published flag: its rule
    assert dict(cfg.generator.class_groups) == {"strings": ["violin"], "rest": ["piano"]}
    assert load_config({"generator_only_mode": False}).federation.mode == "full"


def _run(*args):
    return subprocess.run([cli("feda2v-train"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_alias_override_and_cfg_job():
    out = _run("generator_granularity=per_class", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["generator"]["granularity"] == "per_class"


@pytest.mark.parametrize("arg, needle", [
    ("data.nme=3", "data.nme"),
    ("federation.rounds=0", "federation.rounds"),
    ("generator.granularity=sideways", "generator.granularity"),
])
def test_cli_bad_config_is_one_line_and_nonzero(arg, needle):
    out = _run(arg)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("feda2v: error:") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr
