"""Flower (Message API) side of ``federation.engine=flower``: the ClientApp, the wire format and the
server's round driver. Flower 1.42: ``flwr.clientapp.ClientApp``, ``flwr.serverapp.Grid``,
``flwr.app.{Message,RecordDict,ArrayRecord,ConfigRecord}``.

What travels: for every node visit the server sends the **slice** of the store the node trains
(``server`` in shared relay; the node's own store in local/fedavg) that holds only the keys of the
classes in that node's partition (per the manifest's counts), parameters and optimizer state, as one
feda2v checkpoint container (integrity-checked on receipt), plus a small JSON task. The ClientApp
fills the slice into a fresh store of the same spec, runs the very same ``train_generators`` with the
same derived seeds, and replies with the trained slice and its NodeResult. The server validates the
reply (the node, its keys only, its samples per key) and merges it into the Federation's store in
place, so checkpoints, logging and resume stay on the server, bit-identical to the in-process engine.

Node-resident stores (``federation.sharing`` local and fedavg): each node's store, generator and
AdamW moments, lives on its node and is checkpointed there after every visit
(``checkpoint/nodestate.py``: ``<state dir>/node_NNN/round_RRRRRR.ckpt``; the state dir is the
SuperNode's node config ``state-dir``, else ``federation.flower.node_state_dir``, else
``<checkpoint.dir>/nodes``), in the run's folder ``run-<hash of the server's checkpoint.dir>``.
A visit's task names the round of the node's state the server's
records expect (``from_round``; 0 = a fresh store); the node loads exactly that file, or refuses in
one line (the run stops, whatever the failure policy). fedavg messages carry the global parameters
of the visit's keys out and the trained parameters back, never optimizer state; local messages
carry no store state at all, only the task and the results. The server's checkpoint records
``node_rounds``; see ``nodestate.py`` for what a node keeps so that a server crash is recoverable.

Data locality: a node reads only its own partition (``data/sites.py:load_partition``) from the
directory named by its node config ``data-dir`` (a site bundle or a prepared dir), else from the
server's ``data.prepared_dir`` path (simulation, one machine).

A lost node (no reply within ``federation.flower.reply_timeout_s``, or an error reply) is handled by
``federation.flower.on_node_failure``: ``fail`` stops the run with one line; ``skip`` finishes the
round without it (``Federation.missing`` records who); ``wait`` re-sends the visit to whichever node
then serves that partition (a restarted SuperNode rejoins by its partition-id), ``retries`` times.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Callable, Optional

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from feda2v.checkpoint.container import checkpoint_bytes, read_checkpoint_bytes
from feda2v.errors import ConfigError, DataError, Feda2vError

log = logging.getLogger("feda2v.flower")

MSG_TRAIN = "train.generators"  # ClientApp @app.train("generators")
MSG_QUERY = "query.partition"  # ClientApp @app.query("partition")
MSG_CLASSIFIER = "train.classifier"  # ClientApp @app.train("classifier") (full mode)
WIRE_KIND = "feda2v-store-message"
CLASSIFIER_KIND = "feda2v-classifier-message"
PARAMS_KIND = "feda2v-parameters-message"  # fedavg, node-resident: parameters of the visit's keys only
STYPE = "feda2v.checkpoint"  # Array stype: raw checkpoint-container bytes, not .npy


# -- store slices: the keys one visit trains -------------------------------------------------------
def visit_keys(store, classes: list[str], train_counts: list[int]) -> list[str]:
    """The keys a node trains: those of the classes it holds training samples of (store key order)."""
    held = {store.key_for_class(c) for c, n in zip(classes, train_counts) if n > 0}
    return [k for k in store.keys if k in held]


def expected_samples(store, classes: list[str], train_counts: list[int]) -> dict[str, int]:
    """``samples_per_key`` a node must report: its training samples per key (what FedAvg weighs)."""
    out: dict[str, int] = {}
    for c, n in zip(classes, train_counts):
        if n > 0:
            out[store.key_for_class(c)] = out.get(store.key_for_class(c), 0) + int(n)
    return out


def _of_keys(name: str, keys) -> bool:
    return any(name.startswith(k + "/") for k in keys)


def store_slice(store, keys: list[str], *, with_events: bool = False) -> tuple[dict, dict]:
    """(tensors, meta) of ``keys`` only: their parameters, optimizer state, counters and trained
    classes. ``events`` (the reset log, which training never reads): none when the server lends a
    slice; with ``with_events`` the store's resets of those keys, which on a node's fresh store are
    exactly the visit's own (what the server appends)."""
    tensors, meta = store.state_dict()
    events = [e for e in meta["events"] if e["key"] in keys] if with_events else []
    kr = {f"{k}/{r}" for k in keys for r in meta["roles"]}
    return ({n: t for n, t in tensors.items() if _of_keys(n, keys)},
            {"spec": meta["spec"], "keys": list(keys), "roles": meta["roles"],
             "arch": {n: a for n, a in meta["arch"].items() if n in kr},
             "optimizers": {n: o for n, o in meta["optimizers"].items() if n in kr},
             "trained_classes": {k: meta["trained_classes"][k] for k in keys},
             "reset_counts": {k: meta["reset_counts"][k] for k in keys}, "events": events})


