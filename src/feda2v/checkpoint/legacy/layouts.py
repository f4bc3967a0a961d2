"""Step 2 of a migration: which published architecture each legacy state dict is, and its sizes.

The published modules become this project's ``generator.arch=fedgfe`` architectures
(``models/published.py``), which keep their parameter names: parameters and optimizer moments
carry over by name, unchanged (no re-layout, so the migrated store computes the published
function). ``MultiModalVAEGenerator``'s T5 branch (``t5_projection``, ``fusion``) is not part of
the CLIP-conditioned function this project trains; it is left out only when it never trained
(no optimizer state for it and ``diffusion_type`` not ``flux``), and the migration says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from feda2v.checkpoint.legacy.read import DISCRIMINATOR, GENERATOR, LegacyRun, Part
from feda2v.errors import CheckpointError


@dataclass(frozen=True)
class Layout:
    """A published module: its Linear/LayerNorm prefixes (parameter order), and what it becomes here."""

    name: str
    role: str
    cls: str  # this project's architecture (models/published.py), same parameter names
    prefixes: tuple[str, ...]
    published_type: str = "vae"  # the published system's generator_type for it
    unused: tuple[str, ...] = ()  # prefixes outside the function this project computes
    # config the published training implies for this model (a migrated run trains on like it)
    implies: tuple[tuple[str, Any], ...] = ()

    def param_names(self) -> list[str]:
        return [f"{p}.{w}" for p in self.prefixes for w in ("weight", "bias")]

    def kind(self) -> tuple[str, str]:
        """(generator.type, generator.arch) whose role is built from ``cls``: the kinds table's answer."""
        from feda2v.store.kinds import kind_of_class

        found = kind_of_class(self.cls, self.role)
        if found is None:
            raise CheckpointError(f"no generator kind in store/kinds.py builds its {self.role} from {self.cls}")
        return found


LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    Layout("VAEGenerator", GENERATOR, "FedgfeVAE",
           ("encoder.0", "encoder.3", "encoder.6", "decoder.0", "decoder.3", "decoder.6")),
    Layout("ConditionedVAEGenerator", GENERATOR, "FedgfeCVAE",
           ("encoder.0", "encoder.2", "fc_mu", "fc_logvar", "decoder.0", "decoder.2", "decoder.4")),
    Layout("MultiModalVAEGenerator", GENERATOR, "FedgfeMultiModalVAE",
           ("clip_projection.0", "clip_projection.1", "t5_projection.0", "t5_projection.1", "fusion.0", "fusion.1",
            "single_fusion.0", "single_fusion.1", "encoder.0", "encoder.3", "fc_mu", "fc_logvar",
            "decoder.0", "decoder.3", "decoder.6"),
           unused=("t5_projection", "fusion")),
    # the published GAN update: D then G once per batch, BCE with logits (non-saturating G), no penalty
    Layout("GANGenerator", GENERATOR, "FedgfeGANGenerator", ("model.0", "model.2", "model.4"), "gan",
           implies=(("generator.gan.schedule", "alternating"), ("generator.gan.d_steps", 1),
                    ("generator.gan.g_steps", 1), ("generator.gan.loss", "nonsaturating"),
                    ("generator.gan.r1_gamma", 0.0))),
    Layout("GANDiscriminator", DISCRIMINATOR, "FedgfeGANDiscriminator", ("model.0", "model.3", "model.6"), "gan"),
)}


def detect_layout(sd: Mapping[str, torch.Tensor], src: str) -> Layout:
    """Which published architecture a state dict came from (by its exact parameter names)."""
    names = list(sd)
    for lay in LAYOUTS.values():
        if set(names) == set(lay.param_names()):
            return lay
    known = {p for lay in LAYOUTS.values() for p in lay.prefixes}
    for n in sorted(sd):  # name the first entry no layout explains, to make the error actionable
        if n.rsplit(".", 1)[0] not in known:
            raise CheckpointError(
                f"legacy key '{src}.{n}' has no counterpart in the published generator architectures "
                f"this project has ({', '.join(LAYOUTS)}); it cannot be migrated")
    raise CheckpointError(f"legacy key '{src}' has an unknown layer layout ({', '.join(sorted(names)[:6])}...)")


