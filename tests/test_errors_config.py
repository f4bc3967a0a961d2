"""Validation is complete: every leaf key of the schema has a bad value, and load_config refuses it
with one line that names the key.

The table BAD is the contract: a key added to config/schema.py makes
``test_every_schema_key_has_a_bad_value`` fail until it gets an entry here (and, if its type alone
does not refuse the value, a rule in config/validate.py RULES or CHOICES).
"""
from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from feda2v.config import flatten_dotted, load_config
from feda2v.config.schema import CHOICES, Feda2vConfig
from feda2v.config.validate import RULES
from feda2v.errors import ConfigError

# key -> a value load_config must refuse (by type, CHOICES or RULES), as a user could write it.
BAD = {
    "seed": -1,
    "data.name": "cifar",
    "data.nodes": 0,
    "data.partition.scheme": "random",
    "data.partition.alpha": 0.0,
    "data.partition.classes_per_node": 0,
    "data.test_fraction": 1.0,
    "data.condition": "image",
    "data.max_samples": -1,
    "data.prepared_dir": "",
    "data.progress": "fancy",
    "data.instruments.classes": 0,
    "data.instruments.clips_per_class": 0,
    "data.instruments.sample_rate": 100,
    "data.instruments.clip_seconds": 0.0,
    "data.instruments.feature_skew_nodes": -1,
    "data.instruments.cache_dir": "",
    "data.site_bundles_dir": "",
    "generator.type": "transformer",
    "generator.arch": "resnet",
    "generator.fusion_dim": 0,
    "generator.ema_decay": 1.0,
    "generator.granularity": "per_klass",
    "generator.class_groups": {"strings": []},
    "generator.default_group": "",
    "generator.latent_dim": 0,
    "generator.hidden_dim": -4,
    "generator.beta_max": -1.0,
    "generator.beta_warmup_steps": -1,
    "generator.output_variance": "maybe",
    "generator.conditional_prior": "perhaps",
    "generator.film": "perhaps",
    "generator.optimizer.name": "sgd",
    "generator.optimizer.lr": 0.0,
    "generator.optimizer.schedule": "linear",
    "generator.optimizer.decay_rounds": 0,
    "generator.optimizer.betas": [0.9],
    "generator.optimizer.eps": 0.0,
    "generator.optimizer.weight_decay": -0.01,
    "generator.gan.schedule": "lockstep",
    "generator.gan.d_steps": 0,
    "generator.gan.g_steps": 0,
    "generator.gan.loss": "wasserstein",
    "generator.gan.r1_gamma": -1.0,
    "federation.mode": "partial",
    "federation.sharing": "gossip",
    "federation.rounds": 0,
    "federation.local_epochs": 0,
    "federation.batch_size": 0,
    "federation.fraction": 1.5,
    "federation.reset_on_class_change": "sometimes",
    "federation.engine": "grpc",
    "federation.classifier_lr": -1.0,
    "federation.classifier_hidden": 0,
    "federation.distill": "maybe",
    "federation.synthetic_per_class": "many",
    "federation.distill_epochs": 0,
    "federation.flower.reply_timeout_s": 0.0,
    "federation.flower.poll_s": -1.0,
    "federation.flower.connect_timeout_s": 0.0,
    "federation.flower.on_node_failure": "ignore",
    "federation.flower.retries": -1,
    "federation.flower.node_state_dir": "",
    "checkpoint.dir": "",
    "checkpoint.every": 0,
    "checkpoint.keep_last": 0,
    "train.resume": "",
    "train.start_over": "maybe",
    "train.reports_dir": "",
    "train.progress": "fancy",
    "train.metrics_path": "",
    "train.timing_path": "",
    "train.threads": -1,
    "train.device": "tpu",
    "tracking.enabled": "maybe",
    "tracking.uri": "",
    "tracking.experiment": "",
    "tracking.run_name": "",
    "tracking.required": "maybe",
    "tracking.system_metrics": "maybe",
    "tracking.upload_checkpoints": "some",
    "profiler.enabled": "maybe",
    "profiler.wait": -1,
    "profiler.warmup": -1,
    "profiler.active": 0,
    "profiler.repeat": -1,
    "profiler.record_shapes": "maybe",
    "profiler.profile_memory": "maybe",
    "profiler.with_stack": "maybe",
    "profiler.dir": "",
    "evaluate.checkpoint": "",
    "evaluate.reports_dir": "",
    "evaluate.samples_per_class": 1,
    "evaluate.knn_k": 0,
    "evaluate.seed": -1,
    "evaluate.progress": "fancy",
}

# More bad values for keys whose range has two ends or whose type lets odd values through.
MORE_BAD = [
    ("seed", 2**63), ("seed", "zero"), ("data.nodes", 2.5), ("data.partition.alpha", math.inf),
    ("data.partition.alpha", math.nan), ("data.test_fraction", 0.0), ("data.instruments.sample_rate", 200_000),
    ("data.instruments.clip_seconds", 31.0), ("generator.optimizer.lr", math.nan),
    ("generator.optimizer.lr", -1e-3), ("generator.optimizer.betas", [0.9, 1.0]),
    ("generator.optimizer.betas", [0.9, 0.99, 0.9]), ("generator.optimizer.betas", [-0.1, 0.9]),
    ("generator.class_groups", {"": ["a"]}), ("generator.class_groups", {"a": ["x"], "b": ["x"]}),
    ("generator.class_groups", {"a": [""]}), ("generator.class_groups", {"a": 3}),
    ("federation.fraction", 0.0), ("federation.synthetic_per_class", "0"),
    ("federation.synthetic_per_class", "-3"), ("train.threads", 100_000), ("train.resume", "  "),
    ("evaluate.knn_k", 500),
]


def schema_leaves() -> set[str]:
    return set(flatten_dotted(OmegaConf.to_container(OmegaConf.structured(Feda2vConfig))))


def nested(dotted: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


def test_every_schema_key_has_a_bad_value():
    missing = sorted(schema_leaves() - set(BAD))
    assert not missing, f"give these new config keys a bad value in BAD (and a rule if needed): {missing}"
    assert not sorted(set(BAD) - schema_leaves()), "BAD names keys the schema no longer has"


def test_rules_and_choices_name_schema_keys():
    leaves = schema_leaves()
    assert not sorted(set(RULES) - leaves) and not sorted(set(CHOICES) - leaves)


def test_the_defaults_are_valid():
    load_config({})


@pytest.mark.parametrize("key", sorted(BAD))
def test_each_key_refuses_its_bad_value(key):
    with pytest.raises(ConfigError) as ei:
        load_config(nested(key, BAD[key]))
    msg = str(ei.value)
    assert "\n" not in msg
    assert key in msg or key.rsplit(".", 1)[-1] in msg, msg


@pytest.mark.parametrize("key, value", MORE_BAD, ids=[f"{k}={v!r}" for k, v in MORE_BAD])
def test_more_bad_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.rsplit(".", 1)[-1]):
        load_config(nested(key, value))


@pytest.mark.parametrize("raw, needle", [
    ({"generator": {"granularity": "per_group"}}, "class_groups"),
    # mode=full + sharing=local is refused by the sharing strategy when the Federation is built
    # (tests/test_sharing.py); engine=flower runs mode=full (tests/test_flower*.py)
    ({"data": {"nodes": 2, "instruments": {"feature_skew_nodes": 3}}}, "feature_skew_nodes"),
    ({"evaluate": {"samples_per_class": 5, "knn_k": 5}}, "knn_k"),
])
def test_bad_combinations_are_refused(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(raw)
