"""Migration of published-system checkpoints into one federation checkpoint, as named steps:

1. ``read_legacy`` / ``merge_files`` (read.py): the files' modules, nothing unpickled;
2. ``infer_architecture`` (layouts.py): the published layout per role and its sizes;
3. ``derive_plan``: the config (generator.arch=fedgfe...), the classes, the store key of every
   legacy module, the conditions; every choice the files cannot make is an override or an error;
4. ``map_modules``, ``optimizer_config``, ``build_store``, ``fill_store``: the files' tensors in
   this project's names, a store built from the config, every (key, role) filled from the files (or
   refused naming what is missing; only a GAN discriminator may start fresh, on request);
5. ``write_migrated``: the checkpoint, through the run-state module, and the overrides that resume it.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from feda2v.checkpoint.legacy.layouts import (
    Architecture,
    infer_architecture,
    map_optimizer,
    map_parameters,
    unused_parameters,
)
from feda2v.checkpoint.container import header_get
from feda2v.checkpoint.legacy.read import DISCRIMINATOR, GENERATOR, LegacyRun, Module, merge_files, read_legacy
from feda2v.errors import CheckpointError, ConfigError, Feda2vError

OVERRIDES_SUFFIX = ".overrides"  # beside OUT: the overrides that resume it, one per line
_WHOLE = ("generator.class_groups",)  # written as one override (its key order is the store's key order)
_NOT_FOR_RESUME = ("train", "tracking", "profiler", "checkpoint", "evaluate")


@dataclass
class Options:
    overrides: dict  # user overrides as a nested dict
    prepared_dir: str | None = None
    fresh_discriminator: bool = False
    to_float32: bool = False


@dataclass
class Plan:
    """Everything decided before a store is built."""

    config: dict  # nested, to be validated by load_config
    classes: list[str]
    conditions: torch.Tensor
    key_of: dict[int, str]  # index into run.modules -> store key
    prepared: Any = None  # the loaded prepared data, if any
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------
# overrides


def overrides_dict(overrides: Sequence[str] | None) -> dict:
    from omegaconf import OmegaConf

    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides or [])), resolve=True)
    except Exception as e:  # omegaconf raises many types for bad syntax
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {' '.join(str(e).split())[:200]}") from None


def _get(tree: Mapping, dotted: str) -> Any:
    return header_get(tree, dotted, default=None)


def _set(d: dict, dotted: str, value: Any, *, user: Mapping) -> None:
    """Set a config value the legacy files determine; a contradicting user override is an error."""
    given = _get(user, dotted)
    if given is not None and given != value:
        raise ConfigError(f"override {dotted}={given} contradicts the legacy checkpoint, which has {value}")
    node = d
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


# ------------------------------------------------------------------------------------------
# step 3: the plan


def _granularity(run: LegacyRun, user: Mapping) -> str:
    """unified / per_class / per_group, from the modules' sharing, the files and the user."""
    asked = _get(user, "generator.granularity")
    file_says = run.get("generator_granularity")
    mods = run.modules
    if len(mods) == 1 and (not mods[0].names or mods[0].names == ("unified",) or len(mods[0].names) > 1):
        # one generator: the file's unified one, a 'unified' key, or one object under every key
        if asked not in (None, "unified"):
            what = ("one generator shared by keys " + ", ".join(f"'{n}'" for n in mods[0].names)
                    if len(mods[0].names) > 1 else "one unified generator")
            raise CheckpointError(f"generator.granularity={asked} needs one generator per key, but the legacy "
                                  f"file holds {what}; migrate it as unified (that keeps the sharing)")
        if file_says not in (None, "unified") and not mods[0].names:
            raise CheckpointError(f"legacy key 'generator_granularity' is {file_says!r} but 'generator_key' is missing")
        return "unified"
    if any(m.names in ((), ("unified",)) for m in mods):
        m = next(m for m in mods if m.names in ((), ("unified",)))
        raise CheckpointError(f"legacy {m.label()} holds a unified generator next to per-key generators; "
                              "a store has either one unified generator or one per key")
    if asked == "unified":
        names = [m.names[0] for m in mods]
        raise CheckpointError(f"generator.granularity=unified needs one generator, but the legacy files hold "
                              f"{len(mods)} separate generators ({', '.join(repr(n) for n in names[:4])}"
                              f"{'...' if len(names) > 4 else ''}) and no 'unified' one; the store's "
                              "'unified/generator' would have no legacy source: migrate with per_class or per_group")
    if any(len(m.names) > 1 for m in mods):
        if asked == "per_class":
            m = next(m for m in mods if len(m.names) > 1)
            raise CheckpointError(f"generator.granularity=per_class would split the generator shared by keys "
                                  f"{', '.join(repr(n) for n in m.names)}; migrate as per_group (keeps the sharing)")
        return "per_group"
    gran = asked or file_says
    if gran is None:
        fed = run.get("federated_classes")
        if fed and {m.names[0] for m in mods} <= {str(c) for c in fed}:
            return "per_class"
        raise CheckpointError("legacy key 'generator_keys' does not say whether the keys are classes or groups; "
                              "pass generator.granularity=per_class or per_group (with generator.class_groups)")
    if gran not in ("per_class", "per_group"):
        raise CheckpointError(f"legacy key 'generator_granularity' is {gran!r} but the files hold per-key generators")
    return gran


