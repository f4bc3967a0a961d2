"""Flower (Message API) side of ``federation.engine=flower``: the ClientApp, the wire format and the
server's round driver. Flower 1.42: ``flwr.clientapp.ClientApp``, ``flwr.serverapp.{Grid,ServerApp}``,
``flwr.app.{Message,RecordDict,ArrayRecord,ConfigRecord}``.

What travels: for every node visit the server sends the store the node trains (``server`` in shared
relay; the node's own store in local/fedavg) as one feda2v checkpoint container (the exact bytes
``write_checkpoint`` would put in a file, integrity-checked on receipt), plus a small JSON task. The
ClientApp rebuilds the store with ``GeneratorStore.from_state``, runs the very same
``train_generators`` with the same derived seeds, and replies with the new store bytes and its
NodeResult. The server loads the reply into the Federation's store in place, so checkpoints, logging
and resume stay on the server, exactly as with the in-process engine.

Per-node state: Flower clients are stateless between messages, and the federation checkpoint holds
every node's store (local/fedavg), so the server keeps the authoritative copy and sends it with each
visit. Nothing the next visit needs is left in ``context.state``; the ClientApp only caches the
prepared data it loaded (read-only, verified by manifest hash).
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable, Optional

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from feda2v.checkpoint.container import checkpoint_bytes, read_checkpoint_bytes
from feda2v.errors import ConfigError, DataError, Feda2vError

MSG_TRAIN = "train.generators"  # ClientApp @app.train("generators")
MSG_QUERY = "query.partition"  # ClientApp @app.query("partition")
WIRE_KIND = "feda2v-store-message"
STYPE = "feda2v.checkpoint"  # Array stype: raw checkpoint-container bytes, not .npy


# -- wire format ----------------------------------------------------------------------------------
def encode_store(store, *, store_name: str, round_: int, node: str) -> bytes:
    tensors, meta = store.state_dict()
    header = {"kind": WIRE_KIND, "store_name": store_name, "round": round_, "node": node, "store": meta}
    return checkpoint_bytes(tensors, header)


def decode_store(data: bytes, *, label: str) -> tuple[dict, dict]:
    tensors, header = read_checkpoint_bytes(data, label=label)
    if header.get("kind") != WIRE_KIND:
        raise Feda2vError(f"{label} is a checkpoint container but not a store message (kind={header.get('kind')!r})")
    return tensors, header


def _pack(blob: bytes, fields: dict) -> RecordDict:
    rd = RecordDict()
    rd["state"] = ArrayRecord({"ckpt": Array("uint8", (len(blob),), STYPE, blob)})
    rd["task"] = ConfigRecord({"json": json.dumps(fields, sort_keys=True)})
    return rd


def _unpack(rd) -> tuple[bytes, dict]:
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
_DATA_CACHE: dict = {}
_DATA_LOCK = threading.Lock()


def _node_data(prepared_dir: str, manifest_hash: str, partition: int):
    from feda2v.data import load_prepared

    with _DATA_LOCK:
        data = _DATA_CACHE.get(prepared_dir)
        if data is None or data.manifest_hash != manifest_hash:
            data = load_prepared(prepared_dir)
            _DATA_CACHE[prepared_dir] = data
    if data.manifest_hash != manifest_hash:
        raise DataError(f"this node's prepared data at {prepared_dir} has manifest hash {data.manifest_hash[:12]}, "
                        f"the server trains on {manifest_hash[:12]}; prepare the same data on every node")
    by_id = {nd.node_id: nd for nd in data.nodes}
    if partition not in by_id:
        raise DataError(f"prepared data at {prepared_dir} has no partition {partition}")
    return data, by_id[partition]


def partition_id(context) -> int:
    """This SuperNode's data partition: node_config 'partition-id' (set by the simulation runtime,
    or by `flower-supernode --node-config "partition-id=N ..."`)."""
    pid = context.node_config.get("partition-id")
    if pid is None:
        raise ConfigError("this SuperNode has no 'partition-id' in its node config; start it with "
                          "--node-config \"partition-id=N num-partitions=M\"")
    return int(pid)


def handle_query(msg, context):
    rd = RecordDict()
    rd["node"] = ConfigRecord({"partition-id": partition_id(context), "pid": os.getpid()})
    return Message(rd, reply_to=msg)


def visit(blob: bytes, task: dict, partition: int) -> tuple[bytes, dict]:
    """A node's whole part of one visit, Flower aside: store bytes in -> trained store bytes out."""
    from feda2v.federation.node import train_generators
    from feda2v.store import GeneratorStore

    if partition != task["node_id"]:  # routing guard: never train partition A's data as node B
        raise Feda2vError(f"message for node {task['node_id']} delivered to partition {partition}")
    if task.get("threads", 0) > 0:
        torch.set_num_threads(int(task["threads"]))
    data, nd = _node_data(task["prepared_dir"], task["manifest_hash"], partition)
    tensors, header = decode_store(blob, label=f"store message for node {partition}")
    # clone: tensors are views into the received buffer; the store must own its memory
    store = GeneratorStore.from_state({k: v.clone() for k, v in tensors.items()}, header["store"])
    res = train_generators(store, nd, classes=list(data.classes), seed=task["seed"], round_=task["round"],
                           local_epochs=task["local_epochs"], batch_size=task["batch_size"],
                           reset_on_change=task["reset_on_change"])
    out = encode_store(store, store_name=task["store_name"], round_=task["round"], node=res.node)
    return out, node_result_to_json(res)


