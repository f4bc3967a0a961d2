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
"""
from __future__ import annotations

from typing import Mapping, Sequence

from feda2v.errors import ConfigError
from feda2v.federation.aggregate import average_state

SERVER = "server"


class SharingMode:
    name: str = ""
    sequential: bool = False  # True: visit i trains what visit i-1 returned (no parallel visits)
    has_server_store: bool = False  # a server-side generator exists (full mode distils from it)
    # What a visit's message carries on a distributed engine: "state" = the store's parameters and
    # optimizer state (the relay's point: moments travel); "parameters" = parameters only.
    wire: str = "state"

    def store_names(self, nodes: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def store_name_for(self, node: str) -> str:
        raise NotImplementedError

    def primary_store(self, store_names: Sequence[str]) -> str:
        """The store evaluate and the MLflow model use."""
        return SERVER if SERVER in store_names else store_names[0]

    def before_round(self, stores: Mapping, visits: Sequence) -> None:
        """Called with the round's ``(node data, store name)`` visits before any is trained."""

    def after_round(self, stores: Mapping, node_results: Sequence) -> None:
        """Called with the round's NodeResults (visit order) after every visit is trained."""


class SharedRelay(SharingMode):
    name = "shared"
    sequential = True
    has_server_store = True

    def store_names(self, nodes):
        return [SERVER]

    def store_name_for(self, node):
        return SERVER


class LocalStores(SharingMode):
    name = "local"

    def store_names(self, nodes):
        return list(nodes)

    def store_name_for(self, node):
        return node


class FedAvgStores(SharingMode):
    name = "fedavg"
    has_server_store = True
    wire = "parameters"

    def store_names(self, nodes):
        return [SERVER, *nodes]

    def store_name_for(self, node):
        return node

    def before_round(self, stores, visits):
        # every participant starts from the global parameters
        global_params = stores[SERVER].parameter_tensors()
        for _, store_name in visits:
            stores[store_name].load_parameter_tensors(global_params)

    def after_round(self, stores, node_results):
        server = stores[SERVER]
        merged = server.parameter_tensors()
        node_params = {r.node: stores[r.node].parameter_tensors() for r in node_results}
        for key in server.keys:
            trained = [(r.node, r.samples_per_key[key]) for r in node_results if r.samples_per_key.get(key)]
            if not trained:
                continue  # nobody trained this key: keep the global parameters
            names = [n for n in merged if n.startswith(key + "/")]
            states = [{n: node_params[node][n] for n in names} for node, _ in trained]
            merged.update(average_state(states, [w for _, w in trained]))
        server.load_parameter_tensors(merged)


MODES: dict[str, SharingMode] = {m.name: m for m in (SharedRelay(), LocalStores(), FedAvgStores())}


def sharing_mode(name: str) -> SharingMode:
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(f"federation.sharing={name!r} is not one of {', '.join(MODES)}") from None