def _unified_classes(run: LegacyRun, prepared) -> list[str]:
    if prepared is not None:
        return list(prepared.classes)
    names = run.modules[0].names
    if len(names) > 1:  # one object registered under every class: the keys are the classes
        return [str(n) for n in names]
    for k in ("federated_classes", "selected_classes", "generator_classes"):
        if run.get(k):
            return [str(c) for c in run.get(k)]
    raise CheckpointError("legacy checkpoint lists no classes (federated_classes/selected_classes); pass --prepared DIR")


def _groups_from_files(run: LegacyRun) -> dict[str, list[str]] | None:
    groups: dict[str, list[str]] = {}
    for f in run.files:
        if f.raw.get("generator_granularity") == "per_group" and f.raw.get("generator_classes"):
            groups[str(f.raw["generator_key"])] = [str(c) for c in f.raw["generator_classes"]]
    return groups or None


def _keys_and_classes(run: LegacyRun, gran: str, user: Mapping, prepared
                      ) -> tuple[dict[int, str], list[str], dict[str, list[str]] | None]:
    """Store key per module, the class list and the class groups (never invents a generator)."""
    mods = run.modules
    if gran == "unified":
        return {0: "unified"}, _unified_classes(run, prepared), None
    if gran == "per_class":
        classes = [m.names[0] for m in mods]
        if prepared is not None:
            missing = [c for c in prepared.classes if c not in classes]
            if missing:
                raise CheckpointError(f"the legacy files ({run.names()}) have no generator for class '{missing[0]}' "
                                      "of the prepared data; migrating would leave that class untrained")
            unknown = [c for c in classes if c not in prepared.classes]
            if unknown:
                raise CheckpointError(f"legacy generator key '{unknown[0]}' is not a class of the prepared data")
            classes = list(prepared.classes)
        return {i: f"class/{m.names[0]}" for i, m in enumerate(mods)}, classes, None
    # per_group
    groups = _get(user, "generator.class_groups") or _groups_from_files(run)
    shared = any(len(m.names) > 1 for m in mods)
    if not groups:
        hint = (" (the server shares one generator per group under its classes' names: "
                + "; ".join("[" + ", ".join(m.names) + "]" for m in mods) + ")") if shared else ""
        raise CheckpointError("legacy per_group checkpoint does not record its class groups' names; pass "
                              f"generator.class_groups={{group: [classes], ...}}{hint}")
    groups = {str(g): [str(c) for c in cs] for g, cs in groups.items()}
    key_of: dict[int, str] = {}
    for i, m in enumerate(mods):
        if shared:  # the module's names are its classes; find the group with exactly those classes
            match = [g for g, cs in groups.items() if sorted(cs) == sorted(m.names)]
            if not match:
                raise CheckpointError(f"legacy generator shared by classes {', '.join(repr(n) for n in m.names)} "
                                      "matches no group of generator.class_groups")
            key_of[i] = f"group/{match[0]}"
        else:
            if m.names[0] not in groups:
                raise CheckpointError(f"legacy generator key '{m.names[0]}' is not a group in generator.class_groups")
            key_of[i] = f"group/{m.names[0]}"
    extra = [g for g in groups if f"group/{g}" not in key_of.values()]
    if extra:
        raise CheckpointError(f"generator.class_groups group '{extra[0]}' has no generator in the legacy files")
    order = [k[len("group/"):] for k in key_of.values()]
    classes = [c for g in order for c in groups[g]]
    if prepared is not None:
        if sorted(classes) != sorted(prepared.classes):
            raise CheckpointError("generator.class_groups do not cover exactly the prepared data's classes")
        classes = list(prepared.classes)
    return key_of, classes, {g: groups[g] for g in order}


