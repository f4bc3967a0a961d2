"""The sharing modes (``federation.sharing``) as small strategy objects: the one owner of what a mode
means. Nothing else in the code base compares the mode's name (tests/test_sharing.py holds that).

A mode answers: which stores the federation holds, which store a node trains, what happens before
and after the round's visits, whether visits are sequential (each sees the previous one's result),
which store is primary (the one evaluate and the MLflow model use), and what crosses the wire on a
distributed engine.

- ``shared`` (relay): one store held by the server, lent to every node in turn, optimizer state
  included; visits are sequential.
- ``local``: one store per node, never combined; visits are independent.
- ``fedavg``: each node trains its own store starting from the global parameters (its optimizer
  state stays with the node); after the round the server averages parameters per key, weighted by
  the samples each node trained that key on.

Node-resident stores (``resident=True``, the Flower engine): in ``local`` and ``fedavg`` each node's
store lives on its node and is checkpointed there; the server holds only what is its own (fedavg:
the global store; local: nothing). What a visit's message carries follows from the mode:
``lends_state`` (the relay: the store slice with its optimizer state, both ways),
``lends_parameters`` (fedavg: the global parameters of the visit's keys out, the trained ones back,
never optimizer moments), neither (local: only the task out and the results back).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from feda2v.errors import ConfigError
from feda2v.federation.aggregate import average_state

SERVER = "server"


class SharingMode:
    name: str = ""
    sequential: bool = False  # True: visit i trains what visit i-1 returned (no parallel visits)
    has_server_store: bool = False  # a server-side generator exists (full mode distils from it)
    # Node-resident engines (Flower): the nodes' stores can stay on their nodes (local, fedavg).
    node_resident: bool = False
    # What a visit's message carries on a distributed engine (see the module doc).
    lends_state: bool = False  # the store slice with its optimizer state, out and back
    lends_parameters: bool = False  # the visit keys' parameters only, out and back

    def store_names(self, nodes: Sequence[str], *, resident: bool = False) -> list[str]:
        """The stores the server holds; ``resident``: the nodes hold their own stores."""
        raise NotImplementedError

    def store_name_for(self, node: str) -> str:
        raise NotImplementedError

    def primary_store(self, store_names: Sequence[str]):
        """The store evaluate and the MLflow model use (None: the server holds none, every store
        lives on its node)."""
        if not store_names:
            return None
        return SERVER if SERVER in store_names else store_names[0]

    def before_round(self, stores: Mapping, visits: Sequence) -> None:
        """Called with the round's ``(node data, store name)`` visits before any is trained."""

    def after_round(self, stores: Mapping, node_results: Sequence,
                    node_parameters: Optional[Mapping] = None) -> None:
        """Called with the round's NodeResults (visit order) after every visit is trained;
        ``node_parameters``: node -> the parameters it trained, where its store is not here."""


class SharedRelay(SharingMode):
    name = "shared"
    sequential = True
    has_server_store = True
    lends_state = True  # the relay's point: the moments travel with the generator

    def store_names(self, nodes, *, resident=False):
        return [SERVER]

    def store_name_for(self, node):
        return SERVER


class LocalStores(SharingMode):
    name = "local"
    node_resident = True

    def store_names(self, nodes, *, resident=False):
        return [] if resident else list(nodes)

    def store_name_for(self, node):
        return node


class FedAvgStores(SharingMode):
    name = "fedavg"
    has_server_store = True
    node_resident = True
    lends_parameters = True

    def store_names(self, nodes, *, resident=False):
        return [SERVER] if resident else [SERVER, *nodes]

    def store_name_for(self, node):
        return node

    def before_round(self, stores, visits):
        # every participant starts the keys it trains from the global parameters (its other keys
        # are never trained there nor averaged from there; a node-resident node gets exactly these
        # keys in its message). Resident node stores are not here: the engine sends them.
        global_params = stores[SERVER].parameter_tensors()
        for nd, store_name in visits:
            store = stores.get(store_name)
            if store is None:
                continue
            keys = trained_keys(store, nd)
            own = store.parameter_tensors()
            own.update({n: t for n, t in global_params.items() if any(n.startswith(k + "/") for k in keys)})
            store.load_parameter_tensors(own)

    def after_round(self, stores, node_results, node_parameters=None):
        server = stores[SERVER]
        merged = server.parameter_tensors()
        node_params = node_parameters if node_parameters is not None else {
            r.node: stores[r.node].parameter_tensors() for r in node_results}
        for key in server.keys:
            trained = [(r.node, r.samples_per_key[key]) for r in node_results if r.samples_per_key.get(key)]
            if not trained:
                continue  # nobody trained this key: keep the global parameters
            names = [n for n in merged if n.startswith(key + "/")]
            states = [{n: node_params[node][n] for n in names} for node, _ in trained]
            merged.update(average_state(states, [w for _, w in trained]))
        server.load_parameter_tensors(merged)


def trained_keys(store, nd) -> set:
    """The keys a node's visit trains: those of the classes it holds training samples of."""
    if nd is None or len(nd.train_y) == 0:
        return set()
    return {store.key_for_class(store.spec.classes[c]) for c in set(nd.train_y.tolist())}


MODES: dict[str, SharingMode] = {m.name: m for m in (SharedRelay(), LocalStores(), FedAvgStores())}


def sharing_mode(name: str) -> SharingMode:
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(f"federation.sharing={name!r} is not one of {', '.join(MODES)}") from None