def sizes(lay: Layout, sd: Mapping[str, torch.Tensor], src: str) -> dict[str, int]:
    """The architecture's sizes read off the tensors (the rest of the shapes the store checks)."""
    s = lambda n, i: int(sd[f"{n}.weight"].shape[i])  # noqa: E731
    for n in lay.prefixes:
        if sd[f"{n}.weight"].dim() not in (1, 2):
            raise CheckpointError(f"legacy key '{src}.{n}.weight' is not a Linear or LayerNorm weight "
                                  f"(shape {list(sd[f'{n}.weight'].shape)})")
    if lay.name == "VAEGenerator":
        out = {"feature_dim": s("encoder.0", 1), "hidden_dim": s("encoder.0", 0), "latent_dim": s("decoder.0", 1)}
    elif lay.name == "ConditionedVAEGenerator":
        d = s("decoder.4", 0)
        out = {"feature_dim": d, "hidden_dim": s("encoder.0", 0), "latent_dim": s("fc_mu", 0),
               "condition_dim": s("encoder.0", 1) - d}
    elif lay.name == "MultiModalVAEGenerator":
        out = {"feature_dim": s("decoder.6", 0), "hidden_dim": s("encoder.0", 0), "latent_dim": s("fc_mu", 0),
               "condition_dim": s("clip_projection.0", 1), "fusion_dim": s("clip_projection.0", 0)}
    elif lay.name == "GANGenerator":
        out = {"feature_dim": s("model.4", 0), "hidden_dim": s("model.0", 0), "latent_dim": s("model.0", 1)}
    else:
        out = {"feature_dim": s("model.0", 1), "hidden_dim": s("model.0", 0)}
    return out


@dataclass
class Architecture:
    """What the files hold: one layout per role and the shared sizes."""

    layouts: dict[str, Layout]  # role -> layout
    sizes: dict[str, int]
    type: str
    arch: str


def infer_architecture(run: LegacyRun) -> Architecture:
    """Every module's layout and sizes; all generators of a store must agree (one spec per store)."""
    layouts: dict[str, Layout] = {}
    dims: dict[str, int] | None = None
    first_src: dict[str, str] = {}
    for m in run.modules:
        for role, part in m.roles.items():
            lay = detect_layout(part.state, part.src)
            if lay.role != role:
                raise CheckpointError(f"legacy key '{part.src}' holds a {lay.name}, which cannot be the {role}")
            prev = layouts.setdefault(role, lay)
            first_src.setdefault(role, f"{m.path.name}: {part.src}")
            if prev is not lay:
                raise CheckpointError(f"legacy key '{part.src}' ({m.path.name}) is a {lay.name} but "
                                      f"'{first_src[role]}' is a {prev.name}; one store has one architecture")
            if role == GENERATOR:
                d = sizes(lay, part.state, part.src)
                if dims is not None and d != dims:
                    raise CheckpointError(f"legacy key '{part.src}' ({m.path.name}) has sizes {d} but "
                                          f"'{first_src[role]}' has {dims}; one store has one architecture")
                dims = d
    assert dims is not None and GENERATOR in layouts
    if DISCRIMINATOR in layouts:
        for m in run.modules:
            if DISCRIMINATOR in m.roles:
                dd = sizes(layouts[DISCRIMINATOR], m.roles[DISCRIMINATOR].state, m.roles[DISCRIMINATOR].src)
                if dd["feature_dim"] != dims["feature_dim"] or dd["hidden_dim"] != dims["hidden_dim"]:
                    raise CheckpointError(f"legacy key '{m.roles[DISCRIMINATOR].src}' has sizes {dd} that differ "
                                          f"from the generator's {dims}; this project uses one hidden size per key")
    gen = layouts[GENERATOR]
    gtype, arch = gen.kind()
    if DISCRIMINATOR in layouts and layouts[DISCRIMINATOR].kind() != (gtype, arch):
        raise CheckpointError(f"legacy discriminator {layouts[DISCRIMINATOR].name} does not belong with a {gen.name}")
    legacy_type = run.get("generator_type")
    if legacy_type is not None and legacy_type != gen.published_type:
        raise CheckpointError(f"legacy key 'generator_type' says {legacy_type!r} but the tensors are a {gen.name}")
    return Architecture(layouts, dims, gtype, arch)


# ------------------------------------------------------------------------------------------
# tensors and optimizer state -> this project's names (the published ones, minus unused prefixes)


def _kept(lay: Layout, name: str) -> bool:
    return name.split(".", 1)[0] not in lay.unused


def map_parameters(part: Part, lay: Layout) -> dict[str, torch.Tensor]:
    """Parameter name -> tensor (the legacy dtype; the fill step decides about conversions)."""
    return {n: t.detach().clone() for n, t in part.state.items() if _kept(lay, n)}