def _data_config_from_manifest(cfgd: dict, manifest: Mapping[str, Any], prepared_dir: str, user: Mapping) -> None:
    """The data config the prepared dir was made with, so the migrated checkpoint resumes on it."""
    m = manifest
    pairs = [("data.prepared_dir", prepared_dir), ("data.name", m.get("source")), ("data.nodes", m.get("nodes")),
             ("data.test_fraction", m.get("test_fraction")), ("data.condition", m.get("condition")),
             ("data.max_samples", m.get("max_samples")), ("seed", m.get("seed"))]
    pairs += [(f"data.partition.{k}", v) for k, v in dict(m.get("partition") or {}).items()
              if k in ("scheme", "alpha", "classes_per_node")]
    for dotted, value in pairs:
        if value is not None:
            _set(cfgd, dotted, value, user=user)


def derive_plan(run: LegacyRun, arch: Architecture, opts: Options) -> Plan:
    user = opts.overrides
    notes: list[str] = []
    prepared = None
    if opts.prepared_dir is not None:
        from feda2v.data import load_prepared

        prepared = load_prepared(opts.prepared_dir)
    gran = _granularity(run, user)
    key_of, classes, class_groups = _keys_and_classes(run, gran, user, prepared)
    dims = arch.sizes
    cfgd: dict = copy.deepcopy(dict(user))  # the user's overrides stay as given (conflict checks read them)
    _set(cfgd, "generator.type", arch.type, user=user)
    _set(cfgd, "generator.arch", arch.arch, user=user)
    _set(cfgd, "generator.granularity", gran, user=user)
    _set(cfgd, "generator.latent_dim", dims["latent_dim"], user=user)
    _set(cfgd, "generator.hidden_dim", dims["hidden_dim"], user=user)
    if "fusion_dim" in dims:
        _set(cfgd, "generator.fusion_dim", dims["fusion_dim"], user=user)
    if class_groups is not None:
        cfgd.setdefault("generator", {})["class_groups"] = class_groups
    _set(cfgd, "federation.mode", "generator_only", user=user)
    for dotted, value in arch.layouts[GENERATOR].implies:  # e.g. the published GAN update rule
        _set(cfgd, dotted, value, user=user)
    # one store held by the server: the layout a migrated file has (client files included)
    _set(cfgd, "federation.sharing", "shared", user=user)
    if arch.arch == "fedgfe_multimodal" and run.get("diffusion_type") == "flux":
        raise CheckpointError("legacy key 'diffusion_type' is 'flux': the multimodal VAE was conditioned on T5 "
                              "embeddings too, which this project does not have; it cannot be migrated")
    if prepared is not None:
        _data_config_from_manifest(cfgd, prepared.manifest, str(opts.prepared_dir), user)
        conditions, cdim = prepared.conditions, prepared.condition_dim
    else:
        conditions, cdim = None, None
    if "condition_dim" in dims:  # conditioned VAEs: their conditions are not in the files
        if conditions is None:
            raise CheckpointError("the legacy conditioned VAE was trained on class conditions that its checkpoint "
                                  "does not contain; pass --prepared DIR whose conditions match (condition_dim "
                                  f"{dims['condition_dim']})")
        if cdim != dims["condition_dim"]:
            raise CheckpointError(f"--prepared conditions have condition_dim {cdim} but the legacy conditioned VAE "
                                  f"expects {dims['condition_dim']}")
    if conditions is None:  # unconditional published models: the condition is an unused input
        conditions = torch.eye(len(classes), dtype=torch.float32)
        _set(cfgd, "data.condition", "onehot", user=user)
    return Plan(cfgd, classes, conditions, key_of, prepared, notes)


# ------------------------------------------------------------------------------------------
# step 4: the store


