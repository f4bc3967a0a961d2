"""Per-site data: what one federation node needs, and nothing of the other nodes' samples.

A **site bundle** (``feda2v-prepare data.site_bundles_dir=DIR`` writes ``DIR/node_NNN/``) holds the
site's partition (``node_NNN.safetensors``), the class conditions and ``site.json``: the site's
manifest entry (its per-class counts, classes, dims) plus the federation's files map (file names and
sha256 only), so the site verifies alone that its two files belong to the federation whose manifest
hash the server announces. ``DIR/server/`` holds what the server of a distributed run reads
(``data/prepared.py:load_server_view``): ``manifest.json``, the conditions and, for full mode's
server, the partitions' held-out test splits alone (``test_NNN.safetensors``, their sha256s and the
manifest hash in ``test_splits.json``), no training sample. ``load_partition`` reads a bundle, or one partition of a full prepared
dir, and checks only that partition's files; errors name the partition and the site's directory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import hashlib

from feda2v.data.prepared import (CONDITIONS, MANIFEST, FORMAT, TEST_SPLITS, NodeData, _safetensors_bytes,
                                  _write_dir_atomically, check_conditions, check_node, files_hash, node_file,
                                  read_manifest, read_verified, test_split_file, test_split_index)
from feda2v.errors import DataError

SITE = "site.json"
SERVER_DIR = "server"
SITE_KIND = "feda2v-site"


@dataclass(frozen=True)
class SiteData:
    partition: int
    classes: list[str]
    conditions: "object"  # torch.Tensor [C, condition_dim]
    node: NodeData
    manifest_hash: str
    feature_dim: int
    condition_dim: int


def site_dir_name(partition: int) -> str:
    return f"node_{partition:03d}"


def site_entry(manifest: dict, partition: int) -> dict:
    """``site.json`` for one partition of a (verified) manifest."""
    return {"kind": SITE_KIND, "format": FORMAT, "partition": partition, "source": manifest["source"],
            "classes": list(manifest["classes"]), "feature_dim": manifest["feature_dim"],
            "condition_dim": manifest["condition_dim"], "nodes": manifest["nodes"],
            "counts": {s: manifest["counts"][s][partition] for s in ("train", "test")},
            "files": dict(manifest["files"]), "manifest_hash": manifest["hash"]}


def write_site_bundles(prepared_dir, out_dir) -> list[Path]:
    """One bundle per partition of ``prepared_dir`` under ``out_dir``, and ``out_dir/server/`` (each
    directory written atomically, byte-reproducible: the same prepared data gives the same bytes)."""
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    manifest = read_manifest(prepared_dir)
    written, test_splits = [], {}
    for i in range(manifest["nodes"]):
        blobs = {}
        read_verified(prepared_dir, CONDITIONS, manifest["files"][CONDITIONS])  # never copy a damaged file
        t = read_verified(prepared_dir, node_file(i), manifest["files"][node_file(i)])
        for name in (CONDITIONS, node_file(i)):
            blobs[name] = (prepared_dir / name).read_bytes()
        node = check_node(i, t, len(manifest["classes"]), manifest["feature_dim"],
                          {s: manifest["counts"][s][i] for s in ("train", "test")},
                          lambda what: DataError(f"prepared data {prepared_dir} {what}; run feda2v-prepare again"))
        test_splits[test_split_file(i)] = _safetensors_bytes({"test_x": node.test_x.numpy(),
                                                              "test_y": node.test_y.numpy()})
        blobs[SITE] = (json.dumps(site_entry(manifest, i), indent=1, sort_keys=True) + "\n").encode()
        target = out_dir / site_dir_name(i)
        _write_dir_atomically(target, blobs)
        written.append(target)
    # full mode's server evaluates on the test splits: they go alone, never the training samples
    blobs = {MANIFEST: (prepared_dir / MANIFEST).read_bytes(), CONDITIONS: (prepared_dir / CONDITIONS).read_bytes(),
             **test_splits,
             TEST_SPLITS: test_split_index(manifest, {n: hashlib.sha256(b).hexdigest() for n, b in test_splits.items()})}
    _write_dir_atomically(out_dir / SERVER_DIR, blobs)  # verified above (read_manifest, read_verified)
    written.append(out_dir / SERVER_DIR)
    return written


def _site_error(path: Path, partition: int):
    def bad(what: str) -> DataError:
        return DataError(f"site data for partition {partition} at {path} {what}; copy this site's bundle "
                         f"again (feda2v-prepare data.site_bundles_dir=DIR writes DIR/{site_dir_name(partition)}/)")
    return bad


def _read_site_json(path: Path, partition: int, bad) -> dict:
    try:
        site = json.loads((path / SITE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"has a damaged {SITE} ({e})") from None
    need = ("kind", "format", "partition", "classes", "feature_dim", "condition_dim", "counts", "files",
            "manifest_hash")
    if not isinstance(site, dict) or any(k not in site for k in need) or site["kind"] != SITE_KIND:
        raise bad(f"has a {SITE} that is not a feda2v site manifest")
    if site["format"] != FORMAT:
        raise bad(f"has format {site['format']!r}, this version reads {FORMAT}")
    if site["partition"] != partition:
        raise bad(f"holds partition {site['partition']}, not {partition} (wrong bundle for this node)")
    if not isinstance(site["files"], dict) or files_hash(site["files"]) != site["manifest_hash"]:
        raise bad(f"has a {SITE} whose files map does not match its manifest hash (edited or damaged)")
    for name in (CONDITIONS, node_file(partition)):
        if name not in site["files"]:
            raise bad(f"has a {SITE} that does not list {name}")
    return site


def load_partition(path, partition: int, *, manifest_hash: str | None = None) -> SiteData:
    """Read and verify one partition: from a site bundle (``site.json``) or a full prepared dir
    (``manifest.json``; only this partition's file and the conditions are read). ``manifest_hash``:
    the federation's, which the data must belong to."""
    path = Path(path)
    bad = _site_error(path, partition)
    if not path.is_dir():
        raise bad("is missing")
    if (path / SITE).is_file():
        entry = _read_site_json(path, partition, bad)
    elif (path / MANIFEST).is_file():
        manifest = read_manifest(path)  # its own error: the whole prepared dir is damaged
        if not 0 <= partition < manifest["nodes"]:
            raise bad(f"has no partition {partition} (it holds {manifest['nodes']})")
        entry = site_entry(manifest, partition)
    else:
        raise bad(f"has neither {SITE} nor {MANIFEST}")
    if manifest_hash is not None and entry["manifest_hash"] != manifest_hash:
        raise bad(f"belongs to data with manifest hash {entry['manifest_hash'][:12]}, the server trains on "
                  f"{manifest_hash[:12]}; give this site the bundle of the same prepared data")
    classes = list(entry["classes"])
    C, fdim, cdim = len(classes), int(entry["feature_dim"]), int(entry["condition_dim"])
    files = entry["files"]
    cond = check_conditions(read_verified(path, CONDITIONS, files[CONDITIONS], bad), C, cdim, bad)
    node = check_node(partition, read_verified(path, node_file(partition), files[node_file(partition)], bad),
                      C, fdim, entry["counts"], bad)
    return SiteData(partition=partition, classes=classes, conditions=cond, node=node,
                    manifest_hash=entry["manifest_hash"], feature_dim=fdim, condition_dim=cdim)
