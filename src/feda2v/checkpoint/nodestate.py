"""A node's own checkpoints, for node-resident stores (Flower, ``federation.sharing`` local or fedavg).

Layout: ``<state dir>/<run scope>/node_NNN/round_RRRRRR.ckpt`` and ``latest.ckpt``
(CheckpointManager: atomic round files, ``latest`` moved only once a file is complete). The run
scope (``run_scope``: ``run-`` + a hash of the server's absolute ``checkpoint.dir``) keeps the runs
one SuperNode serves apart: a node's state dir is the site's, not the run's, and no run may
overwrite another's files. The same checkpoint.dir is the same run, as for the server's own files
(resume continues it, ``train.start_over`` replaces it). Each file is a federation checkpoint
(``runstate``) holding one store, ``node/NNN`` (primary; generator, discriminator and every AdamW
moment), the server's state config, the round and the data-manifest hash, so ``feda2v-ckpt
inspect|verify|diff`` and ``feda2v-evaluate`` read it like any checkpoint.

Recovery (the server crashes after a node wrote round r+1 but before the server's own checkpoint of
r+1): the server's checkpoint records each node's state round (``node_rounds``) and a visit asks the
node for exactly that round, so a node keeps older rounds, not only its newest. It keeps its newest
``checkpoint.every + 1`` files: the server writes a checkpoint at least every ``every`` rounds, so
the file its latest checkpoint names is among them (a node trains at most once per round). Writing
round r deletes the node's files of later rounds first: they belong to a timeline the server went
back from (a resume), and round r+1... are trained again to the same bytes.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

from feda2v.checkpoint.manager import CheckpointManager, round_filename
from feda2v.checkpoint.runstate import RunState, check_resumable, pack_run_state, read_run_state
from feda2v.errors import CheckpointError

NODE_STATE = "node_state"  # header field: {"node": name} (what the file is)


class NodeStateError(CheckpointError):
    """A node does not hold the state the server's checkpoint says it has (refused, never skipped)."""


RUN_PREFIX = "run-"


def run_scope(checkpoint_dir: str | os.PathLike) -> str:
    """The folder of one run in a node's state dir: the server's checkpoint.dir identifies a run."""
    return RUN_PREFIX + hashlib.sha256(os.path.abspath(checkpoint_dir).encode()).hexdigest()[:12]


def node_state_dir(state_dir: str | os.PathLike, node: str, scope: str = "") -> Path:
    """``node/001`` -> ``<state_dir>/<scope>/node_001`` (``scope`` "": ``<state_dir>/node_001``)."""
    return Path(state_dir) / scope / node.replace("/", "_")


def held_rounds(state_dir: str | os.PathLike, node: str, scope: str = "") -> list[int]:
    return [r for r, _ in CheckpointManager(node_state_dir(state_dir, node, scope), 1).round_files()]


def save_node_state(state_dir: str | os.PathLike, node: str, round_: int, store_state: tuple[dict, dict], *,
                    config: Mapping[str, Any], manifest_hash: str | None, keep: int, scope: str = "") -> Path:
    """Write ``node``'s store state of ``round_`` atomically; keep its newest ``keep`` files."""
    manager = CheckpointManager(node_state_dir(state_dir, node, scope), max(2, int(keep)))
    for r, path in manager.round_files():
        if r > round_:  # a timeline the server went back from (see the module doc)
            try:
                path.unlink()
            except OSError as e:
                raise CheckpointError(f"cannot remove {path} (a later round than the server's): "
                                      f"{e.strerror or e}") from None
    state = RunState(config=dict(config), round=int(round_), stores={node: store_state}, primary_store=node,
                     data_manifest_hash=manifest_hash, extra={NODE_STATE: {"node": node}})
    tensors, header = pack_run_state(state)
    path, _ = manager.save_with_header(int(round_), tensors, header)
    return path


def load_node_state(state_dir: str | os.PathLike, node: str, round_: int, *, config: Mapping[str, Any],
                    manifest_hash: str | None, scope: str = "") -> tuple[dict, dict]:
    """``node``'s verified store state of ``round_`` (tensors, meta); NodeStateError (one line
    naming the node) when it holds no such state or the file belongs to another run's config or data."""
    directory = node_state_dir(state_dir, node, scope)
    path = directory / round_filename(int(round_))
    if not path.is_file():
        held = held_rounds(state_dir, node, scope)
        raise NodeStateError(
            f"node {node} holds no state of round {round_} in {directory} (it holds "
            f"{'rounds ' + ', '.join(map(str, held)) if held else 'none'}); the server's checkpoint needs "
            "it: give that node its state directory back, or resume from a server checkpoint of a round it "
            "holds (node states are kept per run: per the server's checkpoint.dir path)")
    state = read_run_state(path)  # verified: a damaged file is one CheckpointError naming it
    if state.round != int(round_) or list(state.stores) != [node] or \
            (state.extra.get(NODE_STATE) or {}).get("node") != node:
        raise NodeStateError(f"node {node}: {path} is not {node}'s state of round {round_} "
                             f"(it holds {list(state.stores)} of round {state.round})")
    try:
        check_resumable(config, state, manifest_hash, path)
    except CheckpointError as e:
        raise NodeStateError(f"node {node}: {e}") from None
    return state.stores[node]


