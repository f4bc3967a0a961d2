"""The run-state layout: what a federation checkpoint holds, packed and unpacked in this one place.

A federation checkpoint is one container (``container.py``) whose tensors are named
``store/<store name>/<store tensor>``, ``classifier/<param>`` and ``rng/<part>``, and whose header
records the state-determining config, the round, every store's meta (in an explicit order), the
primary store, the classifier's kwargs, the RNG JSON parts, the data-manifest hash and the library
versions. Nothing else writes these names or fields: training (``Checkpointer``), the federation
(``capture_federation`` / ``load_federation``), evaluate, the MLflow model and legacy migration
(``write_run_state``) all go through here.

This part sits below ``federation/``: the federation object is duck-typed (``.stores``,
``.classifier``, ``.round``, ``.primary_store``).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from feda2v.checkpoint import provenance as prov
from feda2v.checkpoint.container import FORMAT_VERSION, RESERVED, read_checkpoint, write_checkpoint
from feda2v.checkpoint.manager import CheckpointManager
from feda2v.checkpoint.rng import capture_rng, restore_rng
from feda2v.errors import CheckpointError

STORE_PREFIX = "store/"
# Header field of a node-resident run (Flower, sharing local/fedavg): node -> the round its own
# checkpoint holds (0: never trained). checkpoint/nodestate.py writes those node checkpoints.
NODE_ROUNDS = "node_rounds"
CLASSIFIER_PREFIX = "classifier/"
RNG_PREFIX = "rng/"

# Config that says how a run is operated, not what state it trains: kept out of the checkpoint
# (it lives in the provenance sidecar), so the same state gives the same bytes.
OPERATIONAL = ("checkpoint", "train", "tracking", "profiler", "evaluate", "federation.engine",
               "federation.flower", "data.prepared_dir", "data.instruments.cache_dir", "data.site_bundles_dir")
# Config that may differ between a checkpoint and the run resuming it (format 1 files still carry
# the operational keys, so they are skipped as well).
RESUME_FREE = OPERATIONAL + ("federation.rounds",)
GAN_ONLY = "generator.gan"  # the GAN's schedule and objective: state-determining for generator.type=gan only
# Header fields this module writes; RunState.extra may not use them.
LAYOUT_FIELDS = ("config", "round", "stores", "store_order", "primary_store", "classifier", "keys",
                 "roles", "optimizers", "data_manifest_hash", "library_versions", "rng")


@dataclass
class RunState:
    """Everything a federation checkpoint holds, unpacked."""

    config: dict  # the state-determining config (state_config(cfg))
    round: int  # rounds completed
    stores: dict[str, tuple[dict[str, torch.Tensor], dict]]  # name -> (store tensors, store meta), in order
    # None only where the server holds no store (sharing=local on Flower: every store lives on its
    # node; ``extra["node_rounds"]`` then says which round each node's own checkpoint must be)
    primary_store: str | None
    classifier: tuple[dict[str, torch.Tensor], dict] | None = None  # (state_dict, kwargs)
    rng: tuple[dict[str, torch.Tensor], dict] | None = None  # capture_rng()'s (tensors, json parts)
    data_manifest_hash: str | None = None
    extra: dict = field(default_factory=dict)  # other top-level header fields, e.g. {"migration": {...}}
    format_version: int = FORMAT_VERSION  # as read; pack always writes the current version
    library_versions: dict | None = None  # as read; pack records this process's

    def primary(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.stores[self.primary_store]


def library_versions() -> dict:
    """The library versions recorded in every checkpoint (one source: installed metadata), and
    ``cpu``: the CPU code paths torch, numpy and OpenBLAS computed with (numerics.numeric_facts;
    the same on every machine where the pins hold, so the bytes stay machine-independent)."""
    import numpy
    import safetensors

    import feda2v
    from feda2v.numerics import numeric_facts

    # the thread count is how the run was operated (train.threads, in the provenance sidecar),
    # not a code path: runs with other thread counts train the same bytes (issue 13)
    cpu = {k: v for k, v in numeric_facts().items() if k != "torch_threads"}
    return {"feda2v": feda2v.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version(), "cpu": cpu}


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.get(p)
        if not isinstance(node, dict):
            return
    node.pop(leaf, None)


def state_config(cfg) -> dict:
    """The config recorded in checkpoints: resolved, minus the operational sections."""
    from omegaconf import OmegaConf

    from feda2v.config import to_plain

    plain = to_plain(cfg) if OmegaConf.is_config(cfg) else _deep_copy(cfg)
    for dotted in OPERATIONAL:
        _drop(plain, dotted)
    # a null that means the type's default is recorded as the value it resolves to, so a
    # checkpoint written before the key existed (or before its default became the type's:
    # hidden_dim was 128) resumes where null means that too, and is refused, naming it, elsewhere;
    # the lr schedule's horizon likewise (null: federation.rounds, which alone stays resume-free)
    from feda2v.store.spec import resolve_run_config

    return resolve_run_config(plain)


def operational_config(cfg) -> dict:
    """The operational part of ``cfg`` (what ``state_config`` leaves out), for the sidecar."""
    from feda2v.config import flatten_dotted, to_plain

    return {k: v for k, v in flatten_dotted(to_plain(cfg)).items() if _free(k, OPERATIONAL)}


def _deep_copy(tree: Mapping) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _free(name: str, fields: tuple[str, ...]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in fields)


# -------------------------------------------------------------------------------- pack / unpack


def _prefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def _strip(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def pack_run_state(state: RunState) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, header)`` of a federation checkpoint; deterministic for equal states."""
    if not state.stores and NODE_ROUNDS not in state.extra:
        raise CheckpointError("a federation checkpoint needs at least one generator store")
    if state.stores and state.primary_store not in state.stores:
        raise CheckpointError(f"primary store '{state.primary_store}' is not one of the stores "
                              f"{list(state.stores)}")
    clash = [k for k in state.extra if k in LAYOUT_FIELDS or k in RESERVED]
    if clash:
        raise CheckpointError(f"run-state extra field(s) {clash} clash with the checkpoint layout")
    tensors: dict[str, torch.Tensor] = {}
    metas: dict[str, dict] = {}
    for name, (st, meta) in state.stores.items():
        tensors.update(_prefixed(f"{STORE_PREFIX}{name}/", st))
        metas[name] = meta
    classifier_kwargs = None
    if state.classifier is not None:
        sd, classifier_kwargs = state.classifier
        tensors.update(_prefixed(CLASSIFIER_PREFIX, sd))
        classifier_kwargs = dict(classifier_kwargs)
    rng_json = None
    if state.rng is not None:
        rng_t, rng_json = state.rng
        tensors.update(_prefixed(RNG_PREFIX, rng_t))
    primary = metas.get(state.primary_store) or {}
    header = {
        "config": state.config,
        "round": int(state.round),
        "stores": metas,
        "store_order": list(state.stores),  # JSON objects are written with sorted keys
        "primary_store": state.primary_store,
        "classifier": classifier_kwargs,
        # a summary of the primary store, for inspect and humans (unpack reads the store meta)
        "keys": list(primary.get("keys") or []),
        "roles": list(primary.get("roles") or []),
        "optimizers": {kr: {"step": o["step"], "lr": o["lr"], "weight_decay": o["weight_decay"]}
                       for kr, o in (primary.get("optimizers") or {}).items()},
        "data_manifest_hash": state.data_manifest_hash,
        "library_versions": library_versions(),
        "rng": rng_json,
        **state.extra,
    }
    return tensors, header