def merge_slice(store, tensors: dict, meta: dict) -> None:
    """Load a slice into ``store`` (other keys untouched; the slice's resets appended to the log).
    All-or-nothing: the store's strict loader checks the merged state before changing anything."""
    keys = list(meta["keys"])
    full_t, full_m = store.state_dict()
    full_t = {n: t for n, t in full_t.items() if not _of_keys(n, keys)}
    full_t.update(tensors)
    full_m["optimizers"].update(meta["optimizers"])
    for field in ("trained_classes", "reset_counts"):
        full_m[field].update({k: meta[field][k] for k in keys})
    full_m["events"] = full_m["events"] + list(meta["events"])
    store.load_state_dict(full_t, full_m)


# -- wire format ----------------------------------------------------------------------------------
def encode_store(store, *, store_name: str, round_: int, node: str, keys: Optional[list] = None,
                 with_events: bool = False) -> bytes:
    """The whole store (``keys=None``: the exact bytes ``write_checkpoint`` would write) or the slice
    of ``keys`` (header ``keys`` lists them; ``with_events``: see ``store_slice``)."""
    if keys is None:
        tensors, meta = store.state_dict()
        header = {"kind": WIRE_KIND, "store_name": store_name, "round": round_, "node": node, "store": meta}
    else:
        tensors, meta = store_slice(store, keys, with_events=with_events)
        header = {"kind": WIRE_KIND, "store_name": store_name, "round": round_, "node": node, "store": meta,
                  "keys": list(keys)}
    return checkpoint_bytes(tensors, header)


def decode_store(data: bytes, *, label: str) -> tuple[dict, dict]:
    tensors, header = read_checkpoint_bytes(data, label=label)
    if header.get("kind") != WIRE_KIND:
        raise Feda2vError(f"{label} is a checkpoint container but not a store message (kind={header.get('kind')!r})")
    return tensors, header


def _pack(blob: Optional[bytes], fields: dict) -> RecordDict:
    """``blob`` None: a message without store state (local, node-resident)."""
    rd = RecordDict()
    if blob is not None:
        rd["state"] = ArrayRecord({"ckpt": Array("uint8", (len(blob),), STYPE, blob)})
    # insertion order kept: losses per key are summed in key order by the round metrics
    rd["task"] = ConfigRecord({"json": json.dumps(fields)})
    return rd


def _unpack(rd) -> tuple[Optional[bytes], dict]:
    if "state" not in rd:
        return None, json.loads(rd["task"]["json"])
    arr = rd["state"]["ckpt"]
    if arr.stype != STYPE:
        raise Feda2vError(f"store message carries a '{arr.stype}' array, expected '{STYPE}'")
    return arr.data, json.loads(rd["task"]["json"])


def node_result_to_json(res) -> dict:
    return {"node": res.node, "steps": res.steps, "train_seconds": res.train_seconds, "losses": res.losses,
            "samples_per_key": res.samples_per_key, "resets": [e.to_json() for e in res.resets]}


def node_result_from_json(d: dict):
    from feda2v.federation.node import NodeResult
    from feda2v.store.store import ResetEvent

    return NodeResult(node=d["node"], steps=int(d["steps"]), train_seconds=float(d["train_seconds"]),
                      losses=d["losses"], samples_per_key=d["samples_per_key"],
                      resets=[ResetEvent(e["key"], e["node"], int(e["round"])) for e in d["resets"]])


# -- ClientApp (runs on every SuperNode / simulated node) -----------------------------------------
_DATA_CACHE: dict = {}  # (data dir, partition) -> SiteData: read and verified once per process
_DATA_LOCK = threading.Lock()


def _node_data(data_dir: str, manifest_hash: str, partition: int):
    """This node's partition only (never another site's file), verified against the server's
    manifest hash."""
    from feda2v.data.sites import load_partition

    with _DATA_LOCK:
        site = _DATA_CACHE.get((data_dir, partition))
        if site is None or site.manifest_hash != manifest_hash:
            site = load_partition(data_dir, partition, manifest_hash=manifest_hash)
            _DATA_CACHE[data_dir, partition] = site
    return site


def partition_id(context) -> int:
    """This SuperNode's data partition: node_config 'partition-id' (set by the simulation runtime,
    or by `flower-supernode --node-config "partition-id=N ..."`)."""
    pid = context.node_config.get("partition-id")
    if pid is None:
        raise ConfigError("this SuperNode has no 'partition-id' in its node config; start it with "
                          "--node-config \"partition-id=N num-partitions=M\"")
    return int(pid)


_LIGHT = threading.Event()


