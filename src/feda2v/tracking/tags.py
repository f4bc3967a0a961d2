"""What identifies a run: flattened config params, git/seed/engine/stage/data tags, a run name.

Kept free of MLflow imports so building params/tags costs nothing when tracking is off.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from feda2v.config.validate import flatten_dotted

# MLflow rejects longer param values; keep the start of the value and say it was cut.
MAX_PARAM_CHARS = 6000


def _plain(cfg: Any) -> Any:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _param_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple, dict)):
        s = json.dumps(v, sort_keys=True)
    else:
        s = str(v)
    if len(s) > MAX_PARAM_CHARS:
        s = s[: MAX_PARAM_CHARS - 15] + "...[truncated]"
    return s


def flatten(cfg: Mapping | DictConfig, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": {"c": 1}}}`` -> ``{"a.b.c": "1"}``; lists and empty dicts become JSON.

    Values are strings in YAML spelling (``true``, ``null``) so they read like the config and
    compare cleanly in the MLflow UI.
    """
    return {k: _param_value(v) for k, v in flatten_dotted(_plain(cfg), prefix).items()}


def pipeline_outputs(root: str | Path) -> list[str]:
    """``dvc.lock`` and every path ``dvc.yaml`` (at the repo root ``root``) declares as a stage's
    outs, metrics or plots: what a ``dvc repro`` rewrites, so never a reason to call a run dirty."""
    import yaml

    paths = ["dvc.lock"]
    try:
        spec = yaml.safe_load((Path(root) / "dvc.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return paths
    for stage in (spec.get("stages") or {}).values():
        for field in ("outs", "metrics", "plots"):
            for entry in (stage or {}).get(field) or []:
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                paths.append(str(path).rstrip("/"))
    return paths


def _is_under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def git_info(cwd: str | Path | None = None, *, fallback_to_source: bool = False
             ) -> dict[str, str]:
    """Commit, dirty flag and dirty files of the repo around ``cwd``; "unknown" outside a git
    checkout (with ``fallback_to_source``: then the checkout feda2v's own source lives in, if any).

    Dirty means a tracked file differs from the commit, pipeline outputs aside: ``dvc.lock`` and
    the outputs ``dvc.yaml`` declares are rewritten by every ``dvc repro`` (prepare rewrites the
    lock before training starts), and untracked files (data, checkpoints, mlflow.db) are results,
    not source. ``git_dirty_files`` names the differing files (comma-separated, cut to fit a tag).
    """
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        if fallback_to_source:
            return git_info(Path(__file__).resolve().parent)
        return {"git_commit": "unknown", "git_dirty": "unknown", "git_dirty_files": ""}
    top = git("rev-parse", "--show-toplevel")
    status = git("status", "--porcelain=v1", "-z", "--untracked-files=no")
    if status is None or top is None:
        return {"git_commit": commit.strip(), "git_dirty": "unknown", "git_dirty_files": ""}
    outputs = pipeline_outputs(top.strip())
    files, entries = [], status.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        if entry[0] in "RC":  # a rename's or copy's source path follows as its own entry
            i += 1
        path = entry[3:]
        if not _is_under(path, outputs):
            files.append(path)
    files = sorted(set(files))
    listed = _param_value(",".join(files))
    return {"git_commit": commit.strip(), "git_dirty": "true" if files else "false",
            "git_dirty_files": listed}


def run_tags(cfg: Mapping | DictConfig, *, stage: str, manifest_hash: str | None = None,
             cwd: str | Path | None = None, extra: Mapping[str, object] | None = None
             ) -> dict[str, str]:
    """The tags every feda2v run carries (DESIGN: git commit + dirty, manifest hash, seed,
    engine, stage). The commit is the cwd's checkout (where a pipeline runs), else the one the
    feda2v source is in. ``mlflow.source.git.commit`` is also set so the MLflow UI shows it."""
    c = _plain(cfg)
    fed = c.get("federation", {}) or {}
    gen = c.get("generator", {}) or {}
    tags = dict(git_info(cwd, fallback_to_source=True))
    tags["mlflow.source.git.commit"] = tags["git_commit"]
    tags.update({
        "seed": str(c.get("seed")),
        "engine": str(fed.get("engine")),
        "stage": stage,
        "data_manifest_hash": manifest_hash or "unknown",
        "generator": f"{gen.get('type')}/{gen.get('granularity')}",
        "sharing": str(fed.get("sharing")),
    })
    for k, v in (extra or {}).items():
        tags[k] = str(v)
    return tags


def default_run_name(cfg: Mapping | DictConfig) -> str:
    """``tracking.run_name`` if set, else e.g. ``cvae-per_class-shared-digits-s0``."""
    c = _plain(cfg)
    name = (c.get("tracking") or {}).get("run_name")
    if name:
        return str(name)
    gen, fed, data = c.get("generator", {}), c.get("federation", {}), c.get("data", {})
    return (f"{gen.get('type')}-{gen.get('granularity')}-{fed.get('sharing')}-"
            f"{data.get('name')}-s{c.get('seed')}")


def unique_run_name(cfg: Mapping | DictConfig, *, resumed: bool = False,
                    now: float | None = None) -> str:
    """The MLflow run name: ``tracking.run_name`` if set, else ``default_run_name`` plus what
    else tells runs of one config apart (rounds; ``prof`` when profiling, the engine when not
    in-process, ``resume`` when resumed) and the UTC start time, e.g.
    ``cvae-unified-shared-instruments-s0-r20-prof-20261201T075310Z``."""
    import time

    c = _plain(cfg)
    if (c.get("tracking") or {}).get("run_name"):
        return str(c["tracking"]["run_name"])
    fed = c.get("federation") or {}
    parts = [default_run_name(c), f"r{fed.get('rounds')}"]
    if (c.get("profiler") or {}).get("enabled"):
        parts.append("prof")
    if fed.get("engine") not in (None, "inprocess"):
        parts.append(str(fed["engine"]))
    if resumed:
        parts.append("resume")
    parts.append(time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now)))
    return "-".join(parts)