def _optimizer_sources(run: LegacyRun, plan: Plan) -> dict[int, tuple[Mapping, str]]:
    """Server optimizers saved under a name that is no module key (a group, 'unified'): matched to
    the module whose store key has that name; an unmatched one is an error (never dropped)."""
    out: dict[int, tuple[Mapping, str]] = {}
    by_key = {key: i for i, key in plan.key_of.items()}
    for name, (osd, src) in run.free_optimizers.items():
        key = "unified" if name == "unified" else f"group/{name}"
        i = by_key.get(key)
        if i is None:
            raise CheckpointError(f"legacy key '{src}' has no generator in 'prompt_generators' "
                                  f"(no store key '{key}' to attach it to)")
        part = run.modules[i].roles[GENERATOR]
        if part.optim is not None:
            raise CheckpointError(f"legacy keys '{part.optim_src}' and '{src}' are both the optimizer of "
                                  f"'{key}'; cannot tell which holds its state")
        out[i] = (osd, src)
    return out


def _float32(t: torch.Tensor, src: str, worst: list) -> torch.Tensor:
    """float32 as the store trains; another float dtype is converted here and its rounding error
    recorded (fill_store refuses unless --to-float32)."""
    if t.dtype == torch.float32:
        return t
    if not t.is_floating_point():
        raise CheckpointError(f"legacy key '{src}' is {t.dtype}, not a floating-point tensor")
    err = float((t.to(torch.float32).to(torch.float64) - t.to(torch.float64)).abs().max()) if t.numel() else 0.0
    worst.append((err, src, t.dtype))
    return t.to(torch.float32)


@dataclass
class Mapped:
    """One (module, role) in this project's names: parameters, moments, hyper-parameters, step."""

    src: str
    optim_src: str | None
    params: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]] | None  # None: no optimizer state in the files
    hyper: dict | None
    step: int


def map_modules(run: LegacyRun, arch: Architecture, plan: Plan, opts: Options) -> dict[tuple[int, str], Mapped]:
    """Step 4a: every module's tensors and optimizer state under this project's names (float32,
    or refused naming the first other dtype with the largest rounding error)."""
    free = _optimizer_sources(run, plan)
    out: dict[tuple[int, str], Mapped] = {}
    worst: list = []
    dropped: list[str] = []
    for i, m in enumerate(run.modules):
        for role, part in m.roles.items():
            if i in free and role == GENERATOR:
                part.optim, part.optim_src = free[i]
            lay = arch.layouts[role]
            params = {n: _float32(t, f"{part.src}.{n}", worst) for n, t in map_parameters(part, lay).items()}
            dropped += [f"{part.src}.{n}" for n in unused_parameters(part, lay)]
            mapped = map_optimizer(part, lay)
            moments, hyper, step = mapped if mapped is not None else (None, None, 0)
            for name, st in (moments or {}).items():
                for f in ("exp_avg", "exp_avg_sq"):
                    st[f] = _float32(st[f], f"{part.optim_src}.state.{name}.{f}", worst)
            out[i, role] = Mapped(part.src, part.optim_src, params, moments, hyper, step)
    if worst:
        err, src, dtype = max(worst, key=lambda w: w[0])
        if not opts.to_float32:
            raise CheckpointError(f"legacy key '{src}' is {dtype}; this project's store trains float32 (largest "
                                  f"rounding error over all tensors would be {err:.3g}): pass --to-float32 to convert")
        plan.notes.append(f"converted {len(worst)} {dtype} tensors to float32 (--to-float32); largest rounding "
                          f"error {err:.3g} ('{src}')")
    if dropped:
        plan.notes.append(f"left out {len(dropped)} tensors of the multimodal VAE's untrained T5 branch (not part "
                          f"of its CLIP-conditioned function), e.g. '{dropped[0]}'")
    return out


def optimizer_config(plan: Plan, mapped: Mapping[tuple[int, str], Mapped], user: Mapping) -> None:
    """Step 4b: the optimizer factory's settings (used by resets) are the first legacy generator
    optimizer's; each key keeps its own legacy hyper-parameters in the store state."""
    first = next((m.hyper for (_, role), m in sorted(mapped.items()) if role == GENERATOR and m.hyper), None)
    if first is None:
        plan.notes.append("no optimizer state in the legacy files: the optimizers start fresh with "
                          "generator.optimizer from the config")
        return
    for f in ("name", "lr", "betas", "eps", "weight_decay"):
        _set(plan.config, f"generator.optimizer.{f}", first[f], user=user)