def lighten_torch() -> None:
    """Keep torch from importing torch._dynamo in this process for optimizer bookkeeping.

    ``torch.optim.Optimizer.add_param_group`` / ``state_dict`` / ``load_state_dict`` / ``zero_grad``
    are wrapped by ``torch._disable_dynamo``, whose first call imports torch._dynamo (fx, sympy:
    1.2-2.7 s measured here) only to mark them as never traced by torch.compile; building a store
    (one AdamW per key and role) triggers it. Nothing compiles in a ClientApp process, so this
    stores that wrapper's cached decision as "call the function itself": the same functions run,
    the import is never paid. Only where torch._dynamo is not loaded yet (then nothing can have
    compiled); Flower's per-message `flwr-clientapp` process calls it (``handle_train``)."""
    if _LIGHT.is_set() or "torch._dynamo" in sys.modules:
        return
    for name in ("add_param_group", "state_dict", "load_state_dict", "zero_grad"):
        fn = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if fn is not None and getattr(fn, "__dynamo_disable", None) is None:
            fn.__dynamo_disable = fn  # see torch/_compile.py:_disable_dynamo
    _LIGHT.set()


def _per_message_process() -> bool:
    """Flower's deployed ClientApp process, started afresh for every message (the same test Flower
    makes, flwr/supercore/exit/exit.py); its imports are paid on every visit."""
    return bool(sys.argv) and sys.argv[0].endswith("flwr-clientapp")


def handle_query(msg, context):
    rd = RecordDict()
    rd["node"] = ConfigRecord({"partition-id": partition_id(context), "pid": os.getpid()})
    return Message(rd, reply_to=msg)


def node_device(task: dict, override: Optional[str] = None) -> torch.device:
    """The device this node trains on: its node config ``device`` (the node's own hardware, e.g.
    ``--node-config "... device=cuda:1"``) or else the server's ``train.device`` that the task
    carries (cpu for tasks without one); made deterministic as the trainer does (store/device.py).
    The bytes a node sends back are CPU tensors whatever its device."""
    from feda2v.store.device import configure_determinism, resolve_device

    try:
        dev = resolve_device(str(override) if override else task.get("device", "cpu"))
    except ConfigError as e:
        raise ConfigError(f"{'node config device' if override else 'task device'} on this node: {e}") from None
    configure_determinism(dev)
    return dev


def visit(blob: bytes, task: dict, partition: int, data_dir: Optional[str] = None,
          device: Optional[str] = None) -> tuple[bytes, dict]:
    """A node's whole part of one visit, Flower aside: store bytes in -> trained store bytes out.
    ``data_dir``: where this node's partition is (default: the task's ``prepared_dir``);
    ``device``: the node config's (see ``node_device``)."""
    from feda2v.federation.node import train_generators
    from feda2v.store import GeneratorStore, StoreSpec

    if partition != task["node_id"]:  # routing guard: never train partition A's data as node B
        raise Feda2vError(f"message for node {task['node_id']} delivered to partition {partition}")
    if task.get("threads", 0) > 0:
        torch.set_num_threads(int(task["threads"]))
    site = _node_data(data_dir or task["prepared_dir"], task["manifest_hash"], partition)
    tensors, header = decode_store(blob, label=f"store message for node {partition}")
    # clone: tensors are views into the received buffer; the store must own its memory
    tensors = {k: v.clone() for k, v in tensors.items()}
    keys = header.get("keys")
    dev = node_device(task, device)
    if keys is None:  # the whole store
        store = GeneratorStore.from_state(tensors, header["store"], device=dev)
    else:  # a slice: the other keys of this fresh store are never trained, never sent back
        store = GeneratorStore(StoreSpec.from_json(header["store"]["spec"]), site.conditions, device=dev)
        merge_slice(store, tensors, header["store"])
        trains = {store.key_for_class(site.classes[c]) for c in set(site.node.train_y.tolist())}
        if not trains <= set(keys):
            raise Feda2vError(f"store message for node {partition} lacks keys {sorted(trains - set(keys))} "
                              "that this partition trains (server and node disagree on the data)")
    res = train_generators(store, site.node, classes=list(site.classes), seed=task["seed"],
                           round_=task["round"], local_epochs=task["local_epochs"],
                           batch_size=task["batch_size"], reset_on_change=task["reset_on_change"])
    out = encode_store(store, store_name=task["store_name"], round_=task["round"], node=res.node, keys=keys,
                       with_events=True)
    return out, node_result_to_json(res)


def parameters_bytes(store, keys: list[str], *, round_: int, node: str) -> bytes:
    """The parameters of ``keys`` (no optimizer state), as one container."""
    tensors = {n: t.cpu() for n, t in store.parameter_tensors().items() if _of_keys(n, keys)}
    return checkpoint_bytes(tensors, {"kind": PARAMS_KIND, "round": round_, "node": node, "keys": list(keys)})


def read_parameters(blob: bytes, *, label: str) -> tuple[dict, dict]:
    tensors, header = read_checkpoint_bytes(blob, label=label)
    if header.get("kind") != PARAMS_KIND:
        raise Feda2vError(f"{label} is a checkpoint container but not a parameters message "
                          f"(kind={header.get('kind')!r})")
    # parameters (and the generator's moving averages, which fedavg averages with them) only:
    # optimizer state never travels
    if any("/param/" not in n and "/ema/" not in n for n in tensors):
        raise Feda2vError(f"{label} carries tensors other than parameters")
    return tensors, header


