"""The one checkpoint container: a safetensors file whose metadata carries feda2v's JSON header.

Layout (safetensors): 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a
multiple of 8), then the tensor data, contiguous. The JSON holds per-tensor dtype/shape/data_offsets
and ``__metadata__`` (str -> str); feda2v's own header is one canonical JSON string under
``__metadata__["feda2v"]``.

Every byte of a valid file is covered by a check, so a corrupted file is an error, never a silent
load:
- the safetensors JSON must be byte-for-byte the canonical form this writer produces;
- feda2v's header carries ``header_sha256`` (of the rest of the header) and ``sha256`` (of the
  payload) plus a tensor index that must match the safetensors entries exactly;
- the bytes are recognised as a container by their own framing (length fits the file, header parses)
  before anything else; only what is not a container is checked for pickle/zip signatures.
Format compatibility with the ``safetensors`` library is a property of the writer (tests load every
kind of file we write with ``safetensors.torch.load_file``), so a read parses the file once: one
pass to hash the payload, then zero-copy views. Nothing here unpickles.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from feda2v.fsutil import fsync_dir, remove_quietly, start_writeback
from feda2v.errors import CheckpointError

# 2: the header holds only state (provenance moved to the sidecar, see provenance.py), stores in
# an explicit order (store_order); version 1 files still read.
FORMAT_VERSION = 2
METADATA_KEY = "feda2v"
# Fields this module owns in the header; a caller may not set them.
RESERVED = ("format_version", "sha256", "header_sha256", "tensors")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own cap; keeps a lying length from OOMing us

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_BY_NAME = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for dt, name in _DTYPES.items()}


def canonical_json(obj: Any) -> str:
    """The one JSON spelling used in files: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _as_bytes(t: torch.Tensor) -> memoryview:
    """Zero-copy little-endian bytes of a contiguous CPU tensor (any dtype, any rank)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _prepare(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, str]]:
    out = []
    for name in tensors:
        t = tensors[name]
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise CheckpointError(f"invalid tensor name {name!r}; use a non-empty string")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"checkpoint entry '{name}' is a {type(t).__name__}, not a tensor")
        if t.dtype not in _DTYPES:
            raise CheckpointError(
                f"tensor '{name}' has dtype {t.dtype}, which checkpoints do not store; "
                f"use one of {sorted(_DTYPES.values())}"
            )
        if t.is_sparse or t.layout != torch.strided:
            raise CheckpointError(f"tensor '{name}' is not a dense tensor; call .to_dense() first")
        out.append((name, t.detach().to("cpu").contiguous(), _DTYPES[t.dtype]))
    # Larger items first keeps every tensor aligned to its item size (as safetensors' own writer
    # does); names break ties so the order never depends on dict order.
    out.sort(key=lambda e: (-_ITEMSIZE[e[2]], e[0]))
    return out


_NO_DIGEST = "0" * 64  # a SHA-256 hex digest's length: the prefix's length does not depend on it


def _layout(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]):
    """Validate and lay out a checkpoint: ``(payload chunks in file order, prefix_for)``, where
    ``prefix_for(payload_sha256_hex)`` returns ``(prefix_bytes, full_header)``. Both digests in the
    header are 64 hex digits, so the prefix's length is known before the payload is hashed: a
    writer can put the payload first and the prefix last."""
    if sys.byteorder != "little":  # the format is little-endian; we do not byteswap
        raise CheckpointError("checkpoints can only be written on little-endian machines")
    if not isinstance(header, Mapping):
        raise CheckpointError(f"checkpoint header must be a dict, got {type(header).__name__}")
    clash = [k for k in header if k in RESERVED]
    if clash:
        raise CheckpointError(f"checkpoint header field(s) {clash} are reserved for the container")
    entries = _prepare(tensors)
    chunks: list[memoryview] = []
    st_header: dict[str, Any] = {}
    index: dict[str, Any] = {}
    offset = 0
    for name, t, dt in entries:
        data = _as_bytes(t)
        chunks.append(data)
        end = offset + data.nbytes
        st_header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, end]}
        index[name] = {"dtype": dt, "shape": list(t.shape), "offsets": [offset, end]}
        offset = end

    def prefix_for(payload_sha256: str) -> tuple[bytes, dict]:
        full = dict(header)
        full["format_version"] = FORMAT_VERSION
        full["sha256"] = payload_sha256
        full["tensors"] = index
        try:
            body = canonical_json(full)
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint header is not plain JSON ({e}); pass str/int/float/bool/list/dict") from None
        full["header_sha256"] = _sha256_text(body)
        prefix = _st_header_bytes({**st_header, "__metadata__": {METADATA_KEY: canonical_json(full)}})
        return struct.pack("<Q", len(prefix)) + prefix, full

    return chunks, prefix_for


def encode_checkpoint(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]):
    """Return ``(prefix_bytes, [payload chunks], full_header)``; deterministic for equal inputs."""
    chunks, prefix_for = _layout(tensors, header)
    payload_hash = hashlib.sha256()
    for c in chunks:
        payload_hash.update(c)
    prefix, full = prefix_for(payload_hash.hexdigest())
    return prefix, chunks, full


def _st_header_bytes(st_header: Mapping[str, Any]) -> bytes:
    raw = canonical_json(st_header).encode("ascii")
    return raw + b" " * (-len(raw) % 8)


def temp_name(path: Path, tag: str = "tmp") -> Path:
    """A sibling temp path (same filesystem, so rename is atomic); the pid lets cleanup spot orphans."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{os.urandom(4).hex()}")


