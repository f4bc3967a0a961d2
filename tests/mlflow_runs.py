"""Two real trainings (+ evaluations) tracked into one SQLite store, for the MLflow comparison
tests: they differ in generator type (cvae, gan) and granularity (unified, per_class)."""
from __future__ import annotations

import os
from pathlib import Path

RUNS = (("cvae", "unified"), ("gan", "per_class"))
ROUNDS = 2


def train_two_runs(work: Path, *, evaluate_twice: bool = False) -> dict:
    """Train and evaluate both configurations under ``work`` (its mlflow.db); returns
    ``{"db": path, "prepared": path, "cfgs": {(type, granularity): cfg}}``."""
    from feda2v.config import load_config
    from feda2v.data import prepare
    from feda2v.evaluate.job import evaluate
    from feda2v.pipeline.train import train

    old = Path.cwd()
    os.chdir(work)  # the default sqlite:///mlflow.db resolves against the cwd
    # sample often enough that a few-second training logs system metrics
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    try:
        data = {"name": "digits", "nodes": 3, "condition": "onehot",
                "prepared_dir": str(work / "prepared"), "partition": {"scheme": "iid"}}
        prepare(load_config({"seed": 0, "data": data}))
        cfgs = {}
        for kind, gran in RUNS:
            tag = f"{kind}_{gran}"
            cfg = load_config({
                "seed": 0, "data": data,
                "generator": {"type": kind, "granularity": gran, "hidden_dim": 32, "latent_dim": 8},
                "federation": {"rounds": ROUNDS, "batch_size": 128},
                "checkpoint": {"dir": str(work / f"ckpt_{tag}"), "keep_last": 2},
                "train": {"reports_dir": str(work / f"reports_{tag}" / "train"), "progress": "off"},
                "tracking": {"experiment": "compare"},
                "evaluate": {"checkpoint": str(work / f"ckpt_{tag}" / "latest.ckpt"),
                             "reports_dir": str(work / f"reports_{tag}"), "samples_per_class": 20}})
            train(cfg)
            evaluate(cfg)
            if evaluate_twice:
                evaluate(cfg)
            cfgs[(kind, gran)] = cfg
    finally:
        os.chdir(old)
    return {"db": work / "mlflow.db", "prepared": work / "prepared", "cfgs": cfgs}