def resident_visit(blob: Optional[bytes], task: dict, partition: int, data_dir: Optional[str] = None,
                   state_dir: Optional[str] = None, device: Optional[str] = None) -> tuple[Optional[bytes], dict]:
    """A node-resident visit (local, fedavg): load this node's own state of ``from_round`` (a fresh
    store at 0), take the global parameters of the visit's keys if sent (fedavg), train, checkpoint
    the store here, reply the trained parameters (fedavg) or nothing of the store (local) and the
    NodeResult. ``state_dir``: this node's (node config ``state-dir``; default the task's)."""
    from feda2v.checkpoint.nodestate import load_node_state, save_node_state
    from feda2v.federation.node import node_name, train_generators
    from feda2v.store import GeneratorStore, StoreSpec

    if partition != task["node_id"]:  # routing guard: never train partition A's data as node B
        raise Feda2vError(f"message for node {task['node_id']} delivered to partition {partition}")
    if task.get("threads", 0) > 0:
        torch.set_num_threads(int(task["threads"]))
    rt = task["resident"]
    site = _node_data(data_dir or task["prepared_dir"], task["manifest_hash"], partition)
    name, keys, where = node_name(partition), list(rt["keys"]), state_dir or rt["state_dir"]
    store = GeneratorStore(StoreSpec.from_json(rt["spec"]), site.conditions, device=node_device(task, device))
    if rt["from_round"] > 0:
        store.load_state_dict(*load_node_state(where, name, rt["from_round"], config=rt["config"],
                                               manifest_hash=task["manifest_hash"], scope=rt["scope"]))
    trains = {store.key_for_class(site.classes[c]) for c in set(site.node.train_y.tolist())}
    if trains != set(keys):
        raise Feda2vError(f"visit of node {partition} names keys {keys} but this partition trains "
                          f"{sorted(trains)} (server and node disagree on the data)")
    if blob is not None:  # fedavg: start the visit's keys from the global parameters
        tensors, header = read_parameters(blob, label=f"parameters message for node {partition}")
        if header.get("keys") != keys or sorted(tensors) != sorted(
                n for n in store.parameter_tensors() if _of_keys(n, keys)):
            raise Feda2vError(f"parameters message for node {partition} does not hold exactly the "
                              f"parameters of keys {keys}")
        own = store.parameter_tensors()
        own.update(tensors)
        store.load_parameter_tensors(own)
    res = train_generators(store, site.node, classes=list(site.classes), seed=task["seed"],
                           round_=task["round"], local_epochs=task["local_epochs"],
                           batch_size=task["batch_size"], reset_on_change=task["reset_on_change"])
    save_node_state(where, name, task["round"], store.state_dict(), config=rt["config"],
                    manifest_hash=task["manifest_hash"], keep=rt["keep"], scope=rt["scope"])
    out = parameters_bytes(store, keys, round_=task["round"], node=name) if rt["parameters"] else None
    return out, node_result_to_json(res)


def handle_train(msg, context):
    """ClientApp @train("generators"): fill the lent slice into a store (node-resident modes: load
    this node's own store), train, send back what the mode lends."""
    from feda2v.errors import CheckpointError

    if _per_message_process():
        lighten_torch()
    blob, task = _unpack(msg.content)
    data_dir = context.node_config.get("data-dir")
    data_dir = str(data_dir) if data_dir else None
    device = context.node_config.get("device")  # this node's own device (default: the task's)
    if "resident" not in task:
        out, result = visit(blob, task, partition_id(context), data_dir, device)
        return Message(_pack(out, {"node_result": result}), reply_to=msg)
    state_dir = context.node_config.get("state-dir")
    try:
        out, result = resident_visit(blob, task, partition_id(context), data_dir,
                                     str(state_dir) if state_dir else None, device)
    except CheckpointError as e:  # its own state does not fit the server's records: refused, not lost
        return Message(_pack(None, {"refused": str(e)}), reply_to=msg)
    return Message(_pack(out, {"node_result": result}), reply_to=msg)