def _store_order(header: Mapping[str, Any], stores: Mapping[str, Any], source: str) -> list[str]:
    order = header.get("store_order")
    if order is None:  # format 1: the server's store first, then the nodes' in name order
        return sorted(stores, key=lambda n: (n != "server", n))
    if not isinstance(order, list) or sorted(order) != sorted(stores):
        raise CheckpointError(f"{source} is corrupt: its store_order {order!r} does not name its stores "
                              f"{sorted(stores)}")
    return list(order)


def unpack_run_state(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any], *,
                     source: str | os.PathLike) -> RunState:
    """A RunState from a verified container's ``(tensors, header)``; CheckpointError naming
    ``source`` when it is not a federation checkpoint."""
    source = str(source)
    stores_meta = header.get("stores")
    if stores_meta == {} and isinstance(header.get(NODE_ROUNDS), Mapping):
        pass  # every store lives on its node (see RunState.primary_store)
    elif not isinstance(stores_meta, Mapping) or not stores_meta:
        raise CheckpointError(f"checkpoint {source} holds no generator store; is it a federation "
                              "checkpoint (written by feda2v-train or feda2v-ckpt migrate)?")
    order = _store_order(header, stores_meta, source)
    stores: dict[str, tuple[dict, dict]] = {}
    for name in order:
        meta = stores_meta[name]
        own = _strip(f"{STORE_PREFIX}{name}/", tensors)
        if not isinstance(meta, Mapping) or not own:
            raise CheckpointError(f"checkpoint {source} is incomplete: store '{name}' has no "
                                  f"{'meta' if not isinstance(meta, Mapping) else 'tensors'}")
        stores[name] = (own, dict(meta))
    primary = header.get("primary_store") or (order[0] if order else None)
    if stores and primary not in stores:
        raise CheckpointError(f"checkpoint {source}: primary store '{primary}' is not one of its "
                              f"stores {order}")
    classifier = None
    if header.get("classifier") is not None:
        sd = _strip(CLASSIFIER_PREFIX, tensors)
        if not sd:
            raise CheckpointError(f"checkpoint {source} names a classifier but holds no classifier tensors")
        classifier = (sd, dict(header["classifier"]))
    rng = None
    if header.get("rng") is not None:
        rng = (_strip(RNG_PREFIX, tensors), dict(header["rng"]))
    round_ = header.get("round")
    if type(round_) is not int or round_ < 0:
        raise CheckpointError(f"checkpoint {source} has no valid round (got {round_!r})")
    known = set(LAYOUT_FIELDS) | set(RESERVED) | {"provenance", "node_cursor", "created_by"}
    return RunState(
        config=dict(header.get("config") or {}), round=round_, stores=stores, primary_store=primary,
        classifier=classifier, rng=rng, data_manifest_hash=header.get("data_manifest_hash"),
        extra={k: v for k, v in header.items() if k not in known},
        format_version=int(header.get("format_version", FORMAT_VERSION)),
        library_versions=header.get("library_versions"),
    )