def build_store(plan: Plan, arch: Architecture):
    """Step 4c: a store from the plan's config (its fresh state is the template to fill)."""
    from feda2v.config import load_config
    from feda2v.store import GeneratorStore, StoreSpec

    try:
        cfg = load_config(plan.config)
        spec = StoreSpec.from_config(cfg, classes=plan.classes, feature_dim=arch.sizes["feature_dim"],
                                     condition_dim=int(plan.conditions.shape[1]))
        return cfg, GeneratorStore(spec, plan.conditions)
    except ConfigError as e:
        raise CheckpointError(f"cannot build a store for the legacy checkpoint: {e}") from None


def fill_store(store, run: LegacyRun, plan: Plan, mapped: Mapping[tuple[int, str], Mapped], opts: Options) -> None:
    """Step 4d: every (key, role) of the store from the files, or refused naming what is missing
    (only a GAN discriminator may start fresh, with --fresh-discriminator)."""
    tensors, meta = store.state_dict()
    module_of = {key: i for i, key in plan.key_of.items()}
    new_t = {"conditions": tensors["conditions"]}
    no_state: list[str] = []
    for key in store.keys:
        i = module_of.get(key)
        for role in store.roles:
            kr = f"{key}/{role}"
            want = {n[len(f"{kr}/param/"):]: t for n, t in tensors.items() if n.startswith(f"{kr}/param/")}
            got = None if i is None else mapped.get((i, role))
            if got is None:
                _missing(kr, role, None if i is None else run.modules[i], run, opts, plan)
                new_t.update({f"{kr}/param/{n}": t for n, t in want.items()})
                continue
            if set(got.params) != set(want):
                raise CheckpointError(f"legacy key '{got.src}' maps to {sorted(got.params)} but {kr} has {sorted(want)}")
            for name, t in want.items():
                if tuple(got.params[name].shape) != tuple(t.shape):
                    raise CheckpointError(f"legacy key '{got.src}.{name}' has shape {list(got.params[name].shape)} "
                                          f"but this project's {kr} needs {list(t.shape)}")
                new_t[f"{kr}/param/{name}"] = got.params[name]
            o = meta["optimizers"][kr]
            o["step"] = got.step
            if got.moments is None:
                no_state.append(kr)
                continue
            if got.hyper["name"] != o["name"]:
                raise CheckpointError(f"legacy key '{got.optim_src}' is {got.hyper['name']} but the store uses {o['name']}")
            o.update({k: v for k, v in got.hyper.items() if k != "name"})
            for name, st in got.moments.items():
                for f in ("exp_avg", "exp_avg_sq", "step"):
                    new_t[f"{kr}/optim/{name}/{f}"] = st[f]
    if no_state and len(no_state) < len(meta["optimizers"]):
        plan.notes.append(f"no optimizer state in the legacy files for {', '.join(no_state[:3])}"
                          f"{'...' if len(no_state) > 3 else ''}: those optimizers start fresh")
    try:
        store.load_state_dict(new_t, meta)
    except Feda2vError as e:
        raise CheckpointError(f"legacy checkpoint does not fit this project's store: {e}") from None


def _missing(kr: str, role: str, m: Module | None, run: LegacyRun, opts: Options, plan: Plan) -> None:
    """A (key, role) no file holds: only a GAN discriminator, only on request; else one line naming it."""
    if role == DISCRIMINATOR and m is not None:
        if not opts.fresh_discriminator:
            raise CheckpointError(f"the store needs '{kr}' but {m.label()} holds no GAN discriminator (the "
                                  "published client does not save it); pass --fresh-discriminator to start it "
                                  "from a fresh seeded initialisation")
        plan.notes.append(f"{kr} is not in the legacy files: it starts from a fresh seeded initialisation "
                          "(--fresh-discriminator)")
        return
    raise CheckpointError(f"the store needs '{kr}' but no legacy file holds its generator (files: {run.names()})")


# ------------------------------------------------------------------------------------------
# step 5: the file


def _round(run: LegacyRun) -> int:
    r = run.get("round")
    return int(r) if isinstance(r, int) and not isinstance(r, bool) and r >= 0 else 0


