"""MLflow logging cost as a share of a training loop's wall time (target <= 5%).

The same loop (real GeneratorStore steps, per-round metrics for every key, a checkpoint written
each round and handed to the tracker as the pipeline does, ``log_checkpoint``, the store model
logged at the end) runs with a NullTracker and with an MlflowTracker on a fresh SQLite store,
under the default upload policy (``tracking.upload_checkpoints=last``: the target) and under
``all`` (every round's checkpoint uploaded, beside it). Reported: wall times, the difference as
a share of the untracked time, and the time the training thread spent inside tracker calls.
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
        tracker.log_checkpoint(path)  # as pipeline/train.py: uploaded now or at the end, by policy
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
    rows: dict[str, list] = {"last": [], "all": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfgs = {policy: load_config({"tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "b",
                                                  "upload_checkpoints": policy}}) for policy in rows}
        t = time.perf_counter()
        make_tracker(cfgs["last"])  # creates the DB (one-time schema migration)
        setup_s = time.perf_counter() - t
        _loop(NullTracker(), tmp / "warm", 1, 2, batch)  # warm the store code paths
        for i in range(repeats):
            # rotate the order so drift in machine load does not favour one side
            kinds = ["null", "last", "all"]
            kinds = kinds[i % 3:] + kinds[:i % 3]
            results, connect, in_tracker = {}, {}, {}
            for kind in kinds:
                if kind == "null":
                    results[kind] = _loop(NullTracker(), tmp / f"null{i}", rounds, steps, batch)
                    continue
                t = time.perf_counter()
                tracker = make_tracker(cfgs[kind])
                connect[kind] = time.perf_counter() - t
                with warnings.catch_warnings():
                    # a silently disabled tracker would bench nothing
                    warnings.simplefilter("error", TrackingUnavailableWarning)
                    results[kind] = _loop(tracker, tmp / f"{kind}{i}", rounds, steps, batch)
                in_tracker[kind] = tracker.log_seconds
            for policy in rows:
                tracked = results[policy]
                rows[policy].append({"null_s": results["null"]["wall_s"], "tracked_s": tracked["wall_s"],
                                     "connect_s": connect[policy], "in_tracker_s": in_tracker[policy],
                                     "model_log_s": tracked["model_s"],
                                     "metrics_per_round": tracked["metrics_per_round"],
                                     "ckpt_mb": tracked["ckpt_mb"]})
    out: dict = {}
    for policy, prow in rows.items():
        med = {k: statistics.median(r[k] for r in prow) for k in prow[0]}
        out[policy] = {"overhead_share": (med["tracked_s"] - med["null_s"]) / med["null_s"],
                       "in_tracker_share": med["in_tracker_s"] / med["tracked_s"],
                       "per_round_share": (med["in_tracker_s"] - med["model_log_s"]) / med["tracked_s"],
                       "median": med, "runs": prow}
    d, a = out["last"], out["all"]
    return {
        "summary": (f"tracking overhead {100 * d['overhead_share']:.1f}% of wall time under the default "
                    f"upload policy (last; in tracker calls {100 * d['in_tracker_share']:.1f}%, of which the "
                    f"end-of-run model log {d['median']['model_log_s']:.2f} s; per-round logging "
                    f"{100 * d['per_round_share']:.1f}%), {100 * a['overhead_share']:.1f}% uploading every "
                    f"round's {a['median']['ckpt_mb']:.1f} MB checkpoint (all), over {rounds} rounds x {steps} "
                    f"steps ({d['median']['null_s']:.1f} s untracked), target <= 5%"),
        "overhead_share": d["overhead_share"], "in_tracker_share": d["in_tracker_share"],
        "per_round_share": d["per_round_share"], "overhead_share_all": a["overhead_share"],
        "store_setup_s": setup_s, "rounds": rounds, "steps_per_round": steps, "batch": batch,
        "policies": out,
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
