"""StoreSpec: everything needed to build a GeneratorStore, JSON-able (it travels in checkpoints).

Values are checked once, by ``config.load_config``; a spec checks only what no config check
sees (the classes and feature sizes come from the prepared data) and keeps its JSON form exact:
``class_groups`` is an ordered list there, because the order of the groups is the order of the
store's keys and a checkpoint header's JSON is written with sorted object keys.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from feda2v.config.schema import LR_SCHEDULES, GanConfig, GeneratorConfig
from feda2v.errors import CheckpointError, ConfigError
from feda2v.models import ARCHITECTURES, constructor_args
from feda2v.store.kinds import DEFAULT_ARCH, kind  # the kinds table (type defaults); DEFAULT_ARCH re-exported
from feda2v.store.optim import lr_scale


# The config schema owns the defaults; a spec built in code (tests, tools) gets the same ones.
_GEN = GeneratorConfig()
_GAN = GanConfig()


@dataclass(frozen=True)
class OptimizerSpec:
    """The one optimizer factory's settings (generator.optimizer in config, validated there)."""

    name: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    # the lr over the federation's rounds (store/optim.lr_scale) and the rounds it decays over
    # (generator.optimizer.decay_rounds resolved; 1 for the constant lr; a spec from before the
    # schedule existed: constant)
    schedule: str = "constant"
    decay_rounds: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for f in ("lr", "eps", "weight_decay"):
            object.__setattr__(self, f, float(getattr(self, f)))
        object.__setattr__(self, "schedule", str(self.schedule))
        object.__setattr__(self, "decay_rounds", int(self.decay_rounds))
        if self.schedule not in LR_SCHEDULES:
            raise ConfigError(f"generator.optimizer.schedule: {self.schedule!r} is not one of "
                              f"{', '.join(LR_SCHEDULES)}")
        if self.decay_rounds < 1:
            raise ConfigError(f"generator.optimizer.decay_rounds must be >= 1, got {self.decay_rounds}")

    def lr_scale(self, round_: int) -> float:
        """The factor on ``lr`` for a visit of round ``round_`` (1-based)."""
        return lr_scale(self.schedule, round_, self.decay_rounds)


