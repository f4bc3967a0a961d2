"""Where a checkpoint came from, kept beside it: ``<checkpoint dir>/provenance.json``.

The checkpoint's bytes hold only what determines the state (same state, same bytes); who wrote it
(MLflow run id, engine, host, pid) and how the run was operated (``checkpoint.dir``, ``train.*``,
``tracking.*``, ...) go into this small sidecar, keyed by the checkpoint's ``header_sha256``, so any
name of the file (``round_000003.ckpt``, ``latest.ckpt``, a copy next to the sidecar) finds its entry.
The sidecar is best-effort metadata: a missing or unreadable one means "provenance unknown".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from feda2v.errors import OutputError
from feda2v.fsutil import atomic_write_text

SIDECAR = "provenance.json"
_FORMAT = 1


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("feda2v_provenance") != _FORMAT \
            or not isinstance(data.get("checkpoints"), dict):
        return {}
    return data["checkpoints"]


def record(checkpoint: Path, header_sha256: str, provenance: Mapping[str, Any]) -> None:
    """Add ``checkpoint``'s entry; drop the entries of files no longer there. A failure to
    write the sidecar never costs the checkpoint: it only makes its provenance unknown."""
    side = checkpoint.parent / SIDECAR
    entries = _load(side)
    # entries of files gone (pruned, replaced by this one) go
    entries = {h: e for h, e in entries.items()
               if isinstance(e, dict) and e.get("file") != checkpoint.name
               and (checkpoint.parent / str(e.get("file", ""))).is_file()}
    entries[header_sha256] = {"file": checkpoint.name, "provenance": dict(provenance)}
    text = json.dumps({"feda2v_provenance": _FORMAT, "checkpoints": entries}, indent=1, sort_keys=True)
    try:
        atomic_write_text(side, text + "\n")
    except OutputError:
        pass


def lookup(checkpoint: Path, header: Mapping[str, Any]) -> dict | None:
    """The provenance recorded for this checkpoint's bytes, or None when unknown."""
    entry = _load(Path(checkpoint).parent / SIDECAR).get(header.get("header_sha256"))
    if isinstance(entry, dict) and isinstance(entry.get("provenance"), dict):
        return entry["provenance"]
    return None
