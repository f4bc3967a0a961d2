"""Federated partitions of a labelled sample set: iid, Dirichlet(alpha), k classes per node.

Every function is pure: labels + settings + a seed in, index arrays out (numpy, int64, sorted),
so the same seed gives the same split in any process. Every sample lands in exactly one node.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feda2v.errors import ConfigError, DataError
from feda2v.seeding import numpy_generator

# A node needs one sample to train on and one to test on.
MIN_NODE_SAMPLES = 2
# Dirichlet draws that leave a node too small are redrawn (the usual practice in FL benchmarks);
# after this many the request is treated as impossible rather than looping forever.
DIRICHLET_MAX_DRAWS = 1000


@dataclass(frozen=True)
class Partition:
    nodes: list[np.ndarray]  # per node: sorted sample indices
    info: dict  # JSON-able facts for the manifest (scheme, alpha, draws, node classes ...)


def _check_sizes(n: int, nodes: int) -> None:
    if nodes < 1:
        raise ConfigError(f"data.nodes must be > 0, got {nodes}")
    if nodes > n:
        raise DataError(
            f"data.nodes={nodes} is more than the {n} samples available; "
            "lower data.nodes or use more data (data.max_samples / clips_per_class)"
        )


def _check_min(parts: list[np.ndarray], what: str) -> None:
    for i, p in enumerate(parts):
        if len(p) < MIN_NODE_SAMPLES:
            raise DataError(
                f"node {i} was left with {len(p)} sample(s) by {what} (each node needs at least "
                f"{MIN_NODE_SAMPLES}: one to train, one to test); lower data.nodes or use more data"
            )


def iid(labels: np.ndarray, nodes: int, seed: int) -> Partition:
    n = len(labels)
    _check_sizes(n, nodes)
    perm = numpy_generator(seed, "partition", "iid").permutation(n)
    parts = [np.sort(p).astype(np.int64) for p in np.array_split(perm, nodes)]
    _check_min(parts, "the iid split")
    return Partition(parts, {"scheme": "iid"})


def dirichlet(labels: np.ndarray, num_classes: int, nodes: int, alpha: float, seed: int) -> Partition:
    """Per class, node shares ~ Dir(alpha); small alpha = few classes dominate each node."""
    if not alpha > 0:
        raise ConfigError(f"data.partition.alpha must be > 0, got {alpha}")
    n = len(labels)
    _check_sizes(n, nodes)
    if n < MIN_NODE_SAMPLES * nodes:
        raise DataError(
            f"{n} samples cannot give each of data.nodes={nodes} nodes {MIN_NODE_SAMPLES} samples; "
            "lower data.nodes or use more data"
        )
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    n_c = np.array([len(i) for i in by_class])
    sizes = np.zeros(nodes, dtype=np.int64)
    for draw in range(DIRICHLET_MAX_DRAWS):
        # Draw only the shares (cheap) until every node is big enough; then deal the samples.
        share = numpy_generator(seed, "partition", "dirichlet", draw).dirichlet(
            np.full(nodes, float(alpha)), size=num_classes)  # [classes, nodes]
        if not np.isfinite(share).all():
            continue
        ends = np.floor(np.cumsum(share, axis=1) * n_c[:, None]).astype(np.int64)
        ends[:, -1] = n_c  # the last node takes the rounding remainder
        counts = np.diff(np.concatenate([np.zeros((num_classes, 1), np.int64), ends], axis=1), axis=1)
        sizes = counts.sum(axis=0)
        if sizes.min() >= MIN_NODE_SAMPLES:
            rng = numpy_generator(seed, "partition", "dirichlet", draw, "deal")
            buckets: list[list[np.ndarray]] = [[] for _ in range(nodes)]
            for c, idx in enumerate(by_class):
                for node, chunk in enumerate(np.split(rng.permutation(idx), ends[c, :-1])):
                    buckets[node].append(chunk)
            parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
            return Partition(parts, {"scheme": "dirichlet", "alpha": float(alpha), "draws": draw + 1})
    smallest = int(np.argmin(sizes))
    raise DataError(
        f"node {smallest} was left with {sizes[smallest]} sample(s) (each node needs at least "
        f"{MIN_NODE_SAMPLES}: one to train, one to test) and {DIRICHLET_MAX_DRAWS} Dirichlet draws "
        f"did not fix it (alpha={alpha}, {nodes} nodes, {n} samples); raise data.partition.alpha "
        "or lower data.nodes"
    )


def classes_per_node(labels: np.ndarray, num_classes: int, nodes: int, k: int, seed: int) -> Partition:
    """FedA2V layout: each node holds exactly k classes, every class is held by some node,
    and a class's samples are split evenly among the nodes that hold it.

    Classes are dealt in laps, each lap a fresh seeded permutation of all classes, k per node:
    holders per class differ by at most one, and nodes get varied class sets (one fixed order
    would repeat the same sets lap after lap). Where a node's k straddle two laps, the classes it
    already has are moved to the end of the new lap, so its k classes are always distinct.
    """
    n = len(labels)
    _check_sizes(n, nodes)
    if not 0 < k <= num_classes:
        raise ConfigError(
            f"data.partition.classes_per_node={k} must be between 1 and the {num_classes} classes"
        )
    if nodes * k < num_classes:
        raise ConfigError(
            f"data.nodes={nodes} x data.partition.classes_per_node={k} cannot cover all "
            f"{num_classes} classes; raise data.nodes or classes_per_node"
        )
    rng = numpy_generator(seed, "partition", "classes_per_node")
    seq: list[int] = []
    while len(seq) < nodes * k:
        lap = [int(c) for c in rng.permutation(num_classes)]
        pos = len(seq) % k  # classes already dealt to the node being filled
        head = set(seq[len(seq) - pos:]) if pos else set()
        seq += [c for c in lap if c not in head] + [c for c in lap if c in head]
    node_classes = [sorted(seq[i * k:(i + 1) * k]) for i in range(nodes)]
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for node, cls in enumerate(node_classes):
        for c in cls:
            holders[c].append(node)
    buckets: list[list[np.ndarray]] = [[] for _ in range(nodes)]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < len(holders[c]):
            raise DataError(
                f"class {c} has {len(idx)} sample(s) but {len(holders[c])} nodes hold it, so a node "
                "would be left without samples of one of its classes; lower data.nodes or "
                "data.partition.classes_per_node, or use more data"
            )
        for node, chunk in zip(holders[c], np.array_split(idx, len(holders[c]))):
            buckets[node].append(chunk)
    parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
    _check_min(parts, f"classes_per_node={k}")
    return Partition(parts, {"scheme": "classes_per_node", "classes_per_node": int(k),
                             "node_classes": node_classes})


def make_partition(labels: np.ndarray, num_classes: int, nodes: int, part_cfg, seed: int) -> Partition:
    scheme = part_cfg.scheme
    if scheme == "iid":
        return iid(labels, nodes, seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_classes, nodes, part_cfg.alpha, seed)
    if scheme == "classes_per_node":
        return classes_per_node(labels, num_classes, nodes, part_cfg.classes_per_node, seed)
    from feda2v.config.schema import CHOICES

    raise ConfigError(f"data.partition.scheme: {scheme!r} is not one of "
                      f"{', '.join(CHOICES['data.partition.scheme'])}")


def train_test_split(labels: np.ndarray, idx: np.ndarray, test_fraction: float, seed: int,
                     node: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of one node's samples: round(n * test_fraction) test samples, clipped to
    [1, n-1]; a class keeps at least one training sample whenever it can, so a node trains on
    every class it holds. Returns sorted index arrays."""
    n = len(idx)
    total = int(min(max(round(n * test_fraction), 1), n - 1))
    rng = numpy_generator(seed, "split", node)
    classes = np.unique(labels[idx])
    groups = [rng.permutation(idx[labels[idx] == c]) for c in classes]
    quota = np.array([len(g) * test_fraction for g in groups])
    cap = np.array([max(len(g) - 1, 0) for g in groups])
    take = np.minimum(np.floor(quota).astype(np.int64), cap)
    # Largest remainder first (ties: class order), first within the caps, then without them.
    order = sorted(range(len(groups)), key=lambda i: (-(quota[i] - np.floor(quota[i])), i))
    for limit in (cap, np.array([len(g) for g in groups])):
        progress = True
        while take.sum() < total and progress:
            progress = False
            for i in order:
                if take.sum() < total and take[i] < limit[i]:
                    take[i] += 1
                    progress = True
    while take.sum() > total:  # caps can't push above total, but floor can when total was clipped
        take[int(np.argmax(take))] -= 1
    test = np.concatenate([g[:t] for g, t in zip(groups, take)])
    train = np.concatenate([g[t:] for g, t in zip(groups, take)])
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def label_skew(labels: np.ndarray, num_classes: int, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each node's class mix and the global one
    (0 = every node looks like the whole data set; near 1 = nodes see disjoint classes)."""
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    dists = []
    for p in parts:
        local = np.bincount(labels[p], minlength=num_classes) / max(len(p), 1)
        dists.append(0.5 * np.abs(local - glob).sum())
    return float(np.mean(dists))
