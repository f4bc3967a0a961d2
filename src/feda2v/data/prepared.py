"""``prepare`` (source -> partition -> standardised features -> data/prepared/) and its reader.

Byte-reproducible: the same config and seed give the same files, byte for byte (no timestamps,
no absolute cache paths, no cache hit/miss facts in the manifest; safetensors output is canonical).
The directory is written beside its final place and renamed in only when complete, so an error
or a crash never leaves a half-written or missing ``data/prepared/`` in place of a good one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from feda2v.fsutil import fsync_dir, writing
from feda2v.errors import DataError
from feda2v.seeding import numpy_generator

FORMAT = 1
MANIFEST = "manifest.json"
CONDITIONS = "conditions.safetensors"
STD_FLOOR = 1e-8  # constant features (e.g. blank border pixels) are centred, not divided by ~0


def node_file(i: int) -> str:
    return f"node_{i:03d}.safetensors"


def files_hash(files: Mapping[str, str]) -> str:
    """The manifest's ``hash``: sha256 of the files map as compact JSON with sorted keys."""
    return hashlib.sha256(json.dumps(dict(files), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class NodeData:
    node_id: int
    train_x: "torch.Tensor"
    train_y: "torch.Tensor"
    test_x: "torch.Tensor"
    test_y: "torch.Tensor"


@dataclass(frozen=True)
class PreparedData:
    classes: list[str]
    conditions: "torch.Tensor"
    nodes: list[NodeData]
    manifest: dict
    manifest_hash: str
    feature_dim: int
    condition_dim: int


def _as_config(cfg):
    from omegaconf import DictConfig

    from feda2v.config import load_config

    return cfg if isinstance(cfg, DictConfig) else load_config(cfg)


def _subset(n: int, max_samples: int, seed: int) -> np.ndarray:
    if max_samples == 0 or max_samples >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(numpy_generator(seed, "subset", max_samples).choice(n, max_samples, replace=False))


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    # numpy writer: same format as safetensors.torch, and prepare of digits/fashion needs no torch
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def prepare(cfg, report: dict | None = None) -> Path:
    """Build ``cfg.data.prepared_dir`` from ``cfg.data``; returns its path.

    ``report`` (optional dict) receives timings and cache facts for the CLI summary; they are
    kept out of the manifest so a cached re-run writes the same bytes as a cold one.
    """
    # the making of data, imported here: a node or server that only reads prepared data (Flower's
    # per-message ClientApp process) does not pay for the sources, partitioners and progress bars
    from feda2v.data.conditions import make_conditions
    from feda2v.data.partition import make_partition, train_test_split
    from feda2v.data.sources import load_source
    from feda2v.progress import Steps

    cfg = _as_config(cfg)
    t0 = time.perf_counter()
    d = cfg.data
    with writing(d.prepared_dir, "restore the previous prepared data at"):
        _restore_moved_aside(Path(d.prepared_dir))
    seed = int(cfg.seed)
    source = load_source(cfg)
    classes = source.classes
    sel = _subset(len(source.labels), int(d.max_samples), seed)
    labels = source.labels[sel]
    # Partition first: it only needs labels, so a bad request fails before any slow rendering.
    part = make_partition(labels, len(classes), int(d.nodes), d.partition, seed)
    splits = [train_test_split(labels, idx, float(d.test_fraction), seed, i)
              for i, idx in enumerate(part.nodes)]

    skew_nodes = int(d.instruments.feature_skew_nodes) if source.variants > 1 else 0
    # The slow steps: rendering each class (per library used) and embedding the class texts.
    total = len(classes) * (2 if skew_nodes else 1) * source.reports_classes + (d.condition == "text")
    with Steps(d.progress, total, "prepare") as progress:
        source.on_class = lambda name, cached: progress.step(f"{'cached' if cached else 'rendered'} {name}")
        feats = source.features(0, sel)
        skew_feats = source.features(1, sel) if skew_nodes else None
        conditions, cond_info = make_conditions(d.condition, source.descriptions, Path(d.instruments.cache_dir))
        if d.condition == "text":
            progress.step("embedded the class descriptions")
    if feats.shape != (len(sel), source.feature_dim) or not np.isfinite(feats).all():
        raise DataError(f"{source.name}: features came out malformed or non-finite; clear {d.instruments.cache_dir}")

    def rows(node: int, idx: np.ndarray) -> np.ndarray:
        return (skew_feats if node < skew_nodes else feats)[idx]

    train_x = [rows(i, tr) for i, (tr, _) in enumerate(splits)]
    # z-score with statistics of the training samples only (all nodes), applied to train and test.
    all_train = np.concatenate(train_x)
    mean = all_train.mean(axis=0)
    std = all_train.std(axis=0)
    std = np.where(std > STD_FLOOR, std, 1.0)

    def z(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)

    blobs: dict[str, bytes] = {CONDITIONS: _safetensors_bytes({"conditions": conditions})}
    counts = {"train": [], "test": []}
    C = len(classes)
    for i, (tr, te) in enumerate(splits):
        blobs[node_file(i)] = _safetensors_bytes({
            "train_x": z(train_x[i]), "train_y": labels[tr].astype(np.int64),
            "test_x": z(rows(i, te)), "test_y": labels[te].astype(np.int64),
        })
        counts["train"].append(np.bincount(labels[tr], minlength=C).tolist())
        counts["test"].append(np.bincount(labels[te], minlength=C).tolist())

    files = {name: hashlib.sha256(b).hexdigest() for name, b in sorted(blobs.items())}
    info = {k: v for k, v in source.info.items() if k != "cache"}
    manifest = {
        "format": FORMAT,
        "source": source.name,
        "classes": list(classes),
        "feature_dim": int(source.feature_dim),
        "condition": d.condition,
        "condition_dim": int(conditions.shape[1]),
        "nodes": int(d.nodes),
        "partition": part.info,
        "seed": seed,
        "test_fraction": float(d.test_fraction),
        "sizes": {"train": int(sum(len(tr) for tr, _ in splits)), "test": int(sum(len(te) for _, te in splits))},
        "counts": counts,
        "files": files,
        "hash": files_hash(files),
        "max_samples": int(d.max_samples),
        "standardization": {"method": "zscore", "fit_on": "training samples of all nodes",
                            "applied_to": ["train_x", "test_x"], "std_floor": STD_FLOOR},
        "feature_skew": ({"nodes": list(range(skew_nodes)), "library": source.info.get("skew_library")}
                         if skew_nodes else None),
        "source_info": info,
        "condition_info": cond_info,
    }
    blobs[MANIFEST] = _manifest_bytes(manifest)
    target = Path(d.prepared_dir)
    with writing(target):  # disk full, read-only: one line; the previous data stays in place
        _write_dir_atomically(target, blobs)
    if report is not None:
        report.update({"seconds": time.perf_counter() - t0, "manifest": manifest,
                       "cache": dict(source.info.get("cache", {}))})
    return target


_NUM_LIST = re.compile(r"\[\s+(-?[\d.e+-]+(?:,\s+-?[\d.e+-]+)*)\s+\]")


def _manifest_bytes(manifest: dict) -> bytes:
    """Indented JSON with number lists (per-class counts, node classes) kept on one line."""
    text = json.dumps(manifest, indent=2)
    text = _NUM_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    return (text + "\n").encode()


def _restore_moved_aside(target: Path) -> None:
    """A crash between "move the old dir aside" and "move the new one in" leaves the previous
    data in ``.<name>.old-*``: put it back before anything else, so it survives this run too."""
    if target.exists() or not target.parent.is_dir():
        return
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside:
        os.rename(aside[-1], target)


def _write_dir_atomically(target: Path, blobs: dict[str, bytes]) -> None:
    if target.exists() and not target.is_dir():
        raise DataError(f"{target} exists and is not a directory; move it away or set data.prepared_dir")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        for name, b in blobs.items():
            with open(tmp / name, "wb") as f:
                f.write(b)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; prepared data is ordinary project output
        fsync_dir(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            old.rmdir()
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)  # put the previous data back
            raise
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"prepared data {path} {what}; run feda2v-prepare again (dvc repro prepare)")


def _check_shape_fields(path: Path, m: dict) -> None:
    """Types of the fields the reader indexes with, so a hand-edited manifest is one clear line."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    ok = (is_int(m["nodes"]) and m["nodes"] >= 1 and is_int(m["feature_dim"]) and is_int(m["condition_dim"])
          and isinstance(m["classes"], list) and m["classes"] and all(isinstance(c, str) for c in m["classes"])
          and isinstance(m["counts"], dict))
    if ok:
        C = len(m["classes"])
        for split in ("train", "test"):
            rows = m["counts"].get(split)
            ok = ok and isinstance(rows, list) and len(rows) == m["nodes"] and all(
                isinstance(r, list) and len(r) == C and all(is_int(v) for v in r) for r in rows)
    if not ok:
        raise _bad(path, f"has a malformed {MANIFEST} (nodes, classes, dims or counts)")


def read_manifest(path: Path) -> dict:
    """``manifest.json`` of a prepared dir, checked: fields, format, shapes, files-map hash."""
    if not path.is_dir():
        raise _bad(path, "is missing")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise _bad(path, f"has no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"has a damaged {MANIFEST} ({e})") from None
    required = ("format", "source", "classes", "feature_dim", "condition_dim", "nodes", "counts",
                "files", "hash", "sizes")
    missing = [k for k in required if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise _bad(path, f"has a {MANIFEST} without {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise _bad(path, f"has format {manifest['format']!r}, this version reads {FORMAT}")
    _check_shape_fields(path, manifest)
    files = manifest["files"]
    if not isinstance(files, dict) or files_hash(files) != manifest["hash"]:
        raise _bad(path, f"has a {MANIFEST} whose files map does not match its hash (edited or damaged)")
    expected = [CONDITIONS] + [node_file(i) for i in range(manifest["nodes"])]
    absent = [f for f in expected if f not in files]
    if absent:
        raise _bad(path, f"has a {MANIFEST} that does not list {absent[0]}")
    return manifest


def read_verified(path: Path, name: str, sha256: str, bad=None, listed_in: str = MANIFEST) -> dict:
    """One safetensors file of prepared data, its sha256 checked against ``listed_in``'s;
    ``bad(what)`` builds the error."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    bad = bad or (lambda what: _bad(path, what))
    fp = path / name
    if not fp.is_file():
        raise bad(f"is missing {name}")
    b = fp.read_bytes()
    if hashlib.sha256(b).hexdigest() != sha256:
        raise bad(f"has a corrupted {name} (sha256 differs from {listed_in})")
    try:
        return load(b)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise bad(f"has an unreadable {name} ({e})") from None


def check_conditions(t: dict, C: int, cdim: int, bad):
    import torch

    cond = t.get("conditions")
    if cond is None or cond.dtype != torch.float32 or tuple(cond.shape) != (C, cdim):
        raise bad(f"has {CONDITIONS} without a float32 [{C}, {cdim}] 'conditions' tensor")
    return cond


def check_split(name: str, split: str, t: dict, C: int, fdim: int, row: list, bad) -> None:
    """One split's ``{split}_x``/``{split}_y`` in file ``name`` against dims and the manifest's
    per-class counts ``row``."""
    import torch

    x, y = t.get(f"{split}_x"), t.get(f"{split}_y")
    ok = (x is not None and y is not None and x.dtype == torch.float32 and y.dtype == torch.int64
          and x.dim() == 2 and x.shape[1] == fdim and y.shape == (x.shape[0],))
    if not ok:
        raise bad(f"has {name} without float32 {split}_x [n, {fdim}] and int64 {split}_y [n]")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
        raise bad(f"has {name} with {split} labels outside the {C} classes")
    if torch.bincount(y, minlength=C).tolist() != row:
        raise bad(f"has {name} whose {split} class counts differ from the manifest")


def check_node(i: int, t: dict, C: int, fdim: int, counts: dict, bad) -> NodeData:
    """Node ``i``'s tensors against dims and the manifest's per-class ``counts`` ({split: row})."""
    for split in ("train", "test"):
        check_split(node_file(i), split, t, C, fdim, counts[split], bad)
    return NodeData(i, t["train_x"], t["train_y"], t["test_x"], t["test_y"])


def load_prepared(path) -> PreparedData:
    """Read and verify a prepared dir: every file's sha256, the files-map hash, tensor shapes and
    dtypes, and per-node per-class counts against the manifest. DataError on any mismatch."""
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    bad = lambda what: _bad(path, what)  # noqa: E731
    classes = list(manifest["classes"])
    C, fdim, cdim = len(classes), manifest["feature_dim"], manifest["condition_dim"]
    cond = check_conditions(read_verified(path, CONDITIONS, files[CONDITIONS]), C, cdim, bad)
    counts = manifest["counts"]
    nodes = [check_node(i, read_verified(path, node_file(i), files[node_file(i)]), C, fdim,
                        {s: counts[s][i] for s in ("train", "test")}, bad)
             for i in range(manifest["nodes"])]
    return PreparedData(classes=classes, conditions=cond, nodes=nodes, manifest=manifest,
                        manifest_hash=manifest["hash"], feature_dim=fdim, condition_dim=cdim)


@dataclass(frozen=True)
class NodeView:
    """A node as the server of a distributed run (Flower) knows it: its id, its per-class counts
    (the manifest's) and, only where the server evaluates on it (full mode), its test split. Its
    training samples stay on its site: reading them here is an error, not an empty tensor."""

    node_id: int
    counts: dict  # {"train": [per class], "test": [per class]}
    test_x: "torch.Tensor | None" = None
    test_y: "torch.Tensor | None" = None

    def _not_here(self, what: str):
        raise DataError(f"partition {self.node_id}'s {what} stay on its site; the server holds only the "
                        "manifest and the conditions (a node-side step ran on the server)")

    @property
    def train_x(self):
        self._not_here("training samples")

    @property
    def train_y(self):
        self._not_here("training labels")


# The server bundle's held-out test set (data/sites.py writes it): one file per partition holding
# only its test split, and an index binding their sha256s to the manifest hash. The manifest's own
# files map hashes whole node files, so a test split alone needs this index to be verifiable.
TEST_SPLITS = "test_splits.json"
TEST_SPLITS_KIND = "feda2v-test-splits"


def test_split_file(i: int) -> str:
    return f"test_{i:03d}.safetensors"


def test_split_index(manifest: dict, files: Mapping[str, str]) -> bytes:
    """``test_splits.json``: the test-split files' sha256s and the manifest hash they belong to."""
    index = {"kind": TEST_SPLITS_KIND, "format": FORMAT, "manifest_hash": manifest["hash"],
             "files": dict(sorted(files.items()))}
    return (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()


def _read_test_split_index(path: Path, manifest: dict) -> dict:
    """The verified files map of ``path/test_splits.json``; DataError naming the index otherwise."""
    def bad(what: str) -> DataError:
        return DataError(f"server data {path} {what}; copy the server bundle again (feda2v-prepare "
                         "data.site_bundles_dir=DIR writes DIR/server/)")
    try:
        index = json.loads((path / TEST_SPLITS).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"has a damaged {TEST_SPLITS} ({e})") from None
    if (not isinstance(index, dict) or index.get("kind") != TEST_SPLITS_KIND or index.get("format") != FORMAT
            or not isinstance(index.get("files"), dict)):
        raise bad(f"has a {TEST_SPLITS} that is not a feda2v test-split index of format {FORMAT}")
    if index.get("manifest_hash") != manifest["hash"]:
        raise bad(f"has a {TEST_SPLITS} of other prepared data (manifest hash "
                  f"{str(index.get('manifest_hash'))[:12]}, {MANIFEST} has {manifest['hash'][:12]})")
    return index["files"]


def load_server_view(path, *, test_sets: bool = False) -> PreparedData:
    """What the server of a distributed run reads: the manifest and the conditions (verified), and
    with ``test_sets`` (full mode: the held-out test set it evaluates on) each partition's test
    split: from the server bundle's ``test_NNN.safetensors`` (``test_splits.json`` present, each
    verified against it), else from the node files of a plain prepared dir (against the manifest).
    ``nodes`` are NodeViews. A folder holding only ``manifest.json`` and ``conditions.safetensors``
    is enough without ``test_sets``."""
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    classes = list(manifest["classes"])
    C, fdim, cdim = len(classes), manifest["feature_dim"], manifest["condition_dim"]
    cond = check_conditions(read_verified(path, CONDITIONS, files[CONDITIONS]), C, cdim,
                            lambda what: _bad(path, what))
    counts = manifest["counts"]
    split_files = _read_test_split_index(path, manifest) if test_sets and (path / TEST_SPLITS).is_file() else None
    nodes = []
    for i in range(manifest["nodes"]):
        mine = {s: counts[s][i] for s in ("train", "test")}
        if not test_sets:
            nodes.append(NodeView(i, mine))
            continue
        if split_files is None:
            def bad(what: str, i=i) -> DataError:
                return DataError(f"prepared data {path} {what} (partition {i}'s test split, which the server "
                                 "evaluates full mode on); copy that file from the prepared data or run "
                                 "feda2v-prepare again")
            nd = check_node(i, read_verified(path, node_file(i), files[node_file(i)], bad), C, fdim, mine, bad)
            nodes.append(NodeView(i, mine, nd.test_x, nd.test_y))
            continue

        def bad(what: str, i=i) -> DataError:
            return DataError(f"server data {path} {what} (partition {i}'s test split, which the server "
                             "evaluates full mode on); copy the server bundle again (feda2v-prepare "
                             "data.site_bundles_dir=DIR writes DIR/server/)")
        name = test_split_file(i)
        if name not in split_files:
            raise bad(f"has a {TEST_SPLITS} that does not list {name}")
        t = read_verified(path, name, split_files[name], bad, TEST_SPLITS)
        check_split(name, "test", t, C, fdim, mine["test"], bad)
        nodes.append(NodeView(i, mine, t["test_x"], t["test_y"]))
    return PreparedData(classes=classes, conditions=cond, nodes=nodes, manifest=manifest,
                        manifest_hash=manifest["hash"], feature_dim=fdim, condition_dim=cdim)
