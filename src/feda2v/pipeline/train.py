"""The ``federated-train`` job: data -> federation rounds -> checkpoints, tracking, profile, reports."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from feda2v.config import to_plain
from feda2v.errors import DataError, RunDirError, TrainingStopped
from feda2v.fsutil import atomic_write_text, ensure_dir, output_error, remove_quietly, writing

# Training reports in train.reports_dir that belong to one run (a fresh run refuses a folder holding them).
REPORT_FILES = ("losses.csv", "round_losses.csv", "downstream.json")

def run_params(cfg) -> dict:
    """The run's MLflow params: the resolved config, minus where it was resumed from.

    A generator null that means "the type's default" is logged as the value the run trained with
    (hidden_dim, conditional_prior, ema_decay, optimizer lr, betas, schedule and decay_rounds): in MLflow's run table a
    cvae and a gan run would otherwise both show lr null, and a filter on the width would miss
    every run that left it to the type."""
    from feda2v.store.spec import resolve_optimizer_defaults, resolve_run_config

    plain = to_plain(cfg)
    plain["train"]["resume"] = None
    gen = resolve_run_config(plain)["generator"]
    opt = gen["optimizer"]
    lr, betas = resolve_optimizer_defaults(opt["lr"], opt["betas"], str(gen["type"]), opt["schedule"])
    opt.update(lr=lr, betas=list(betas))
    return plain


def provenance(cfg, tracker) -> dict:
    """Who wrote a checkpoint (kept in the sidecar beside it, never in its bytes)."""
    from feda2v.numerics import host_cpu

    return {"mlflow_run_id": tracker.run_id, "engine": cfg.federation.engine, "host": platform.node(),
            "host_cpu": host_cpu()}


class LossLog:
    """reports/train/losses.csv (round,node,key,metric,value) and round_losses.csv (DVC plots).

    Rows are kept in memory and each file is replaced atomically by ``commit()``, called right after
    a checkpoint is saved: the reports on disk always describe a saved state, a failed run leaves
    the previous reports whole, and a resumed run continues from rows it can verify.
    """

    FILES = {"losses.csv": ["round", "node", "key", "metric", "value"],
             "round_losses.csv": ["round", "key", "metric", "value"]}

    def __init__(self, reports_dir: Path, keep_before_round: int):
        self.dir = ensure_dir(reports_dir)
        probe_writable(self.dir)  # fail before training, not after the first checkpoint
        self.rows = {name: verified_rows(self.dir / name, header, keep_before_round) if keep_before_round > 1
                     else [] for name, header in self.FILES.items()}

    def add(self, result) -> None:
        detail, rounds = self.rows["losses.csv"], self.rows["round_losses.csv"]
        for nr in result.nodes:
            for key, ms in nr.losses.items():
                for m, v in ms.items():
                    detail.append({"round": result.round, "node": nr.node, "key": key, "metric": m,
                                   "value": f"{v:.9g}"})
        for name, v in result.metrics.items():
            if name.startswith("gen/"):
                _, metric, key = name.split("/", 2)
                rounds.append({"round": result.round, "key": key, "metric": metric, "value": f"{v:.9g}"})

    def commit(self) -> None:
        for name, header in self.FILES.items():
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=header)  # \r\n rows, as csv writes them by default
            w.writeheader()
            w.writerows(self.rows[name])
            atomic_write_text(self.dir / name, buf.getvalue())


def probe_writable(directory: Path) -> None:
    """Raise OutputError unless ``directory`` takes a small file (read-only, disk full)."""
    import tempfile

    with writing(directory):
        fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=directory)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            remove_quietly(tmp)


def verified_rows(path: Path, header: list, before_round: int) -> list[dict]:
    """The rows of a loss report from rounds before ``before_round`` that read back whole. A crash
    mid-write leaves a torn last row, and a damaged file can hold more: those rows are dropped
    (with a note), never trusted, so resume never fails on its own reports."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise output_error(path, e, "read") from e
    lines = raw.decode("utf-8", "replace").splitlines()
    rows, dropped = [], 0
    if not lines or lines[0].split(",") != header:
        dropped = len(lines)
        lines = []
    for line in lines[1:]:
        try:
            fields = next(csv.reader([line]))
            row = dict(zip(header, fields, strict=True))
            rnd = int(row["round"])
            float(row["value"])
            if rnd < 1 or any(not row[k] for k in header):
                raise ValueError
        except (csv.Error, ValueError, StopIteration):
            dropped += 1
            continue
        if rnd < before_round:
            rows.append(row)
    if dropped:
        print(f"note: {path}: {dropped} damaged row(s) dropped; the rows of rounds before "
              f"{before_round} that read back whole are kept", flush=True)
    return rows


