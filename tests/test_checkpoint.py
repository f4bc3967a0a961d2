"""Container round-trips, determinism, size, header rules, version compatibility."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from feda2v.checkpoint import (
    FORMAT_VERSION,
    diff_checkpoints,
    inspect_checkpoint,
    read_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from feda2v.checkpoint import container
from feda2v.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]


def sample_state(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "store/server/unified/generator/param/encoder.0.weight": torch.randn(32, 20, generator=g),
        "store/server/unified/generator/param/encoder.0.bias": torch.randn(32, generator=g),
        "store/server/unified/generator/optim/encoder.0.weight/exp_avg": torch.randn(32, 20, generator=g),
        "store/server/unified/generator/optim/encoder.0.weight/exp_avg_sq": torch.rand(32, 20, generator=g),
        "store/server/unified/generator/optim/encoder.0.weight/step": torch.tensor(7.0),
        "rng/torch": torch.Generator().manual_seed(seed).get_state(),
        "half": torch.randn(3, 5, generator=g).to(torch.float16),
        "bf": torch.randn(4, generator=g).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "ints": torch.arange(-3, 9, dtype=torch.int32).reshape(3, 4),
        "bytes": torch.arange(7, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "scalar64": torch.tensor(-0.0, dtype=torch.float64),
    }
    header = {
        "round": 3,
        "node_cursor": 0,
        "keys": ["unified"],
        "roles": ["generator"],
        "optimizers": {"unified/generator": {"step": 7, "lr": 0.001, "weight_decay": 0.01}},
        "config": {"seed": 0, "generator": {"granularity": "unified", "type": "vae"}, "note": "naïve ✓"},
        "data_manifest_hash": "ab" * 32,
        "created_by": "tests",
    }
    return tensors, header


def user_header(header: dict) -> dict:
    return {k: v for k, v in header.items() if k not in container.RESERVED}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        # bitwise (distinguishes -0.0 from 0.0)
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_round_trip_tensors_and_header(tmp_path):
    tensors, header = sample_state()
    write_checkpoint(tmp_path / "a.ckpt", tensors, header)
    got, h = read_checkpoint(tmp_path / "a.ckpt")
    assert_same(tensors, got)
    assert user_header(h) == header
    assert h["format_version"] == FORMAT_VERSION == 2
    assert sorted(h["tensors"]) == sorted(tensors)
    assert verify_checkpoint(tmp_path / "a.ckpt") == h
    # loaded tensors own writable memory
    got["half"].add_(1)


def test_save_load_save_is_byte_identical_across_processes(tmp_path):
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]);"
        "from test_checkpoint import sample_state; from feda2v.checkpoint import write_checkpoint;"
        "t, h = sample_state(5); write_checkpoint(sys.argv[1], t, h)"
    )
    first = tmp_path / "first.ckpt"
    subprocess.run([sys.executable, "-c", code, str(first), str(Path(__file__).parent)], check=True)
    tensors, header = read_checkpoint(first)
    write_checkpoint(tmp_path / "second.ckpt", tensors, user_header(header))
    assert first.read_bytes() == (tmp_path / "second.ckpt").read_bytes()
    # and a third generation from a fresh in-process state with the same seed
    t3, h3 = sample_state(5)
    write_checkpoint(tmp_path / "third.ckpt", t3, h3)
    assert first.read_bytes() == (tmp_path / "third.ckpt").read_bytes()
    # tensor/header insertion order does not matter
    write_checkpoint(tmp_path / "rev.ckpt", dict(reversed(list(t3.items()))), dict(reversed(list(h3.items()))))
    assert first.read_bytes() == (tmp_path / "rev.ckpt").read_bytes()


def test_is_a_real_safetensors_file(tmp_path):
    tensors, header = sample_state()
    p = tmp_path / "a.ckpt"
    write_checkpoint(p, tensors, header)
    assert_same(tensors, load_file(p))
    with safe_open(p, framework="pt") as f:
        meta = f.metadata()
    assert set(meta) == {"feda2v"}
    inner = json.loads(meta["feda2v"])
    assert inner["round"] == 3 and inner["format_version"] == FORMAT_VERSION
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    # every tensor starts aligned to its item size (zero-copy friendly)
    for name, e in json.loads(raw[8 : 8 + n]).items():
        if name != "__metadata__":
            assert (8 + n + e["data_offsets"][0]) % tensors[name].element_size() == 0, name


def test_size_is_tensor_bytes_plus_header(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"k{i}/w": torch.randn(256, 64, generator=g) for i in range(20)}
    tensors.update({f"k{i}/exp_avg": torch.randn(256, 64, generator=g) for i in range(20)})
    p = tmp_path / "a.ckpt"
    write_checkpoint(p, tensors, {"round": 1})
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    size = p.stat().st_size
    assert size <= 1.05 * tensor_bytes + 8 + n
    assert size == tensor_bytes + 8 + n  # no slack at all in practice


def test_non_contiguous_and_grad_tensors(tmp_path):
    w = torch.randn(6, 4, requires_grad=True)
    tensors = {"t": torch.randn(4, 6).t(), "w": w, "s": torch.randn(10)[::3]}
    write_checkpoint(tmp_path / "a.ckpt", tensors, {})
    got, _ = read_checkpoint(tmp_path / "a.ckpt")
    for k in tensors:
        assert torch.equal(got[k], tensors[k].detach())


@pytest.mark.parametrize(
    "tensors, header, match",
    [
        ({"a": torch.zeros(2)}, {"sha256": "x"}, "reserved"),
        ({"a": torch.zeros(2)}, {"format_version": 9}, "reserved"),
        ({"a": torch.zeros(2)}, {"x": object()}, "not plain JSON"),
        ({"a": torch.zeros(2)}, {"x": float("nan")}, "not plain JSON"),
        ({"a": torch.zeros(2, dtype=torch.complex64)}, {}, "dtype"),
        ({"a": [1, 2]}, {}, "not a tensor"),
        ({"": torch.zeros(1)}, {}, "invalid tensor name"),
        ({"__metadata__": torch.zeros(1)}, {}, "invalid tensor name"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_overwritten(tmp_path, tensors, header, match):
    p = tmp_path / "a.ckpt"
    good_t, good_h = sample_state()
    write_checkpoint(p, good_t, good_h)
    before = p.read_bytes()
    with pytest.raises(CheckpointError, match=match):
        write_checkpoint(p, tensors, header)
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.ckpt"]  # no temp file left


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        write_checkpoint(tmp_path / "nope" / "a.ckpt", {"a": torch.zeros(1)}, {})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "absent.ckpt")
    with pytest.raises(CheckpointError, match="directory"):
        read_checkpoint(tmp_path)


def _write_as_version(path: Path, version: int) -> None:
    tensors, header = sample_state()
    old = container.FORMAT_VERSION
    container.FORMAT_VERSION = version
    try:
        write_checkpoint(path, tensors, header)
    finally:
        container.FORMAT_VERSION = old


def test_newer_format_version_is_a_clear_error(tmp_path):
    p = tmp_path / "future.ckpt"
    _write_as_version(p, FORMAT_VERSION + 1)
    for fn in (read_checkpoint, verify_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match="written by a newer feda2v") as e:
            fn(p)
        assert "\n" not in str(e.value)


def test_version_zero_is_unknown(tmp_path):
    p = tmp_path / "zero.ckpt"
    _write_as_version(p, 0)
    with pytest.raises(CheckpointError, match="unknown checkpoint format version 0"):
        read_checkpoint(p)


# The committed fixture of format version 1 (written by tests/fixtures/make_checkpoint_v1.py).
# Every later feda2v must keep loading it with these exact values.
V1_FIXTURE = FIXTURES / "checkpoint_v1.ckpt"


def test_committed_v1_fixture_still_loads():
    tensors, header = read_checkpoint(V1_FIXTURE)
    assert header["format_version"] == 1
    assert header["round"] == 2
    assert header["keys"] == ["class/a", "class/b"]
    assert header["roles"] == ["generator"]
    assert header["optimizers"]["class/a/generator"] == {"step": 4, "lr": 0.001, "weight_decay": 0.01}
    assert header["sha256"] == json.loads((FIXTURES / "checkpoint_v1.json").read_text())["sha256"]
    expected = json.loads((FIXTURES / "checkpoint_v1.json").read_text())["tensors"]
    assert sorted(tensors) == sorted(expected)
    for name, want in expected.items():
        t = tensors[name]
        assert str(t.dtype) == want["dtype"] and list(t.shape) == want["shape"], name
        assert t.double().sum().item() == pytest.approx(want["sum"], rel=0, abs=1e-9), name
    # rewriting the fixture with today's writer reproduces it exactly while the format is v1
    if FORMAT_VERSION == 1:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "again.ckpt"
            write_checkpoint(out, tensors, user_header(header))
            assert out.read_bytes() == V1_FIXTURE.read_bytes()


def test_inspect_reports_federation_fields(tmp_path):
    tensors, header = sample_state()
    p = tmp_path / "a.ckpt"
    write_checkpoint(p, tensors, header)
    info = inspect_checkpoint(p)
    assert info["format_version"] == FORMAT_VERSION
    assert info["round"] == 3
    assert info["keys"] == ["unified"]
    assert info["optimizers"] == {"unified/generator": {"step": 7, "lr": 0.001, "weight_decay": 0.01}}
    assert info["sha256"] == read_checkpoint(p)[1]["sha256"]
    assert info["tensor_count"] == len(tensors)
    json.dumps(info)


def test_inspect_falls_back_to_store_meta_for_optimizers(tmp_path):
    tensors, header = sample_state()
    del header["optimizers"]
    header["stores"] = {"server": {"optimizers": {"unified/generator": {"name": "adamw", "lr": 0.002, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0, "step": 11}}}}
    write_checkpoint(tmp_path / "a.ckpt", tensors, header)
    info = inspect_checkpoint(tmp_path / "a.ckpt")
    assert info["optimizers"] == {"unified/generator": {"step": 11, "lr": 0.002, "weight_decay": 0.0}}
    assert info["stores"] == ["server"]


def test_diff_identical_and_different(tmp_path):
    t, h = sample_state()
    write_checkpoint(tmp_path / "a.ckpt", t, h)
    write_checkpoint(tmp_path / "b.ckpt", t, h)
    assert diff_checkpoints(tmp_path / "a.ckpt", tmp_path / "b.ckpt") == []
    t2 = dict(t)
    t2["half"] = t["half"].clone()
    t2["half"][0, 0] += 1
    t2["scalar64"] = torch.tensor(0.0, dtype=torch.float64)  # +0.0 vs -0.0: bitwise different
    del t2["bytes"]
    t2["new"] = torch.ones(1)
    h2 = dict(h, round=4, config={**h["config"], "seed": 1})
    write_checkpoint(tmp_path / "c.ckpt", t2, h2)
    d = diff_checkpoints(tmp_path / "a.ckpt", tmp_path / "c.ckpt")
    text = "\n".join(d)
    assert "tensor half: 1 of 15 values differ" in text
    assert "tensor scalar64: 1 of 1 values differ" in text
    assert any(x.startswith("tensor bytes: only in") for x in d)
    assert any(x.startswith("tensor new: only in") for x in d)
    assert "header round: 3 vs 4" in d
    assert "header config.seed: 0 vs 1" in d
    assert not any("sha256" in x for x in d)


def test_resume_check_refuses_another_config_by_name(tmp_path):
    """The one resume compatibility check (checkpoint/runstate.py): state keys must match, the
    operational ones and federation.rounds may differ, and so may nothing else."""
    from feda2v.checkpoint import RunState, check_resumable, state_config
    from feda2v.config import load_config

    cfg = load_config({"data": {"name": "digits"}, "generator": {"granularity": "per_class", "type": "gan"}})
    mine = state_config(cfg)
    assert "train" not in mine and "tracking" not in mine and "engine" not in mine["federation"]
    other = load_config({"data": {"name": "digits"}, "generator": {"granularity": "unified", "type": "gan"},
                         "train": {"threads": 7}, "checkpoint": {"dir": "elsewhere"},
                         "federation": {"rounds": 99}})
    same_state = load_config({"data": {"name": "digits"}, "generator": {"granularity": "per_class", "type": "gan"},
                              "train": {"threads": 7}, "checkpoint": {"dir": "elsewhere"},
                              "federation": {"rounds": 99}})

    def state(c):
        return RunState(config=state_config(c), round=1, stores={}, primary_store="server",
                        data_manifest_hash="ab" * 32)

    check_resumable(mine, state(same_state), "ab" * 32, tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match="generator.granularity is 'unified' there, 'per_class' here"):
        check_resumable(mine, state(other), "ab" * 32, tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match="other prepared data"):
        check_resumable(mine, state(same_state), "cd" * 32, tmp_path / "a.ckpt")
    # a format-1 header recorded the operational keys too: they are skipped, not compared
    v1 = RunState(config=run_params_like(cfg), round=1, stores={}, primary_store="server",
                  data_manifest_hash="ab" * 32)
    check_resumable(mine, v1, "ab" * 32, tmp_path / "a.ckpt")


def run_params_like(cfg) -> dict:
    from feda2v.config import to_plain

    plain = to_plain(cfg)
    plain["train"]["threads"] = 3
    plain["checkpoint"]["dir"] = "/somewhere/else"
    return plain
