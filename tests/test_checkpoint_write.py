"""The write path: payload first (each piece handed to the disk, then hashed), prefix last, fsync,
rename, directory fsync. Same bytes as ``checkpoint_bytes``; a failure at any step leaves the old
file intact and no temp file; the data is on disk before any rename makes it visible."""
from __future__ import annotations

import errno
import os
import re
import stat

import pytest
import torch

from feda2v import fsutil
from feda2v.checkpoint import CheckpointManager, checkpoint_bytes, read_checkpoint, write_checkpoint
from feda2v.checkpoint import container, manager
from feda2v.errors import CheckpointError

from test_checkpoint import assert_same, sample_state, user_header


def big_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors, header = sample_state(4)
    g = torch.Generator().manual_seed(9)
    tensors["big"] = torch.randn(3000, generator=g)  # 12000 bytes: several write pieces
    tensors["odd"] = torch.randn(77, generator=g).to(torch.float16)
    return tensors, user_header(header)


@pytest.fixture
def small_pieces(monkeypatch):
    """Write pieces of 4 KiB, so pieces split tensors and span several of them."""
    monkeypatch.setattr(container, "_WRITE_CHUNK", 4096)
    calls: list[tuple[int, int]] = []
    real = container.start_writeback

    def recording(fd, offset, nbytes):
        calls.append((offset, nbytes))
        real(fd, offset, nbytes)

    monkeypatch.setattr(container, "start_writeback", recording)
    return calls


def test_file_bytes_are_the_in_memory_bytes_with_small_pieces(tmp_path, small_pieces):
    tensors, header = big_state()
    full = write_checkpoint(tmp_path / "a.ckpt", tensors, header)
    data = (tmp_path / "a.ckpt").read_bytes()
    assert data == checkpoint_bytes(tensors, header)
    got, h = read_checkpoint(tmp_path / "a.ckpt", provenance=False)
    assert_same(got, tensors) and h == full
    # the pieces handed to the disk are consecutive, start at the payload and stay inside it
    start = len(data) - sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(small_pieces) >= 3 and small_pieces[0][0] == start
    for (o1, n1), (o2, _) in zip(small_pieces, small_pieces[1:]):
        assert o1 + n1 == o2
    assert small_pieces[-1][0] + small_pieces[-1][1] <= len(data)


def test_without_writeback_hints_the_bytes_are_the_same(tmp_path, monkeypatch):
    tensors, header = big_state()
    monkeypatch.setattr(fsutil, "_sync_file_range", False)  # as on a system without the call
    write_checkpoint(tmp_path / "a.ckpt", tensors, header)
    assert (tmp_path / "a.ckpt").read_bytes() == checkpoint_bytes(tensors, header)


def test_start_writeback_is_only_a_hint():
    fsutil.start_writeback(-1, 0, 4096)  # a bad descriptor is ignored: fsync reports real errors
    r, w = os.pipe()
    try:
        fsutil.start_writeback(w, 0, 1)  # not a file: ignored too
    finally:
        os.close(r), os.close(w)


def _fail(exc=None):
    def boom(*a, **k):
        raise exc or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return boom


@pytest.mark.parametrize("step", ["payload", "fsync", "rename"])
def test_a_failure_at_any_step_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, step, small_pieces):
    old_t, old_h = sample_state(1)
    p = tmp_path / "a.ckpt"
    write_checkpoint(p, old_t, user_header(old_h))
    before = p.read_bytes()
    tensors, header = big_state()
    if step == "payload":
        monkeypatch.setattr(container, "start_writeback", _fail())
    elif step == "fsync":
        monkeypatch.setattr(os, "fsync", _fail(OSError(errno.EIO, os.strerror(errno.EIO))))
    else:
        monkeypatch.setattr(os, "replace", _fail(OSError(errno.EACCES, os.strerror(errno.EACCES))))
    with pytest.raises(CheckpointError, match=re.escape(f"cannot write checkpoint {p}")):
        write_checkpoint(p, tensors, header)
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.ckpt"]


def test_an_interrupt_mid_payload_keeps_the_old_file(tmp_path, monkeypatch, small_pieces):
    p = tmp_path / "a.ckpt"
    write_checkpoint(p, *sample_state(1)[:1], {})
    before = p.read_bytes()
    monkeypatch.setattr(container, "start_writeback", _fail(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(p, *big_state())
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["a.ckpt"]


def _record_durability(monkeypatch) -> list[tuple]:
    """Events of a save, in order: ('fsync', path), ('replace', dst), ('fsync_dir', dir)."""
    events: list[tuple] = []
    real_fsync, real_replace, real_dir = os.fsync, os.replace, fsutil.fsync_dir

    def fsync(fd):
        if not stat.S_ISDIR(os.fstat(fd).st_mode):  # a directory's fsync is recorded as fsync_dir
            events.append(("fsync", fd))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    def fsync_dir(d):
        events.append(("fsync_dir", os.fspath(d)))
        real_dir(d)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(container, "fsync_dir", fsync_dir)
    monkeypatch.setattr(manager, "fsync_dir", fsync_dir)
    return events


def test_manager_save_orders_data_before_renames_and_one_dir_fsync_after(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep_last=5)
    m.save(1, sample_state(1)[0], {})
    events = _record_durability(monkeypatch)
    p = m.save(2, sample_state(2)[0], {})
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "replace", "fsync_dir"], events
    assert events[1][1] == os.fspath(p) and events[2][1] == os.fspath(m.latest_path)
    assert events[3][1] == os.fspath(tmp_path)
    assert read_checkpoint(m.latest_path)[1]["round"] == 2


def test_manager_syncs_the_directory_even_when_pointing_latest_fails(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep_last=5)
    m.save(1, sample_state(1)[0], {})
    before = m.latest_path.read_bytes()
    events = _record_durability(monkeypatch)
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(m.latest_path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match="cannot update"):
        m.save(2, sample_state(2)[0], {})
    assert events[-1] == ("fsync_dir", os.fspath(tmp_path))  # the new round file's rename is made durable
    monkeypatch.undo()
    assert m.latest_path.read_bytes() == before  # latest still the old, complete checkpoint
    assert read_checkpoint(tmp_path / "round_000002.ckpt")[1]["round"] == 2


def test_plain_write_syncs_its_directory(tmp_path, monkeypatch):
    events = _record_durability(monkeypatch)
    write_checkpoint(tmp_path / "a.ckpt", *sample_state(3)[:1], {})
    assert [e[0] for e in events] == ["fsync", "replace", "fsync_dir"]