# Payload pieces between writeback starts: large enough that a start costs nothing, small enough
# that a piece is still in cache when it is hashed right after being written.
_WRITE_CHUNK = 8 << 20


def _write_payload(f, start: int, chunks: list[memoryview]) -> str:
    """Write the payload at ``start`` and return its SHA-256. Each piece is handed to the disk
    (start_writeback) before it is hashed, so the device writes while the CPU hashes and the
    final fsync waits only for the last piece: one pass over the bytes, I/O and hash overlapped."""
    f.seek(start)
    h = hashlib.sha256()
    pos = synced = start
    unhashed: list[memoryview] = []
    for c in chunks:
        for s in range(0, c.nbytes, _WRITE_CHUNK):
            piece = c[s : s + _WRITE_CHUNK]
            f.write(piece)
            unhashed.append(piece)
            pos += piece.nbytes
            if pos - synced >= _WRITE_CHUNK:
                f.flush()
                start_writeback(f.fileno(), synced, pos - synced)
                for p in unhashed:
                    h.update(p)
                unhashed.clear()
                synced = pos
    for p in unhashed:
        h.update(p)
    return h.hexdigest()


def write_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any],
                     *, sync_dir: bool = True) -> dict:
    """Write atomically: temp file in the same dir, write (payload, then the prefix that carries
    its checksum), fsync, rename, fsync the dir. Returns the full header written (with
    format_version, checksums and tensor index). The bytes are exactly ``checkpoint_bytes``'.

    A crash at any moment leaves either the old file at ``path`` or the complete new one.
    ``sync_dir=False`` leaves the directory fsync to a caller that does one itself right after
    (CheckpointManager, after pointing ``latest``); the rename is durable only after it.
    """
    path = Path(path)
    chunks, prefix_for = _layout(tensors, header)
    start = len(prefix_for(_NO_DIGEST)[0])  # a header that is not JSON fails here, before any file
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: directory {path.parent} does not exist")
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            prefix, full = prefix_for(_write_payload(f, start, chunks))
            if len(prefix) != start:  # cannot happen: both digests are 64 hex digits
                raise CheckpointError(f"internal error: checkpoint header length changed while writing {path}")
            f.seek(0)
            f.write(prefix)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    except BaseException:
        remove_quietly(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return full


# --------------------------------------------------------------------------------------------
# reading


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip archive; plain pickles (protocol >= 2) start with PROTO 0x80. Only
    # asked of bytes that are not a container: a container's 8-byte length can start the same way.
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and head[1] <= 5)


def _framed_length(data) -> int | None:
    """The header length if ``data`` is framed as a container (the length fits the file and the
    header starts a JSON object), else None."""
    if len(data) < 10:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > len(data) or data[8] != 0x7B:  # "{"
        return None
    return n


_CHUNK = 1 << 20  # read and hash in cache-sized pieces: one pass over the bytes


def _owned_buffer(size: int) -> memoryview:
    """A private, writable buffer for a whole file. Anonymous memory with transparent huge pages
    where the OS offers them: a 4 KiB page fault per 4 KiB read cost as much as the SHA-256."""
    if size == 0:
        return memoryview(bytearray())
    try:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError, ValueError):
        return memoryview(torch.empty(size, dtype=torch.uint8).numpy())  # not zero-filled first
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return memoryview(m)