def write_run_state(path: str | os.PathLike, state: RunState, *,
                    provenance: Mapping[str, Any] | None = None) -> dict:
    """Write ``state`` atomically to ``path``; ``provenance`` (who wrote it: MLflow run, engine,
    host, operational config) goes to the sidecar beside it, never into the file. Returns the header."""
    tensors, header = pack_run_state(state)
    full = write_checkpoint(path, tensors, header)
    if provenance:
        prov.record(Path(path), full["header_sha256"], provenance)
    return full


def read_run_state(path: str | os.PathLike) -> RunState:
    """Read and verify a federation checkpoint (format 1 or 2)."""
    tensors, header = read_checkpoint(path)
    return unpack_run_state(tensors, header, source=path)


def read_primary_store(path: str | os.PathLike, store: str | None = None
                       ) -> tuple[str, dict[str, torch.Tensor], dict, dict]:
    """``(name, store tensors, store meta, header)`` of the primary store (or ``store``)."""
    tensors, header = read_checkpoint(path)
    state = unpack_run_state(tensors, header, source=path)
    name = store or state.primary_store
    if name is None:
        raise CheckpointError(f"checkpoint {path} holds no generator store: every node's store lives on its "
                              "node (node-resident run); read a node's own checkpoint instead "
                              "(<federation.flower.node_state_dir>/node_NNN/latest.ckpt)")
    if name not in state.stores:
        raise CheckpointError(f"checkpoint {path} has no store '{name}'; it has: {', '.join(state.stores)}")
    st, meta = state.stores[name]
    return name, st, meta, header


# -------------------------------------------------------------------------------- resume check


# State-determining config keys added after checkpoints existed: the value a checkpoint written
# before the key ran with (so it resumes with that value set, and is refused, naming it, otherwise).
ADDED_CONFIG_KEYS: dict[str, Any] = {
    "generator.output_variance": False,  # VAE stores sampled the decoder mean (models/generators.py)
    "generator.conditional_prior": False,  # cVAE stores had the N(0, I) prior (models/generators.py)
    "generator.ema_decay": 0.0,  # stores sampled their trained weights (store/store.py)
    "generator.film": False,  # generating networks saw the condition in their input only (models/generators.py)
    "generator.optimizer.schedule": "constant",  # every round stepped at the configured lr (store/optim.py)
    "generator.optimizer.decay_rounds": None,  # ... so there was no horizon
}
# Recorded keys whose value state_config derives from others (a null resolved by generator.type):
# compared last, so a refusal names the key the user changed, not its consequence.
# (store/spec.py TYPE_DEFAULT_KEYS, spelled out here: checkpoint imports store only inside functions;
# a test holds the two equal)
DERIVED_CONFIG_KEYS = ("generator.conditional_prior", "generator.hidden_dim", "generator.ema_decay",
                       "generator.film")


