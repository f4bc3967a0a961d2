"""The ``federated-train`` job: data -> federation rounds -> checkpoints, tracking, profile, reports."""
from __future__ import annotations

import csv
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from feda2v.config import flatten_dotted, to_plain
from feda2v.errors import CheckpointError

# Config sections that may differ between a checkpoint and the run resuming it.
RESUME_FREE = ("federation.rounds", "train", "tracking", "profiler", "checkpoint.every",
               "checkpoint.keep_last", "checkpoint.dir", "evaluate", "federation.engine",
               "federation.flower")


def checkpoint_config(cfg) -> dict:
    """The config recorded in checkpoints: resolved, minus where this run was resumed from (so a
    resumed run and a straight run write identical files)."""
    plain = to_plain(cfg)
    plain["train"]["resume"] = None
    return plain


def check_resumable(cfg, header: dict, manifest_hash: str, path: Path) -> None:
    if header.get("data_manifest_hash") != manifest_hash:
        raise CheckpointError(f"{path} was trained on other prepared data (manifest hash differs); "
                              "re-run prepare with that checkpoint's data config or start without resume")
    mine, theirs = flatten_dotted(checkpoint_config(cfg)), flatten_dotted(header.get("config") or {})
    for name in sorted(set(mine) | set(theirs)):
        if any(name == f or name.startswith(f + ".") for f in RESUME_FREE):
            continue
        if mine.get(name) != theirs.get(name):
            raise CheckpointError(f"{path} belongs to another config: {name} is "
                                  f"{theirs.get(name)!r} there, {mine.get(name)!r} here")


def library_versions() -> dict:
    import safetensors

    import feda2v

    return {"feda2v": feda2v.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def build_header(cfg, meta: dict, data, rng_json: dict, provenance: dict) -> dict:
    primary = meta["stores"][meta["primary_store"]]
    # The engine (inprocess | flower) is how the rounds ran, not what state they produced: both
    # engines train bit-identical state, so it lives in the volatile provenance, not the config.
    conf = checkpoint_config(cfg)
    conf["federation"].pop("engine", None)
    conf["federation"].pop("flower", None)  # Flower's timing and failure policy: operational too
    return {
        "config": conf,
        "round": meta["round"],
        "node_cursor": meta["node_cursor"],
        "stores": meta["stores"],
        "primary_store": meta["primary_store"],
        "classifier": meta["classifier"],
        "keys": primary["keys"],
        "roles": primary["roles"],
        "optimizers": {kr: {"step": o["step"], "lr": o["lr"], "weight_decay": o["weight_decay"]}
                       for kr, o in primary["optimizers"].items()},
        "data_manifest_hash": data.manifest_hash,
        "library_versions": library_versions(),
        "rng": rng_json,
        "provenance": provenance,
    }


class LossLog:
    """reports/train/losses.csv (round,node,key,metric,value) and round_losses.csv (DVC plots)."""

    def __init__(self, reports_dir: Path, keep_before_round: int):
        self.dir = reports_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.detail = self._open("losses.csv", ["round", "node", "key", "metric", "value"], keep_before_round)
        self.rounds = self._open("round_losses.csv", ["round", "key", "metric", "value"], keep_before_round)

    def _open(self, name: str, header: list, keep_before_round: int):
        path = self.dir / name
        kept = []
        if keep_before_round > 1 and path.exists():  # resume: keep the rounds already done
            with path.open(newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["round"]) < keep_before_round]
        f = path.open("w", newline="")
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(kept)
        return f, w

    def add(self, result) -> None:
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
        for f, _ in (self.detail, self.rounds):
            f.close()


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
    from feda2v.checkpoint import CheckpointManager, capture_rng, read_checkpoint, restore_rng
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
    manager = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last)
    start_round, resumed_from = 1, None
    if cfg.train.resume:
        path = manager.resolve(cfg.train.resume)
        tensors, header = read_checkpoint(path)
        check_resumable(cfg, header, data.manifest_hash, path)
        federation.load_state_dict(tensors, header)
        restore_rng({k[4:]: v for k, v in tensors.items() if k.startswith("rng/")}, header.get("rng") or {})
        start_round, resumed_from = int(header["round"]) + 1, str(path)
        print(f"resuming from {path} after round {start_round - 1}", flush=True)
    rounds = cfg.federation.rounds
    if start_round > rounds:
        print(f"nothing to do: the checkpoint already has {start_round - 1} rounds (federation.rounds={rounds})")
        return {}

    tracker = make_tracker(cfg)  # raises before training when tracking.required and unreachable
    name = default_run_name(cfg)
    tracker.start(name, params=flatten(checkpoint_config(cfg)),
                  tags=run_tags(cfg, stage="federated-train", manifest_hash=data.manifest_hash,
                                extra={"resumed_from": resumed_from} if resumed_from else None))
    reports = Path(cfg.train.reports_dir)
    Path(cfg.profiler.dir).mkdir(parents=True, exist_ok=True)  # a DVC output, empty when profiling is off
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
                    (reports / "downstream.json").write_text(json.dumps(result.downstream, indent=2) + "\n")
                if result.round % cfg.checkpoint.every == 0 or result.round == rounds:
                    tensors, meta = federation.state_dict()
                    rng_tensors, rng_json = capture_rng()
                    tensors.update({f"rng/{k}": v for k, v in rng_tensors.items()})
                    header = build_header(cfg, meta, data, rng_json,
                                          {"mlflow_run_id": tracker.run_id,
                                           "engine": cfg.federation.engine})
                    path = manager.save(result.round, tensors, header)
                    tracker.log_artifact(str(path), "checkpoints")
                progress.round_done(result)
                summary = dict(result.metrics)
        summary["rounds"] = rounds
        summary["train_wall_seconds"] = time.perf_counter() - t_train
        summary["resets_total"] = len(federation.stores[federation.primary_store].events)
        metrics_path = reports.parent / "train_metrics.json"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        tracker.log_artifact(str(metrics_path))
        for p in sorted(reports.glob("*")):
            if p.is_file():
                tracker.log_artifact(str(p), "reports/train")
        tracker.log_artifact(str(Path(cfg.data.prepared_dir) / "manifest.json"), "data")
        if profiler.enabled and profiler.out_dir.exists():
            tracker.log_artifact(str(profiler.out_dir), "profile")
        tracker.log_store_model(str(manager.latest_path))
        status = "FINISHED"
        return summary
    finally:
        progress.close()
        losses.close()
        tracker.end(status)
