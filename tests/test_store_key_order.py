"""Key order is recorded (a list), never derived from a dict's order: every path that rebuilds a
store from a file gets the writer's keys, with groups out of alphabetical order and class names
that sort differently from their indices (the header JSON is written with sorted object keys)."""
from __future__ import annotations

import json

import pytest
import torch

from feda2v.checkpoint import read_checkpoint, write_checkpoint
from feda2v.seeding import torch_generator
from feda2v.store import GeneratorStore, StoreSpec

CLASSES = ("zeta", "alpha", "mid", "beta", "omega")  # index order != name order
GROUPS = {"zz": ["mid", "alpha"], "aa": ["zeta"], "mm": ["beta"]}  # key order != name order


def trained(default_group="rest") -> GeneratorStore:
    spec = StoreSpec(type="cvae", granularity="per_group", classes=CLASSES, feature_dim=4, condition_dim=5,
                     latent_dim=2, hidden_dim=6, class_groups=GROUPS, default_group=default_group)
    s = GeneratorStore(spec, torch.eye(5))
    g = torch.Generator().manual_seed(0)
    for r in range(2):
        s.train_batch(torch.randn(20, 4, generator=g), torch.arange(20) % 5, gen=torch_generator("k", r),
                      node="node/000", round=r)
    return s


def assert_same_store(a: GeneratorStore, b: GeneratorStore) -> None:
    assert b.keys == a.keys == ["group/zz", "group/aa", "group/mm", "group/rest"]
    assert [b.key_for_class(c) for c in CLASSES] == [a.key_for_class(c) for c in CLASSES]
    ta, tb = a.state_dict()[0], b.state_dict()[0]
    assert set(ta) == set(tb) and all(torch.equal(ta[n], tb[n]) for n in ta)
    idx = torch.arange(5)
    assert torch.equal(a.sample(idx, gen=torch_generator("s")), b.sample(idx, gen=torch_generator("s")))


def test_spec_json_keeps_group_order_through_sorted_json():
    s = trained()
    d = json.loads(json.dumps(s.spec.to_json(), sort_keys=True))
    assert d["class_groups"] == [["zz", ["mid", "alpha"]], ["aa", ["zeta"]], ["mm", ["beta"]]]
    assert StoreSpec.from_json(d) == s.spec
    # a spec with the same groups in another order is another spec (it makes other keys)
    other = StoreSpec.from_json({**d, "class_groups": sorted(d["class_groups"])})
    assert other != s.spec


def test_from_state_after_sorted_json_rebuilds_the_same_keys():
    s = trained()
    tensors, meta = s.state_dict()
    assert_same_store(s, GeneratorStore.from_state(tensors, json.loads(json.dumps(meta, sort_keys=True))))


def test_older_meta_with_groups_as_an_object_is_ordered_by_its_recorded_keys():
    s = trained()
    tensors, meta = s.state_dict()
    meta = json.loads(json.dumps(meta))
    meta["spec"]["class_groups"] = dict(sorted((g, cs) for g, cs in meta["spec"]["class_groups"]))
    del meta["spec"]["arch"]
    meta = json.loads(json.dumps(meta, sort_keys=True))  # as a header written before the list form
    rebuilt = GeneratorStore.from_state(tensors, meta)
    assert_same_store(s, rebuilt)
    s.load_state_dict(tensors, meta)  # and the in-process resume path reads it too


def _write(path, s):
    tensors, meta = s.state_dict()
    write_checkpoint(path, {f"store/server/{k}": v for k, v in tensors.items()},
                     {"stores": {"server": meta}, "primary_store": "server", "round": 2})


def test_evaluate_load_rebuilds_the_writers_keys(tmp_path):
    from feda2v.evaluate.job import load_trained_store

    s = trained()
    _write(tmp_path / "c.ckpt", s)
    _, header = read_checkpoint(tmp_path / "c.ckpt")
    assert header["stores"]["server"]["spec"]["class_groups"][0][0] == "zz"
    loaded, _, name = load_trained_store(tmp_path / "c.ckpt")
    assert name == "server"
    assert_same_store(s, loaded)


def test_flower_wire_rebuilds_the_writers_keys():
    """The Flower ClientApp rebuilds the lent store from the wire bytes' header."""
    from feda2v.checkpoint import checkpoint_bytes, read_checkpoint_bytes

    s = trained()
    tensors, meta = s.state_dict()
    got_t, header = read_checkpoint_bytes(checkpoint_bytes(tensors, {"store": meta}))
    assert_same_store(s, GeneratorStore.from_state(got_t, header["store"]))


def test_pyfunc_model_rebuilds_the_writers_keys(tmp_path):
    pytest.importorskip("mlflow")
    from feda2v.tracking.pyfunc import StoreModel

    s = trained()
    _write(tmp_path / "c.ckpt", s)

    class Ctx:
        artifacts = {"checkpoint": str(tmp_path / "c.ckpt")}
        model_config = {}

    m = StoreModel()
    m.load_context(Ctx())
    assert m.classes == list(CLASSES)
    assert_same_store(s, m.store)
