"""CheckpointManager (round files, latest pointer, pruning, resume lookup) and RNG capture."""
from __future__ import annotations

import errno
import os
import random

import numpy as np
import pytest
import torch

from feda2v.checkpoint import (
    CheckpointManager,
    capture_rng,
    read_checkpoint,
    restore_rng,
    write_checkpoint,
)
from feda2v.errors import CheckpointError


def state(round_: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), float(round_)), "step": torch.tensor(float(round_))}


def test_save_writes_round_file_latest_and_prunes(tmp_path):
    m = CheckpointManager(tmp_path / "ck", keep_last=2)
    paths = [m.save(r, state(r), {"node_cursor": 0}) for r in range(1, 6)]
    assert paths[-1] == tmp_path / "ck" / "round_000005.ckpt"
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["latest.ckpt", "round_000004.ckpt", "round_000005.ckpt"]
    t, h = read_checkpoint(m.latest_path)
    assert h["round"] == 5 and torch.equal(t["w"], state(5)["w"])
    assert m.latest_path.read_bytes() == paths[-1].read_bytes()
    assert os.stat(m.latest_path).st_ino == os.stat(paths[-1]).st_ino  # a hard link, not a copy
    # pruning the round file that latest links to later does not break latest
    m2 = CheckpointManager(tmp_path / "ck", keep_last=1)
    m2.save(6, state(6), {})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["latest.ckpt", "round_000006.ckpt"]
    assert read_checkpoint(m2.latest_path)[1]["round"] == 6


def test_latest_falls_back_to_a_copy_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    m = CheckpointManager(tmp_path, keep_last=1)
    m.save(1, state(1), {})
    p = m.save(2, state(2), {})
    assert os.stat(m.latest_path).st_ino != os.stat(p).st_ino
    assert m.latest_path.read_bytes() == p.read_bytes()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["latest.ckpt", "round_000002.ckpt"]


def test_failed_save_keeps_previous_latest(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    m.save(1, state(1), {})
    before = m.latest_path.read_bytes()
    with pytest.raises(CheckpointError):
        m.save(2, {"w": torch.zeros(2, dtype=torch.complex64)}, {})
    assert m.latest_path.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["latest.ckpt", "round_000001.ckpt"]


def test_round_arguments_are_checked(tmp_path):
    m = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="header says round 3"):
        m.save(2, state(2), {"round": 3})
    with pytest.raises(CheckpointError, match="integer >= 0"):
        m.save(-1, state(2), {})
    with pytest.raises(CheckpointError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_orphan_temp_files_of_dead_writers_are_removed(tmp_path):
    m = CheckpointManager(tmp_path)
    dead = tmp_path / ".round_000001.ckpt.tmp-999999999-0123abcd"
    mine = tmp_path / f".latest.ckpt.link-{os.getpid()}-0123abcd"
    dead.write_bytes(b"partial")
    mine.write_bytes(b"in progress")
    m.save(1, state(1), {})
    assert not dead.exists()
    assert mine.exists()  # a live writer's temp file is left alone


def test_resolve(tmp_path):
    m = CheckpointManager(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="train.resume=latest but .*latest.ckpt does not exist"):
        m.resolve("latest")
    p = m.save(1, state(1), {})
    assert m.resolve("latest") == m.latest_path
    assert m.resolve(str(p)) == p
    assert m.resolve(tmp_path / "ck") == m.latest_path
    with pytest.raises(CheckpointError, match="not found"):
        m.resolve(tmp_path / "nope.ckpt")


def _draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1))


def test_rng_capture_restore_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn(1)  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0, 1)  # and in python's
    tensors, parts = capture_rng()
    expected = _draws()
    write_checkpoint(tmp_path / "r.ckpt", {f"rng/{k}": v for k, v in tensors.items()}, {"rng": parts})
    _draws(), _draws()  # move every stream on
    t, h = read_checkpoint(tmp_path / "r.ckpt")
    assert set(t) == {"rng/torch", "rng/numpy/state", "rng/python/state"}
    restore_rng({k[4:]: v for k, v in t.items()}, h["rng"])
    assert _draws() == expected
    assert set(tensors) == {"torch", "numpy/state", "python/state"}  # stored under rng/ by callers


@pytest.mark.parametrize(
    "breakage",
    [
        lambda t, p: t.pop("torch"),
        lambda t, p: t.__setitem__("numpy/state", torch.zeros(3, dtype=torch.int64)),
        lambda t, p: t.__setitem__("numpy/state", torch.full((624,), -1, dtype=torch.int64)),
        lambda t, p: t.__setitem__("python/state", torch.zeros(625, dtype=torch.float32)),
        lambda t, p: t.__setitem__("torch", torch.zeros(3, dtype=torch.uint8)),
        lambda t, p: p.pop("numpy"),
        lambda t, p: p["python"].__setitem__("version", 99),
    ],
)
def test_malformed_rng_is_refused_and_globals_untouched(breakage):
    tensors, parts = capture_rng()
    parts = {k: dict(v) for k, v in parts.items()}
    breakage(tensors, parts)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = _draws()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    with pytest.raises(CheckpointError, match="RNG state"):
        restore_rng(tensors, parts)
    assert _draws() == expected
