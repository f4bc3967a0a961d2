"""Corrupted, forged and mismatched checkpoints: each is refused by verify, load and the CLI."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feda2v.checkpoint import read_checkpoint, verify_checkpoint, write_checkpoint
from feda2v.checkpoint.container import canonical_json
from feda2v.cli.ckpt import main as ckpt_main
from feda2v.errors import CheckpointError


def real_checkpoint(path: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    tensors = {
        "store/server/class/a/generator/param/net.0.weight": torch.randn(8, 5, generator=g),
        "store/server/class/a/generator/param/net.0.bias": torch.randn(8, generator=g),
        "store/server/class/a/generator/optim/net.0.weight/exp_avg": torch.randn(8, 5, generator=g),
        "store/server/class/a/generator/optim/net.0.weight/step": torch.tensor(3.0),
        "rng/numpy/state": torch.arange(6, dtype=torch.int64),
        "flags": torch.tensor([True, False]),
    }
    header = {"round": 1, "keys": ["class/a"], "roles": ["generator"],
              "config": {"generator": {"granularity": "per_class", "type": "gan"}}}
    write_checkpoint(path, tensors, header)
    return path


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def forge(path: Path, edit, *, payload_edit=None, fix_header_hash=True, fix_payload_hash=False) -> None:
    """Rewrite a checkpoint as a buggy or malicious writer would: edit the headers and re-sign the
    feda2v header so only the deeper checks can catch the lie."""
    st_header, payload = split(path.read_bytes())
    header = json.loads(st_header["__metadata__"]["feda2v"])
    edit(st_header, header)
    if payload_edit:
        payload = payload_edit(payload)
    if fix_payload_hash:
        header["sha256"] = hashlib.sha256(payload).hexdigest()
    if fix_header_hash:
        rest = {k: v for k, v in header.items() if k != "header_sha256"}
        header["header_sha256"] = hashlib.sha256(canonical_json(rest).encode()).hexdigest()
    st_header["__metadata__"]["feda2v"] = canonical_json(header)
    raw = canonical_json(st_header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


W = "store/server/class/a/generator/param/net.0.weight"
B = "store/server/class/a/generator/param/net.0.bias"


def _lie_shape(st_header, header):
    # A consistent re-signed lie with the same byte count (e.g. a transpose) is a different valid
    # file, not corruption; a shape whose bytes do not fit is what a buggy writer produces.
    for h in (st_header[W], header["tensors"][W]):
        h["shape"] = [8, 6]


def _index_only_shape(st_header, header):
    header["tensors"][W]["shape"] = [5, 8]


def _drop_tensor(st_header, header):
    del st_header[B]
    del header["tensors"][B]


def _drop_from_file_only(st_header, header):
    del st_header[B]


def _extra_tensor(st_header, header):
    st_header["sneaky"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}


def _extra_in_both(st_header, header):
    end = max(e["data_offsets"][1] for k, e in st_header.items() if k != "__metadata__")
    st_header["sneaky"] = {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}
    header["tensors"]["sneaky"] = {"dtype": "F32", "shape": [1], "offsets": [end, end + 4]}


def _dtype_lie(st_header, header):
    for h in (st_header[B], header["tensors"][B]):
        h["dtype"] = "F64"  # bytes no longer fit the claimed dtype x shape


def _round_change(st_header, header):
    header["round"] = 7


def _version_bump(st_header, header):
    header["format_version"] = 99


CASES = {
    "truncated-payload": lambda p: p.write_bytes(p.read_bytes()[:-10]),
    "truncated-header": lambda p: p.write_bytes(p.read_bytes()[:40]),
    "truncated-to-4-bytes": lambda p: p.write_bytes(p.read_bytes()[:4]),
    "empty-file": lambda p: p.write_bytes(b""),
    "trailing-garbage": lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8),
    "flipped-payload-byte": lambda p: p.write_bytes(_flip(p.read_bytes(), -20)),
    "flipped-header-byte": lambda p: p.write_bytes(_flip(p.read_bytes(), 60)),
    "flipped-length-byte": lambda p: p.write_bytes(_flip(p.read_bytes(), 0)),
    "wrong-checksum": lambda p: forge(p, lambda s, h: h.update(sha256="0" * 64)),
    "payload-changed-and-resigned-header-only": lambda p: forge(p, lambda s, h: None, payload_edit=lambda b: b[:-1] + bytes([b[-1] ^ 1])),
    "header-edited-without-resigning": lambda p: forge(p, _round_change, fix_header_hash=False),
    "header-lies-about-shape": lambda p: forge(p, _lie_shape),
    "index-disagrees-with-file": lambda p: forge(p, _index_only_shape),
    "missing-tensor": lambda p: forge(p, _drop_tensor),
    "tensor-missing-from-file-only": lambda p: forge(p, _drop_from_file_only),
    "extra-tensor-in-file": lambda p: forge(p, _extra_tensor),
    "extra-tensor-unhashed": lambda p: forge(p, _extra_in_both, payload_edit=lambda b: b + b"\0\0\0\0"),
    "dtype-lie": lambda p: forge(p, _dtype_lie),
    "newer-version": lambda p: forge(p, _version_bump),
    "not-a-checkpoint": lambda p: p.write_text("hello, I am text\n" * 10),
}


def _flip(raw: bytes, i: int) -> bytes:
    b = bytearray(raw)
    b[i] ^= 0x40
    return bytes(b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_is_rejected_everywhere(tmp_path, case, capsys):
    p = real_checkpoint(tmp_path / "a.ckpt")
    CASES[case](p)
    for fn in (verify_checkpoint, read_checkpoint):
        with pytest.raises(CheckpointError) as e:
            fn(p)
        msg = str(e.value)
        assert "\n" not in msg and msg
    for cmd in (["verify", str(p)], ["inspect", str(p)]):
        with pytest.raises(SystemExit) as ex:
            ckpt_main(cmd)
        assert ex.value.code == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith("feda2v: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err


def test_specific_messages(tmp_path):
    def msg_for(case):
        p = real_checkpoint(tmp_path / f"{case}.ckpt")
        CASES[case](p)
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(p)
        return str(e.value)

    assert "truncated" in msg_for("truncated-payload")
    assert "sha256" in msg_for("wrong-checksum")
    assert "sha256" in msg_for("flipped-payload-byte")
    assert "needs 192 bytes but the header gives it 160" in msg_for("header-lies-about-shape")
    assert "belong to no tensor (a tensor entry is missing" in msg_for("missing-tensor")
    assert f"'{B}' is in the header index but missing" in msg_for("tensor-missing-from-file-only")
    assert "'sneaky'" in msg_for("extra-tensor-in-file")
    assert "newer feda2v" in msg_for("newer-version")
    assert "header checksum" in msg_for("header-edited-without-resigning")


def test_file_of_another_granularity_is_refused_by_name(tmp_path, capsys):
    from feda2v.checkpoint import RunState, check_resumable

    p = real_checkpoint(tmp_path / "a.ckpt")
    _, h = read_checkpoint(p)
    state = RunState(config=h["config"], round=h["round"], stores={}, primary_store="server")
    with pytest.raises(CheckpointError, match="generator.granularity is 'per_class' there, 'unified' here"):
        check_resumable({"generator": {"granularity": "unified", "type": "gan"}}, state, None, p)
    with pytest.raises(CheckpointError, match="generator.type is 'gan' there, 'vae' here"):
        check_resumable({"generator": {"granularity": "per_class", "type": "vae"}}, state, None, p)


# -------------------------------------------------------------------------------------------
# property: any mutation of real checkpoint bytes is either a no-op or a CheckpointError

_ORIGINAL: dict[str, bytes] = {}


def _original(tmp_path_factory) -> bytes:
    """A real federation-style checkpoint: a trained per_group GAN store's state + RNG + header."""
    if "raw" not in _ORIGINAL:
        from test_checkpoint_store import build_store, federation_checkpoint

        d = tmp_path_factory.mktemp("orig")
        federation_checkpoint(d / "a.ckpt", build_store("gan", "per_group"), "per_group", "gan")
        _ORIGINAL["raw"] = (d / "a.ckpt").read_bytes()
    return _ORIGINAL["raw"]


