"""Migration of the published FedA2V system's checkpoint dicts into this project's format.

Layouts (from the published code, lucapalazzo/fedgfe, ``save_generator_checkpoint`` of the
server and ``_save_single_generator_checkpoint`` of the client):
- server unified VAE: ``generator_state_dict``, ``optimizer_state_dict`` (may be None),
  ``checkpoint_type='server'``;
- server per_class/per_group: ``prompt_generators`` {key: state_dict}, ``generator_optimizers``
  {key: optimizer state_dict} (or None), ``generator_keys``, ``use_conditioned_vae``;
- server unified GAN: ``generator_clip_state_dict``, ``discriminator_clip_state_dict``,
  ``generator_optimizer_state_dict``, ``discriminator_optimizer_state_dict`` (the T5 variants
  must be None: this project has no T5-conditioned architecture);
- client: one generator per file with ``node_id``, ``round``, ``generator_granularity``,
  ``generator_key`` (None = unified), ``class_name``/``group_name``, ``generator_classes``,
  ``generator_state_dict`` (+ ``optimizer_state_dict`` when the client had one) or, for GAN,
  ``generator_clip_state_dict`` only.
The generator modules (``flcore/trainmodel/generators.py``) are MLPs whose Linear layers map onto
this project's architectures one to one (see ``_LAYOUTS``); ConditionedVAEGenerator's separate
``fc_mu``/``fc_logvar`` become the rows of the encoder's last layer ([mu, logvar], as here).
The legacy GAN is unconditional: its first layers get zero columns for the condition inputs
(condition contributes nothing, as before), with zero optimizer moments for those columns.

Files are opened only with ``torch.load(weights_only=True)``; anything needing arbitrary objects
is refused. Every tensor in the file is either carried over or an error naming its key.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from feda2v.checkpoint.container import write_checkpoint
from feda2v.errors import CheckpointError, ConfigError, Feda2vError

# Top-level metadata the published system writes; kept (JSON-able) under header["migration"].
_METADATA_KEYS = {
    "checkpoint_type", "is_global", "round", "timestamp", "generator_type", "diffusion_type",
    "generator_training_epochs", "synthetic_samples_per_class", "num_clients", "client_metadata",
    "federated_datasets", "federated_classes", "audio_model_name", "img_pipe_name",
    "global_model_train", "global_model_train_from_nodes_adapters", "use_conditioned_vae",
    "sequence_length", "generator_keys", "num_generators", "client_id", "node_id",
    "generator_granularity", "generator_key", "class_name", "group_name", "generator_classes",
    "dataset_name", "selected_classes", "train_folds", "test_folds", "num_train_samples",
    "num_test_samples", "visual_dim",
}
_STATE_KEYS = {
    "generator_state_dict", "optimizer_state_dict", "prompt_generators", "generator_optimizers",
    "generator_clip_state_dict", "generator_t5_state_dict", "discriminator_clip_state_dict",
    "discriminator_t5_state_dict", "generator_optimizer_state_dict",
    "discriminator_optimizer_state_dict",
}

# legacy architecture -> (project class, {legacy linear prefix: project linear prefix}); a tuple
# of legacy prefixes is concatenated along the output rows.
_LAYOUTS: dict[str, tuple[str, dict[str, Any]]] = {
    "VAEGenerator": ("VAE", {"encoder.0": "encoder.0", "encoder.3": "encoder.2", "encoder.6": "encoder.4",
                             "decoder.0": "decoder.0", "decoder.3": "decoder.2", "decoder.6": "decoder.4"}),
    "ConditionedVAEGenerator": ("CVAE", {"encoder.0": "encoder.0", "encoder.2": "encoder.2",
                                         ("fc_mu", "fc_logvar"): "encoder.4",
                                         "decoder.0": "decoder.0", "decoder.2": "decoder.2",
                                         "decoder.4": "decoder.4"}),
    "GANGenerator": ("GANGenerator", {"model.0": "net.0", "model.2": "net.2", "model.4": "net.4"}),
    "GANDiscriminator": ("GANDiscriminator", {"model.0": "net.0", "model.3": "net.2", "model.6": "net.4"}),
}


def _legacy_prefixes(layout: str) -> list[str]:
    out: list[str] = []
    for k in _LAYOUTS[layout][1]:
        out.extend(k if isinstance(k, tuple) else (k,))
    return out


# ------------------------------------------------------------------------------------------
# reading


def load_legacy(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)``; refuses files that need arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"legacy checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes from the weights-only unpickler: noise on a CLI
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"refused to load {path}: it needs unpickling of arbitrary objects, which can run code "
            f"(weights-only load said: {first}); only plain tensor/dict checkpoints can be migrated"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        msg = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path} is not a readable torch.save checkpoint ({type(e).__name__}: {msg})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a published-system checkpoint dict")
    return obj


def _is_tensor_tree(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, Mapping):
        return any(_is_tensor_tree(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_is_tensor_tree(x) for x in v)
    return False


def _jsonable(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x, where) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x, f"{where}.{k}") for k, x in v.items()}
    raise CheckpointError(f"legacy metadata '{where}' is a {type(v).__name__}, which cannot be carried over")


def _state_dict(d: Any, key: str) -> dict[str, torch.Tensor]:
    if not isinstance(d, Mapping) or not d:
        raise CheckpointError(f"legacy key '{key}' is not a module state_dict")
    for name, t in d.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"legacy key '{key}.{name}' is a {type(t).__name__}, not a tensor")
    return dict(d)


def detect_layout(sd: Mapping[str, torch.Tensor], key: str) -> str:
    """Which published architecture a state_dict came from (by its exact parameter names)."""
    names = set(sd)
    for layout in _LAYOUTS:
        want = {f"{p}.{w}" for p in _legacy_prefixes(layout) for w in ("weight", "bias")}
        if names == want:
            return layout
    known_prefixes = {p for layout in _LAYOUTS for p in _legacy_prefixes(layout)}
    for n in sorted(sd):  # name the first entry no layout explains, to make the error actionable
        if n.rsplit(".", 1)[0] not in known_prefixes:
            raise CheckpointError(
                f"legacy key '{key}.{n}' has no counterpart in this project's generator architectures "
                "(only the published VAEGenerator, ConditionedVAEGenerator, GANGenerator and "
                "GANDiscriminator can be migrated)"
            )
    raise CheckpointError(f"legacy key '{key}' has an unknown layer layout ({', '.join(sorted(names)[:6])}...)")


# ------------------------------------------------------------------------------------------
# the legacy file -> generators per key


class _Legacy:
    def __init__(self, raw: dict, path: Path):
        self.raw, self.path = raw, path
        unknown = [k for k in raw if k not in _METADATA_KEYS and k not in _STATE_KEYS]
        for k in unknown:
            if _is_tensor_tree(raw[k]):
                raise CheckpointError(f"legacy key '{k}' holds tensors this migration does not know how to map")
        for k in ("generator_t5_state_dict", "discriminator_t5_state_dict"):
            if raw.get(k) is not None:
                raise CheckpointError(
                    f"legacy key '{k}' holds a T5-conditioned model, which this project has no architecture for; "
                    "it cannot be migrated"
                )
        self.metadata = {k: _jsonable(v, k) for k, v in raw.items() if k not in _STATE_KEYS}
        # entries: legacy generator key (None = unified) -> {role: (state_dict, optimizer_state|None, src)}
        self.entries: dict[str | None, dict[str, tuple[dict, Any, str]]] = {}
        self.used: set[str] = set()
        self.kind = self._collect()
        leftover = sorted(k for k in _STATE_KEYS if raw.get(k) is not None and k not in self.used)
        if leftover:  # e.g. an optimizer_state_dict next to prompt_generators: never drop it silently
            raise CheckpointError(f"legacy key '{leftover[0]}' does not belong with the rest of this "
                                  f"{self.kind} checkpoint; cannot tell where it maps")

    def _collect(self) -> str:
        r = self.raw
        has = lambda k: r.get(k) is not None  # noqa: E731
        if has("prompt_generators"):
            for k in ("generator_state_dict", "generator_clip_state_dict"):
                if has(k):
                    raise CheckpointError(f"legacy file has both 'prompt_generators' and '{k}'; cannot tell which to migrate")
            gens = r["prompt_generators"]
            if not isinstance(gens, Mapping) or not gens:
                raise CheckpointError("legacy key 'prompt_generators' is not a non-empty {key: state_dict} map")
            opts = r.get("generator_optimizers") or {}
            if not isinstance(opts, Mapping):
                raise CheckpointError("legacy key 'generator_optimizers' is not a {key: optimizer state} map")
            extra = sorted(set(map(str, opts)) - set(map(str, gens)))
            if extra:
                raise CheckpointError(f"legacy key 'generator_optimizers.{extra[0]}' has no generator in 'prompt_generators'")
            keys = r.get("generator_keys")
            if keys is not None and sorted(map(str, keys)) != sorted(map(str, gens)):
                raise CheckpointError("legacy key 'generator_keys' does not list the same keys as 'prompt_generators'")
            self.used |= {"prompt_generators", "generator_optimizers"}
            for k, sd in gens.items():
                src = f"prompt_generators.{k}"
                self.entries[str(k)] = {"generator": (_state_dict(sd, src), opts.get(k), src)}
            return "server-multi"
        if has("generator_state_dict"):
            if has("generator_clip_state_dict"):
                raise CheckpointError("legacy file has both 'generator_state_dict' and 'generator_clip_state_dict'")
            key = r.get("generator_key")
            self.used |= {"generator_state_dict", "optimizer_state_dict"}
            self.entries[None if key is None else str(key)] = {
                "generator": (_state_dict(r["generator_state_dict"], "generator_state_dict"),
                              r.get("optimizer_state_dict"), "generator_state_dict")}
            return "client" if "node_id" in r or "client_id" in r else "server-unified"
        if has("generator_clip_state_dict"):
            if has("generator_optimizer_state_dict") and has("optimizer_state_dict"):
                raise CheckpointError("legacy file has both 'generator_optimizer_state_dict' and 'optimizer_state_dict'")
            gopt = "generator_optimizer_state_dict" if has("generator_optimizer_state_dict") else "optimizer_state_dict"
            self.used |= {"generator_clip_state_dict", gopt, "discriminator_clip_state_dict",
                          "discriminator_optimizer_state_dict"}
            roles = {"generator": (_state_dict(r["generator_clip_state_dict"], "generator_clip_state_dict"),
                                   r.get(gopt), "generator_clip_state_dict")}
            if has("discriminator_clip_state_dict"):
                roles["discriminator"] = (_state_dict(r["discriminator_clip_state_dict"], "discriminator_clip_state_dict"),
                                          r.get("discriminator_optimizer_state_dict"), "discriminator_clip_state_dict")
            elif has("discriminator_optimizer_state_dict"):
                raise CheckpointError("legacy key 'discriminator_optimizer_state_dict' has no 'discriminator_clip_state_dict'")
            key = r.get("generator_key")
            self.entries[None if key is None else str(key)] = roles
            return "client" if "node_id" in r or "client_id" in r else "server-unified"
        for k in ("optimizer_state_dict", "generator_optimizer_state_dict", "generator_optimizers"):
            if has(k):
                raise CheckpointError(f"legacy key '{k}' holds optimizer state but the file has no generator to attach it to")
        raise CheckpointError(
            f"{self.path} has no generator state (none of generator_state_dict, prompt_generators, "
            "generator_clip_state_dict); it is not a published-system generator checkpoint"
        )


# ------------------------------------------------------------------------------------------
# tensors -> this project's names


def _linear(sd: Mapping[str, torch.Tensor], prefix: str | tuple[str, ...], src: str) -> dict[str, torch.Tensor]:
    names = prefix if isinstance(prefix, tuple) else (prefix,)
    out = {}
    for w in ("weight", "bias"):
        parts = [sd[f"{n}.{w}"] for n in names]
        out[w] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def map_parameters(sd: Mapping[str, torch.Tensor], layout: str, cond_pad: int, src: str) -> dict[str, torch.Tensor]:
    """Project parameter name -> tensor (float32). ``cond_pad`` zero input columns are appended to
    the first layer (the unconditional legacy GAN gains condition inputs that contribute nothing)."""
    out = {}
    for i, (legacy, target) in enumerate(_LAYOUTS[layout][1].items()):
        lin = _linear(sd, legacy, src)
        w = lin["weight"]
        if w.dim() != 2 or lin["bias"].shape != (w.shape[0],):
            raise CheckpointError(f"legacy key '{src}.{legacy}.weight' is not a Linear layer (shape {list(w.shape)})")
        if i == 0 and cond_pad:
            w = torch.cat([w, torch.zeros(w.shape[0], cond_pad, dtype=w.dtype)], dim=1)
        out[f"{target}.weight"] = w.detach().to(torch.float32).clone()
        out[f"{target}.bias"] = lin["bias"].detach().to(torch.float32).clone()
    return out


def map_optimizer(osd: Any, sd: Mapping[str, torch.Tensor], layout: str, cond_pad: int, src: str, okey: str):
    """(tensors by project param name -> {exp_avg, exp_avg_sq, step}, hyper-parameters, step)."""
    if not isinstance(osd, Mapping) or "state" not in osd or "param_groups" not in osd:
        raise CheckpointError(f"legacy key '{okey}' is not an optimizer state_dict")
    groups = osd["param_groups"]
    if not isinstance(groups, list) or not groups:
        raise CheckpointError(f"legacy key '{okey}.param_groups' is empty")
    hyper_fields = ("lr", "betas", "eps", "weight_decay")
    first = groups[0]
    for g in groups:
        if any(g.get(f) != first.get(f) for f in hyper_fields):
            raise CheckpointError(f"legacy key '{okey}' has param groups with different hyper-parameters; "
                                  "this project uses one optimizer setting per generator")
        if g.get("amsgrad") or g.get("maximize") or g.get("nesterov"):
            raise CheckpointError(f"legacy key '{okey}' uses amsgrad/maximize, which this project's optimizer factory does not support")
    ids = [i for g in groups for i in g.get("params", [])]
    legacy_names = list(sd)  # module.parameters() order == state_dict order (the models have no buffers)
    if len(ids) != len(legacy_names):
        raise CheckpointError(
            f"legacy key '{okey}' covers {len(ids)} parameters but '{src}' has {len(legacy_names)}; "
            "they do not belong together"
        )
    state = osd["state"]
    name_of = dict(zip(ids, legacy_names))
    extra = [i for i in state if i not in name_of]
    if extra:
        raise CheckpointError(f"legacy key '{okey}.state.{extra[0]}' refers to no parameter")
    if not state:
        return {}, _hyper(first, okey), 0
    per_legacy: dict[str, dict[str, torch.Tensor]] = {}
    steps = set()
    for i, name in name_of.items():
        s = state.get(i)
        if s is None:
            raise CheckpointError(f"legacy key '{okey}' has no state for parameter '{src}.{name}' while others have; "
                                  "partial optimizer state cannot be migrated")
        unknown = sorted(set(s) - {"step", "exp_avg", "exp_avg_sq"})
        if unknown:
            raise CheckpointError(f"legacy key '{okey}.state.{i}.{unknown[0]}' cannot be mapped (only Adam/AdamW moments can)")
        for f in ("step", "exp_avg", "exp_avg_sq"):
            if f not in s:
                raise CheckpointError(f"legacy key '{okey}.state.{i}' lacks '{f}'")
        if tuple(s["exp_avg"].shape) != tuple(sd[name].shape) or tuple(s["exp_avg_sq"].shape) != tuple(sd[name].shape):
            raise CheckpointError(f"legacy key '{okey}.state.{i}' moments do not match the shape of '{src}.{name}'")
        step = float(s["step"].item() if isinstance(s["step"], torch.Tensor) else s["step"])
        steps.add(step)
        per_legacy[name] = s
    if len(steps) != 1:
        raise CheckpointError(f"legacy key '{okey}' has different step counts per parameter ({sorted(steps)})")
    step = steps.pop()
    if step != int(step) or step < 0:
        raise CheckpointError(f"legacy key '{okey}' has a non-integer step {step}")
    moments = {}
    for f in ("exp_avg", "exp_avg_sq"):
        moments[f] = map_parameters({n: v[f] for n, v in per_legacy.items()}, layout, cond_pad, okey)
    out = {name: {"exp_avg": moments["exp_avg"][name], "exp_avg_sq": moments["exp_avg_sq"][name],
                  "step": torch.tensor(float(step), dtype=torch.float32)} for name in moments["exp_avg"]}
    return out, _hyper(first, okey), int(step)


def _hyper(group: Mapping[str, Any], okey: str) -> dict[str, Any]:
    try:
        name = "adam" if group.get("decoupled_weight_decay") is False else "adamw"
        return {"name": name, "lr": float(group["lr"]), "betas": [float(b) for b in group["betas"]],
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"legacy key '{okey}.param_groups' lacks Adam hyper-parameters ({e})") from None


# ------------------------------------------------------------------------------------------
# the migration


def _shape_dims(layout: str, sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Architecture sizes read off the legacy tensors."""
    if layout == "VAEGenerator":
        h, d = sd["encoder.0.weight"].shape
        return {"feature_dim": d, "hidden_dim": h, "latent_dim": sd["encoder.6.weight"].shape[0] // 2, "cond_in": 0}
    if layout == "ConditionedVAEGenerator":
        d = sd["decoder.4.weight"].shape[0]
        return {"feature_dim": d, "hidden_dim": sd["encoder.0.weight"].shape[0],
                "latent_dim": sd["fc_mu.weight"].shape[0], "cond_in": sd["encoder.0.weight"].shape[1] - d}
    if layout == "GANGenerator":
        return {"feature_dim": sd["model.4.weight"].shape[0], "hidden_dim": sd["model.0.weight"].shape[0],
                "latent_dim": sd["model.0.weight"].shape[1], "cond_in": 0}
    return {"feature_dim": sd["model.0.weight"].shape[1], "hidden_dim": sd["model.0.weight"].shape[0], "cond_in": 0}


def _overrides_dict(overrides: list[str] | None) -> dict:
    from omegaconf import OmegaConf

    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides or [])), resolve=True)
    except Exception as e:  # omegaconf raises many types for bad syntax
        raise ConfigError(f"cannot parse overrides {overrides}: {' '.join(str(e).split())[:200]}") from None


