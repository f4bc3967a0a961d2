"""The one table of generator kinds: what ``generator.type`` (and ``generator.arch``) mean.

Per kind: its roles (each role has its own module and optimizer per key), its training step
(``steps.py``), and per architecture variant the architecture class of every role. A role's
constructor arguments are read from the StoreSpec field of the same name (``constructor_args``
of the class), or of the name ``from_spec`` gives, for architectures whose arguments are
spelled otherwise (the published ones). The store, the spec, the checkpoint meta and legacy
migration all read this table; adding a kind or a variant is an entry here (plus its name in
``config/schema.py`` CHOICES, which sits below this part and cannot import it; a test holds the
two equal).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from feda2v.errors import ConfigError
from feda2v.models import ARCHITECTURES, constructor_args, recorded_kwargs
from feda2v.store.steps import DISCRIMINATOR, GENERATOR, gan_step, vae_step
# `StoreSpec` appears in annotations only (never evaluated): importing spec.py, which imports
# this table, would close an import circle.


DEFAULT_ARCH = "default"  # the architecture variant of every kind


@dataclass(frozen=True)
class RoleArch:
    """The architecture class of one role, and how its constructor arguments come from the spec."""

    cls: str  # a name in models.ARCHITECTURES
    from_spec: Mapping[str, str] = field(default_factory=dict)  # constructor arg -> StoreSpec field

    def kwargs(self, spec: StoreSpec) -> dict[str, Any]:
        cls = ARCHITECTURES[self.cls]
        return recorded_kwargs(cls, {a: getattr(spec, self.from_spec.get(a, a)) for a in constructor_args(cls)})


@dataclass(frozen=True)
class Kind:
    name: str
    roles: tuple[str, ...]
    step: Callable[..., Any]  # (store, grouping, keys, xs, cs, zs, visit, *, gen) -> [K, len(metrics)] device tensor
    archs: Mapping[str, Mapping[str, RoleArch]]  # variant -> role -> architecture
    # generator.optimizer settings left null in config take these (the type's own defaults); "lr"
    # is per lr schedule (store/spec.resolve_optimizer_defaults)
    optimizer_defaults: Mapping[str, Any] = field(default_factory=dict)
    # generator.optimizer.schedule left null, with the default architecture (the published ones: constant)
    lr_schedule: str = "constant"
    # generator.conditional_prior left null: on where the architecture has one and this says so
    conditional_prior: bool = False
    # generator.hidden_dim left null, with the default architecture (the published ones: 128)
    hidden_dim: int = 128
    # ... and for keys that hold several classes (unified, class groups), where it differs
    hidden_dim_several_classes: int | None = None
    # generator.ema_decay left null, with the default architecture (the published ones: 0, off)
    ema_decay: float = 0.0
    # generator.film left null: on for keys of several classes, with the default architecture
    film: bool = False

    @property
    def metrics(self) -> tuple[str, ...]:
        """The names of the step's per-key loss columns, in order (the step function carries them)."""
        return self.step.metrics

    def arch(self, variant: str) -> Mapping[str, RoleArch]:
        try:
            return self.archs[variant]
        except KeyError:
            raise ConfigError(f"generator.arch: {variant!r} is not an architecture of generator.type="
                              f"{self.name}; known: {', '.join(self.archs)}") from None


# VAE: lr 2e-3 measured on the instruments defaults (README, generator comparison): at 1e-3 the
# default run's ~4000 steps leave the cVAE under-trained (its loss still falls); 5e-3 diverged.
# With the cosine schedule, which ends the run at a tenth of it, 3e-3 (4e-3 and 2e-3 lower).
_VAE_OPTIMIZER = {"lr": {"constant": 2e-3, "cosine": 3e-3}, "betas": (0.9, 0.999)}
# The generator weights' moving average that sampling reads (generator.ema_decay): 0.995, an
# average over about the last 200 of a key's steps (one round of the unified key). Measured on the
# instruments defaults, 3 seeds (README, generator comparison): TSTR/TRTR up on every seed for the
# cVAE and the GAN, unified and per class; the unconditional VAE per class lost on every seed, so
# it samples its trained weights. 0.99 and 0.998 screened about the same; 0.999 lost recall.
_EMA_DECAY = 0.995
# GAN: beta1 0.5 (Radford et al., 2016, DCGAN) damps the momentum that makes the two players
# overshoot each other; lr and beta2 measured on the instruments defaults (README, GAN section).
_GAN_OPTIMIZER = {"lr": {"constant": 1e-3, "cosine": 1e-3}, "betas": (0.5, 0.99)}