def write_migrated(out: Path, cfg, store, run: LegacyRun, arch: Architecture, plan: Plan) -> dict:
    from feda2v.checkpoint.runstate import RunState, state_config, write_run_state

    migration = {
        "sources": [{"file": f.path.name, "sha256": f.sha256, "kind": f.kind, "legacy_metadata": f.metadata}
                    for f in run.files],
        "legacy_layouts": {role: lay.name for role, lay in arch.layouts.items()},
        "legacy_keys": {plan.key_of[i]: list(m.names) for i, m in enumerate(run.modules)},
        "notes": list(plan.notes),
    }
    state = RunState(config=state_config(cfg), round=_round(run), stores={"server": store.state_dict()},
                     primary_store="server", classifier=None, rng=None,  # no RNG in the files: none is claimed
                     data_manifest_hash=None if plan.prepared is None else plan.prepared.manifest_hash,
                     extra={"migration": migration})
    return write_run_state(out, state)


def _hydra_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{_hydra_key(str(k))}:{_hydra_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _hydra_key(k: str) -> str:
    """Hydra's override grammar takes dict keys unquoted; its special characters are escaped."""
    return "".join("\\" + ch if ch in "\\()[]{}:=, \t" else ch for ch in k)


def _leaves(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and name not in _WHOLE:
            out.update(_leaves(v, name + "."))
        else:
            out[name] = v
    return out


def resume_overrides(config: Mapping, default: Mapping) -> list[str]:
    """The command-line overrides that turn the composed default config into ``config`` (for the
    keys a resume compares, plus the data location): ``feda2v-train <these> train.resume=OUT``."""
    mine, base = _leaves(config), _leaves(default)
    out = []
    for name in sorted(mine):
        if name.split(".", 1)[0] in _NOT_FOR_RESUME or name.startswith("federation.rounds"):
            continue
        if base.get(name, object()) != mine[name]:
            out.append(f"{name}={_hydra_value(mine[name])}")
    return out


# ------------------------------------------------------------------------------------------


@dataclass
class Migrated:
    header: dict
    notes: list[str]
    overrides: list[str]  # resume overrides (empty when no default config was given)
    resumable: bool  # a resume checks the prepared data's manifest: only with --prepared


def migrate_legacy(legacy: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   overrides: Sequence[str] | None = None, prepared_dir: str | os.PathLike | None = None,
                   fresh_discriminator: bool = False, to_float32: bool = False,
                   default_config: Mapping | None = None) -> Migrated:
    """Convert published-system checkpoint file(s) into one federation checkpoint (store ``server``).

    ``legacy``: one file, or several client files of one run (one generator each) merged into one
    store. ``overrides`` supply what the files do not record; ``prepared_dir`` the classes and
    conditions (required for conditioned VAEs). With ``default_config`` (the composed conf/), the
    overrides that resume ``out`` are written beside it (``out`` + OVERRIDES_SUFFIX) and returned.
    """
    paths = [legacy] if isinstance(legacy, (str, os.PathLike)) else list(legacy)
    if not paths:
        raise CheckpointError("no legacy checkpoint given")
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} already exists; remove it or choose another output path")
    opts = Options(overrides_dict(overrides), None if prepared_dir is None else str(prepared_dir),
                   fresh_discriminator, to_float32)
    run = merge_files([read_legacy(p) for p in paths])      # 1. read
    arch = infer_architecture(run)                            # 2. architecture
    plan = derive_plan(run, arch, opts)                       # 3. config, classes, keys
    mapped = map_modules(run, arch, plan, opts)               # 4. the store, every (key, role) accounted for
    optimizer_config(plan, mapped, opts.overrides)
    cfg, store = build_store(plan, arch)
    fill_store(store, run, plan, mapped, opts)
    resume: list[str] = []
    if default_config is not None:
        from feda2v.config import to_plain

        resume = resume_overrides(to_plain(cfg), default_config)
    header = write_migrated(out, cfg, store, run, arch, plan)  # 5. the file
    resumable = plan.prepared is not None
    if default_config is not None and resumable:
        from feda2v.fsutil import atomic_write_text

        atomic_write_text(Path(str(out) + OVERRIDES_SUFFIX), "".join(f"{o}\n" for o in resume))
    return Migrated(header, list(plan.notes), resume, resumable)