def check_resumable(config: Mapping[str, Any], state: RunState, manifest_hash: str | None,
                    source: str | os.PathLike) -> None:
    """Refuse (CheckpointError, one line naming the first differing key) a checkpoint that this
    run's state config or prepared data cannot continue."""
    from feda2v.config import flatten_dotted

    if state.data_manifest_hash != manifest_hash:
        raise CheckpointError(f"{source} was trained on other prepared data (manifest hash differs); "
                              "re-run prepare with that checkpoint's data config or start without resume")
    mine, theirs = flatten_dotted(dict(config)), flatten_dotted(state.config)
    for name, value in ADDED_CONFIG_KEYS.items():  # a config older than the key ran with this value
        theirs.setdefault(name, value)
        mine.setdefault(name, value)
    for flat in (mine, theirs):  # a config recorded unresolved (a format-1 header: the whole config)
        nulls = [name for name in DERIVED_CONFIG_KEYS if name in flat and flat[name] is None]
        if nulls:
            from feda2v.store.spec import resolve_generator_defaults

            gen = resolve_generator_defaults({"type": flat.get("generator.type"),
                                              "arch": flat.get("generator.arch", "default"),
                                              "granularity": flat.get("generator.granularity", "unified"),
                                              **{name.split(".", 1)[1]: None for name in nulls}})
            flat.update({name: gen[name.split(".", 1)[1]] for name in nulls})
        if flat.get("generator.optimizer.schedule") is None:
            from feda2v.store.spec import resolve_decay_rounds, resolve_lr_schedule

            schedule = resolve_lr_schedule(None, str(flat.get("generator.type")), flat.get("generator.arch", "default"),
                                           flat.get("generator.granularity", "unified"))
            flat["generator.optimizer.schedule"] = schedule
            flat["generator.optimizer.decay_rounds"] = resolve_decay_rounds(
                schedule, flat.get("generator.optimizer.decay_rounds"), flat.get("federation.rounds", 1))
    # generator.gan.* trains nothing but a GAN: a cVAE run resumes whatever the GAN defaults became
    # (a differing generator.type is still refused, naming that key)
    free = RESUME_FREE if mine.get("generator.type") == theirs.get("generator.type") == "gan" else \
        RESUME_FREE + (GAN_ONLY,)
    # the type defaults after what they follow (the type, the granularity), the schedule's horizon
    # after the schedule
    order = {**{n: 1 for n in (*DERIVED_CONFIG_KEYS, "generator.optimizer.schedule")},
             "generator.optimizer.decay_rounds": 2}
    for name in sorted(set(mine) | set(theirs), key=lambda n: (order.get(n, 0), n)):
        if _free(name, free):
            continue
        if mine.get(name) != theirs.get(name):
            raise CheckpointError(f"{source} belongs to another config: {name} is "
                                  f"{theirs.get(name)!r} there, {mine.get(name)!r} here")


# -------------------------------------------------------------------------------- the federation


def capture_federation(federation, *, config: dict, data_manifest_hash: str | None,
                       with_rng: bool = True) -> RunState:
    """The federation's full state (duck-typed: ``.stores``, ``.classifier``, ``.round``,
    ``.primary_store``) plus, by default, the global RNG streams."""
    stores = {name: store.state_dict() for name, store in federation.stores.items()}
    classifier = None
    if federation.classifier is not None:
        classifier = (dict(federation.classifier.state_dict()), dict(federation.classifier.kwargs))
    # rounds that went on without a lost node (Flower, on_node_failure=skip): absent when none
    missing = getattr(federation, "missing", None)
    extra = {"missing_nodes": {str(r): list(n) for r, n in sorted(missing.items())}} if missing else {}
    if getattr(federation, "node_resident", False):  # the round each node's own checkpoint must be
        extra[NODE_ROUNDS] = {n: int(r) for n, r in sorted(federation.node_rounds.items())}
    return RunState(config=config, round=int(federation.round), stores=stores,
                    primary_store=federation.primary_store, classifier=classifier,
                    rng=capture_rng() if with_rng else None, data_manifest_hash=data_manifest_hash,
                    extra=extra)


