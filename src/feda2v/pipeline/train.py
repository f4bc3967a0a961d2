"""The ``federated-train`` job: data -> federation rounds -> checkpoints, tracking, profile, reports."""
from __future__ import annotations

import csv
import io
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from feda2v.config import to_plain
from feda2v.fsutil import atomic_write_text, ensure_dir, output_error, writing

def run_params(cfg) -> dict:
    """The run's MLflow params: the resolved config, minus where it was resumed from."""
    plain = to_plain(cfg)
    plain["train"]["resume"] = None
    return plain


def provenance(cfg, tracker) -> dict:
    """Who wrote a checkpoint (kept in the sidecar beside it, never in its bytes)."""
    return {"mlflow_run_id": tracker.run_id, "engine": cfg.federation.engine, "host": platform.node()}


class LossLog:
    """reports/train/losses.csv (round,node,key,metric,value) and round_losses.csv (DVC plots)."""

    def __init__(self, reports_dir: Path, keep_before_round: int):
        self.dir = ensure_dir(reports_dir)
        self.detail = self._open("losses.csv", ["round", "node", "key", "metric", "value"], keep_before_round)
        self.rounds = self._open("round_losses.csv", ["round", "key", "metric", "value"], keep_before_round)

    def _open(self, name: str, header: list, keep_before_round: int):
        path = self.dir / name
        kept = verified_rows(path, header, keep_before_round) if keep_before_round > 1 else []
        # The rows kept are rewritten atomically (a failure leaves the old file), then appended to.
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header)
        w.writeheader()
        w.writerows(kept)
        atomic_write_text(path, buf.getvalue())
        with writing(path):
            f = path.open("a", newline="")
        return f, csv.DictWriter(f, fieldnames=header)

    def add(self, result) -> None:
        with writing(self.dir, "write the loss reports in"):
            self._add(result)

    def _add(self, result) -> None:
        _, w = self.detail
        for nr in result.nodes:
            for key, ms in nr.losses.items():
                for m, v in ms.items():
                    w.writerow({"round": result.round, "node": nr.node, "key": key, "metric": m,
                                "value": f"{v:.9g}"})
        _, w = self.rounds
        for name, v in result.metrics.items():
            if name.startswith("gen/"):
                _, metric, key = name.split("/", 2)
                w.writerow({"round": result.round, "key": key, "metric": metric, "value": f"{v:.9g}"})
        for f, _ in (self.detail, self.rounds):
            f.flush()

    def close(self) -> None:
        with writing(self.dir, "write the loss reports in"):
            for f, _ in (self.detail, self.rounds):
                f.close()


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


def seed_globals(seed: int) -> None:
    """Global RNGs are not used for training decisions, but are seeded and checkpointed anyway."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def train(cfg, engine=None) -> dict:
    """Run (or resume) the federation; returns the final summary metrics. ``engine``: one built by
    the caller (the Flower deployment job injects one on its Grid); default from the config."""
    from feda2v.checkpoint import Checkpointer
    from feda2v.data import load_prepared
    from feda2v.federation.engine import make_engine
    from feda2v.federation.server import Federation
    from feda2v.profiling import StepProfiler
    from feda2v.tracking import default_run_name, flatten, make_tracker, run_tags

    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    data = load_prepared(cfg.data.prepared_dir)
    engine = engine or make_engine(cfg.federation.engine)
    seed_globals(cfg.seed)
    federation = Federation(cfg, data)
    checkpointer = Checkpointer(cfg, data.manifest_hash)
    start_round, resumed_from = 1, None
    if cfg.train.resume:
        path, state = checkpointer.restore(cfg.train.resume, federation)
        start_round, resumed_from = state.round + 1, str(path)
        print(f"resuming from {path} after round {state.round}", flush=True)
    rounds = cfg.federation.rounds
    if start_round > rounds:
        print(f"nothing to do: the checkpoint already has {start_round - 1} rounds (federation.rounds={rounds})")
        return {}

    tracker = make_tracker(cfg)  # raises before training when tracking.required and unreachable
    name = default_run_name(cfg)
    tracker.start(name, params=flatten(run_params(cfg)),
                  tags=run_tags(cfg, stage="federated-train", manifest_hash=data.manifest_hash,
                                extra={"resumed_from": resumed_from} if resumed_from else None))
    reports = Path(cfg.train.reports_dir)
    ensure_dir(cfg.profiler.dir)  # a DVC output, empty when profiling is off
    losses = LossLog(reports, start_round)
    progress = Progress(cfg.train.progress, rounds, start_round, len(federation.participants(start_round)))
    summary: dict = {}
    status = "FAILED"
    t_train = time.perf_counter()
    try:
        with StepProfiler(cfg.profiler, name) as profiler:
            for result in engine.run(federation, start_round, rounds, on_step=profiler.step,
                                     on_node=progress.node_done):
                losses.add(result)
                tracker.log_metrics(result.metrics, step=result.round)
                if result.downstream is not None:
                    atomic_write_text(reports / "downstream.json", json.dumps(result.downstream, indent=2) + "\n")
                if checkpointer.due(result.round, rounds):
                    path = checkpointer.save(result.round, federation, provenance(cfg, tracker))
                    tracker.log_artifact(str(path), "checkpoints")
                progress.round_done(result)
                summary = dict(result.metrics)
        summary["rounds"] = rounds
        summary["train_wall_seconds"] = time.perf_counter() - t_train
        summary["resets_total"] = len(federation.stores[federation.primary_store].events)
        metrics_path = reports.parent / "train_metrics.json"
        atomic_write_text(metrics_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        tracker.log_artifact(str(metrics_path))
        for p in sorted(reports.glob("*")):
            if p.is_file():
                tracker.log_artifact(str(p), "reports/train")
        tracker.log_artifact(str(Path(cfg.data.prepared_dir) / "manifest.json"), "data")
        if profiler.enabled and profiler.out_dir.exists():
            tracker.log_artifact(str(profiler.out_dir), "profile")
        if checkpointer.sidecar.is_file():
            tracker.log_artifact(str(checkpointer.sidecar), "checkpoints")
        tracker.log_store_model(str(checkpointer.latest_path))
        status = "FINISHED"
        return summary
    finally:
        progress.close()
        losses.close()
        tracker.end(status)