def classifier_visit(blob: bytes, task: dict, partition: int, data_dir: Optional[str] = None,
                     device: Optional[str] = None) -> tuple[bytes, dict]:
    """Full mode, a node's part: train the classifier it is sent on its own partition (the very
    ``train_classifier`` call and seed of the in-process engine); reply its state and weight."""
    from feda2v.federation.node import node_name, train_classifier
    from feda2v.models.classifier import Classifier
    from feda2v.seeding import torch_generator

    if partition != task["node_id"]:
        raise Feda2vError(f"message for node {task['node_id']} delivered to partition {partition}")
    if task.get("threads", 0) > 0:
        torch.set_num_threads(int(task["threads"]))
    site = _node_data(data_dir or task["prepared_dir"], task["manifest_hash"], partition)
    tensors, header = read_checkpoint_bytes(blob, label=f"classifier message for node {partition}")
    if header.get("kind") != CLASSIFIER_KIND:
        raise Feda2vError(f"classifier message for node {partition} has kind {header.get('kind')!r}")
    model = Classifier(**header["kwargs"])
    model.load_state_dict({k: v.clone() for k, v in tensors.items()}, strict=True)
    model.to(node_device(task, device))
    nd = site.node
    train_classifier(model, nd.train_x, nd.train_y, lr=task["lr"], epochs=task["epochs"],
                     batch_size=task["batch_size"],
                     gen=torch_generator(task["seed"], "classifier", task["round"], partition))
    out = checkpoint_bytes({k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                           {"kind": CLASSIFIER_KIND, "kwargs": header["kwargs"], "round": task["round"],
                            "node": node_name(partition)})
    return out, {"node": node_name(partition), "weight": float(len(nd.train_y))}


def handle_classifier(msg, context):
    """ClientApp @train("classifier"): full mode's node classifier step."""
    blob, task = _unpack(msg.content)
    data_dir = context.node_config.get("data-dir")
    out, result = classifier_visit(blob, task, partition_id(context), str(data_dir) if data_dir else None,
                                   context.node_config.get("device"))
    return Message(_pack(out, {"classifier_result": result}), reply_to=msg)


# The ClientApp component of `flwr run` (the ServerApp is pipeline/flower_job.py:server_app).
client_app = ClientApp()
client_app.train("generators")(handle_train)
client_app.train("classifier")(handle_classifier)
client_app.query("partition")(handle_query)


def make_task(federation, node_id: int, round_: int, store_name: str) -> dict:
    """What a node needs besides the store: the seeds and loop sizes of ``train_generators`` and
    the server's prepared-data path (used where the node config names no ``data-dir``) and manifest
    hash (the node's data must belong to it)."""
    cfg = federation.cfg
    fed = cfg.federation
    return {"node_id": int(node_id), "round": int(round_), "seed": int(cfg.seed), "store_name": store_name,
            "local_epochs": int(fed.local_epochs), "batch_size": int(fed.batch_size),
            "reset_on_change": str(fed.reset_on_class_change), "threads": int(cfg.train.threads),
            "device": str(cfg.train.device),  # a node's config "device" overrides it (node_device)
            "prepared_dir": os.path.abspath(cfg.data.prepared_dir),
            "manifest_hash": federation.data.manifest_hash}


def default_node_state_dir(cfg) -> str:
    """Where nodes without a node config ``state-dir`` keep their stores (absolute)."""
    d = cfg.federation.flower.node_state_dir
    return os.path.abspath(d if d else os.path.join(cfg.checkpoint.dir, "nodes"))


# -- server side: drive one round of a Federation over a Grid ------------------------------------
class NodeLost(Exception):
    """A visit got no usable answer (timeout, error reply, node gone): the failure policy decides."""


class GridRounds:
    """Runs ``Federation`` rounds with node visits as Flower messages.

    ``Federation.run_round`` does everything (participants, store routing, FedAvg merge, metrics)
    but the node visit itself, which ``visits`` sends over the Grid. Settings: ``federation.flower``.
    """

    def __init__(self, grid, federation, *, poll_s: Optional[float] = None):
        self.grid, self.fed = grid, federation
        self.opts = federation.cfg.federation.flower
        self.timeout_s = float(self.opts.reply_timeout_s)
        self.poll_s = float(self.opts.poll_s if poll_s is None else poll_s)
        self.routes: dict[int, int] = {}  # partition id -> Flower node id (random; a restart changes it)
        self._queried: set[int] = set()  # node ids that told their partition
        self._silent: set[int] = set()  # node ids that did not answer the partition query
        if federation.sharing.node_resident and not federation.node_resident:
            # never lend a node's private store (its moments) over the network
            raise ConfigError(f"federation.sharing={federation.sharing.name} over Flower keeps each node's store on "
                              "its node: build the Federation with node_resident=True (the Flower engine does)")
        n = len(federation.data.nodes)
        self._resident = None  # node-resident visits: what every task shares (built once)
        if federation.node_resident:
            from feda2v.checkpoint.nodestate import run_scope
            from feda2v.checkpoint.runstate import state_config
            from feda2v.federation.sharing import SERVER
            from feda2v.store import GeneratorStore

            cfg = federation.cfg
            # the key layout, where the server holds no store of its own (local): keys only
            layout = federation.stores.get(SERVER)
            if layout is None:
                layout = GeneratorStore(federation.spec, federation.data.conditions)
            self._resident = {"config": state_config(cfg), "spec": federation.spec.to_json(), "layout": layout,
                              "keep": int(cfg.checkpoint.every) + 1, "state_dir": default_node_state_dir(cfg),
                              "scope": run_scope(cfg.checkpoint.dir),
                              "global": federation.stores.get(SERVER) if federation.sharing.lends_parameters else None}
        self.received: dict = {}  # node -> parameters its visit trained (fedavg, node-resident), per round
        self._refresh_routes(need=set(range(n)), wait_s=float(self.opts.connect_timeout_s), strict=True)
        missing = sorted(set(range(n)) - set(self.routes))
        if missing:
            raise ConfigError(f"no Flower node serves partition-id {missing} after "
                              f"{self.opts.connect_timeout_s:.0f}s; start SuperNodes with "
                              f"--node-config \"partition-id=N\" for N in 0..{n - 1}")

    # Route by each node's partition-id, asked of every node id not seen before.
    def _refresh_routes(self, need: set = frozenset(), wait_s: float = 0.0, strict: bool = False) -> None:
        """Learn the partition of every node id not seen before; ``need``: wait up to ``wait_s``
        until these partitions are served. ``strict`` (start-up): two nodes on one partition is an
        error; later the newer node takes the partition over (a restarted SuperNode)."""
        end = time.monotonic() + wait_s
        while True:
            ids = set(self.grid.get_node_ids())
            self.routes = {p: nid for p, nid in self.routes.items() if nid in ids}
            # a node that did not answer before is asked again only when a partition is awaited
            new = sorted(ids - self._queried - (set() if need else self._silent))
            if new:
                msgs = [Message(RecordDict(), dst_node_id=nid, message_type=MSG_QUERY) for nid in new]
                ask_s = max(end - time.monotonic(), min(self.timeout_s, 10.0))
                for nid, reply in zip(new, self._exchange(msgs, timeout_s=ask_s)):
                    if isinstance(reply, str):
                        self._silent.add(nid)
                        continue
                    self._queried.add(nid)
                    self._silent.discard(nid)
                    pid = int(reply.content["node"]["partition-id"])
                    if strict and pid in self.routes:
                        raise ConfigError(f"two Flower nodes claim partition-id {pid}; give each "
                                          "SuperNode its own")
                    self.routes[pid] = nid
            if need <= set(self.routes) or time.monotonic() >= end:
                return
            time.sleep(min(0.2, max(self.poll_s, 0.01)))

    def _exchange(self, msgs: list, timeout_s: Optional[float] = None) -> list:
        """Push messages, poll until every reply is in or the timeout passes; per message (in
        order) its reply, or a string saying why there is none."""
        if not msgs:
            return []
        ids = list(self.grid.push_messages(msgs))
        if len(ids) != len(msgs):
            raise Feda2vError(f"Flower accepted {len(ids)} of {len(msgs)} messages")
        want = {mid: i for i, mid in enumerate(ids)}
        got: dict[int, object] = {}
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        end = time.monotonic() + timeout_s
        while len(got) < len(ids):
            for reply in self.grid.pull_messages([mid for mid in ids if want[mid] not in got]):
                got[want[reply.metadata.reply_to_message_id]] = reply
            if len(got) < len(ids):
                if time.monotonic() > end:
                    break
                time.sleep(self.poll_s)
        out = []
        for i in range(len(ids)):
            reply = got.get(i)
            if reply is None:
                out.append(f"did not reply within {timeout_s:.0f}s")
            elif reply.has_error():
                out.append(f"failed: {reply.error.reason}")
            else:
                out.append(reply)
        return out

    # -- one visit: message out, reply validated and merged ---------------------------------------
    def _plan(self, nd, store_name: str, round_: int):
        from feda2v.federation.node import node_name

        counts = self.fed.data.manifest["counts"]["train"][nd.node_id]
        if self._resident is not None:
            layout = self._resident["layout"]
            return {"kind": "resident", "nd": nd, "name": node_name(nd.node_id), "store_name": store_name,
                    "keys": visit_keys(layout, self.fed.classes, counts),
                    "samples": expected_samples(layout, self.fed.classes, counts), "round": round_}
        store = self.fed.stores[store_name]
        keys = visit_keys(store, self.fed.classes, counts)
        return {"kind": "store", "nd": nd, "name": node_name(nd.node_id), "store_name": store_name,
                "store": store, "keys": keys, "samples": expected_samples(store, self.fed.classes, counts),
                "round": round_}

    def _classifier_plan(self, nd, round_: int, start: dict):
        from feda2v.federation.node import node_name

        return {"kind": "classifier", "nd": nd, "name": node_name(nd.node_id), "round": round_, "start": start,
                "weight": float(sum(self.fed.data.manifest["counts"]["train"][nd.node_id]))}

    def _message(self, plan):
        nid = self.routes.get(plan["nd"].node_id)
        if nid is None:
            return None
        if plan["kind"] == "classifier":
            fed = self.fed.cfg.federation
            blob = checkpoint_bytes({k: v.detach().cpu() for k, v in plan["start"].items()}, {"kind": CLASSIFIER_KIND, "round": plan["round"],
                                                    "node": plan["name"],
                                                    "kwargs": dict(self.fed.classifier.kwargs)})
            task = dict(make_task(self.fed, plan["nd"].node_id, plan["round"], ""), lr=float(fed.classifier_lr),
                        epochs=int(fed.local_epochs))
            kind = MSG_CLASSIFIER
        elif plan["kind"] == "resident":
            r = self._resident
            blob = None if r["global"] is None else parameters_bytes(r["global"], plan["keys"], round_=plan["round"],
                                                                     node=plan["name"])
            task = dict(make_task(self.fed, plan["nd"].node_id, plan["round"], plan["store_name"]),
                        resident={"from_round": int(self.fed.node_rounds[plan["name"]]), "keys": plan["keys"],
                                  "parameters": blob is not None, "keep": r["keep"], "state_dir": r["state_dir"],
                                  "scope": r["scope"],
                                  "config": r["config"], "spec": r["spec"]})
            kind = MSG_TRAIN
        else:
            blob = encode_store(plan["store"], store_name=plan["store_name"], round_=plan["round"],
                                node=plan["name"], keys=plan["keys"])
            task = make_task(self.fed, plan["nd"].node_id, plan["round"], plan["store_name"])
            kind = MSG_TRAIN
        return Message(_pack(blob, task), dst_node_id=nid, message_type=kind, group_id=str(plan["round"]))

    def _send(self, plans: list) -> list:
        """One exchange for ``plans``: per plan its reply, or NodeLost."""
        msgs = [self._message(p) for p in plans]
        sent = [m for m in msgs if m is not None]
        replies = iter(self._exchange(sent))
        out = []
        for p, m in zip(plans, msgs):
            r = next(replies) if m is not None else "is not connected"
            if isinstance(r, str):
                out.append(NodeLost(f"node {p['name']} (partition {p['nd'].node_id}) {r}"))
            else:
                out.append(r)
        return out

    @staticmethod
    def _refuser(plan):
        def refuse(what: str) -> Feda2vError:
            return Feda2vError(f"node {plan['name']} (partition {plan['nd'].node_id}) sent an invalid reply: "
                               f"{what}; refused (is that SuperNode running this feda2v version on its own partition?)")
        return refuse

    def _apply_classifier(self, reply, plan):
        """Validate a classifier reply: the node, the start state's names and shapes, its weight."""
        refuse = self._refuser(plan)
        try:
            blob, task = _unpack(reply.content)
            tensors, header = read_checkpoint_bytes(blob, label=f"classifier reply of node {plan['name']}")
            result = task["classifier_result"]
        except (Feda2vError, KeyError, TypeError, ValueError) as e:
            raise refuse(str(e)) from None
        if (header.get("kind"), header.get("node"), result.get("node")) != (CLASSIFIER_KIND, plan["name"], plan["name"]):
            raise refuse(f"it answers for {result.get('node')!r} ({header.get('kind')!r}), expected {plan['name']!r}")
        shapes = {k: tuple(v.shape) for k, v in plan["start"].items()}
        if {k: tuple(v.shape) for k, v in tensors.items()} != shapes:
            raise refuse("its classifier state has other tensors or shapes than it was sent")
        if float(result.get("weight", -1)) != plan["weight"]:
            raise refuse(f"weight {result.get('weight')} differs from its partition's {plan['weight']:.0f} samples")
        return plan["name"], {k: v.clone() for k, v in tensors.items()}, plan["weight"]

    def _check_result(self, res, meta_events, plan, refuse) -> None:
        """The checks every generator reply passes: its node, its samples per key, its resets."""
        if res.node != plan["name"]:
            raise refuse(f"its result names {res.node!r}")
        if {k: int(v) for k, v in res.samples_per_key.items()} != plan["samples"]:
            raise refuse(f"samples_per_key {res.samples_per_key} differs from its partition's {plan['samples']}")
        bad_events = [e for e in meta_events
                      if e.get("node") != plan["name"] or e.get("round") != plan["round"] or e.get("key") not in plan["keys"]]
        if bad_events:
            raise refuse(f"it reports resets of other nodes, rounds or keys ({bad_events[0]})")

    def _apply_resident(self, reply, plan):
        """A node-resident reply: refused state (stop), or the result (+ the trained parameters of
        its keys in fedavg) validated; the node's state round advances."""
        from feda2v.checkpoint.nodestate import NodeStateError

        refuse = self._refuser(plan)
        try:
            blob, task = _unpack(reply.content)
        except (Feda2vError, KeyError, TypeError, ValueError) as e:
            raise refuse(str(e)) from None
        if "refused" in task:
            raise NodeStateError(f"node {plan['name']} (partition {plan['nd'].node_id}) refused round "
                                 f"{plan['round']}: {task['refused']}")
        try:
            res = node_result_from_json(task["node_result"])
        except (KeyError, TypeError, ValueError) as e:
            raise refuse(str(e)) from None
        self._check_result(res, [e.to_json() for e in res.resets], plan, refuse)
        glob = self._resident["global"]
        if glob is None:
            if blob is not None:
                raise refuse("it carries store state although its store stays on the node")
        else:
            if blob is None:
                raise refuse("it carries no parameters")
            try:
                tensors, header = read_parameters(blob, label=f"reply of node {plan['name']}")
            except Feda2vError as e:
                raise refuse(str(e)) from None
            want = {n: t for n, t in glob.parameter_tensors().items() if _of_keys(n, plan["keys"])}
            if (header.get("node"), header.get("keys")) != (plan["name"], plan["keys"]) or \
                    {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()} != \
                    {n: (t.dtype, tuple(t.shape)) for n, t in want.items()}:
                raise refuse(f"it carries other parameters than those of its keys {plan['keys']}")
            self.received[plan["name"]] = {n: t.clone() for n, t in tensors.items()}
        self.fed.node_rounds[plan["name"]] = int(plan["round"])
        return res

    def _apply(self, reply, plan):
        """Validate a reply against what was sent, then merge it into the store."""
        if plan["kind"] == "classifier":
            return self._apply_classifier(reply, plan)
        if plan["kind"] == "resident":
            return self._apply_resident(reply, plan)
        name, keys = plan["name"], plan["keys"]
        refuse = self._refuser(plan)

        try:
            blob, task = _unpack(reply.content)
            tensors, header = decode_store(blob, label=f"reply of node {name}")
            res = node_result_from_json(task["node_result"])
        except (Feda2vError, KeyError, TypeError, ValueError) as e:
            raise refuse(str(e)) from None
        if (header.get("store_name"), header.get("node"), header.get("keys")) != (plan["store_name"], name, keys):
            raise refuse(f"it answers for store {header.get('store_name')!r} of {header.get('node')!r} with keys "
                         f"{header.get('keys')}, expected {plan['store_name']!r} of {name!r} with {keys}")
        if res.node != name:
            raise refuse(f"its result names {res.node!r}")
        foreign = sorted(n for n in tensors if not _of_keys(n, keys))
        meta = header["store"]
        if foreign or list(meta.get("keys", [])) != keys:
            raise refuse(f"it carries state of keys it was not lent ({', '.join(foreign[:3]) or meta.get('keys')})")
        self._check_result(res, meta.get("events", []), plan, refuse)
        try:
            merge_slice(plan["store"], {k: v.clone() for k, v in tensors.items()}, meta)
        except Feda2vError as e:
            raise refuse(str(e)) from None
        return res

    def _lost_node(self, err: NodeLost, plan, attempt: int) -> bool:
        """The failure policy for one lost visit: True = send again, False = skip it; or raise."""
        policy = self.opts.on_node_failure
        if policy == "skip":
            print(f"feda2v: warning: {err}; round {plan['round']} goes on without it "
                  "(federation.flower.on_node_failure=skip)", flush=True)
            return False
        if policy == "wait" and attempt < int(self.opts.retries):
            print(f"feda2v: warning: {err}; waiting for partition {plan['nd'].node_id} to rejoin "
                  f"(retry {attempt + 1} of {self.opts.retries})", flush=True)
            lost = self.routes.pop(plan["nd"].node_id, None)
            # under SuperNode authentication the node id belongs to the registered key: a restarted
            # SuperNode comes back under its old id, which must be asked for its partition again
            self._queried.discard(lost)
            self._refresh_routes(need={plan["nd"].node_id}, wait_s=float(self.opts.connect_timeout_s))
            return True
        tried = f" after {attempt} retries" if policy == "wait" else ""
        raise Feda2vError(f"{err}{tried}; the run stops (federation.flower.on_node_failure={policy}; "
                          "'skip' finishes rounds without a lost node, 'wait' lets it rejoin)")

    def _visit_all(self, plans: list) -> list:
        """Results of ``plans`` in order (None for a skipped visit), retrying per the policy."""
        results: list = [None] * len(plans)
        todo, attempt = list(range(len(plans))), 0
        while todo:
            replies = self._send([plans[i] for i in todo])
            again = []
            for i, r in zip(todo, replies):
                if isinstance(r, NodeLost):
                    if self._lost_node(r, plans[i], attempt):
                        again.append(i)
                else:
                    results[i] = r
            # merge in visit order (FedAvg and logs see the in-process order)
            todo, attempt = again, attempt + 1
        return [None if r is None else self._apply(r, p) for r, p in zip(results, plans)]

    def visits(self, round_: int, visits: list, on_step=None):
        """``Federation.run_round``'s node step over Flower; yields NodeResults in visit order (a
        skipped visit yields nothing). Sequential modes (shared relay) send one visit at a time,
        each training what the previous one returned; the others send all visits together."""
        self._refresh_routes()  # a node restarted since the last round takes its partition back
        plans = [self._plan(nd, sn, round_) for nd, sn in visits]
        if self.fed.sharing.sequential:
            for p in plans:
                (res,) = self._visit_all([p])
                if res is not None:
                    yield res
            return
        for res in self._visit_all(plans):
            if res is not None:
                yield res

    def classifiers(self, round_: int, participants: list, start: dict):
        """``Federation.run_round``'s full-mode node classifier step over Flower (sent together,
        merged in participant order); yields (node name, state, weight) per node that answered."""
        plans = [self._classifier_plan(nd, round_, start) for nd in participants
                 if sum(self.fed.data.manifest["counts"]["train"][nd.node_id]) > 0]
        for res in self._visit_all(plans):
            if res is not None:
                yield res

    def run_round(self, round_: int, on_node: Optional[Callable[[object], None]] = None):
        """``Federation.run_round`` with node visits over Flower (bit-identical results)."""
        self.received = {}
        return self.fed.run_round(round_, on_node=on_node, train_visits=self.visits,
                                  train_classifiers=self.classifiers,
                                  node_parameters=self.received if self.fed.node_resident else None)