# Half the positions fall in the first 8 KiB (length prefix + JSON header), half anywhere.
pos = st.one_of(st.integers(0, 8192), st.integers(0, 10**7))
mutation = st.one_of(
    st.tuples(st.just("flip"), pos, st.integers(1, 255)),
    st.tuples(st.just("set"), pos, st.integers(0, 255)),
    st.tuples(st.just("truncate"), pos, st.just(0)),
    st.tuples(st.just("delete"), pos, st.integers(1, 64)),
    st.tuples(st.just("insert"), pos, st.integers(0, 255)),
    st.tuples(st.just("zero-run"), pos, st.integers(1, 512)),
)


def _apply(raw: bytes, m) -> bytes:
    kind, pos, arg = m
    b = bytearray(raw)
    if not b:
        return raw
    pos %= len(b)
    if kind == "flip":
        b[pos] ^= arg
    elif kind == "set":
        b[pos] = arg
    elif kind == "truncate":
        del b[pos:]
    elif kind == "delete":
        del b[pos : pos + arg]
    elif kind == "insert":
        b.insert(pos, arg)
    elif kind == "zero-run":
        b[pos : pos + arg] = bytes(len(b[pos : pos + arg]))
    return bytes(b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_bytes_never_load_silently(tmp_path_factory, muts):
    raw = _original(tmp_path_factory)
    bad = raw
    for m in muts:
        bad = _apply(bad, m)
    p = tmp_path_factory.mktemp("mut") / "m.ckpt"
    p.write_bytes(bad)
    if bad == raw:
        read_checkpoint(p)  # a no-op mutation must still load
        return
    with pytest.raises(CheckpointError):
        read_checkpoint(p)