KINDS: dict[str, Kind] = {k.name: k for k in (
    # "fedgfe*": the published FedA2V architectures (models/published.py), for migrated runs
    Kind("vae", (GENERATOR,), vae_step, {DEFAULT_ARCH: {GENERATOR: RoleArch("VAE")},
                                          "fedgfe": {GENERATOR: RoleArch("FedgfeVAE")}}, _VAE_OPTIMIZER),
    Kind("cvae", (GENERATOR,), vae_step, {DEFAULT_ARCH: {GENERATOR: RoleArch("CVAE")},
                                           "fedgfe": {GENERATOR: RoleArch("FedgfeCVAE")},
                                           "fedgfe_multimodal": {GENERATOR: RoleArch("FedgfeMultiModalVAE")}},
         # the learned p(z | c): TSTR/TRTR 0.754 -> 0.780 unified, 0.717 -> 0.869 per_class, 3 seeds each;
         # width 256: unified 0.780 -> 0.816 (every seed up), per_class 0.869 -> 0.878 at ~2x the
         # training time (README, generator comparison)
         # FiLM of the decoder for keys of several classes: unified TSTR/TRTR 0.850 -> 0.877,
         # Frechet 7.0 -> 5.9, recall 0.62 -> 0.71, 3 seeds (README, generator comparison)
         # width 512 for keys of several classes (with FiLM): unified TSTR/TRTR 0.857 -> 0.891 over
         # 6 seeds, every seed up; Frechet 6.2 -> 7.4 and recall 0.70 -> 0.62 (README, generator comparison)
         # the cosine lr schedule at 3e-3 for keys of several classes (against 2e-3 constant): unified
         # TSTR/TRTR 0.878 -> 0.898 over 6 seeds of 5 sample draws each, up on 5 and level on 1;
         # Frechet 7.4 -> 6.0, recall 0.62 -> 0.72. Per class seed 0 lost, 0.914 -> 0.865 (README,
         # "The lr schedule")
         _VAE_OPTIMIZER, conditional_prior=True, hidden_dim=256, hidden_dim_several_classes=512,
         ema_decay=_EMA_DECAY, film=True, lr_schedule="cosine"),
    Kind("gan", (GENERATOR, DISCRIMINATOR), gan_step, {
        DEFAULT_ARCH: {GENERATOR: RoleArch("GANGenerator"), DISCRIMINATOR: RoleArch("ProjectionDiscriminator")},
        # the discriminator this project's GAN stores had before the projection one (still readable)
        "concat": {GENERATOR: RoleArch("GANGenerator"), DISCRIMINATOR: RoleArch("GANDiscriminator")},
        "fedgfe": {GENERATOR: RoleArch("FedgfeGANGenerator"), DISCRIMINATOR: RoleArch("FedgfeGANDiscriminator")},
    # FiLM of the generator for keys of several classes: unified TSTR 0.678 -> 0.678 (the same),
    # Frechet 9.9 -> 7.9, recall 0.54 -> 0.66; with it, width 256: TSTR 0.678 -> 0.736 (every seed
    # up), recall 0.66 -> 0.70, at ~2x the training time (3 seeds; README, generator comparison)
    }, _GAN_OPTIMIZER, hidden_dim=256, ema_decay=_EMA_DECAY, film=True),
)}

TYPES: tuple[str, ...] = tuple(KINDS)
ARCHS: tuple[str, ...] = tuple(dict.fromkeys(a for k in KINDS.values() for a in k.archs))


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"generator.type: {name!r} is not one of {', '.join(TYPES)}") from None


def architecture(spec: StoreSpec, role: str) -> tuple[str, dict[str, Any]]:
    """(class name, constructor kwargs) of ``role`` for the spec's kind and architecture variant."""
    ra = kind(spec.type).arch(spec.arch)[role]
    return ra.cls, ra.kwargs(spec)


def kind_of_class(class_name: str, role: str = GENERATOR) -> tuple[str, str] | None:
    """(generator.type, generator.arch) whose ``role`` is built from ``class_name``; None if none is.

    For readers that meet an architecture before a spec (legacy migration). A class serving several
    kinds (none does today) gives the first in table order."""
    for k in KINDS.values():
        for variant, roles in k.archs.items():
            if role in roles and roles[role].cls == class_name:
                return k.name, variant
    return None
