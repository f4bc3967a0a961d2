"""prepare / load_prepared in-process: manifest content and hashes, byte-identical re-prepare,
standardisation, atomic replacement, and rejection of missing or corrupted prepared data."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from feda2v.config import load_config
from feda2v.data import PreparedData, files_hash, load_prepared, prepare
from feda2v.data.prepared import node_file
from feda2v.errors import ConfigError, DataError


def cfg_for(tmp_path: Path, **data):
    base = {"name": "digits", "nodes": 5, "condition": "onehot",
            "prepared_dir": str(tmp_path / "prepared"),
            "instruments": {"cache_dir": str(tmp_path / "cache")},
            "partition": {"scheme": "dirichlet", "alpha": 0.5}}
    for k, v in data.items():
        if isinstance(v, dict):
            base[k] = {**base.get(k, {}), **v}
        else:
            base[k] = v
    return load_config({"seed": 7, "data": base})


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_prepare_digits_manifest_and_tensors(tmp_path):
    out = prepare(cfg_for(tmp_path))
    assert out == tmp_path / "prepared"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["conditions.safetensors", "manifest.json"] + [node_file(i) for i in range(5)]
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == 1 and m["source"] == "digits" and m["seed"] == 7
    assert m["classes"] == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert m["feature_dim"] == 64 and m["condition"] == "onehot" and m["condition_dim"] == 10
    assert m["nodes"] == 5 and m["partition"]["scheme"] == "dirichlet" and m["partition"]["alpha"] == 0.5
    assert m["test_fraction"] == 0.2
    assert m["sizes"]["train"] + m["sizes"]["test"] == 1797
    assert np.array(m["counts"]["train"]).sum() == m["sizes"]["train"]
    assert np.array(m["counts"]["test"]).shape == (5, 10)
    assert m["standardization"]["method"] == "zscore"
    # files map: every data file with its real sha256; hash over the sorted map
    assert set(m["files"]) == set(names) - {"manifest.json"}
    for name, digest in m["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    expect = hashlib.sha256(json.dumps(m["files"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert m["hash"] == expect == files_hash(m["files"])

    data = load_prepared(out)
    assert isinstance(data, PreparedData)
    assert data.manifest_hash == m["hash"] and data.classes == m["classes"]
    assert data.feature_dim == 64 and data.condition_dim == 10
    assert torch.equal(data.conditions, torch.eye(10))
    assert [n.node_id for n in data.nodes] == list(range(5))
    for i, node in enumerate(data.nodes):
        assert node.train_x.dtype == torch.float32 and node.train_y.dtype == torch.int64
        assert node.train_x.shape == (len(node.train_y), 64) and node.test_x.shape == (len(node.test_y), 64)
        assert torch.bincount(node.train_y, minlength=10).tolist() == m["counts"]["train"][i]
        assert len(node.test_y) >= 1
    # z-scored with training statistics: pooled training features have mean 0, std 1 (or 0 for
    # constant pixels), test features are only approximately so
    train = torch.cat([n.train_x for n in data.nodes]).double()
    assert train.mean(0).abs().max() < 1e-5
    std = train.std(0, unbiased=False)
    assert torch.all(((std - 1).abs() < 1e-4) | (std < 1e-6))
    assert (std < 1e-6).sum() >= 1  # digits has blank corner pixels: floored, not divided by 0


def test_prepare_is_byte_reproducible_and_seed_sensitive(tmp_path):
    a = snapshot(prepare(cfg_for(tmp_path, prepared_dir=str(tmp_path / "a"))))
    b = snapshot(prepare(cfg_for(tmp_path, prepared_dir=str(tmp_path / "b"))))
    assert a == b
    again = snapshot(prepare(cfg_for(tmp_path, prepared_dir=str(tmp_path / "a"))))  # over itself
    assert again == a
    other = load_config({"seed": 8, "data": {**dict(cfg_for(tmp_path).data), "prepared_dir": str(tmp_path / "c")}})
    c = snapshot(prepare(other))
    assert c["manifest.json"] != a["manifest.json"]


@pytest.mark.parametrize("scheme", [{"scheme": "iid"}, {"scheme": "classes_per_node", "classes_per_node": 3}])
def test_prepare_other_schemes_and_max_samples(tmp_path, scheme):
    out = prepare(cfg_for(tmp_path, partition=scheme, max_samples=600))
    data = load_prepared(out)
    m = data.manifest
    assert m["sizes"]["train"] + m["sizes"]["test"] == 600
    if scheme["scheme"] == "classes_per_node":
        for node in data.nodes:
            assert len(torch.unique(torch.cat([node.train_y, node.test_y]))) == 3
            assert len(torch.unique(node.train_y)) == 3


def test_prepare_rejects_bad_requests_and_keeps_existing_dir(tmp_path):
    out = prepare(cfg_for(tmp_path))
    before = snapshot(out)
    with pytest.raises(DataError, match="more than the 1797 samples"):
        prepare(cfg_for(tmp_path, nodes=5000))
    with pytest.raises(DataError, match="cannot give each"):
        prepare(cfg_for(tmp_path, nodes=40, max_samples=60))
    with pytest.raises(DataError, match=r"node \d+ was left with \d sample"):
        prepare(cfg_for(tmp_path, nodes=40, max_samples=200, partition={"alpha": 0.01}))
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        prepare(cfg_for(tmp_path, partition={"alpha": 0.0}))
    with pytest.raises(ConfigError, match="data.name"):
        prepare(cfg_for(tmp_path, name="cifar"))
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no temp dirs left


def test_failure_while_writing_keeps_existing_dir(tmp_path, monkeypatch):
    out = prepare(cfg_for(tmp_path))
    before = snapshot(out)
    import feda2v.data.prepared as prepared_mod

    real_rename = os.rename
    calls = []

    def rename_failing_at_swap(src, dst):
        # the old dir has already been moved aside when the new one fails to move in
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".prepared.tmp-"):
            raise OSError("disk full (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(prepared_mod.os, "rename", rename_failing_at_swap)
    from feda2v.errors import OutputError

    with pytest.raises(OutputError, match="simulated"):  # one user-facing line, not a traceback
        prepare(cfg_for(tmp_path, partition={"scheme": "iid"}))
    monkeypatch.undo()
    assert calls[0][0] == "prepared" and calls[-1][1] == "prepared"  # moved aside, put back
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_data_moved_aside_by_a_crash_is_restored(tmp_path):
    out = prepare(cfg_for(tmp_path))
    before = snapshot(out)
    out.rename(tmp_path / ".prepared.old-crash")  # as if killed between the two renames
    with pytest.raises(DataError):
        prepare(cfg_for(tmp_path, nodes=5000))
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_existing_file_in_the_way_is_an_error(tmp_path):
    (tmp_path / "prepared").write_text("not a dir")
    with pytest.raises(DataError, match="not a directory"):
        prepare(cfg_for(tmp_path))
    assert (tmp_path / "prepared").read_text() == "not a dir"


@pytest.fixture
def prepared(tmp_path):
    return prepare(cfg_for(tmp_path))


def test_load_prepared_missing(tmp_path, prepared):
    with pytest.raises(DataError, match="is missing; run feda2v-prepare"):
        load_prepared(tmp_path / "nope")
    (prepared / node_file(2)).unlink()
    with pytest.raises(DataError, match=f"is missing {node_file(2)}"):
        load_prepared(prepared)


def test_load_prepared_missing_manifest(prepared):
    (prepared / "manifest.json").unlink()
    with pytest.raises(DataError, match="has no manifest.json"):
        load_prepared(prepared)


def test_load_prepared_truncated_file(prepared):
    p = prepared / node_file(1)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"corrupted {node_file(1)}"):
        load_prepared(prepared)


def test_load_prepared_flipped_byte(prepared):
    p = prepared / "conditions.safetensors"
    b = bytearray(p.read_bytes())
    b[-1] ^= 0x01
    p.write_bytes(bytes(b))
    with pytest.raises(DataError, match="corrupted conditions.safetensors"):
        load_prepared(prepared)


def test_load_prepared_edited_manifest(prepared):
    mp = prepared / "manifest.json"
    m = json.loads(mp.read_text())
    m["files"][node_file(0)] = "0" * 64
    mp.write_text(json.dumps(m))
    with pytest.raises(DataError, match="does not match its hash"):
        load_prepared(prepared)
    mp.write_text('{"format": 1, "sour')
    with pytest.raises(DataError, match="damaged manifest.json"):
        load_prepared(prepared)


def test_load_prepared_counts_must_match(prepared):
    mp = prepared / "manifest.json"
    m = json.loads(mp.read_text())
    m["counts"]["train"][0][0] += 1
    mp.write_text(json.dumps(m))
    with pytest.raises(DataError, match="class counts differ"):
        load_prepared(prepared)


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("counts"),
    lambda m: m["counts"].pop("test"),
    lambda m: m.__setitem__("nodes", "five"),
    lambda m: m["counts"]["train"].pop(),
    lambda m: m.__setitem__("classes", []),
])
def test_load_prepared_malformed_manifest_is_one_clear_error(prepared, edit):
    mp = prepared / "manifest.json"
    m = json.loads(mp.read_text())
    edit(m)
    mp.write_text(json.dumps(m))
    with pytest.raises(DataError, match="manifest.json|class counts"):
        load_prepared(prepared)


def test_load_prepared_swapped_files_detected(prepared):
    # both files intact on their own, but in each other's place: hashes catch it
    a, b = prepared / node_file(0), prepared / node_file(1)
    ab, bb = a.read_bytes(), b.read_bytes()
    a.write_bytes(bb)
    b.write_bytes(ab)
    with pytest.raises(DataError, match="corrupted node_000"):
        load_prepared(prepared)


def test_relative_prepared_dir_follows_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config({"data": {"name": "digits", "nodes": 3, "condition": "onehot",
                                "partition": {"scheme": "iid"}}})
    out = prepare(cfg)
    assert out == Path("data/prepared") and (tmp_path / "data/prepared/manifest.json").is_file()
    assert os.listdir(tmp_path / "data") == ["prepared"]