def _ordered_groups(groups: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """{group: classes} (a config mapping, in the order written) or [[group, classes], ...]."""
    items = groups.items() if isinstance(groups, Mapping) else groups
    return tuple((str(g), tuple(str(c) for c in cs)) for g, cs in items)


GAN_SCHEDULES = ("alternating", "simultaneous")
GAN_LOSSES = ("nonsaturating", "hinge")


@dataclass(frozen=True)
class GanSpec:
    """The GAN's training schedule and objective (generator.gan in config; see store/steps.py)."""

    schedule: str = _GAN.schedule  # D step(s), then G step(s) against the updated D | simultaneous
    d_steps: int = _GAN.d_steps  # discriminator updates per batch (alternating)
    g_steps: int = _GAN.g_steps  # generator updates per batch (alternating)
    loss: str = _GAN.loss  # nonsaturating | hinge
    r1_gamma: float = _GAN.r1_gamma  # weight gamma of the R1 penalty gamma/2 * ||grad_x D(x_real)||^2 (0 = off)

    def __post_init__(self) -> None:
        object.__setattr__(self, "r1_gamma", float(self.r1_gamma))
        if self.schedule not in GAN_SCHEDULES:
            raise ConfigError(f"generator.gan.schedule: {self.schedule!r} is not one of {', '.join(GAN_SCHEDULES)}")
        if self.loss not in GAN_LOSSES:
            raise ConfigError(f"generator.gan.loss: {self.loss!r} is not one of {', '.join(GAN_LOSSES)}")
        if int(self.d_steps) < 1 or int(self.g_steps) < 1:
            raise ConfigError("generator.gan.d_steps and generator.gan.g_steps must be >= 1")
        if not self.r1_gamma >= 0:
            raise ConfigError(f"generator.gan.r1_gamma must be >= 0, got {self.r1_gamma}")


def _generator_has(argument: str, type_: str, arch: str) -> bool:
    """Whether the generator of ``type_``'s architecture variant ``arch`` takes ``argument``."""
    return argument in constructor_args(ARCHITECTURES[kind(type_).arch(arch)["generator"].cls])


def has_conditional_prior(type_: str, arch: str) -> bool:
    """Whether ``type_``'s architecture variant ``arch`` can have a learned conditional prior."""
    return _generator_has("conditional_prior", type_, arch)


def holds_several_classes(granularity: str) -> bool:
    """Whether a key of this granularity serves several classes (unified, class groups): one
    network must then shape each class, so it gets the type's several-classes defaults (FiLM, a
    wider hidden layer); a per-class key's condition is one constant vector."""
    return granularity != "per_class"


# Each resolver: (the config value, generator.type, generator.arch, generator.granularity) -> the
# value the store runs with.
def resolve_conditional_prior(value: bool | None, type_: str, arch: str, granularity: str = "unified") -> bool:
    """generator.conditional_prior as the store runs it: null is the type's own default (on for
    the cVAE's default architecture, store/kinds.py), where the architecture has one."""
    if value is None:
        return kind(type_).conditional_prior and has_conditional_prior(type_, arch)
    return bool(value)


# The width every generator had before it was the type's (and the published architectures' still).
_FIXED_HIDDEN_DIM = 128


def resolve_hidden_dim(value: int | None, type_: str, arch: str, granularity: str = "unified") -> int:
    """generator.hidden_dim as the store runs it: null is the type's own width for the default
    architecture (store/kinds.py; keys of several classes may have their own, wider: one network
    serves all their classes), 128 for the published ones."""
    if value is None:
        if arch != DEFAULT_ARCH:
            return _FIXED_HIDDEN_DIM
        k = kind(type_)
        if holds_several_classes(granularity) and k.hidden_dim_several_classes is not None:
            return k.hidden_dim_several_classes
        return k.hidden_dim
    return int(value)


def resolve_ema_decay(value: float | None, type_: str, arch: str, granularity: str = "unified") -> float:
    """generator.ema_decay as the store runs it: null is the type's own decay for the default
    architecture (store/kinds.py), 0 (sampling the trained weights, as they did) for the published ones."""
    if value is None:
        return kind(type_).ema_decay if arch == DEFAULT_ARCH else 0.0
    return float(value)


def resolve_film(value: bool | None, type_: str, arch: str, granularity: str = "unified") -> bool:
    """generator.film as the store runs it: null is the type's own default (store/kinds.py) for
    the default architecture's keys that hold several classes; off per class, where a key's
    condition is one vector and its modulation would be a constant, and for the other architectures."""
    if value is None:
        return kind(type_).film and arch == DEFAULT_ARCH and holds_several_classes(granularity)
    return bool(value)


# generator keys whose null means the type's default, and how each resolves
TYPE_DEFAULT_KEYS = {"conditional_prior": resolve_conditional_prior, "hidden_dim": resolve_hidden_dim,
                     "ema_decay": resolve_ema_decay, "film": resolve_film}


def resolve_lr_schedule(value: str | None, type_: str, arch: str, granularity: str = "unified") -> str:
    """generator.optimizer.schedule as the store runs it: null is the type's own schedule for the
    default architecture's keys that hold several classes (store/kinds.py); constant per class,
    where a key steps only on its class's samples (~a fifth of the unified key's steps in the
    default run) and a decayed lr left it under-trained, and for the published architectures (as
    they trained)."""
    if value is None:
        return kind(type_).lr_schedule if arch == DEFAULT_ARCH and holds_several_classes(granularity) else "constant"
    return str(value)


def resolve_optimizer_defaults(lr: float | None, betas: Sequence[float] | None, type_: str,
                               schedule: str = "constant") -> tuple[float, tuple]:
    """generator.optimizer's (lr, betas) as the store runs them under the (resolved) ``schedule``:
    a null is the type's own setting for that schedule (store/kinds.py). The lr's default follows
    the schedule, so a run from before the schedule existed (constant) resumes with its lr."""
    defaults = kind(type_).optimizer_defaults
    return (float(defaults["lr"][schedule] if lr is None else lr),
            tuple(defaults["betas"] if betas is None else betas))


def resolve_generator_defaults(generator: dict) -> dict:
    """A plain ``generator`` config section with its nulls that mean "the type's default"
    (TYPE_DEFAULT_KEYS) replaced, in place, by what they resolve to; returned."""
    type_, arch = str(generator.get("type")), str(generator.get("arch", DEFAULT_ARCH))
    granularity = str(generator.get("granularity", _GEN.granularity))
    for key, resolve in TYPE_DEFAULT_KEYS.items():
        if key in generator:
            generator[key] = resolve(generator[key], type_, arch, granularity)
    opt = generator.get("optimizer")
    if isinstance(opt, dict) and "schedule" in opt:
        opt["schedule"] = resolve_lr_schedule(opt["schedule"], type_, arch, granularity)
    return generator


def resolve_decay_rounds(schedule: str, decay_rounds: int | None, rounds: int) -> int | None:
    """generator.optimizer.decay_rounds as a run records it: the horizon of a decaying ``schedule``
    (resolved), null meaning the run's federation.rounds; None under the constant lr, which has none
    (so a constant run still resumes with more rounds)."""
    if schedule == "constant":
        return None
    return int(rounds if decay_rounds is None else decay_rounds)


def resolve_run_config(plain: dict) -> dict:
    """A plain whole config with the generator's type defaults resolved (resolve_generator_defaults)
    and the lr schedule's horizon, which also reads federation.rounds; in place, returned."""
    gen = plain.get("generator")
    if isinstance(gen, dict):
        resolve_generator_defaults(gen)
        opt = gen.get("optimizer")
        if isinstance(opt, dict) and "schedule" in opt:
            rounds = (plain.get("federation") or {}).get("rounds", 1)
            opt["decay_rounds"] = resolve_decay_rounds(opt["schedule"], opt.get("decay_rounds"), rounds)
    return plain


@dataclass(frozen=True)
class StoreSpec:
    type: str
    granularity: str
    classes: tuple[str, ...]
    feature_dim: int
    condition_dim: int
    latent_dim: int = _GEN.latent_dim
    hidden_dim: int | None = _GEN.hidden_dim  # None: the type's default (resolve_hidden_dim)
    # (group, classes) pairs in key order; a mapping is accepted and keeps its insertion order.
    class_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    default_group: str | None = None
    beta_max: float = _GEN.beta_max
    beta_warmup_steps: int = _GEN.beta_warmup_steps
    output_variance: bool = _GEN.output_variance  # VAE kinds: learned output variance, sampled (models/generators.py)
    # cVAE: learned prior p(z | c), sampled (models/generators.py); None: the type's default
    conditional_prior: bool | None = _GEN.conditional_prior
    # the generator weights' moving average that sampling reads (store/store.py); None: the type's default
    ema_decay: float | None = _GEN.ema_decay
    # cVAE and GAN: the condition's FiLM of the generating network's hidden layers (models/generators.py);
    # None: the type's default for the key's granularity
    film: bool | None = _GEN.film
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    seed: int = 0
    arch: str = DEFAULT_ARCH  # architecture variant of the kind (store/kinds.py)
    fusion_dim: int = _GEN.fusion_dim  # the published multimodal VAE's condition projection (arch fedgfe_multimodal)
    gan: GanSpec = field(default_factory=GanSpec)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "class_groups", _ordered_groups(self.class_groups))
        if isinstance(self.optimizer, Mapping):
            object.__setattr__(self, "optimizer", OptimizerSpec(**dict(self.optimizer)))
        if isinstance(self.gan, Mapping):
            object.__setattr__(self, "gan", GanSpec(**dict(self.gan)))
        object.__setattr__(self, "output_variance", bool(self.output_variance))
        object.__setattr__(self, "hidden_dim", resolve_hidden_dim(self.hidden_dim, self.type, self.arch,
                                                                   self.granularity))
        object.__setattr__(self, "conditional_prior",
                           resolve_conditional_prior(self.conditional_prior, self.type, self.arch))
        object.__setattr__(self, "ema_decay", resolve_ema_decay(self.ema_decay, self.type, self.arch))
        object.__setattr__(self, "film",
                           resolve_film(self.film, self.type, self.arch, self.granularity))
        if self.film and not _generator_has("film", self.type, self.arch):
            raise ConfigError(f"generator.film=true needs a conditional generator architecture "
                              f"(generator.type cvae or gan, generator.arch=default), not type {self.type} "
                              f"arch {self.arch}; set it false")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"generator.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.conditional_prior and not has_conditional_prior(self.type, self.arch):
            raise ConfigError(f"generator.conditional_prior=true needs a conditional VAE architecture "
                              f"(generator.type cvae, generator.arch=default), not type {self.type} "
                              f"arch {self.arch}; set it false")
        if self.output_variance and not _generator_has("output_variance", self.type, self.arch):
            raise ConfigError(f"generator.output_variance=true needs an architecture with an output variance "
                              f"(generator.type vae or cvae, generator.arch=default), not type {self.type} "
                              f"arch {self.arch}; set it false")
        # What the prepared data decides (no config check has seen it):
        if not self.classes:
            raise ConfigError("the generator store needs at least one class")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"class names must be unique, got {list(self.classes)}")
        for name in ("feature_dim", "condition_dim"):
            if not int(getattr(self, name)) > 0:
                raise ConfigError(f"generator store: {name} must be > 0, got {getattr(self, name)}")

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """class_groups as an (ordered) dict."""
        return dict(self.class_groups)

    @classmethod
    def from_config(cls, cfg: Any, *, classes: Sequence[str], feature_dim: int, condition_dim: int) -> "StoreSpec":
        g = cfg.generator
        o = g.optimizer
        schedule = resolve_lr_schedule(o.schedule, str(g.type), str(g.arch), str(g.granularity))
        lr, betas = resolve_optimizer_defaults(o.lr, o.betas, str(g.type), schedule)
        decay_rounds = resolve_decay_rounds(schedule, o.decay_rounds, cfg.federation.rounds) or 1  # 1: no horizon
        return cls(
            type=str(g.type), arch=str(g.arch), granularity=str(g.granularity), classes=tuple(classes),
            feature_dim=int(feature_dim), condition_dim=int(condition_dim),
            latent_dim=int(g.latent_dim), hidden_dim=None if g.hidden_dim is None else int(g.hidden_dim),
            class_groups=[(str(k), tuple(v)) for k, v in (g.class_groups or {}).items()],
            default_group=None if g.default_group is None else str(g.default_group),
            beta_max=float(g.beta_max), beta_warmup_steps=int(g.beta_warmup_steps),
            output_variance=bool(g.output_variance),
            conditional_prior=None if g.conditional_prior is None else bool(g.conditional_prior),
            ema_decay=None if g.ema_decay is None else float(g.ema_decay),
            film=None if g.film is None else bool(g.film),
            optimizer=OptimizerSpec(name=str(o.name), lr=float(lr), betas=tuple(betas),
                                    eps=float(o.eps), weight_decay=float(o.weight_decay), schedule=schedule,
                                    decay_rounds=decay_rounds),
            seed=int(cfg.seed), fusion_dim=int(g.fusion_dim),
            gan=GanSpec(schedule=str(g.gan.schedule), d_steps=int(g.gan.d_steps), g_steps=int(g.gan.g_steps),
                        loss=str(g.gan.loss), r1_gamma=float(g.gan.r1_gamma)),
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["class_groups"] = [[g, list(cs)] for g, cs in self.class_groups]
        d["optimizer"] = {**asdict(self.optimizer), "betas": list(self.optimizer.betas)}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, key_order: Sequence[str] | None = None) -> "StoreSpec":
        """Inverse of ``to_json``; also reads the older form (no ``arch``; ``class_groups`` as an
        object, whose order the sorted header lost: ``key_order``, the store's recorded key list,
        restores it)."""
        d = dict(d)
        if "gan" not in d:  # before the GAN schedule was configurable: simultaneous, no R1, concat D
            d["gan"] = {"schedule": "simultaneous", "d_steps": 1, "g_steps": 1, "loss": "nonsaturating",
                        "r1_gamma": 0.0}  # every field: today's defaults are not what those ran with
            if d.get("type") == "gan":
                d.setdefault("arch", "concat")
        d.setdefault("arch", DEFAULT_ARCH)
        d.setdefault("output_variance", False)  # before it existed: VAEs sampled the decoder mean
        d.setdefault("conditional_prior", False)  # before it existed: cVAEs had the N(0, I) prior
        d.setdefault("fusion_dim", StoreSpec.fusion_dim)
        d.setdefault("ema_decay", 0.0)  # before it existed: sampling read the trained weights
        d.setdefault("film", False)  # before it existed: the condition entered the generating network's input only
        expected = set(cls.__dataclass_fields__)
        got = set(d)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise CheckpointError(f"store spec: missing fields {missing}, unexpected fields {extra}")
        groups = d["class_groups"]
        if isinstance(groups, Mapping) and key_order is not None:
            rank = {k: i for i, k in enumerate(key_order)}
            d["class_groups"] = sorted(groups.items(), key=lambda gc: rank.get(f"group/{gc[0]}", len(rank)))
        return cls(**d)
