"""The config files derived from the schema: conf/schema.yaml and params.yaml.

conf/ is plain YAML (no ConfigStore lookups) so DVC's own Hydra composition (`dvc exp run -S`)
can compose it without importing feda2v; the schema reaches it as a generated file.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from feda2v.config.schema import Feda2vConfig

HEADER = ("# GENERATED from src/feda2v/config/schema.py by scripts/sync_config.py: do not edit.\n"
          "# Every key, type and default of the config; conf/config.yaml builds on it.\n")
PARAMS_HEADER = ("# GENERATED: the composed default of conf/ (scripts/sync_config.py); the DVC stages\n"
                 "# read it. `dvc exp run -S key=value` recomposes it through DVC's Hydra integration.\n")


def schema_yaml() -> str:
    return HEADER + OmegaConf.to_yaml(OmegaConf.structured(Feda2vConfig))


def compose_conf(conf_dir: Path, overrides: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides or [])
    return OmegaConf.to_container(cfg, resolve=True)


def composed_default_yaml(conf_dir: Path) -> str:
    return PARAMS_HEADER + OmegaConf.to_yaml(OmegaConf.create(compose_conf(conf_dir)))