def _read_hashed(path: Path) -> tuple[memoryview, str | None]:
    """The file's bytes in one owned, writable buffer (tensors become views into it) and the
    SHA-256 of its payload (the bytes after the header its first 8 bytes announce), computed
    while each piece is still in cache. None for the hash when the length does not fit the file
    (parse_header refuses such a file anyway)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = _owned_buffer(size)
            h = hashlib.sha256()
            pos, start = 0, None
            while pos < size:
                got = f.readinto(buf[pos : pos + _CHUNK])
                if not got:
                    break
                end = pos + got
                if start is None and end >= 8:
                    start = 8 + struct.unpack("<Q", buf[:8])[0]
                if start is not None and end > start:
                    h.update(buf[max(pos, start) : end])
                pos = end
            if pos != size or f.read(1):
                raise CheckpointError(f"{path} changed size while it was read; try again")
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if start is None or start > size:
        return buf, None
    return buf, h.hexdigest()


def parse_header(path: Path, data: bytes) -> tuple[dict, dict, int]:
    """Check the framing and headers (not the payload hash); returns (st_header, header, data_start)."""
    bad = f"{path} is not a valid feda2v checkpoint"
    n = _framed_length(data)
    st_header = None
    if n is not None and n % 8:  # framed as a container, but this writer always pads to 8
        raise CheckpointError(f"{bad}: its header bytes were altered (not in the form feda2v writes)")
    if n is not None:
        raw = bytes(data[8 : 8 + n])
        try:
            st_header = json.loads(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            st_header = None
    if st_header is None:  # not a container by its own framing: say what it is instead
        if _looks_like_pickle(bytes(data[:4])):
            raise CheckpointError(
                f"{path} is a pickle/torch.save file, not a feda2v checkpoint; it was not opened because "
                "unpickling can run arbitrary code; convert a published-system file with "
                "'feda2v-ckpt migrate LEGACY OUT'"
            )
        if len(data) < 8:
            raise CheckpointError(f"{bad}: file is truncated ({len(data)} bytes)")
        (n,) = struct.unpack("<Q", data[:8])
        if n > MAX_HEADER_BYTES or 8 + n > len(data) or n < 2:
            raise CheckpointError(f"{bad}: header length {n} does not fit the file ({len(data)} bytes); it is truncated or corrupt")
        raise CheckpointError(f"{bad}: its header is not valid JSON (corrupt or truncated)")
    if not isinstance(st_header, dict):
        raise CheckpointError(f"{bad}: its header is not a JSON object")
    meta = st_header.get("__metadata__")
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise CheckpointError(f"{bad}: it is a safetensors file without a feda2v header")
    try:
        canonical = _st_header_bytes(st_header)
    except (TypeError, ValueError, RecursionError):
        canonical = None
    if canonical != raw:
        raise CheckpointError(f"{bad}: its header bytes were altered (not in the form feda2v writes)")
    if not isinstance(meta[METADATA_KEY], str):
        raise CheckpointError(f"{bad}: its feda2v header is not a string")
    try:
        header = json.loads(meta[METADATA_KEY])
    except (ValueError, RecursionError):
        raise CheckpointError(f"{bad}: its feda2v header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: its feda2v header is not a JSON object")
    version = header.get("format_version")
    if type(version) is not int:
        raise CheckpointError(f"{bad}: its header has no integer format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer feda2v (checkpoint format version {version}; this "
            f"feda2v reads up to {FORMAT_VERSION}); upgrade feda2v to load it"
        )
    if version < 1:
        raise CheckpointError(f"{bad}: unknown checkpoint format version {version}")
    claimed = header.get("header_sha256")
    rest = {k: v for k, v in header.items() if k != "header_sha256"}
    try:
        actual = _sha256_text(canonical_json(rest))
    except (TypeError, ValueError, RecursionError):
        actual = None
    if not isinstance(claimed, str) or actual != claimed:
        raise CheckpointError(f"{path} is corrupt: its header checksum does not match (header_sha256)")
    _check_index(path, st_header, header, len(data) - 8 - n)
    return st_header, header, 8 + n


def _check_index(path: Path, st_header: dict, header: dict, payload_len: int) -> None:
    index = header.get("tensors")
    if not isinstance(index, dict):
        raise CheckpointError(f"{path} is corrupt: its header has no tensor index")
    entries = {k: v for k, v in st_header.items() if k != "__metadata__"}
    missing = sorted(set(index) - set(entries))
    extra = sorted(set(entries) - set(index))
    if missing:
        raise CheckpointError(f"{path} is corrupt: tensor '{missing[0]}' is in the header index but missing from the file")
    if extra:
        raise CheckpointError(f"{path} is corrupt: tensor '{extra[0]}' is in the file but not in the header index")
    spans = []
    for name, e in entries.items():
        want = index[name]
        if not isinstance(e, dict) or e.get("dtype") not in _BY_NAME:
            raise CheckpointError(f"{path} is corrupt: tensor '{name}' has an unknown dtype")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(type(s) is int and s >= 0 for s in shape)
            or not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
        ):
            raise CheckpointError(f"{path} is corrupt: tensor '{name}' has a malformed shape or offsets")
        if want != {"dtype": e["dtype"], "shape": shape, "offsets": offs}:
            raise CheckpointError(f"{path} is corrupt: tensor '{name}' does not match its header index entry (dtype/shape/offsets)")
        numel = 1
        for s in shape:
            numel *= s
        if offs[1] - offs[0] != numel * _ITEMSIZE[e["dtype"]]:
            raise CheckpointError(
                f"{path} is corrupt: tensor '{name}' shape {shape} ({e['dtype']}) needs "
                f"{numel * _ITEMSIZE[e['dtype']]} bytes but the header gives it {offs[1] - offs[0]}"
            )
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start > pos:
            raise CheckpointError(
                f"{path} is corrupt: {start - pos} payload bytes before tensor '{name}' belong to no "
                "tensor (a tensor entry is missing from the header)"
            )
        if start < pos:
            raise CheckpointError(f"{path} is corrupt: tensor '{name}' overlaps the previous tensor's data")
        pos = end
    if pos != payload_len:
        what = "truncated" if pos > payload_len else "has trailing bytes"
        raise CheckpointError(
            f"{path} is corrupt: the tensors need {pos} payload bytes but the file has {payload_len} ({what})"
        )


def _load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    data, payload_sha256 = _read_hashed(path)
    _, header, start = parse_header(path, data)
    if payload_sha256 != header.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: the tensor data does not match its sha256 checksum")
    # Tensors are views into the one (writable, owned) buffer just verified: no second copy, and
    # nothing read after the checksum can differ from what was checked.
    return _tensor_views(data, start, header["tensors"]), header


def _tensor_views(buf: bytearray, start: int, index: dict) -> dict[str, torch.Tensor]:
    """Tensors as views into ``buf`` (already verified) at the offsets of the checked index."""
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(index):
        e = index[name]
        dtype = _BY_NAME[e["dtype"]]
        begin, end = e["offsets"]
        count = (end - begin) // _ITEMSIZE[e["dtype"]]
        if count == 0:
            tensors[name] = torch.empty(e["shape"], dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=start + begin).reshape(e["shape"])
    return tensors


def read_checkpoint(path: str | os.PathLike, *, provenance: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and verify everything; returns ``(tensors, header)`` or raises CheckpointError.

    With ``provenance`` (default), ``header["provenance"]`` is where the file came from when that
    is known: the file's own field (format 1) or its entry in the sidecar beside it (format 2,
    see provenance.py). ``provenance=False`` returns exactly what the file holds.
    """
    tensors, header = _load(path)
    if provenance and "provenance" not in header:
        from feda2v.checkpoint.provenance import lookup

        found = lookup(Path(path), header)
        if found is not None:
            header["provenance"] = found
    return tensors, header


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Run every check ``read_checkpoint`` runs; returns the header (exactly as in the file)."""
    return _load(path)[1]


_MISSING = object()


def header_get(header: Mapping[str, Any], dotted: str, default: Any = _MISSING) -> Any:
    node: Any = header
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


# --------------------------------------------------------------------------------------------
# in memory (the on-wire form: the very bytes write_checkpoint puts in a file)


def checkpoint_bytes(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> bytes:
    """The checkpoint file's exact bytes, in memory (for messages: same format as on disk)."""
    prefix, chunks, _ = encode_checkpoint(tensors, header)
    return b"".join([prefix, *chunks])


def read_checkpoint_bytes(
    data: bytes | bytearray | memoryview, *, label: str = "checkpoint message",
) -> tuple[dict[str, torch.Tensor], dict]:
    """``read_checkpoint`` for bytes received over the wire: framing, canonical header, header and
    payload checksums, tensor index (every byte checked, nothing unpickled). Tensors are views into
    one private copy of ``data``. ``label`` names the source in errors."""
    buf = bytearray(data)  # writable + owned, so tensors can alias it safely
    st_header, header, start = parse_header(label, buf)  # type: ignore[arg-type]
    if hashlib.sha256(memoryview(buf)[start:]).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{label} is corrupt: the tensor data does not match its sha256 checksum")
    return _tensor_views(buf, start, header["tensors"]), header