class Progress:
    """A bar over rounds x nodes on a terminal, one plain line per round elsewhere."""

    def __init__(self, mode: str, total_rounds: int, start_round: int, nodes_per_round: int):
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.lines = mode in ("lines", "auto") and not use_bar
        self.total_rounds = total_rounds
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=(total_rounds - start_round + 1) * nodes_per_round, unit="node",
                            desc=f"round {start_round}/{total_rounds}", file=sys.stderr)

    def node_done(self, node_result) -> None:
        if self.bar is not None:
            loss = {k: round(v.get("loss", v.get("g_loss", 0.0)), 4) for k, v in node_result.losses.items()}
            self.bar.set_postfix_str(f"{node_result.node} " + " ".join(f"{k}={v}" for k, v in list(loss.items())[:3]))
            self.bar.update(1)

    def round_done(self, result) -> None:
        if self.bar is not None:
            self.bar.set_description(f"round {result.round}/{self.total_rounds}")
        elif self.lines:
            losses = " ".join(f"{k[4:]}={v:.4f}" for k, v in result.metrics.items()
                              if k.startswith("gen/loss/") or k.startswith("gen/g_loss/"))
            print(f"round {result.round}/{self.total_rounds}: {losses} "
                  f"resets={int(result.metrics['resets'])} {result.wall_seconds:.2f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Wall-clock figures: MLflow and train.timing_path (untracked) only, never a DVC output, so two
# identical runs write identical outputs (and dvc.lock).
TIMING = ("round_seconds", "train_step_seconds", "engine_overhead_share", "train_wall_seconds")
MAIN_LOSSES = ("loss", "g_loss", "d_loss")


def split_summary(summary: dict) -> tuple[dict, dict]:
    """(train_metrics.json, timing). The DVC metrics are few, so `dvc metrics show` fits 120
    columns whatever the granularity: the last round's main losses averaged over keys
    (``gen/loss``, or ``gen/g_loss`` and ``gen/d_loss``; every loss per key is in
    reports/train/round_losses.csv, a plot, and in MLflow), full mode's accuracies, the resets."""
    metrics, timing, per_key = {}, {}, {}
    for name, v in summary.items():
        if name in TIMING:
            timing[name] = v
        elif name.startswith("gen/"):
            metric = name.split("/")[1]
            if metric in MAIN_LOSSES:
                per_key.setdefault(metric, []).append(v)
        elif name.startswith("acc/"):
            metrics[name] = v
    for metric, values in per_key.items():
        metrics[f"gen/{metric}"] = sum(values) / len(values)
    metrics["resets"] = summary.get("resets_total", 0)
    return metrics, timing


def seed_globals(seed: int) -> None:
    """Global RNGs are not used for training decisions, but are seeded and checkpointed anyway."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def check_manifest(cfg, manifest: dict) -> None:
    """The data config must describe the prepared data it trains on (else the checkpoint's
    config would record false values): one line naming the key and both values.

    ``seed`` is not compared: it also seeds training, and sweeping training seeds over one
    prepared data set is a supported multirun (the header's data_manifest_hash names the data)."""
    d = cfg.data
    part = manifest.get("partition") or {}
    pairs = [("data.name", d.name, manifest.get("source")), ("data.nodes", d.nodes, manifest.get("nodes")),
             ("data.condition", d.condition, manifest.get("condition")),
             ("data.partition.scheme", d.partition.scheme, part.get("scheme")),
             ("data.test_fraction", d.test_fraction, manifest.get("test_fraction")),
             ("data.max_samples", d.max_samples, manifest.get("max_samples"))]
    if d.partition.scheme == "dirichlet":
        pairs.append(("data.partition.alpha", d.partition.alpha, part.get("alpha")))
    if d.partition.scheme == "classes_per_node":
        pairs.append(("data.partition.classes_per_node", d.partition.classes_per_node, part.get("classes_per_node")))
    if d.name == "instruments":
        pairs.append(("data.instruments.classes", d.instruments.classes, len(manifest.get("classes") or [])))
    for key, mine, theirs in pairs:
        if theirs is None and key in ("data.test_fraction", "data.max_samples"):
            continue  # not recorded by older manifests
        if mine != theirs:
            raise DataError(f"{key}={mine!r} but the prepared data in {d.prepared_dir} was made with "
                            f"{theirs!r}; re-run feda2v-prepare with this config or set {key}={theirs!r}")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def train(cfg, engine=None) -> dict:
    """Run (or resume) the federation; returns the final summary metrics. ``engine``: one built by
    the caller (the Flower deployment job injects one on its Grid); default from the config.

    The run owns checkpoint.dir and train.reports_dir (locked) from start to end; SIGTERM/SIGINT
    stop it at the next safe point with ``latest`` intact (TrainingStopped, exit 143/130)."""
    from feda2v.checkpoint.rundir import RunDirs
    from feda2v.pipeline.stopping import StopOnSignal
    from feda2v.store.device import configure_determinism, resolve_device

    # An absent device is one line before anything is read or written (the run-directory locks
    # below create their folders); on CUDA the trainer sets the determinism switches (incl.
    # CUBLAS_WORKSPACE_CONFIG) before the first kernel runs.
    configure_determinism(resolve_device(cfg.train.device))

    last = {"path": None, "round": None}  # the last complete checkpoint, for the stop message

    def stopped(signum: int) -> str:
        if last["path"] is None:
            return f"stopped by {_signal_name(signum)} before any checkpoint was written; nothing to resume"
        return (f"stopped by {_signal_name(signum)}; {last['path']} (round {last['round']}) is the last "
                "complete checkpoint; continue with train.resume=latest")

    with StopOnSignal(stopped) as stop, \
            RunDirs({"checkpoint.dir": cfg.checkpoint.dir, "train.reports_dir": cfg.train.reports_dir}):
        return _train(cfg, stop, last, engine)


def _refuse_used_dirs(cfg, checkpointer, reports: Path) -> None:
    """A fresh run never replaces another run's results unless told to (train.start_over)."""
    used = [p.name for p in checkpointer.existing()]
    old_reports = [f for f in REPORT_FILES if (reports / f).is_file()]
    if not (used or old_reports):
        return
    if not cfg.train.start_over:
        what, where, files = (("checkpoint.dir", cfg.checkpoint.dir, used) if used
                              else ("train.reports_dir", cfg.train.reports_dir, old_reports))
        raise RunDirError(
            f"{what}={where} holds another run's {'checkpoints' if used else 'reports'} "
            f"({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}); resume it with "
            "train.resume=latest, replace it with train.start_over=true (nothing is deleted before "
            f"this run's first checkpoint), or choose another {what}")
    # Old checkpoints go once the first new one is complete; the reports are only ever replaced
    # right after a checkpoint (LossLog.commit), so they follow.
    checkpointer.start_over()


def _train(cfg, stop, last: dict, engine=None) -> dict:
    from feda2v.checkpoint import Checkpointer
    from feda2v.data import load_prepared
    from feda2v.data.prepared import load_server_view
    from feda2v.federation.engine import make_engine
    from feda2v.federation.server import Federation
    from feda2v.profiling import StepProfiler
    from feda2v.tracking import default_run_name, flatten, make_tracker, run_tags, unique_run_name
    from feda2v.tracking.tags import missing_nodes_tag, prepared_dataset

    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    engine = engine or make_engine(cfg.federation.engine)
    if getattr(engine, "nodes_hold_data", False):  # Flower: the sites hold their partitions
        data = load_server_view(cfg.data.prepared_dir, test_sets=cfg.federation.mode == "full")
    else:
        data = load_prepared(cfg.data.prepared_dir)
    check_manifest(cfg, data.manifest)
    seed_globals(cfg.seed)
    federation = Federation(cfg, data, node_resident=getattr(engine, "node_resident", False))
    checkpointer = Checkpointer(cfg, data.manifest_hash)
    reports = Path(cfg.train.reports_dir)
    start_round, resumed_from = 1, None
    if cfg.train.resume:
        path, state = checkpointer.restore(cfg.train.resume, federation)
        start_round, resumed_from = state.round + 1, str(path)
        last.update(path=checkpointer.latest_path, round=state.round)
        print(f"resuming from {path} after round {state.round}", flush=True)
    else:
        _refuse_used_dirs(cfg, checkpointer, reports)
    rounds = cfg.federation.rounds
    if start_round > rounds:
        print(f"nothing to do: the checkpoint already has {start_round - 1} rounds (federation.rounds={rounds})")
        return {}

    tracker = make_tracker(cfg)  # raises before training when tracking.required and unreachable
    name = default_run_name(cfg)
    tracker.start(unique_run_name(cfg, resumed=bool(resumed_from)), params=flatten(run_params(cfg)),
                  tags=run_tags(cfg, stage="federated-train", manifest_hash=data.manifest_hash,
                                extra={"resumed_from": resumed_from} if resumed_from else None))
    tracker.log_dataset(**prepared_dataset(data, cfg.data.prepared_dir, cfg.data.name), context="training")
    if federation.missing:  # resumed: the rounds before still lost those nodes
        tracker.set_tags({"feda2v.nodes_missing": missing_nodes_tag(federation.missing)})
    status = "FAILED"
    progress = None
    summary: dict = {}
    downstream = None
    try:
        losses = LossLog(reports, start_round)
        progress = Progress(cfg.train.progress, rounds, start_round, len(federation.participants(start_round)))
        t_train = time.perf_counter()
        with StepProfiler(cfg.profiler, name) as profiler:
            for result in engine.run(federation, start_round, rounds, on_step=profiler.step,
                                     on_node=progress.node_done):
                losses.add(result)
                tracker.log_metrics(result.metrics, step=result.round)
                if result.missing:  # who, beside the count: a 1 in each lost node's series, and a tag
                    tracker.log_metrics({f"nodes_missing/{n}": 1.0 for n in result.missing}, step=result.round)
                    tracker.set_tags({"feda2v.nodes_missing": missing_nodes_tag(federation.missing)})
                downstream = result.downstream if result.downstream is not None else downstream
                if checkpointer.due(result.round, rounds):
                    with stop.critical():  # a signal waits until latest names the new file
                        path = checkpointer.save(result.round, federation, provenance(cfg, tracker))
                        last.update(path=checkpointer.latest_path, round=result.round)
                        # reports follow the checkpoint: a failed save leaves the previous ones whole
                        losses.commit()
                        if downstream is not None:
                            atomic_write_text(reports / "downstream.json", json.dumps(downstream, indent=2) + "\n")
                    tracker.log_checkpoint(path)  # now or at the end: tracking.upload_checkpoints
                progress.round_done(result)
                summary = dict(result.metrics)
        summary["rounds"] = rounds
        summary["train_wall_seconds"] = time.perf_counter() - t_train
        if federation.primary_store is not None:  # None: every store lives on its node (local on Flower)
            summary["resets_total"] = len(federation.stores[federation.primary_store].events)
        metrics, timing = split_summary(summary)
        metrics_path, timing_path = Path(cfg.train.metrics_path), Path(cfg.train.timing_path)
        atomic_write_text(metrics_path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        atomic_write_text(timing_path, json.dumps(timing, indent=2, sort_keys=True) + "\n")
        tracker.log_metrics({"train_wall_seconds": timing["train_wall_seconds"]}, step=rounds)
        tracker.log_artifact(str(metrics_path))
        tracker.log_artifact(str(timing_path))
        for p in sorted(reports.glob("*")):
            if p.is_file() and not p.name.startswith("."):  # not the run lock
                tracker.log_artifact(str(p), "reports/train")
        tracker.log_artifact(str(Path(cfg.data.prepared_dir) / "manifest.json"), "data")
        if profiler.enabled and profiler.out_dir.exists():
            tracker.log_artifact(str(profiler.out_dir), "profile")
        if checkpointer.sidecar.is_file():
            tracker.log_artifact(str(checkpointer.sidecar), "checkpoints")
        if federation.primary_store is not None:
            tracker.log_store_model(str(checkpointer.latest_path))
        status = "FINISHED"
        return summary
    except TrainingStopped:
        status = "KILLED"
        raise
    finally:
        if progress is not None:
            progress.close()
        tracker.end(status)