def _set(d: dict, dotted: str, value: Any, *, user: dict) -> None:
    """Set a config value read from the legacy file; a conflicting user override is an error."""
    from feda2v.checkpoint.container import header_get

    given = header_get(user, dotted, default=None)
    if given is not None and given != value:
        raise ConfigError(f"override {dotted}={given} contradicts the legacy checkpoint, which has {value}")
    node = d
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _prepared(prepared_dir: str | os.PathLike | None):
    if prepared_dir is None:
        return None
    from feda2v.data import load_prepared

    return load_prepared(prepared_dir)


def migrate_legacy(
    legacy: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overrides: list[str] | None = None,
    prepared_dir: str | os.PathLike | None = None,
) -> dict:
    """Convert a published-system checkpoint to a federation checkpoint with one store ``server``.

    Returns the written header. ``overrides`` (``generator.granularity=per_group`` ...) supply what
    the legacy file does not record; ``prepared_dir`` supplies the class list and conditions
    (required for conditioned VAEs, whose legacy conditions are not in the file).
    """
    from feda2v.checkpoint.rng import NUMPY, PREFIX, PYTHON, TORCH
    from feda2v.config import load_config
    from feda2v.store import GeneratorStore, StoreSpec

    legacy, out = Path(legacy), Path(out)
    if out.exists():
        raise CheckpointError(f"{out} already exists; remove it or choose another output path")
    leg = _Legacy(load_legacy(legacy), legacy)
    raw = leg.raw
    user = _overrides_dict(overrides)
    notes: list[str] = []

    # -- architecture, from the tensors -----------------------------------------------------
    layouts: dict[str, str] = {}
    dims: dict[str, int] | None = None
    for key, roles in leg.entries.items():
        for role, (sd, _, src) in roles.items():
            lay = detect_layout(sd, src)
            want_disc = role == "discriminator"
            if (lay == "GANDiscriminator") != want_disc:
                raise CheckpointError(f"legacy key '{src}' holds a {lay}, which cannot be the {role}")
            prev = layouts.setdefault(role, lay)
            if prev != lay:
                raise CheckpointError(f"legacy key '{src}' is a {lay} but other generators in the file are {prev}")
            d = _shape_dims(lay, sd)
            if role == "generator":
                if dims is not None and dims != d:
                    raise CheckpointError(f"legacy key '{src}' has sizes {d}, other generators {dims}")
                dims = d
    assert dims is not None
    gtype = {"VAEGenerator": "vae", "ConditionedVAEGenerator": "cvae", "GANGenerator": "gan"}[layouts["generator"]]
    if gtype == "gan":
        if "discriminator" not in layouts:
            notes.append("legacy file has no discriminator; it starts from a fresh seeded initialisation")
        else:
            dd = _shape_dims("GANDiscriminator", leg.entries[next(iter(leg.entries))]["discriminator"][0])
            if dd["feature_dim"] != dims["feature_dim"] or dd["hidden_dim"] != dims["hidden_dim"]:
                raise CheckpointError(
                    "legacy key 'discriminator_clip_state_dict' has sizes "
                    f"{dd} that differ from the generator's {dims}; this project uses one hidden size per key"
                )
    legacy_type = raw.get("generator_type")
    if legacy_type is not None and legacy_type != ("gan" if gtype == "gan" else "vae"):
        raise CheckpointError(f"legacy key 'generator_type' says {legacy_type!r} but the tensors are a {layouts['generator']}")

    # -- classes, granularity, keys ---------------------------------------------------------
    prepared = _prepared(prepared_dir)
    keys = list(leg.entries)
    gran = raw.get("generator_granularity") or header_default(user, "generator.granularity")
    if keys == [None]:
        gran_eff = "unified" if gran in (None, "unified") else gran
        if gran_eff != "unified":
            raise CheckpointError(f"legacy key 'generator_granularity' is {gran!r} but 'generator_key' is missing")
    elif leg.kind == "client":
        gran_eff = gran
        if gran_eff not in ("per_class", "per_group"):
            raise CheckpointError("legacy key 'generator_key' is set but 'generator_granularity' is not per_class/per_group")
    else:
        gran_eff = gran
        if gran_eff is None:
            fed = raw.get("federated_classes")
            if fed and set(keys) <= set(map(str, fed)):
                gran_eff = "per_class"
            else:
                raise CheckpointError(
                    "legacy key 'generator_keys' does not say whether the keys are classes or groups; "
                    "pass generator.granularity=per_class or per_group (with generator.class_groups)"
                )
    classes, class_groups = _classes(leg, gran_eff, keys, prepared, user)

    # -- config -----------------------------------------------------------------------------
    cfgd: dict = {k: v for k, v in user.items()}
    _set(cfgd, "generator.type", gtype, user=user)
    _set(cfgd, "generator.granularity", gran_eff, user=user)
    _set(cfgd, "generator.latent_dim", int(dims["latent_dim"]), user=user)
    _set(cfgd, "generator.hidden_dim", int(dims["hidden_dim"]), user=user)
    if gtype == "gan":  # the published discriminator concatenates the condition; published update: simultaneous
        _set(cfgd, "generator.arch", "concat", user=user)
        _set(cfgd, "generator.gan.schedule", "simultaneous", user=user)
        _set(cfgd, "generator.gan.r1_gamma", 0.0, user=user)
    if class_groups is not None:
        cfgd.setdefault("generator", {})["class_groups"] = class_groups
    _set(cfgd, "federation.mode", "generator_only", user=user)
    if leg.kind != "client":
        _set(cfgd, "federation.sharing", "shared", user=user)

    # optimizer hyper-parameters: the generator's (first key's) legacy optimizer feeds the factory
    mapped: dict[tuple[str, str], tuple[dict, dict, dict | None, int]] = {}
    hyper_all: dict[tuple[str, str], dict] = {}
    if prepared is not None:
        conditions = prepared.conditions
        cdim = prepared.condition_dim
        _data_config_from_manifest(cfgd, prepared.manifest, str(prepared_dir), user)
    else:
        conditions, cdim = None, None
    if gtype == "cvae":
        if conditions is None:
            raise CheckpointError(
                "the legacy conditioned VAE was trained on class conditions that its checkpoint does not "
                "contain; pass --prepared DIR whose conditions match (condition_dim "
                f"{dims['cond_in']})"
            )
        if cdim != dims["cond_in"]:
            raise CheckpointError(f"--prepared conditions have condition_dim {cdim} but the legacy conditioned VAE expects {dims['cond_in']}")
    if conditions is None:
        conditions = torch.eye(len(classes), dtype=torch.float32)
        cdim = len(classes)
        _set(cfgd, "data.condition", "onehot", user=user)
        if gtype == "gan":
            notes.append("legacy GAN is unconditional: condition inputs were added with zero weights (one-hot conditions)")
    cond_pad = cdim if gtype == "gan" else 0

    for key, roles in leg.entries.items():
        for role, (sd, osd, src) in roles.items():
            lay = layouts[role]
            params = map_parameters(sd, lay, cond_pad, src)
            okey = _opt_key(leg, key, role)
            if osd is None:
                mapped[(key, role)] = (params, {}, None, 0)
                continue
            moments, hyper, step = map_optimizer(osd, sd, lay, cond_pad, src, okey)
            hyper_all[(key, role)] = hyper
            mapped[(key, role)] = (params, moments, hyper, step)
    if hyper_all:
        first = hyper_all.get((keys[0], "generator")) or next(iter(hyper_all.values()))
        for f, v in first.items():
            _set(cfgd, f"generator.optimizer.{f}", v, user=user)
    if any(m[2] is None for m in mapped.values()):
        notes.append("some generators had no optimizer state in the legacy file; their optimizers start fresh")

    try:
        cfg = load_config(cfgd)
        spec = StoreSpec.from_config(cfg, classes=classes, feature_dim=int(dims["feature_dim"]), condition_dim=int(cdim))
        store = GeneratorStore(spec, conditions)
    except ConfigError as e:
        raise CheckpointError(f"cannot build a store for the legacy checkpoint: {e}") from None
    tensors, meta = store.state_dict()

    # -- fill the store's state with the legacy tensors (every one accounted for) ------------
    new_t = {"conditions": tensors["conditions"]}
    for key in store.keys:
        legacy_key = _legacy_key_for(key, keys)
        for role in store.roles:
            kr = f"{key}/{role}"
            if (legacy_key, role) not in mapped:
                # only the GAN discriminator may be absent (noted above)
                for n, t in tensors.items():
                    if n.startswith(f"{kr}/param/"):
                        new_t[n] = t
                continue
            params, moments, hyper, step = mapped[(legacy_key, role)]
            want = {n[len(f"{kr}/param/"):]: t for n, t in tensors.items() if n.startswith(f"{kr}/param/")}
            src = leg.entries[legacy_key][role][2]
            if set(params) != set(want):
                raise CheckpointError(f"legacy key '{src}' maps to {sorted(params)} but {kr} has {sorted(want)}")
            for name, t in want.items():
                if tuple(params[name].shape) != tuple(t.shape):
                    raise CheckpointError(
                        f"legacy key '{src}' ({name}) has shape {list(params[name].shape)} but this project's "
                        f"{kr} needs {list(t.shape)}"
                    )
                new_t[f"{kr}/param/{name}"] = params[name]
                if step > 0:
                    for f in ("exp_avg", "exp_avg_sq", "step"):
                        new_t[f"{kr}/optim/{name}/{f}"] = moments[name][f]
            o = meta["optimizers"][kr]
            if hyper is not None:
                o.update({k: v for k, v in hyper.items() if k != "name"})
                if hyper["name"] != spec.optimizer.name:
                    raise CheckpointError(f"legacy key '{_opt_key(leg, legacy_key, role)}' is {hyper['name']} but the store uses {spec.optimizer.name}")
            o["step"] = step
    try:
        store.load_state_dict(new_t, meta)
    except Feda2vError as e:
        raise CheckpointError(f"legacy checkpoint does not fit this project's store: {e}") from None
    final_t, final_meta = store.state_dict()

    # -- write the federation checkpoint ----------------------------------------------------
    from omegaconf import OmegaConf

    seed = int(cfg.seed)
    rng_t = {  # the globals as seeded from cfg.seed (deterministic output, like a fresh run)
        PREFIX + TORCH: torch.Generator().manual_seed(seed).get_state(),
        PREFIX + NUMPY: _np_keys(seed),
        PREFIX + PYTHON: _py_state(seed),
    }
    rng_parts = {"numpy": {"kind": "MT19937", "pos": 624, "has_gauss": 0, "cached_gaussian": 0.0},
                 "python": {"version": 3, "gauss_next": None}}
    round_ = raw.get("round")
    round_ = int(round_) if isinstance(round_, int) and round_ >= 0 else 0
    header = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "round": round_,
        "node_cursor": 0,
        "stores": {"server": final_meta},
        "primary_store": "server",
        "classifier": None,
        "keys": list(final_meta["keys"]),
        "roles": list(final_meta["roles"]),
        "optimizers": {kr: {"step": o["step"], "lr": o["lr"], "weight_decay": o["weight_decay"]}
                       for kr, o in final_meta["optimizers"].items()},
        "data_manifest_hash": None if prepared is None else prepared.manifest_hash,
        "library_versions": library_versions(),
        "rng": rng_parts,
        "created_by": "feda2v-ckpt migrate",
        "migration": {
            "source_sha256": hashlib.sha256(legacy.read_bytes()).hexdigest(),
            "source_kind": leg.kind,
            "legacy_layouts": layouts,
            "legacy_keys": {k: _legacy_key_for(k, keys) for k in final_meta["keys"]},
            "legacy_metadata": leg.metadata,
            "notes": notes,
        },
    }
    all_t = {f"store/server/{n}": t for n, t in final_t.items()}
    all_t.update(rng_t)
    write_checkpoint(out, all_t, header)
    return header


