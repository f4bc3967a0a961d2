"""Turn any composed config (Hydra, params.yaml, a dict) into a validated, typed config."""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping

from typing import TYPE_CHECKING

from feda2v.config.schema import CHOICES, LEGACY_ALIASES, LR_SCHEDULES, Feda2vConfig
from feda2v.errors import ConfigError

# omegaconf (and yaml, antlr) are imported where a config is built or resolved, not by importing
# this module: a Flower node's per-message process reads checkpoints (flatten_dotted) but never
# loads a config, and saves ~0.1 s per visit.
if TYPE_CHECKING:
    from omegaconf import DictConfig

def _legacy_value(alias: str, value: Any) -> Any:
    if alias == "generator_only_mode":
        return "generator_only" if _as_bool(alias, value) else "full"
    if alias == "shared_generator_in_only_mode":
        return "shared" if _as_bool(alias, value) else "local"
    if alias == "reset_generator_on_class_change":
        return _reset_policy(alias, value)
    return value


def _reset_policy(name: str, value: Any) -> Any:
    """The published on/off flag's meaning as a policy: true = the published rule, false = never."""
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
        return "new_classes" if _as_bool(name, value) else "never"
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
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, dotted)


def load_config(raw: Mapping | DictConfig) -> DictConfig:
    """Validate ``raw`` against the schema; returns a typed, read-only DictConfig.

    Raises ConfigError naming the offending key for unknown keys, wrong types and bad values.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    raw = translate_legacy(dict(raw))
    fed = raw.get("federation")
    if isinstance(fed, Mapping) and "reset_on_class_change" in fed:  # true/false: the published flag
        raw["federation"] = {**fed, "reset_on_class_change": _reset_policy(
            "federation.reset_on_class_change", fed["reset_on_class_change"])}
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


class _Rule:
    """One leaf key's allowed values: ``ok(value)`` and the words for the error message."""

    def __init__(self, ok, expected: str):
        self.ok, self.expected = ok, expected


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(lo) -> _Rule:
    return _Rule(lambda v: _finite(v) and v >= lo, f">= {lo}")


def _above(lo) -> _Rule:
    return _Rule(lambda v: _finite(v) and v > lo, f"> {lo}")


def _between(lo, hi) -> _Rule:
    return _Rule(lambda v: _finite(v) and lo <= v <= hi, f"in [{lo}, {hi}]")


def _text(optional: bool = False) -> _Rule:
    # A path or a name: an empty string is never meant (null is how to say "none").
    return _Rule(lambda v: (optional and v is None) or (isinstance(v, str) and v.strip() != ""),
                 "a non-empty string" + (" or null" if optional else ""))


_SEED = _Rule(lambda v: isinstance(v, int) and 0 <= v < 2**63, "an integer in [0, 2**63)")