def load_federation(federation, state: RunState, *, restore_globals: bool = True) -> None:
    """Load ``state`` into ``federation`` in place (and the global RNG streams, if saved)."""
    have, want = set(state.stores), set(federation.stores)
    resident, holds_rounds = bool(getattr(federation, "node_resident", False)), NODE_ROUNDS in state.extra
    if resident != holds_rounds:
        raise CheckpointError(
            "checkpoint and run disagree on where the node stores live: "
            + ("this run keeps them on the nodes (federation.engine=flower) but the checkpoint holds them "
               "(written in-process); resume it with federation.engine=inprocess" if resident else
               "the checkpoint's node stores live on the Flower nodes (node_rounds); resume it with "
               "federation.engine=flower"))
    if have != want:
        raise CheckpointError(f"checkpoint holds stores {sorted(have)} but this config needs "
                              f"{sorted(want)} (federation.sharing or data.nodes differ)")
    if (state.classifier is None) != (federation.classifier is None):
        raise CheckpointError("checkpoint and config disagree on the node classifier "
                              "(federation.mode differs)")
    for name, store in federation.stores.items():
        st, meta = state.stores[name]
        store.load_state_dict(st, meta)
    if federation.classifier is not None:
        try:
            federation.classifier.load_state_dict(state.classifier[0], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"classifier state does not fit: {str(e).splitlines()[0]}") from None
    federation.round = state.round
    if resident:
        rounds = state.extra[NODE_ROUNDS]
        if sorted(rounds) != sorted(federation.node_rounds):
            raise CheckpointError(f"checkpoint records node states of {sorted(rounds)} but this config has "
                                  f"nodes {sorted(federation.node_rounds)} (data.nodes differs)")
        federation.node_rounds = {n: int(r) for n, r in rounds.items()}
    if hasattr(federation, "missing"):
        federation.missing = {int(r): list(n) for r, n in (state.extra.get("missing_nodes") or {}).items()}
    if restore_globals and state.rng is not None:
        restore_rng(*state.rng)


class Checkpointer:
    """One training run's checkpoints (torchtitan's named-states manager, for a federation):
    ``save(round, federation)`` writes the round file, points ``latest`` at it, prunes and records
    provenance in the sidecar; ``restore(path, federation)`` checks and loads a checkpoint."""

    def __init__(self, cfg, manifest_hash: str | None):
        self.config = state_config(cfg)
        self.operational = operational_config(cfg)
        self.manifest_hash = manifest_hash
        self.every = int(cfg.checkpoint.every)
        self.manager = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last)
        self._replaces: tuple[Path, ...] = ()  # another run's files, deleted after our first save

    def existing(self) -> list[Path]:
        """Checkpoint files already in the directory (round files, then ``latest``)."""
        found = [p for _, p in self.manager.round_files()]
        return found + ([self.latest_path] if self.latest_path.is_file() else [])

    def start_over(self) -> list[Path]:
        """Replace the checkpoints in the directory: nothing is deleted now; they go once this
        run's first checkpoint is complete and ``latest`` names it. Returns them."""
        self._replaces = tuple(self.existing())
        return list(self._replaces)

    @property
    def latest_path(self) -> Path:
        return self.manager.latest_path

    def due(self, round_: int, last_round: int) -> bool:
        return round_ % self.every == 0 or round_ == last_round

    def save(self, round_: int, federation, provenance: Mapping[str, Any] | None = None) -> Path:
        state = capture_federation(federation, config=self.config, data_manifest_hash=self.manifest_hash)
        if state.round != round_:
            raise CheckpointError(f"the federation has completed round {state.round}, not {round_}")
        tensors, header = pack_run_state(state)
        path, full = self.manager.save_with_header(round_, tensors, header, replaces=self._replaces)
        self._replaces = ()
        prov.record(path, full["header_sha256"], {**(provenance or {}), "operational": self.operational})
        return path

    def resolve(self, resume: str | os.PathLike) -> Path:
        return self.manager.resolve(resume)

    @property
    def sidecar(self) -> Path:
        return self.manager.dir / prov.SIDECAR

    def restore(self, resume: str | os.PathLike, federation) -> tuple[Path, RunState]:
        """Resolve ``resume`` (``latest``, a directory or a file), check that this run can continue
        it, and load it into ``federation`` and the global RNG streams; returns (path, state)."""
        path = self.resolve(resume)
        state = read_run_state(path)
        check_resumable(self.config, state, self.manifest_hash, path)
        load_federation(federation, state)
        return path, state
