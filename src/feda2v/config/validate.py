"""Turn any composed config (Hydra, params.yaml, a dict) into a validated, typed config."""
from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from feda2v.config.schema import CHOICES, LEGACY_ALIASES, Feda2vConfig
from feda2v.errors import ConfigError

def _legacy_value(alias: str, value: Any) -> Any:
    if alias == "generator_only_mode":
        return "generator_only" if _as_bool(alias, value) else "full"
    if alias == "shared_generator_in_only_mode":
        return "shared" if _as_bool(alias, value) else "local"
    return value


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def translate_legacy(raw: dict) -> dict:
    """Map the published system's top-level flag names onto this project's dotted names."""
    out = dict(raw)
    for alias, target in LEGACY_ALIASES.items():
        if alias not in out:
            continue
        value = _legacy_value(alias, out.pop(alias))
        node = out
        *parents, leaf = target.split(".")
        for p in parents:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[leaf] = value
    return out


def translate_legacy_override(arg: str) -> str:
    """``generator_granularity=per_class`` -> ``generator.granularity=per_class`` (CLI aliases)."""
    name, sep, value = arg.partition("=")
    bare = name.lstrip("+~")
    if not sep or bare not in LEGACY_ALIASES:
        return arg
    return f"{LEGACY_ALIASES[bare]}={_legacy_value(bare, value)}"


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted)


def load_config(raw: Mapping | DictConfig) -> DictConfig:
    """Validate ``raw`` against the schema; returns a typed, read-only DictConfig.

    Raises ConfigError naming the offending key for unknown keys, wrong types and bad values.
    """
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    raw = translate_legacy(dict(raw))
    raw.pop("hydra", None)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Feda2vConfig), raw)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key '{key}': {msg}" if key else f"config: {msg}") from None
    _check(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check(cfg: DictConfig) -> None:
    for dotted, allowed in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(allowed)}")
    positive = {
        "data.nodes": cfg.data.nodes,
        "federation.rounds": cfg.federation.rounds,
        "federation.local_epochs": cfg.federation.local_epochs,
        "federation.batch_size": cfg.federation.batch_size,
        "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "generator.latent_dim": cfg.generator.latent_dim,
        "generator.hidden_dim": cfg.generator.hidden_dim,
        "generator.optimizer.lr": cfg.generator.optimizer.lr,
        "data.partition.classes_per_node": cfg.data.partition.classes_per_node,
        "federation.flower.reply_timeout_s": cfg.federation.flower.reply_timeout_s,
        "federation.flower.poll_s": cfg.federation.flower.poll_s,
        "federation.flower.connect_timeout_s": cfg.federation.flower.connect_timeout_s,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    if cfg.federation.flower.retries < 0:
        raise ConfigError(f"federation.flower.retries must be >= 0, got {cfg.federation.flower.retries}")
    if not cfg.data.partition.alpha > 0:
        raise ConfigError(f"data.partition.alpha must be > 0, got {cfg.data.partition.alpha}")
    if not 0 < cfg.federation.fraction <= 1:
        raise ConfigError(f"federation.fraction must be in (0, 1], got {cfg.federation.fraction}")
    if not 0 < cfg.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {cfg.data.test_fraction}")
    betas = list(cfg.generator.optimizer.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"generator.optimizer.betas must be two numbers in [0, 1), got {betas}")
    if cfg.generator.granularity == "per_group" and not cfg.generator.class_groups:
        raise ConfigError("generator.granularity=per_group needs generator.class_groups ({group: [classes]})")
    spc = cfg.federation.synthetic_per_class
    if spc != "auto" and not (spc.isdigit() and int(spc) > 0):
        raise ConfigError(f"federation.synthetic_per_class must be 'auto' or a positive integer, got {spc!r}")


def flatten_dotted(tree: Mapping, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "c": {}}`` -> ``{"a.b": 1, "c": {}}``: leaves keep their values (an empty
    mapping is a leaf). Shared by resume checks, checkpoint diffs and MLflow params."""
    out: dict = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_dotted(v, name + "."))
        else:
            out[name] = v
    return out


def to_plain(cfg: DictConfig) -> dict:
    """A plain, JSON-able dict of the resolved config (for headers, MLflow params, params.yaml)."""
    return OmegaConf.to_container(cfg, resolve=True)
