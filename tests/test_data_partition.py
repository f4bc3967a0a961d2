"""Partition invariants: every sample in exactly one node, seeded reproducibility, Dirichlet skew
that grows as alpha shrinks, exactly k classes per node, stratified per-node train/test splits."""
from types import SimpleNamespace

import numpy as np
import pytest

from feda2v.data.partition import (
    MIN_NODE_SAMPLES,
    classes_per_node,
    dirichlet,
    iid,
    label_skew,
    make_partition,
    train_test_split,
)
from feda2v.errors import ConfigError, DataError


def labels_of(n_per_class=(50, 80, 30, 120, 60, 45, 90, 70)):
    return np.repeat(np.arange(len(n_per_class)), n_per_class).astype(np.int64)


def assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "some sample is missing or duplicated"
    assert np.array_equal(np.sort(allidx), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


SCHEMES = [
    ("iid", lambda y, s: iid(y, 7, s)),
    ("dirichlet", lambda y, s: dirichlet(y, 8, 7, 0.3, s)),
    ("classes_per_node", lambda y, s: classes_per_node(y, 8, 7, 3, s)),
]


@pytest.mark.parametrize("name,fn", SCHEMES, ids=[s[0] for s in SCHEMES])
def test_every_sample_in_exactly_one_node(name, fn):
    y = labels_of()
    for seed in range(5):
        p = fn(y, seed)
        assert len(p.nodes) == 7
        assert_exact_cover(p.nodes, len(y))
        assert min(len(x) for x in p.nodes) >= MIN_NODE_SAMPLES


@pytest.mark.parametrize("name,fn", SCHEMES, ids=[s[0] for s in SCHEMES])
def test_same_seed_same_split_other_seed_other_split(name, fn):
    y = labels_of()
    a, b, c = fn(y, 3), fn(y, 3), fn(y, 4)
    assert all(np.array_equal(u, v) for u, v in zip(a.nodes, b.nodes))
    assert a.info == b.info
    assert not all(np.array_equal(u, v) for u, v in zip(a.nodes, c.nodes))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = labels_of((200,) * 10)
    skew = {}
    for alpha in (100.0, 1.0, 0.3, 0.05):
        skew[alpha] = np.mean([label_skew(y, 10, dirichlet(y, 10, 10, alpha, s).nodes) for s in range(8)])
    iid_skew = np.mean([label_skew(y, 10, iid(y, 10, s).nodes) for s in range(8)])
    # measured: ~0.03 (alpha 100), ~0.33 (1), ~0.5 (0.3), ~0.75 (0.05)
    assert iid_skew < 0.1 and skew[100.0] < 0.1
    assert skew[100.0] < skew[1.0] < skew[0.3] < skew[0.05]
    assert skew[0.05] > 0.6


def test_dirichlet_rejects_bad_alpha_and_impossible_requests():
    y = labels_of()
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match="alpha must be > 0"):
            dirichlet(y, 8, 4, bad, 0)
    with pytest.raises(DataError, match="more than the"):
        dirichlet(y[:5], 8, 6, 0.5, 0)
    with pytest.raises(DataError, match="cannot give each"):
        dirichlet(y[:9], 8, 5, 0.5, 0)  # 9 samples cannot give 5 nodes 2 each
    # Possible in principle but practically never drawn: a clear error, not an endless loop.
    tiny = np.repeat(np.arange(4), 3).astype(np.int64)
    with pytest.raises(DataError, match=r"node \d+ was left with .* Dirichlet draws"):
        dirichlet(tiny, 4, 6, 0.001, 0)


def test_classes_per_node_gives_exactly_k_classes_and_covers_all():
    y = labels_of()
    for nodes, k in [(7, 3), (8, 1), (4, 2), (10, 4), (3, 8)]:
        p = classes_per_node(y, 8, nodes, k, seed=1)
        assert_exact_cover(p.nodes, len(y))
        held = [set(np.unique(y[x]).tolist()) for x in p.nodes]
        assert all(len(h) == k for h in held), held
        assert set().union(*held) == set(range(8))
        assert [sorted(h) for h in held] == p.info["node_classes"]
        # a class's samples are split evenly among the nodes holding it
        for c in range(8):
            shares = [int((y[x] == c).sum()) for x in p.nodes if c in set(y[x].tolist())]
            assert max(shares) - min(shares) <= 1


def test_classes_per_node_varies_class_sets():
    y = labels_of((30,) * 20)
    p = classes_per_node(y, 20, 10, 4, seed=0)  # the instruments default layout
    sets = {tuple(c) for c in p.info["node_classes"]}
    assert len(sets) >= 8  # laps are reshuffled: not the same 5 sets twice
    holders = np.bincount(np.concatenate(p.info["node_classes"]), minlength=20)
    assert holders.tolist() == [2] * 20


def test_classes_per_node_bad_requests():
    y = labels_of()
    with pytest.raises(ConfigError, match="cannot cover all"):
        classes_per_node(y, 8, 3, 2, 0)
    with pytest.raises(ConfigError, match="between 1 and"):
        classes_per_node(y, 8, 4, 9, 0)
    y_small = np.repeat(np.arange(2), [3, 100]).astype(np.int64)
    with pytest.raises(DataError, match="class 0 has 3 sample"):
        classes_per_node(y_small, 2, 8, 2, 0)


def test_iid_more_nodes_than_samples():
    with pytest.raises(DataError, match="data.nodes=11 is more than the 10 samples"):
        iid(np.zeros(10, dtype=np.int64), 11, 0)
    with pytest.raises(DataError, match="node .* was left with 1 sample"):
        iid(np.zeros(10, dtype=np.int64), 10, 0)


def test_make_partition_dispatch():
    y = labels_of()
    cfg = SimpleNamespace(scheme="classes_per_node", alpha=0.5, classes_per_node=2)
    assert make_partition(y, 8, 4, cfg, 0).info["scheme"] == "classes_per_node"
    with pytest.raises(ConfigError, match="not one of"):
        make_partition(y, 8, 4, SimpleNamespace(scheme="zipf", alpha=1, classes_per_node=1), 0)


def test_train_test_split_is_stratified_and_disjoint():
    y = labels_of()
    p = classes_per_node(y, 8, 7, 3, seed=2)
    for node, idx in enumerate(p.nodes):
        tr, te = train_test_split(y, idx, 0.2, seed=2, node=node)
        assert np.array_equal(np.sort(np.concatenate([tr, te])), idx)
        assert len(np.intersect1d(tr, te)) == 0
        assert len(te) == round(len(idx) * 0.2)
        # every class the node holds is in its training split, test mix follows the node's mix
        assert set(y[tr].tolist()) == set(y[idx].tolist())
        for c in set(y[idx].tolist()):
            assert abs(int((y[te] == c).sum()) - 0.2 * int((y[idx] == c).sum())) <= 1
        tr2, te2 = train_test_split(y, idx, 0.2, seed=2, node=node)
        assert np.array_equal(tr, tr2) and np.array_equal(te, te2)


def test_train_test_split_small_nodes_keep_one_of_each():
    y = np.array([0, 1, 1, 2], dtype=np.int64)
    tr, te = train_test_split(y, np.arange(4), 0.2, seed=0, node=0)
    assert len(te) == 1 and len(tr) == 3
    tr, te = train_test_split(y, np.array([0, 3]), 0.5, seed=0, node=0)  # singletons only
    assert len(te) == 1 and len(tr) == 1