def header_default(user: dict, dotted: str):
    from feda2v.checkpoint.container import header_get

    return header_get(user, dotted, default=None)


def _opt_key(leg: _Legacy, key: str | None, role: str) -> str:
    """The legacy key an optimizer state came from (for error messages)."""
    if leg.kind == "server-multi":
        return f"generator_optimizers.{key}"
    if role == "discriminator":
        return "discriminator_optimizer_state_dict"
    if leg.raw.get("generator_clip_state_dict") is not None and leg.raw.get("generator_optimizer_state_dict") is not None:
        return "generator_optimizer_state_dict"
    return "optimizer_state_dict"


def _legacy_key_for(store_key: str, legacy_keys: list) -> str | None:
    if store_key == "unified":
        return None
    return store_key.split("/", 1)[1]


def _classes(leg: _Legacy, gran: str, keys: list, prepared, user: dict):
    """The class list (and class groups) of the migrated store; never invents a generator."""
    raw = leg.raw
    if gran == "unified":
        if prepared is not None:
            return list(prepared.classes), None
        for k in ("federated_classes", "selected_classes", "generator_classes"):
            if raw.get(k):
                return [str(c) for c in raw[k]], None
        raise CheckpointError(
            "legacy checkpoint lists no classes (federated_classes/selected_classes); pass --prepared DIR"
        )
    if gran == "per_class":
        classes = [str(k) for k in keys]
        if prepared is not None:
            missing = [c for c in prepared.classes if c not in classes]
            if missing:
                raise CheckpointError(f"legacy checkpoint has no generator for class '{missing[0]}' of the prepared data; "
                                      "migrating it would leave that class untrained")
            unknown = [c for c in classes if c not in prepared.classes]
            if unknown:
                raise CheckpointError(f"legacy generator key '{unknown[0]}' is not a class of the prepared data")
            return list(prepared.classes), None
        return classes, None
    # per_group
    groups = header_default(user, "generator.class_groups")
    if groups is None and leg.kind == "client" and raw.get("generator_classes"):
        groups = {str(keys[0]): [str(c) for c in raw["generator_classes"]]}
    if not groups:
        raise CheckpointError(
            "legacy per_group checkpoint does not record its class groups; pass "
            "generator.class_groups={group: [classes], ...}"
        )
    groups = {str(g): [str(c) for c in cs] for g, cs in groups.items()}
    missing = [k for k in keys if k not in groups]
    if missing:
        raise CheckpointError(f"legacy generator key '{missing[0]}' is not a group in generator.class_groups")
    extra = [g for g in groups if g not in keys]
    if extra:
        raise CheckpointError(f"generator.class_groups group '{extra[0]}' has no generator in the legacy checkpoint")
    classes = [c for g in keys for c in groups[g]]
    if prepared is not None and sorted(classes) != sorted(prepared.classes):
        raise CheckpointError("generator.class_groups do not cover exactly the prepared data's classes")
    if prepared is not None:
        classes = list(prepared.classes)
    return classes, {g: groups[g] for g in keys}


