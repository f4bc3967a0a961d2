"""Step 1 of a migration: read the published system's ``torch.save`` dicts into modules.

Layouts (lucapalazzo/fedgfe: the server's ``save_generator_checkpoint``, the client's
``_save_single_generator_checkpoint``):
- server unified VAE: ``generator_state_dict``, ``optimizer_state_dict`` (may be None);
- server unified GAN: ``generator_clip_state_dict``, ``discriminator_clip_state_dict``,
  ``generator_optimizer_state_dict``, ``discriminator_optimizer_state_dict`` (the T5 twins must be
  None: this project has no T5 embeddings);
- server per-key: ``prompt_generators`` {key: state_dict}, ``generator_optimizers`` {key: optimizer
  state} (or None), ``generator_keys``. The server registers one generator object under several
  keys (a unified generator under every class, a group's generator under each of its classes);
  ``torch.save`` keeps such tensors as one storage, which is how a *module* here is found: the
  legacy keys whose state dicts share storage are one module;
- client: one generator per file (``generator_key`` None = unified, else a class or group) with
  ``generator_state_dict`` (+ ``optimizer_state_dict`` when written) or, for GAN,
  ``generator_clip_state_dict`` only.

Files are opened only with ``torch.load(weights_only=True)``: a file needing arbitrary objects is
refused before anything in it runs.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from feda2v.errors import CheckpointError

GENERATOR, DISCRIMINATOR = "generator", "discriminator"

# Top-level metadata the published system writes; kept (JSON-able) in the migration record.
METADATA_KEYS = frozenset({
    "checkpoint_type", "is_global", "round", "timestamp", "generator_type", "diffusion_type",
    "generator_training_epochs", "synthetic_samples_per_class", "num_clients", "client_metadata",
    "federated_datasets", "federated_classes", "audio_model_name", "img_pipe_name",
    "global_model_train", "global_model_train_from_nodes_adapters", "use_conditioned_vae",
    "sequence_length", "generator_keys", "num_generators", "client_id", "node_id",
    "generator_granularity", "generator_key", "class_name", "group_name", "generator_classes",
    "dataset_name", "selected_classes", "train_folds", "test_folds", "num_train_samples",
    "num_test_samples", "visual_dim",
})
STATE_KEYS = frozenset({
    "generator_state_dict", "optimizer_state_dict", "prompt_generators", "generator_optimizers",
    "generator_clip_state_dict", "generator_t5_state_dict", "discriminator_clip_state_dict",
    "discriminator_t5_state_dict", "generator_optimizer_state_dict", "discriminator_optimizer_state_dict",
})
# Metadata that must agree between files merged into one store (else they are other runs).
RUN_FIELDS = ("generator_type", "generator_granularity", "diffusion_type", "use_conditioned_vae",
              "sequence_length", "visual_dim", "dataset_name", "audio_model_name", "img_pipe_name", "round")


@dataclass
class Part:
    """One role's module state as the legacy file holds it."""

    state: dict[str, torch.Tensor]
    optim: Mapping | None
    src: str  # where the state dict is, e.g. "prompt_generators.piano" (in error messages)
    optim_src: str | None  # where the optimizer state is


@dataclass
class Module:
    """One generator (with its discriminator for a GAN): ``names`` are the legacy keys it was saved
    under (several: one shared object; empty: the file's unified generator)."""

    names: tuple[str, ...]
    roles: dict[str, Part]
    path: Path

    def label(self) -> str:
        return f"'{self.path.name}'" + (f" key '{self.names[0]}'" if len(self.names) == 1 else "")


@dataclass
class LegacyFile:
    path: Path
    raw: dict
    kind: str  # "server" | "client"
    modules: list[Module]
    free_optimizers: dict[str, tuple[Mapping, str]] = field(default_factory=dict)  # server: by a non-module key
    sha256: str = ""

    @property
    def metadata(self) -> dict:
        return {k: _jsonable(v, k) for k, v in self.raw.items() if k not in STATE_KEYS}