def unused_parameters(part: Part, lay: Layout) -> list[str]:
    return [n for n in part.state if not _kept(lay, n)]


def map_optimizer(part: Part, lay: Layout) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], int] | None:
    """(per parameter {exp_avg, exp_avg_sq, step}, hyper-parameters, step), or None without state."""
    osd, okey, src = part.optim, part.optim_src, part.src
    if osd is None:
        return None
    if not isinstance(osd, Mapping) or "state" not in osd or "param_groups" not in osd:
        raise CheckpointError(f"legacy key '{okey}' is not an optimizer state_dict")
    groups = osd["param_groups"]
    if not isinstance(groups, list) or not groups:
        raise CheckpointError(f"legacy key '{okey}.param_groups' is empty")
    first = groups[0]
    for g in groups:
        if any(g.get(f) != first.get(f) for f in ("lr", "betas", "eps", "weight_decay")):
            raise CheckpointError(f"legacy key '{okey}' has param groups with different hyper-parameters; "
                                  "this project uses one optimizer setting per generator")
        if g.get("amsgrad") or g.get("maximize") or g.get("nesterov"):
            raise CheckpointError(f"legacy key '{okey}' uses amsgrad/maximize, which this project's optimizer "
                                  "factory does not support")
    ids = [i for g in groups for i in g.get("params", [])]
    # the published modules have no buffers: parameters() order is the state dict's order
    legacy_names = list(part.state)
    if len(ids) != len(legacy_names):
        raise CheckpointError(f"legacy key '{okey}' covers {len(ids)} parameters but '{src}' has "
                              f"{len(legacy_names)}; they do not belong together")
    name_of = dict(zip(ids, legacy_names))
    state = osd["state"]
    extra = [i for i in state if i not in name_of]
    if extra:
        raise CheckpointError(f"legacy key '{okey}.state.{extra[0]}' refers to no parameter")
    hyper = _hyper(first, okey)
    for i, name in name_of.items():
        if not _kept(lay, name) and i in state:
            raise CheckpointError(f"legacy key '{okey}' has optimizer state for '{src}.{name}': the T5 branch was "
                                  "trained, and this project has no T5 embeddings to condition on")
    kept = {i: n for i, n in name_of.items() if _kept(lay, n)}
    if not state:
        return {}, hyper, 0
    out: dict[str, dict[str, torch.Tensor]] = {}
    steps = set()
    for i, name in kept.items():
        s = state.get(i)
        if s is None:
            raise CheckpointError(f"legacy key '{okey}' has no state for parameter '{src}.{name}' while others "
                                  "have; partial optimizer state cannot be migrated")
        unknown = sorted(set(s) - {"step", "exp_avg", "exp_avg_sq"})
        if unknown:
            raise CheckpointError(f"legacy key '{okey}.state.{i}.{unknown[0]}' cannot be mapped (only Adam/AdamW "
                                  "moments can)")
        for f in ("step", "exp_avg", "exp_avg_sq"):
            if f not in s:
                raise CheckpointError(f"legacy key '{okey}.state.{i}' lacks '{f}'")
        shape = tuple(part.state[name].shape)
        if tuple(s["exp_avg"].shape) != shape or tuple(s["exp_avg_sq"].shape) != shape:
            raise CheckpointError(f"legacy key '{okey}.state.{i}' moments do not match the shape of '{src}.{name}'")
        step = float(s["step"].item() if isinstance(s["step"], torch.Tensor) else s["step"])
        steps.add(step)
        out[name] = {"exp_avg": s["exp_avg"].detach().clone(), "exp_avg_sq": s["exp_avg_sq"].detach().clone(),
                     "step": torch.tensor(step, dtype=torch.float32)}
    if len(steps) != 1:
        raise CheckpointError(f"legacy key '{okey}' has different step counts per parameter ({sorted(steps)})")
    step = steps.pop()
    if step != int(step) or step < 0:
        raise CheckpointError(f"legacy key '{okey}' has a non-integer step {step}")
    return out, hyper, int(step)


def _hyper(group: Mapping[str, Any], okey: str) -> dict[str, Any]:
    try:
        name = "adam" if group.get("decoupled_weight_decay") is False else "adamw"
        return {"name": name, "lr": float(group["lr"]), "betas": [float(b) for b in group["betas"]],
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"legacy key '{okey}.param_groups' lacks Adam hyper-parameters ({e})") from None
