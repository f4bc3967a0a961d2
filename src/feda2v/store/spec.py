"""StoreSpec: everything needed to build a GeneratorStore, JSON-able (it travels in checkpoints)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from feda2v.errors import CheckpointError, ConfigError

TYPES = ("vae", "cvae", "gan")
GRANULARITIES = ("unified", "per_class", "per_group")
OPTIMIZERS = ("adamw", "adam")


@dataclass(frozen=True)
class OptimizerSpec:
    """The one optimizer factory's settings (generator.optimizer in config)."""

    name: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for f in ("lr", "eps", "weight_decay"):
            object.__setattr__(self, f, float(getattr(self, f)))
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"generator.optimizer.name: {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ConfigError(f"generator.optimizer.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"generator.optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0 or self.weight_decay < 0:
            raise ConfigError("generator.optimizer: eps must be > 0 and weight_decay >= 0")


GAN_SCHEDULES = ("alternating", "simultaneous")
GAN_LOSSES = ("nonsaturating", "hinge")


@dataclass(frozen=True)
class GanSpec:
    """The GAN's training schedule and objective (generator.gan in config; see store/steps.py)."""

    schedule: str = "alternating"  # D step(s), then G step(s) against the updated D | simultaneous
    d_steps: int = 1  # discriminator updates per batch (alternating)
    g_steps: int = 1  # generator updates per batch (alternating)
    loss: str = "nonsaturating"  # nonsaturating | hinge
    r1_gamma: float = 1.0  # weight gamma of the R1 penalty gamma/2 * ||grad_x D(x_real)||^2 (0 = off)

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


@dataclass(frozen=True)
class StoreSpec:
    type: str
    granularity: str
    classes: tuple[str, ...]
    feature_dim: int
    condition_dim: int
    latent_dim: int = 16
    hidden_dim: int = 128
    class_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_group: str | None = None
    beta_max: float = 1.0
    beta_warmup_steps: int = 200
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    seed: int = 0
    gan: GanSpec = field(default_factory=GanSpec)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "class_groups",
                           {str(g): tuple(str(c) for c in cs) for g, cs in dict(self.class_groups).items()})
        if isinstance(self.optimizer, Mapping):
            object.__setattr__(self, "optimizer", OptimizerSpec(**dict(self.optimizer)))
        if isinstance(self.gan, Mapping):
            object.__setattr__(self, "gan", GanSpec(**dict(self.gan)))
        if self.type not in TYPES:
            raise ConfigError(f"generator.type: {self.type!r} is not one of {', '.join(TYPES)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"generator.granularity: {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if not self.classes:
            raise ConfigError("the generator store needs at least one class")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"class names must be unique, got {list(self.classes)}")
        for name in ("feature_dim", "condition_dim", "latent_dim", "hidden_dim"):
            if not int(getattr(self, name)) > 0:
                raise ConfigError(f"generator store: {name} must be > 0, got {getattr(self, name)}")
        if self.beta_max < 0 or self.beta_warmup_steps < 0:
            raise ConfigError("generator.beta_max and generator.beta_warmup_steps must be >= 0")

    @classmethod
    def from_config(cls, cfg: Any, *, classes: Sequence[str], feature_dim: int, condition_dim: int) -> "StoreSpec":
        g = cfg.generator
        o = g.optimizer
        return cls(
            type=str(g.type), granularity=str(g.granularity), classes=tuple(classes),
            feature_dim=int(feature_dim), condition_dim=int(condition_dim),
            latent_dim=int(g.latent_dim), hidden_dim=int(g.hidden_dim),
            class_groups={str(k): tuple(v) for k, v in dict(g.class_groups or {}).items()},
            default_group=None if g.default_group is None else str(g.default_group),
            beta_max=float(g.beta_max), beta_warmup_steps=int(g.beta_warmup_steps),
            optimizer=OptimizerSpec(name=str(o.name), lr=float(o.lr), betas=tuple(o.betas),
                                    eps=float(o.eps), weight_decay=float(o.weight_decay)),
            seed=int(cfg.seed),
            gan=GanSpec(schedule=str(g.gan.schedule), d_steps=int(g.gan.d_steps), g_steps=int(g.gan.g_steps),
                        loss=str(g.gan.loss), r1_gamma=float(g.gan.r1_gamma)),
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["class_groups"] = {g: list(cs) for g, cs in self.class_groups.items()}
        d["optimizer"] = {**asdict(self.optimizer), "betas": list(self.optimizer.betas)}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "StoreSpec":
        expected = set(cls.__dataclass_fields__)
        got = set(d)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise CheckpointError(f"store spec: missing fields {missing}, unexpected fields {extra}")
        return cls(**dict(d))
