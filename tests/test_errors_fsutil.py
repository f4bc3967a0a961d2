"""fsutil's atomic writes: whole file or the old one, unique temp names, one OutputError line."""
from __future__ import annotations

import errno
import os
import threading

import pytest

from feda2v.errors import OutputError
from feda2v.fsutil import atomic_write_bytes, atomic_write_text, ensure_dir, os_error_message


def test_writes_and_replaces_leaving_no_temp(tmp_path):
    p = tmp_path / "sub" / "r.json"
    atomic_write_text(p, "one\n")
    atomic_write_bytes(p, b"two\n")
    assert p.read_bytes() == b"two\n"
    assert sorted(x.name for x in p.parent.iterdir()) == ["r.json"]


def test_mode_follows_umask(tmp_path):
    p = atomic_write_text(tmp_path / "m.txt", "x")
    ref = tmp_path / "ref.txt"
    ref.write_text("x")
    assert (p.stat().st_mode & 0o777) == (ref.stat().st_mode & 0o777)


def test_concurrent_writers_never_share_a_temp_name(tmp_path):
    p = tmp_path / "c.txt"
    payloads = [bytes([65 + i]) * 200_000 for i in range(8)]
    errors = []

    def w(b):
        try:
            for _ in range(5):
                atomic_write_bytes(p, b)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=w, args=(b,)) for b in payloads]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert p.read_bytes() in payloads  # one writer's whole file, never a mix
    assert [x.name for x in tmp_path.iterdir()] == ["c.txt"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    p = tmp_path / "keep.txt"
    p.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError) as ei:
        atomic_write_text(p, "new")
    msg = str(ei.value)
    assert str(p) in msg and os.strerror(errno.ENOSPC) in msg and "\n" not in msg
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["keep.txt"]


def test_file_where_a_directory_should_be(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="f"):
        atomic_write_text(tmp_path / "f" / "r.txt", "y")
    with pytest.raises(OutputError, match="in the way"):
        ensure_dir(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_message_names_the_culprit_path():
    e = OSError(errno.ENOTDIR, "Not a directory", "/a/b")
    m = os_error_message("/a/b/c.txt", e)
    assert m.startswith("cannot write /a/b/c.txt: Not a directory (/a/b);")