# Every numeric and string leaf of the schema has a rule here; bool keys are checked by their type
# and the string "enums" by CHOICES (config/schema.py). tests/test_errors_config.py enumerates the
# schema and proves each leaf key refuses a bad value, so a new key needs a rule (or a type) here.
RULES: Dict[str, _Rule] = {
    "seed": _SEED,
    "data.nodes": _at_least(1),
    "data.partition.alpha": _above(0),
    "data.partition.classes_per_node": _at_least(1),
    "data.instruments.classes": _at_least(1),
    "data.instruments.clips_per_class": _at_least(1),
    "data.instruments.sample_rate": _between(8000, 96000),
    "data.instruments.clip_seconds": _between(0.1, 30),
    "data.instruments.feature_skew_nodes": _at_least(0),
    "data.instruments.cache_dir": _text(),
    "data.test_fraction": _Rule(lambda v: _finite(v) and 0 < v < 1, "in (0, 1)"),
    "data.max_samples": _Rule(lambda v: _finite(v) and v >= 0, ">= 0 (0 = all)"),
    "data.prepared_dir": _text(),
    "data.site_bundles_dir": _text(optional=True),
    "generator.default_group": _text(optional=True),
    "generator.latent_dim": _at_least(1),
    "generator.hidden_dim": _Rule(lambda v: v is None or (_finite(v) and v >= 1), ">= 1 or null (the type's default)"),
    "generator.fusion_dim": _at_least(1),
    "generator.ema_decay": _Rule(lambda v: v is None or (_finite(v) and 0 <= v < 1),
                                 "in [0, 1) or null (the type's default)"),
    "generator.beta_max": _at_least(0),
    "generator.beta_warmup_steps": _at_least(0),
    "generator.optimizer.schedule": _Rule(lambda v: v is None or v in LR_SCHEDULES,
                                          f"one of {', '.join(LR_SCHEDULES)} or null (the type's default)"),
    "generator.optimizer.decay_rounds": _Rule(lambda v: v is None or (_finite(v) and v >= 1),
                                              ">= 1 or null (federation.rounds)"),
    "generator.optimizer.lr": _Rule(lambda v: v is None or (_finite(v) and v > 0), "> 0 or null (the type's default)"),
    "generator.gan.d_steps": _at_least(1),
    "generator.gan.g_steps": _at_least(1),
    "generator.gan.r1_gamma": _at_least(0),
    "generator.optimizer.eps": _above(0),
    "generator.optimizer.weight_decay": _at_least(0),
    "federation.rounds": _at_least(1),
    "federation.local_epochs": _at_least(1),
    "federation.batch_size": _at_least(1),
    "federation.fraction": _Rule(lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]"),
    "federation.classifier_lr": _above(0),
    "federation.classifier_hidden": _at_least(1),
    "federation.synthetic_per_class": _Rule(
        lambda v: v == "auto" or (isinstance(v, str) and v.isdigit() and int(v) > 0),
        "'auto' or a positive integer"),
    "federation.distill_epochs": _at_least(1),
    "federation.flower.reply_timeout_s": _above(0),
    "federation.flower.poll_s": _above(0),
    "federation.flower.connect_timeout_s": _above(0),
    "federation.flower.retries": _at_least(0),
    "federation.flower.node_state_dir": _text(optional=True),
    "checkpoint.dir": _text(),
    "checkpoint.every": _at_least(1),
    "checkpoint.keep_last": _at_least(1),
    "train.resume": _text(optional=True),
    "train.reports_dir": _text(),
    "train.metrics_path": _text(),
    "train.timing_path": _text(),
    "train.threads": _between(0, 4096),
    "train.device": _Rule(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                          "auto, cpu, cuda or cuda:N"),
    "tracking.uri": _text(),
    "tracking.experiment": _text(),
    "tracking.run_name": _text(optional=True),
    "profiler.wait": _at_least(0),
    "profiler.warmup": _at_least(0),
    "profiler.active": _at_least(1),
    "profiler.repeat": _at_least(0),
    "profiler.dir": _text(),
    "evaluate.checkpoint": _text(),
    "evaluate.reports_dir": _text(),
    "evaluate.samples_per_class": _at_least(2),
    "evaluate.knn_k": _at_least(1),
    "evaluate.seed": _SEED,
}


def _check(cfg: DictConfig) -> None:
    for dotted, allowed in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(allowed)}")
    for dotted, rule in RULES.items():
        value = _get(cfg, dotted)
        if not rule.ok(value):
            raise ConfigError(f"{dotted} must be {rule.expected}, got {value!r}")
    betas = None if cfg.generator.optimizer.betas is None else list(cfg.generator.optimizer.betas)
    if betas is not None and (len(betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"generator.optimizer.betas must be two numbers in [0, 1), got {betas}")
    _check_groups(cfg.generator)
    # Combinations: each would otherwise fail later, after data loading or mid-run.
    if cfg.data.instruments.feature_skew_nodes > cfg.data.nodes:
        raise ConfigError(f"data.instruments.feature_skew_nodes must be in [0, data.nodes={cfg.data.nodes}], "
                          f"got {cfg.data.instruments.feature_skew_nodes}")
    if cfg.evaluate.knn_k >= cfg.evaluate.samples_per_class:
        raise ConfigError(f"evaluate.knn_k ({cfg.evaluate.knn_k}) must be below evaluate.samples_per_class "
                          f"({cfg.evaluate.samples_per_class})")
    # (mode=full with a sharing mode that has no server-side store is refused by the sharing
    # strategy, federation/sharing.py, when the Federation is built: config/ cannot import it.)


def _check_groups(g) -> None:
    """class_groups: {group: [classes]}, each group named and non-empty, no class in two groups."""
    groups = g.class_groups
    if g.granularity == "per_group" and not groups:
        raise ConfigError("generator.granularity=per_group needs generator.class_groups ({group: [classes]})")
    seen: dict = {}
    for name, members in groups.items():
        if not str(name).strip():
            raise ConfigError("generator.class_groups: a group has an empty name")
        if not members:
            raise ConfigError(f"generator.class_groups: group '{name}' is empty; list its classes or remove it")
        for c in members:
            if not str(c).strip():
                raise ConfigError(f"generator.class_groups: group '{name}' lists an empty class name")
            if c in seen:
                raise ConfigError(f"generator.class_groups: class '{c}' is in two groups "
                                  f"('{seen[c]}' and '{name}')")
            seen[c] = name


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
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)