def handle_train(msg, context):
    """ClientApp @train("generators"): rebuild the lent store from the message, train, send back."""
    blob, task = _unpack(msg.content)
    out, result = visit(blob, task, partition_id(context))
    return Message(_pack(out, {"node_result": result}), reply_to=msg)


# The ClientApp component of `flwr run` (the ServerApp is pipeline/flower_job.py:server_app).
client_app = ClientApp()
client_app.train("generators")(handle_train)
client_app.query("partition")(handle_query)


def make_task(federation, node_id: int, round_: int, store_name: str) -> dict:
    """What a node needs besides the store: the seeds and loop sizes of ``train_generators`` and
    where its prepared data is (absolute path; checked against the server's manifest hash)."""
    cfg = federation.cfg
    fed = cfg.federation
    return {"node_id": int(node_id), "round": int(round_), "seed": int(cfg.seed), "store_name": store_name,
            "local_epochs": int(fed.local_epochs), "batch_size": int(fed.batch_size),
            "reset_on_change": bool(fed.reset_on_class_change), "threads": int(cfg.train.threads),
            "prepared_dir": os.path.abspath(cfg.data.prepared_dir),
            "manifest_hash": federation.data.manifest_hash}


# -- server side: drive one round of a Federation over a Grid ------------------------------------
class GridRounds:
    """Runs ``Federation`` rounds with node visits as Flower messages.

    ``Federation.run_round`` does everything (participants, store routing, FedAvg merge, metrics)
    but the node visit itself, which ``visits`` sends over the Grid.
    """

    def __init__(self, grid, federation, *, timeout_s: float = 600.0, poll_s: float = 0.01,
                 min_nodes: Optional[int] = None, connect_timeout_s: float = 120.0):
        self.grid, self.fed = grid, federation
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.routes = self._discover(min_nodes or len(federation.data.nodes), connect_timeout_s)

    # Flower node ids are random: route by each node's partition-id (asked once, in a query round).
    def _discover(self, need: int, wait_s: float) -> dict[int, int]:
        t0 = time.monotonic()
        while len(ids := sorted(self.grid.get_node_ids())) < need:
            if time.monotonic() - t0 > wait_s:
                raise Feda2vError(f"only {len(ids)} Flower node(s) connected after {wait_s:.0f}s, "
                                  f"the federation needs {need}; start more SuperNodes")
            time.sleep(0.2)
        msgs = [Message(RecordDict(), dst_node_id=nid, message_type=MSG_QUERY) for nid in ids]
        routes: dict[int, int] = {}
        for reply in self._exchange(msgs):
            pid = int(reply.content["node"]["partition-id"])
            if pid in routes:
                raise ConfigError(f"two Flower nodes claim partition-id {pid}; give each SuperNode its own")
            routes[pid] = reply.metadata.src_node_id
        missing = sorted(nd.node_id for nd in self.fed.data.nodes if nd.node_id not in routes)
        if missing:
            raise ConfigError(f"no Flower node serves partition-id {missing}; start SuperNodes with "
                              f"--node-config \"partition-id=N\" for N in 0..{len(self.fed.data.nodes) - 1}")
        return routes

    def _exchange(self, msgs: list) -> list:
        """Push messages, poll until every reply is in; replies in the order of ``msgs``."""
        ids = list(self.grid.push_messages(msgs))
        if len(ids) != len(msgs):
            raise Feda2vError(f"Flower accepted {len(ids)} of {len(msgs)} messages")
        want = {mid: i for i, mid in enumerate(ids)}
        got: dict[int, object] = {}
        end = time.monotonic() + self.timeout_s
        while len(got) < len(ids):
            for reply in self.grid.pull_messages([mid for mid in ids if want[mid] not in got]):
                got[want[reply.metadata.reply_to_message_id]] = reply
            if len(got) < len(ids):
                if time.monotonic() > end:
                    raise Feda2vError(f"{len(ids) - len(got)} Flower node(s) did not reply within {self.timeout_s:.0f}s")
                time.sleep(self.poll_s)
        out = [got[i] for i in range(len(ids))]
        for msg, reply in zip(msgs, out):
            if reply.has_error():
                raise Feda2vError(f"Flower node {msg.metadata.dst_node_id} failed: {reply.error.reason}")
        return out

    def _visit_msg(self, store_name: str, store, nd, round_: int):
        from feda2v.federation.node import node_name

        blob = encode_store(store, store_name=store_name, round_=round_, node=node_name(nd.node_id))
        task = make_task(self.fed, nd.node_id, round_, store_name)
        return Message(_pack(blob, task), dst_node_id=self.routes[nd.node_id],
                       message_type=MSG_TRAIN, group_id=str(round_))

    def _apply(self, reply, store, store_name: str):
        blob, task = _unpack(reply.content)
        tensors, header = decode_store(blob, label=f"reply for store {store_name}")
        if header["store_name"] != store_name:
            raise Feda2vError(f"reply carries store {header['store_name']!r}, expected {store_name!r}")
        store.load_state_dict({k: v.clone() for k, v in tensors.items()}, header["store"])
        return node_result_from_json(task["node_result"])

    def visits(self, round_: int, visits: list, on_step=None):
        """``Federation.run_round``'s node step over Flower; yields NodeResults in visit order.
        Shared relay is sequential (each node trains what the previous one returned); local/fedavg
        visits are independent, so they are sent together and answered in parallel."""
        if self.fed.sharing.sequential:
            for nd, store_name in visits:
                store = self.fed.stores[store_name]
                (reply,) = self._exchange([self._visit_msg(store_name, store, nd, round_)])
                yield self._apply(reply, store, store_name)
            return
        msgs = [self._visit_msg(sn, self.fed.stores[sn], nd, round_) for nd, sn in visits]
        for (nd, store_name), reply in zip(visits, self._exchange(msgs)):
            yield self._apply(reply, self.fed.stores[store_name], store_name)

    def run_round(self, round_: int, on_node: Optional[Callable[[object], None]] = None):
        """``Federation.run_round`` with node visits over Flower (bit-identical results)."""
        return self.fed.run_round(round_, on_node=on_node, train_visits=self.visits)