def _data_config_from_manifest(cfgd: dict, manifest: Mapping[str, Any], prepared_dir: str, user: dict) -> None:
    """The data config the prepared dir was made with, so a migrated checkpoint can be resumed on it."""
    m = manifest
    pairs = [("data.prepared_dir", prepared_dir), ("data.name", m.get("source")), ("data.nodes", m.get("nodes")),
             ("data.test_fraction", m.get("test_fraction")), ("data.condition", m.get("condition")),
             ("data.max_samples", m.get("max_samples")), ("seed", m.get("seed"))]
    pairs += [(f"data.partition.{k}", v) for k, v in dict(m.get("partition") or {}).items()
              if k in ("scheme", "alpha", "classes_per_node")]
    for dotted, value in pairs:
        if value is not None:
            _set(cfgd, dotted, value, user=user)


def _np_keys(seed: int) -> torch.Tensor:
    import numpy as np

    keys = np.random.RandomState(seed).get_state(legacy=True)[1]
    return torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())


def _py_state(seed: int) -> torch.Tensor:
    import random

    return torch.tensor(list(random.Random(seed).getstate()[1]), dtype=torch.int64)


def library_versions() -> dict[str, str]:
    import platform

    import numpy
    import safetensors

    try:
        from importlib.metadata import version

        own = version("feda2v")
    except Exception:  # not installed as a distribution (e.g. running from a source tree)
        own = "unknown"
    return {"feda2v": own, "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}