def missing_nodes_tag(missing: Mapping[int, list[str]]) -> str:
    """``Federation.missing`` (round -> lost participants) as the ``feda2v.nodes_missing`` tag
    value, by node: ``{"node/001": [2, 3]}``. Searchable in MLflow (``tags.`feda2v.nodes_missing`
    LIKE '%node/001%'``); cut to a tag's size (the checkpoint keeps the whole record)."""
    by_node: dict[str, list[int]] = {}
    for round_, names in sorted(missing.items()):
        for name in names:
            by_node.setdefault(name, []).append(int(round_))
    return _param_value(dict(sorted(by_node.items())))


def prepared_dataset(data: Any, prepared_dir: str | Path, name: str) -> dict:
    """``Tracker.log_dataset`` arguments for a prepared folder (a ``PreparedData``): digest =
    its manifest hash, source = the folder, a schema of what a sample is and a profile of counts."""
    # a distributed run's server holds no samples, only each node's counts (data.prepared.NodeView)
    def samples(n, split: str) -> int:
        counts = getattr(n, "counts", None)
        return int(sum(counts[split])) if counts is not None else int(len(getattr(n, f"{split}_y")))

    train = sum(samples(n, "train") for n in data.nodes)
    test = sum(samples(n, "test") for n in data.nodes)
    schema = {"features": {"dtype": "float32", "shape": [-1, int(data.feature_dim)]},
              "label": {"dtype": "int64", "shape": [-1], "classes": list(data.classes)},
              "condition": {"dtype": "float32", "shape": [len(data.classes), int(data.condition_dim)]}}
    profile = {"classes": len(data.classes), "nodes": len(data.nodes), "train_samples": train,
               "test_samples": test, "feature_dim": int(data.feature_dim)}
    return {"name": str(name), "digest": str(data.manifest_hash), "source": str(prepared_dir),
            "schema": schema, "profile": profile}
