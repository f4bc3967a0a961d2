"""Read-only views of checkpoints: inspect (a JSON summary) and diff (bit-level differences)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from feda2v.checkpoint.container import canonical_json, read_checkpoint
from feda2v.config.validate import flatten_dotted

# Derived from the tensors (the tensor comparison already reports them), never volatile data.
_DERIVED = ("sha256", "header_sha256", "tensors")
# Which run wrote the file (MLflow run id, engine, host), not what it holds. Format 2 keeps it in the
# sidecar beside the file (provenance.py); format 1 files carry it in the header, where diff ignores
# it unless strict.
PROVENANCE = "provenance"


def _optimizer_summary(header: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    opts = header.get("optimizers")
    if not isinstance(opts, Mapping):
        stores = header.get("stores")
        if isinstance(stores, Mapping) and stores:
            first = stores["server"] if "server" in stores else stores[sorted(stores)[0]]
            opts = first.get("optimizers") if isinstance(first, Mapping) else None
    out: dict[str, dict[str, Any]] = {}
    for name, o in (opts or {}).items():
        if isinstance(o, Mapping):
            out[name] = {"step": o.get("step"), "lr": o.get("lr"), "weight_decay": o.get("weight_decay")}
    return out


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able summary of a verified checkpoint (raises CheckpointError if it is not intact)."""
    path = Path(path)
    tensors, header = read_checkpoint(path)
    stores = header.get("stores")
    return {
        "path": str(path),
        "format_version": header["format_version"],
        "round": header.get("round"),
        "keys": list(header.get("keys") or []),
        "roles": list(header.get("roles") or []),
        "stores": sorted(stores) if isinstance(stores, Mapping) else [],
        "optimizers": _optimizer_summary(header),
        "sha256": header["sha256"],
        "data_manifest_hash": header.get("data_manifest_hash"),
        "library_versions": header.get("library_versions"),
        "provenance": header.get(PROVENANCE),  # None when unknown (no sidecar entry)
        "migrated": isinstance(header.get("migration"), Mapping),
        "tensor_count": len(tensors),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "file_bytes": path.stat().st_size,
    }


def _tensor_difference(name: str, a: torch.Tensor, b: torch.Tensor) -> str | None:
    if a.dtype != b.dtype:
        return f"tensor {name}: dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"tensor {name}: shape {list(a.shape)} vs {list(b.shape)}"
    # Bitwise: -0.0 vs 0.0 and different NaN payloads count as differences.
    ab, bb = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    if torch.equal(ab, bb):
        return None
    if a.numel() == 0:
        return None
    neq = (ab.view(-1, a.element_size()) != bb.view(-1, a.element_size())).any(dim=1)
    detail = f"{int(neq.sum())} of {a.numel()} values differ"
    if a.is_floating_point():
        diff = (a.double() - b.double()).abs()
        finite = diff[torch.isfinite(diff)]
        if finite.numel():
            detail += f", max abs diff {float(finite.max()):.6g}"
    return f"tensor {name}: {detail}"


def diff_checkpoints(a: str | os.PathLike, b: str | os.PathLike, *, strict: bool = False) -> list[str]:
    """Differences between two verified checkpoints. ``[]`` iff every tensor is bit-identical and
    every header field is equal, ``provenance`` (the writing run's identity) aside; with ``strict``,
    ``[]`` iff the files are byte-identical."""
    a, b = Path(a), Path(b)
    ta, ha = read_checkpoint(a, provenance=False)
    tb, hb = read_checkpoint(b, provenance=False)
    out: list[str] = []
    for name in sorted(set(ta) | set(tb)):
        if name not in tb:
            out.append(f"tensor {name}: only in {a}")
        elif name not in ta:
            out.append(f"tensor {name}: only in {b}")
        else:
            d = _tensor_difference(name, ta[name], tb[name])
            if d:
                out.append(d)
    skip = _DERIVED if strict else (*_DERIVED, PROVENANCE)
    fa = flatten_dotted({k: v for k, v in ha.items() if k not in skip})
    fb = flatten_dotted({k: v for k, v in hb.items() if k not in skip})
    for field in sorted(set(fa) | set(fb)):
        if field not in fb:
            out.append(f"header {field}: only in {a}")
        elif field not in fa:
            out.append(f"header {field}: only in {b}")
        elif canonical_json(fa[field]) != canonical_json(fb[field]):
            out.append(f"header {field}: {_short(fa[field])} vs {_short(fb[field])}")
    if not out and (strict or ha.get(PROVENANCE) == hb.get(PROVENANCE)) \
            and a.read_bytes() != b.read_bytes():  # cannot happen for canonical files; never hide it
        out.append("file bytes differ although tensors and header fields are equal")
    return out


def _short(v: Any, limit: int = 80) -> str:
    s = canonical_json(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def provenance_note(a: str | os.PathLike, b: str | os.PathLike) -> str | None:
    """A one-line note when two checkpoints were written by different runs (ignored by diff), as
    far as their provenance is known."""
    pa, pb = read_checkpoint(a)[1].get(PROVENANCE), read_checkpoint(b)[1].get(PROVENANCE)
    if pa == pb:
        return None
    return f"note: written by different runs (provenance {canonical_json(pa)} vs {canonical_json(pb)}); not compared"
