"""MLflow logging cost as a share of a training loop's wall time (target <= 5%).

The same loop (real GeneratorStore steps, per-round metrics for every key, a checkpoint written and
logged each round, the store model logged at the end) runs with a NullTracker and with an
MlflowTracker on a fresh SQLite store. Reported: wall times of both, their difference as a share
of the untracked time, and the time the training thread spent inside tracker calls.
Store creation (MLflow's schema migrations, once per DB file) is reported separately.

Run: .venv/bin/python benchmarks/bench_tracking.py [--full]
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_batch, make_store  # noqa: E402


def _loop(tracker, workdir: Path, rounds: int, steps: int, batch: int) -> dict:
    from feda2v.checkpoint import write_checkpoint
    from feda2v.seeding import torch_generator

    store = make_store("cvae", "per_class")
    x, y = make_batch(batch)
    (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tracker.start("bench", {f"p{i}": i for i in range(70)}, {"stage": "bench"})
    for r in range(1, rounds + 1):
        t_round = time.perf_counter()
        metrics: dict[str, float] = {}
        for s in range(steps):
            out = store.train_batch(x, y, gen=torch_generator("b", r, s), node="n", round=r)
        for key, vals in out.items():
            metrics.update({f"{key}/{k}": float(v) for k, v in vals.items()})
        metrics["round_time_s"] = time.perf_counter() - t_round
        tracker.log_metrics(metrics, step=r)
        tensors, meta = store.state_dict()
        path = workdir / "checkpoints" / f"round_{r:04d}.ckpt"
        write_checkpoint(path, {f"store/server/{k}": v for k, v in tensors.items()},
                         {"stores": {"server": meta}, "round": r})
        tracker.log_artifact(path, "checkpoints")
    t_model = time.perf_counter()
    tracker.log_store_model(path)
    model_s = time.perf_counter() - t_model
    tracker.end("FINISHED")
    return {"wall_s": time.perf_counter() - t0, "model_s": model_s,
            "metrics_per_round": len(metrics), "ckpt_mb": path.stat().st_size / 1e6}


def run(quick: bool = False) -> dict:
    from feda2v.config import load_config
    from feda2v.tracking import NullTracker, make_tracker
    from feda2v.tracking.mlflow_tracker import TrackingUnavailableWarning

    rounds, steps, batch, repeats = (3, 5, 256, 1) if quick else (10, 30, 512, 3)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config({"tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "b"}})
        t = time.perf_counter()
        make_tracker(cfg)  # creates the DB (one-time schema migration)
        setup_s = time.perf_counter() - t
        _loop(NullTracker(), tmp / "warm", 1, 2, batch)  # warm the store code paths
        for i in range(repeats):
            # alternate the order so drift in machine load does not favour one side
            results = {}
            for kind in (("null", "mlflow") if i % 2 == 0 else ("mlflow", "null")):
                if kind == "null":
                    results[kind] = _loop(NullTracker(), tmp / f"null{i}", rounds, steps, batch)
                    continue
                t = time.perf_counter()
                tracker = make_tracker(cfg)
                connect_s = time.perf_counter() - t
                with warnings.catch_warnings():
                    # a silently disabled tracker would bench nothing
                    warnings.simplefilter("error", TrackingUnavailableWarning)
                    results[kind] = _loop(tracker, tmp / f"mlf{i}", rounds, steps, batch)
            null, tracked = results["null"], results["mlflow"]
            rows.append({"null_s": null["wall_s"], "tracked_s": tracked["wall_s"],
                         "connect_s": connect_s,
                         "in_tracker_s": tracker.log_seconds, "model_log_s": tracked["model_s"],
                         "metrics_per_round": tracked["metrics_per_round"],
                         "ckpt_mb": tracked["ckpt_mb"]})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    share = (med["tracked_s"] - med["null_s"]) / med["null_s"]
    in_share = med["in_tracker_s"] / med["tracked_s"]
    no_model = (med["in_tracker_s"] - med["model_log_s"]) / med["tracked_s"]
    return {
        "summary": (f"tracking overhead {100 * share:.1f}% of wall time (in tracker calls "
                    f"{100 * in_share:.1f}%, of which the end-of-run model log "
                    f"{med['model_log_s']:.2f} s; per-round logging {100 * no_model:.1f}%) over "
                    f"{rounds} rounds x {steps} steps, target <= 5%"),
        "overhead_share": share, "in_tracker_share": in_share, "per_round_share": no_model,
        "store_setup_s": setup_s, "rounds": rounds, "steps_per_round": steps, "batch": batch,
        "median": med, "runs": rows,
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