def load_legacy(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)``; refuses files that need arbitrary objects (before they run)."""
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
    return {str(n): t for n, t in d.items()}


def _storage_fingerprint(sd: Mapping[str, torch.Tensor]) -> tuple:
    """Equal for state dicts of one module object saved under several keys (shared storages)."""
    return tuple((n, t.untyped_storage().data_ptr(), t.storage_offset()) for n, t in sorted(sd.items()))


def read_legacy(path: str | os.PathLike) -> LegacyFile:
    """Read one published-system file into its modules; every tensor in it is accounted for."""
    path = Path(path)
    raw = load_legacy(path)
    for k in raw:
        if k not in METADATA_KEYS and k not in STATE_KEYS and _is_tensor_tree(raw[k]):
            raise CheckpointError(f"legacy key '{k}' holds tensors this migration does not know how to map")
    for k in ("generator_t5_state_dict", "discriminator_t5_state_dict"):
        if raw.get(k) is not None:
            raise CheckpointError(f"legacy key '{k}' holds a T5-conditioned model, which this project has no "
                                  "T5 embeddings for; it cannot be migrated")
    kind = "client" if ("node_id" in raw or "client_id" in raw) else "server"
    used: set[str] = set()
    if raw.get("prompt_generators") is not None:
        modules, free = _prompt_generators(raw, path, used)
    else:
        modules, free = [_single(raw, path, used)], {}
    leftover = sorted(k for k in STATE_KEYS if raw.get(k) is not None and k not in used)
    if leftover:  # e.g. an optimizer_state_dict next to prompt_generators: never drop it silently
        raise CheckpointError(f"legacy key '{leftover[0]}' does not belong with the rest of {path.name}; "
                              "cannot tell where it maps")
    f = LegacyFile(path, raw, kind, modules, free, hashlib.sha256(path.read_bytes()).hexdigest())
    f.metadata  # noqa: B018 - refuse non-JSON metadata now, before anything is built
    return f


def _prompt_generators(raw: dict, path: Path, used: set[str]) -> tuple[list[Module], dict]:
    for k in ("generator_state_dict", "generator_clip_state_dict"):
        if raw.get(k) is not None:
            raise CheckpointError(f"legacy file has both 'prompt_generators' and '{k}'; cannot tell which to migrate")
    gens = raw["prompt_generators"]
    if not isinstance(gens, Mapping) or not gens:
        raise CheckpointError("legacy key 'prompt_generators' is not a non-empty {key: state_dict} map")
    opts = raw.get("generator_optimizers") or {}
    if not isinstance(opts, Mapping):
        raise CheckpointError("legacy key 'generator_optimizers' is not a {key: optimizer state} map")
    keys = raw.get("generator_keys")
    if keys is not None and sorted(map(str, keys)) != sorted(map(str, gens)):
        raise CheckpointError("legacy key 'generator_keys' does not list the same keys as 'prompt_generators'")
    used |= {"prompt_generators", "generator_optimizers"}
    by_object: dict[tuple, list[str]] = {}
    states: dict[str, dict] = {}
    for k, sd in gens.items():
        states[str(k)] = _state_dict(sd, f"prompt_generators.{k}")
        by_object.setdefault(_storage_fingerprint(states[str(k)]), []).append(str(k))
    opts = {str(k): v for k, v in opts.items()}
    modules = []
    for names in by_object.values():
        with_opt = [n for n in names if n in opts]
        if len(with_opt) > 1:
            raise CheckpointError(f"legacy keys 'generator_optimizers.{with_opt[0]}' and "
                                  f"'generator_optimizers.{with_opt[1]}' are two optimizers of one shared "
                                  "generator; cannot tell which holds its state")
        osrc = f"generator_optimizers.{with_opt[0]}" if with_opt else None
        part = Part(states[names[0]], opts[with_opt[0]] if with_opt else None, f"prompt_generators.{names[0]}", osrc)
        modules.append(Module(tuple(names), {GENERATOR: part}, path))
    free = {k: (v, f"generator_optimizers.{k}") for k, v in opts.items() if k not in states}
    return modules, free


def _single(raw: dict, path: Path, used: set[str]) -> Module:
    has = lambda k: raw.get(k) is not None  # noqa: E731
    key = raw.get("generator_key")
    names = () if key is None else (str(key),)
    if has("generator_state_dict"):
        if has("generator_clip_state_dict"):
            raise CheckpointError("legacy file has both 'generator_state_dict' and 'generator_clip_state_dict'")
        used |= {"generator_state_dict", "optimizer_state_dict"}
        part = Part(_state_dict(raw["generator_state_dict"], "generator_state_dict"), raw.get("optimizer_state_dict"),
                    "generator_state_dict", "optimizer_state_dict" if has("optimizer_state_dict") else None)
        return Module(names, {GENERATOR: part}, path)
    if has("generator_clip_state_dict"):
        if has("generator_optimizer_state_dict") and has("optimizer_state_dict"):
            raise CheckpointError("legacy file has both 'generator_optimizer_state_dict' and 'optimizer_state_dict'")
        gopt = "generator_optimizer_state_dict" if has("generator_optimizer_state_dict") else "optimizer_state_dict"
        used |= {"generator_clip_state_dict", gopt, "discriminator_clip_state_dict",
                 "discriminator_optimizer_state_dict"}
        roles = {GENERATOR: Part(_state_dict(raw["generator_clip_state_dict"], "generator_clip_state_dict"),
                                 raw.get(gopt), "generator_clip_state_dict", gopt if has(gopt) else None)}
        if has("discriminator_clip_state_dict"):
            dopt = "discriminator_optimizer_state_dict"
            roles[DISCRIMINATOR] = Part(_state_dict(raw["discriminator_clip_state_dict"], "discriminator_clip_state_dict"),
                                        raw.get(dopt), "discriminator_clip_state_dict", dopt if has(dopt) else None)
        elif has("discriminator_optimizer_state_dict"):
            raise CheckpointError("legacy key 'discriminator_optimizer_state_dict' has no 'discriminator_clip_state_dict'")
        return Module(names, roles, path)
    for k in ("optimizer_state_dict", "generator_optimizer_state_dict", "generator_optimizers"):
        if has(k):
            raise CheckpointError(f"legacy key '{k}' holds optimizer state but the file has no generator to attach it to")
    raise CheckpointError(
        f"{path} has no generator state (none of generator_state_dict, prompt_generators, "
        "generator_clip_state_dict); it is not a published-system generator checkpoint"
    )


@dataclass
class LegacyRun:
    """The modules of one or more files of one published run, to become one store."""

    files: list[LegacyFile]
    modules: list[Module]
    free_optimizers: dict[str, tuple[Mapping, str]]
    kind: str

    def get(self, key: str, default: Any = None) -> Any:
        """Run-wide metadata (the first file's; merged files agree on RUN_FIELDS)."""
        return self.files[0].raw.get(key, default)

    def per_file(self, key: str) -> list[Any]:
        return [f.raw.get(key) for f in self.files]

    def names(self) -> str:
        return ", ".join(f"'{f.path.name}'" for f in self.files)


def merge_files(files: list[LegacyFile]) -> LegacyRun:
    """Several client files (one generator each, per class or group) as one run of modules.

    Two files for one key, a unified file among several, a server file among several, and files
    whose run metadata differ (other runs, or other rounds) are errors naming both files."""
    if len(files) == 1:
        f = files[0]
        return LegacyRun([f], list(f.modules), dict(f.free_optimizers), f.kind)
    files = sorted(files, key=lambda f: (f.path.name, str(f.path)))  # the result does not depend on argv order
    first = files[0]
    seen: dict[str, LegacyFile] = {}
    for f in files:
        if f.kind != "client":
            raise CheckpointError(f"'{f.path.name}' is a server checkpoint; only client files (one generator "
                                  "each) can be merged; migrate a server file on its own")
        for m in f.modules:
            if not m.names:
                other = files[1] if f is first else first
                raise CheckpointError(f"'{f.path.name}' holds a unified generator; it cannot be merged with "
                                      f"'{other.path.name}' (a store has one unified key)")
        for fld in RUN_FIELDS:
            if f.raw.get(fld) != first.raw.get(fld):
                raise CheckpointError(f"'{first.path.name}' and '{f.path.name}' are from different runs or rounds "
                                      f"({fld} {first.raw.get(fld)!r} vs {f.raw.get(fld)!r}); merge files of one run")
        for m in f.modules:
            for n in m.names:
                if n in seen:
                    raise CheckpointError(f"'{seen[n].path.name}' and '{f.path.name}' both hold generator key '{n}'; "
                                          "pass one file per key")
                seen[n] = f
    modules = sorted((m for f in files for m in f.modules), key=lambda m: m.names)
    return LegacyRun(list(files), modules, {}, "client")