# -- what an in-process run of the same config would have written ---------------------------------
def find_node_checkpoint(state_dirs, node: str, round_: int, *, config: Mapping[str, Any],
                         manifest_hash: str | None) -> Path:
    """``node``'s round file of this run (``config``, ``manifest_hash``) in ``state_dirs``: each a
    run's folder (``<state dir>/run-...``, holding ``node_NNN/``) or a state dir holding runs."""
    name = f"{node.replace('/', '_')}/{round_filename(int(round_))}"
    found = []
    for d in map(Path, state_dirs):
        candidates = [d / name] + sorted(d.glob(f"{RUN_PREFIX}*/{name}"))
        for path in (p for p in candidates if p.is_file()):
            state = read_run_state(path)
            if state.config == dict(config) and state.data_manifest_hash == manifest_hash:
                found.append(path)
    if len(found) > 1:
        raise NodeStateError(f"node {node}: several runs of this config hold round {round_} ({', '.join(map(str, found))}); "
                             "pass the run's own folder (<state dir>/run-...) instead")
    if not found:
        raise NodeStateError(f"no state of round {round_} for node {node} of this run in "
                             f"{', '.join(str(d) for d in state_dirs)} (looked for [run-*/]{name})")
    return found[0]


def assemble_node_resident(server_path: str | os.PathLike, state_dirs) -> RunState:
    """A node-resident server checkpoint plus each node's own checkpoint of the round it records,
    in the in-process layout (the server's stores, then every node's store in name order; the
    server's primary store, else the first node's): the RunState the in-process engine writes for
    the same config, so ``diff_checkpoints`` compares the two engines bit for bit."""
    from feda2v.checkpoint.runstate import NODE_ROUNDS

    server = read_run_state(server_path)
    rounds = server.extra.get(NODE_ROUNDS)
    if rounds is None:
        raise CheckpointError(f"{server_path} is not a node-resident checkpoint (it records no node_rounds)")
    stores = dict(server.stores)
    for node in sorted(rounds):
        if int(rounds[node]) == 0:
            raise NodeStateError(f"node {node} never trained by round {server.round}; no node checkpoint "
                                 "stands for its store")
        path = find_node_checkpoint(state_dirs, node, rounds[node], config=server.config,
                                    manifest_hash=server.data_manifest_hash)
        state = read_run_state(path)
        if list(state.stores) != [node] or state.config != server.config or \
                state.data_manifest_hash != server.data_manifest_hash:
            raise NodeStateError(f"{path} is not {node}'s state of this run (other store, config or data)")
        stores[node] = state.stores[node]
    return RunState(config=server.config, round=server.round, stores=stores,
                    primary_store=server.primary_store or sorted(rounds)[0], classifier=server.classifier,
                    rng=server.rng, data_manifest_hash=server.data_manifest_hash,
                    extra={k: v for k, v in server.extra.items() if k != NODE_ROUNDS})


def diff_with_nodes(a: str | os.PathLike, b: str | os.PathLike, state_dirs, *, strict: bool = False) -> list[str]:
    """``diff_checkpoints`` where a node-resident side (``node_rounds`` in its header) is first
    assembled with its nodes' checkpoints from ``state_dirs`` (see ``assemble_node_resident``)."""
    import tempfile

    from feda2v.checkpoint.container import read_checkpoint
    from feda2v.checkpoint.runstate import NODE_ROUNDS, write_run_state
    from feda2v.checkpoint.tools import diff_checkpoints

    with tempfile.TemporaryDirectory(prefix="feda2v-assembled-") as tmp:
        sides = []
        for i, path in enumerate((a, b)):
            if NODE_ROUNDS in read_checkpoint(path, provenance=False)[1]:
                out = Path(tmp) / f"{i}-{Path(path).name}"
                write_run_state(out, assemble_node_resident(path, state_dirs))
                path = out
            sides.append(path)
        return diff_checkpoints(*sides, strict=strict)
