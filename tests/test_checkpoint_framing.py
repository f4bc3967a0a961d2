"""A container is recognised by its own framing before anything else (issue 13, defect 1).

A safetensors file starts with its 8-byte little-endian header length N. The old pickle sniff took
every N with N mod 65536 in {0x080, 0x180, ..., 0x580} (first byte 0x80, second <= 5: pickle's
PROTO opcode) for a pickle and refused valid checkpoints. These tests sweep every low-16-bit pattern
of N, on the wire and on disk.
"""
from __future__ import annotations

import os
import struct

import pytest
import torch

from feda2v.checkpoint import checkpoint_bytes, read_checkpoint, read_checkpoint_bytes, write_checkpoint
from feda2v.checkpoint.container import canonical_json
from feda2v.errors import CheckpointError

TENSORS = {"store/server/unified/generator/param/w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


def _base_raw_len() -> int:
    data = checkpoint_bytes(TENSORS, {"round": 0, "pad": ""})
    (n,) = struct.unpack("<Q", data[:8])
    raw = data[8 : 8 + n].rstrip(b" ")
    return len(raw)


R0 = _base_raw_len()  # unpadded header length with an empty pad; each pad character adds one byte


def _target(pattern: int, floor: int) -> int:
    """The smallest header length >= floor whose low 16 bits are ``pattern``."""
    return pattern if pattern >= floor else pattern + 65536


def _container_with_header_length(n: int) -> bytes:
    """A real container (written by the writer) whose header length is exactly ``n`` (n % 8 == 0)."""
    data = checkpoint_bytes(TENSORS, {"round": 0, "pad": "x" * (n - R0)})
    assert struct.unpack("<Q", data[:8])[0] == n
    return data


def test_the_old_sniff_would_have_refused_these():
    """Guard: the patterns below really start like a pickle (so the sweep means something)."""
    for low in (0x080, 0x180, 0x580):
        data = _container_with_header_length(_target(low, R0 + 8))
        assert data[0] == 0x80 and data[1] <= 5


@pytest.fixture
def fast_dir(tmp_path):
    """A RAM-backed folder when the machine has one (the sweep writes 65,536 files), else tmp_path."""
    import shutil
    import tempfile

    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="feda2v-framing-", dir=shm)
    try:
        yield __import__("pathlib").Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow  # a sweep: tens of seconds on a busy 2-core machine
def test_every_writable_header_length_pattern_reads_back(fast_dir):
    """The writer pads its header to a multiple of 8, so 8192 of the 65,536 low-16-bit patterns
    can occur: each one, written by the writer, reads back on the wire and from a file."""
    want = TENSORS["store/server/unified/generator/param/w"]
    p = fast_dir / "a.ckpt"
    for low in range(0, 65536, 8):
        data = _container_with_header_length(_target(low, R0 + 8))
        tensors, header = read_checkpoint_bytes(data)
        assert header["round"] == 0 and torch.equal(tensors["store/server/unified/generator/param/w"], want), low
        p.write_bytes(data)  # the very bytes write_checkpoint writes (test_checkpoint.py holds that)
        tensors, header = read_checkpoint(p, provenance=False)
        assert header["round"] == 0 and torch.equal(tensors["store/server/unified/generator/param/w"], want), low


def test_the_writer_hits_the_old_pickle_patterns_on_disk(tmp_path):
    """write_checkpoint itself (atomic write, fsync) at each pattern the old sniff refused."""
    p = tmp_path / "a.ckpt"
    for low in (0x080, 0x180, 0x280, 0x380, 0x480, 0x580):
        n = _target(low, R0 + 8)
        full = write_checkpoint(p, TENSORS, {"round": 0, "pad": "x" * (n - R0)})
        assert struct.unpack("<Q", p.read_bytes()[:8])[0] == n
        assert read_checkpoint(p, provenance=False)[1]["header_sha256"] == full["header_sha256"]


_BASE = checkpoint_bytes(TENSORS, {"round": 0, "pad": ""})
_BASE_N = struct.unpack("<Q", _BASE[:8])[0]
_BASE_RAW = _BASE[8 : 8 + _BASE_N].rstrip(b" ")
_BASE_PAYLOAD = _BASE[8 + _BASE_N :]


def _framed_with_trailing_spaces(n: int) -> bytes:
    """A safetensors framing of our header padded with spaces to exactly ``n`` bytes (any n):
    what a writer with another padding rule would produce. It is not in the canonical form."""
    return struct.pack("<Q", n) + _BASE_RAW + b" " * (n - len(_BASE_RAW)) + _BASE_PAYLOAD


@pytest.mark.slow
def test_no_header_length_pattern_is_taken_for_a_pickle(fast_dir):
    """All 65,536 low-16-bit patterns, on the wire and from a file: a framed container is never
    called a pickle; the patterns the writer cannot produce are refused for what they are."""
    p = fast_dir / "b.ckpt"
    for low in range(65536):
        if low % 8 == 0:
            continue  # read back in full above
        data = _framed_with_trailing_spaces(_target(low, len(_BASE_RAW)))
        p.write_bytes(data)
        for source in (data, p):
            with pytest.raises(CheckpointError) as e:
                read_checkpoint_bytes(source) if source is data else read_checkpoint(p, provenance=False)
            assert "pickle" not in str(e.value) and "not in the form feda2v writes" in str(e.value), low


def test_real_pickles_are_still_refused_as_pickles(tmp_path):
    import pickle

    for data in (pickle.dumps({"w": [1, 2]}, protocol=2), pickle.dumps({"w": [1, 2]}, protocol=5),
                 b"PK\x03\x04" + b"\0" * 60):
        with pytest.raises(CheckpointError, match="pickle/torch.save file"):
            read_checkpoint_bytes(data)
        (tmp_path / "p.ckpt").write_bytes(data)
        with pytest.raises(CheckpointError, match="pickle/torch.save file"):
            read_checkpoint(tmp_path / "p.ckpt")
    assert canonical_json({"b": 1, "a": 2}) == '{"a":2,"b":1}'
