"""The evaluation job: trained store + prepared data -> metrics.json, plot CSVs, figures, report.md.

Real side: the held-out set is the union of the nodes' test splits; TRTR trains on the union of
their train splits. Synthetic side: ``evaluate.samples_per_class`` samples per class from the
checkpoint's primary store (the server's; node 0's for ``sharing=local``), each class drawn from its
own seeded stream so adding a class never changes another class's samples.
Distribution metrics (Fréchet, MMD, k-NN precision/recall) compare class-balanced sets: per class,
the real side is at most ``samples_per_class`` seeded picks of that class's held-out samples.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feda2v.errors import CheckpointError, DataError, Feda2vError, TrackingError
from feda2v.evaluate import metrics as M
from feda2v.progress import Steps
from feda2v.fsutil import atomic_write_text
from feda2v.seeding import numpy_generator, torch_generator

# Progress steps of one evaluation: compute_metrics' five, then plot data and figures.
EVALUATE_STEPS = 7
# Pairwise metrics are O(n²) in memory; overall sets larger than this are subsampled (seeded).
MAX_PAIRWISE = 2000


# ------------------------------------------------------------------------------------ loading


def load_trained_store(path: str | Path):
    """(store, header, store_name) from a federation checkpoint; CheckpointError if unusable."""
    from feda2v.checkpoint import read_primary_store
    from feda2v.store import GeneratorStore

    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint not found: {path}; run feda2v-train first or set evaluate.checkpoint=PATH"
        )
    name, st, meta, header = read_primary_store(path)
    try:
        store = GeneratorStore.from_state(st, meta)
    except Feda2vError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: store '{name}' cannot be rebuilt: {e}") from e
    return store, header, name


def _real_sets(prepared):
    def cat(attr):
        parts = [getattr(n, attr) for n in prepared.nodes]
        return torch.cat(parts) if parts else torch.empty(0)

    return cat("train_x"), cat("train_y"), cat("test_x"), cat("test_y")


@torch.no_grad()
def sample_synthetic(store, n_classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for c in range(n_classes):
        idx = torch.full((per_class,), c, dtype=torch.long)
        xs.append(store.sample(idx, gen=torch_generator(seed, "evaluate/sample", c)).detach().cpu().float())
        ys.append(idx)
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------------------ metrics


def _subsample(n: int, cap: int, *seed_parts) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    return np.sort(numpy_generator(*seed_parts).choice(n, cap, replace=False))


def _finite(v):
    """JSON-safe number (ints stay ints) or None for NaN/inf, which DVC and MLflow cannot take."""
    if v is None or not math.isfinite(v):
        return None
    return int(v) if isinstance(v, (int, np.integer)) else float(v)


@torch.no_grad()
def reconstruction_errors(store, x: torch.Tensor, y: torch.Tensor, classes: list[str], conditions: torch.Tensor):
    """(overall, per-class) reconstruction MSE per feature, or None when the store has no encoder (GAN).

    Each class goes through its own key's model: encode, decode the posterior mean (no sampling noise,
    so the number is deterministic), conditioned on the class vector for conditional models.
    """
    if len(y) == 0:
        return None
    recon = torch.empty_like(x)
    for c in torch.unique(y).tolist():
        module = store.module(store.key_for_class(classes[c]), "generator")
        if not (hasattr(module, "encode") and hasattr(module, "decode")):
            return None
        rows = y == c
        p = next(module.parameters(), None)  # on train.device; the metrics are computed on the host
        device = p.device if p is not None else torch.device("cpu")
        xc = x[rows].to(device)
        cond = (conditions[c].to(device, xc.dtype).expand(len(xc), -1)
                if getattr(module, "conditional", False) else None)
        mu, _ = module.encode(xc, cond)
        recon[rows] = module.decode(mu, cond).cpu()
    overall, per = M.reconstruction_error(x, recon)
    yy = y.numpy()
    return overall, {classes[c]: float(per[yy == c].mean()) for c in np.unique(yy)}


def compute_metrics(
    store, prepared, *, samples_per_class: int, knn_k: int, seed: int, progress=None
) -> tuple[dict, dict]:
    """(metrics, extras): metrics is JSON-able numbers only; extras holds arrays for plots.
    ``progress`` (a feda2v.progress.Steps, optional) advances ``metric_steps(C)`` times."""
    step = progress.step if progress is not None else (lambda what: None)
    classes = list(prepared.classes)
    C = len(classes)
    tr_x, tr_y, te_x, te_y = _real_sets(prepared)
    if len(te_y) == 0:
        raise DataError("the prepared data has no test samples; set data.test_fraction > 0 and re-run feda2v-prepare")
    sx, sy = sample_synthetic(store, C, samples_per_class, seed)
    if not torch.isfinite(sx).all():
        raise DataError("the generator produced NaN/inf samples; the checkpoint's generator diverged")
    step("sampled the generator")

    sx_np, sy_np = M.as_array(sx), sy.numpy()
    te_np, tey_np = M.as_array(te_x), te_y.numpy()

    # class-balanced real counterpart of the synthetic set
    real_idx = []
    for c in range(C):
        where = np.flatnonzero(tey_np == c)
        real_idx.append(where[_subsample(len(where), samples_per_class, seed, "evaluate/real", c)])
    real_idx = np.concatenate(real_idx) if real_idx else np.empty(0, dtype=int)
    rx, ry = te_np[real_idx], tey_np[real_idx]

    per_class: dict[str, dict[str, float]] = {c: {} for c in classes}
    for c, name in enumerate(classes):
        a, b = rx[ry == c], sx_np[sy_np == c]
        pc = per_class[name]
        pc["n_real"] = int(len(a))
        if len(a) >= 2:
            pc["frechet"] = M.frechet_distance(a, b)
            pc["mmd"] = M.mmd_rbf(a, b)
        if len(a) > knn_k and len(b) > knn_k:
            pc["precision"], pc["recall"] = M.knn_precision_recall(a, b, knn_k)

    overall: dict[str, float] = {}
    step("per-class distances")
    overall["frechet"] = M.frechet_distance(rx, sx_np)
    i_r = _subsample(len(rx), MAX_PAIRWISE, seed, "evaluate/pairwise/real")
    i_s = _subsample(len(sx_np), MAX_PAIRWISE, seed, "evaluate/pairwise/synthetic")
    overall["mmd"] = M.mmd_rbf(rx[i_r], sx_np[i_s])
    overall["precision"], overall["recall"] = M.knn_precision_recall(rx[i_r], sx_np[i_s], knn_k)

    step("overall distances")
    tstr, trtr = M.tstr_trtr(sx_np, sy_np, tr_x, tr_y, te_np, tey_np, seed=seed)
    step("TSTR and TRTR classifiers")
    overall["tstr_acc"], overall["trtr_acc"] = tstr.overall, trtr.overall
    overall["tstr_balanced_acc"], overall["trtr_balanced_acc"] = tstr.balanced, trtr.balanced
    overall["tstr_trtr_ratio"] = tstr.balanced / trtr.balanced if trtr.balanced > 0 else float("nan")
    for c, name in enumerate(classes):
        if c in tstr.per_class:
            per_class[name]["tstr_acc"] = tstr.per_class[c]
            per_class[name]["trtr_acc"] = trtr.per_class[c]

    rec = reconstruction_errors(store, te_x.float(), te_y, classes, prepared.conditions)
    step("reconstruction error")
    if rec is not None:
        overall["recon_mse"] = rec[0]
        for name, v in rec[1].items():
            per_class[name]["recon_mse"] = v

    metrics = {
        "overall": {k: v for k, v in ((k, _finite(v)) for k, v in overall.items()) if v is not None},
        "per_class": {
            n: {k: v for k, v in ((k, _finite(v)) for k, v in d.items()) if v is not None}
            for n, d in per_class.items()
        },
    }
    extras = {"real_x": rx, "real_y": ry, "synth_x": sx_np, "synth_y": sy_np, "classes": classes,
              "keys": list(getattr(store, "keys", []))}
    return metrics, extras


# ------------------------------------------------------------------------------------ job


def _read_downstream(train_reports: Path) -> dict | None:
    p = train_reports / "downstream.json"
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{p} is not valid JSON ({e}); re-run feda2v-train or delete the file") from e
    if not isinstance(d, dict):
        raise DataError(f"{p} must hold a JSON object; re-run feda2v-train")
    return d


def _downstream_metrics(d: dict) -> dict:
    """Numbers only (DVC metrics): global accuracies and per-node accuracies."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    per_node = d.get("per_node")
    if isinstance(per_node, dict):
        out["per_node"] = {
            str(n): {k: float(v) for k, v in accs.items() if isinstance(v, (int, float))}
            if isinstance(accs, dict) else float(accs)
            for n, accs in per_node.items()
        }
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    return out


_MLFLOW_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


def _log_to_mlflow(cfg, run_id, flat: dict, files: list[Path], step: int, notes: list[str],
                   dataset: dict | None = None) -> None:
    """Eval metrics into the training's run, against its LoggedModel and the evaluation data
    (``dataset``: ``Tracker.log_dataset`` arguments); a repeated evaluation with the same results
    adds no points."""
    if not cfg.tracking.enabled:
        notes.append("MLflow: tracking.enabled=false; nothing logged")
        return
    if not run_id:
        notes.append("MLflow: the checkpoint names no MLflow run (mlflow_run_id); nothing logged")
        return
    try:
        from feda2v.tracking import open_run
    except ImportError:
        notes.append("MLflow: feda2v.tracking.open_run is not available; nothing logged")
        return
    try:
        tracker = open_run(cfg, run_id)
        if type(tracker).__name__ == "NullTracker":  # open_run already warned why
            why = getattr(tracker, "reason", None) or "unreachable"
            notes.append(f"MLflow: run {run_id} at {cfg.tracking.uri} not available ({why}); nothing logged")
            return
        if dataset is not None:
            tracker.log_dataset(**dataset, context="evaluation")
        model_id = tracker.find_store_model()
        logged = tracker.log_model_metrics(
            {"eval/" + _MLFLOW_NAME_BAD.sub("_", k): v for k, v in flat.items()}, step=step,
            model_id=model_id)
        for f in files:
            tracker.log_artifact(str(f), artifact_path="evaluate")
        tracker.end("FINISHED")
        same = f", {len(flat) - logged} unchanged" if logged < len(flat) else ""
        # (no model id here: report.md shows these notes and must not vary between identical runs)
        notes.append(f"MLflow: logged {logged} metrics{same} and {len(files)} files into run {run_id}"
                     + (" and its store model" if model_id else ""))
    except Exception as e:  # tracking must not cost the user the evaluation itself
        if cfg.tracking.required:
            raise TrackingError(f"could not log the evaluation into MLflow run {run_id}: {e}") from e
        notes.append(f"MLflow: logging into run {run_id} failed ({type(e).__name__}: {e}); outputs kept on disk")


def evaluate(cfg) -> dict:
    """Run the evaluation described by ``cfg``; returns ``{"metrics", "outputs", "notes"}``."""
    from feda2v.data import load_prepared
    from feda2v.evaluate import plots, report

    ev = cfg.evaluate  # its ranges were checked by load_config
    ckpt = Path(ev.checkpoint)
    from feda2v.store import GeneratorStore
    from feda2v.store.device import configure_determinism, resolve_device

    device = resolve_device(cfg.train.device)  # checked before the checkpoint is read
    configure_determinism(device)
    store, header, store_name = load_trained_store(ckpt)
    if isinstance(store, GeneratorStore):  # (tests evaluate stand-in stores too)
        store.to(device)  # sampling and reconstruction run there; checkpoints hold CPU tensors
    prepared = load_prepared(cfg.data.prepared_dir)
    want = header.get("data_manifest_hash")
    if want != prepared.manifest_hash:
        raise DataError(
            f"checkpoint {ckpt} was trained on data manifest {str(want)[:12]}… but "
            f"{cfg.data.prepared_dir} holds {prepared.manifest_hash[:12]}…; re-run feda2v-prepare with "
            "the training's data settings, or evaluate a checkpoint trained on this data"
        )
    trained_classes = getattr(getattr(store, "spec", None), "classes", None)
    if trained_classes is not None and list(trained_classes) != list(prepared.classes):
        raise DataError(
            f"the checkpoint's classes {list(trained_classes)[:3]}… differ from the prepared data's "
            f"{list(prepared.classes)[:3]}…; re-run feda2v-prepare with the training's data settings"
        )

    if cfg.train.threads > 0:  # as in training: intra-op splits follow the thread count
        torch.set_num_threads(cfg.train.threads)
    seed = int(derive_eval_seed(cfg))
    progress = Steps(ev.progress, EVALUATE_STEPS, "evaluate")
    try:
        metrics, extras = compute_metrics(
            store, prepared, samples_per_class=int(ev.samples_per_class), knn_k=int(ev.knn_k), seed=seed,
            progress=progress)
        # Training's reports are read (and checked) before anything is written, so a bad file costs
        # nothing already on disk.
        train_reports = Path(cfg.train.reports_dir)
        downstream = _read_downstream(train_reports)
        losses_csv = train_reports / "losses.csv"
        losses = plots.read_losses(losses_csv) if losses_csv.is_file() else None
        if downstream is not None:
            metrics["downstream"] = _downstream_metrics(downstream)
        metrics["round"] = int(header.get("round", 0))

        out = Path(ev.reports_dir)
        outputs: dict[str, Path] = {}
        notes: list[str] = []
        if losses is None:
            notes.append(f"{losses_csv} not found (written by feda2v-train); no loss curves")
        elif not losses:
            notes.append(f"{losses_csv} has no rows; no loss curves")
        outputs.update(plots.write_plot_csvs(out / "plots", metrics, extras, losses))
        progress.step("plot data")
        outputs.update(plots.write_figures(out / "figures", metrics, extras, losses))
        progress.step("figures")
    finally:
        progress.close()
    info = {
        "checkpoint": str(ckpt),
        "store": store_name,
        "round": metrics["round"],
        "keys": list(store.keys),
        "generator": f"{store.spec.type}, {store.spec.granularity}" if hasattr(store, "spec") and hasattr(store.spec, "type") else "?",
        "data_manifest_hash": prepared.manifest_hash,
        "samples_per_class": int(ev.samples_per_class),
        "knn_k": int(ev.knn_k),
        "seed": int(ev.seed),
        "stream_seed": seed,
    }
    # metrics.json: the headline numbers, flat (DVC metrics: `dvc metrics show` fits 120 columns);
    # evaluation.json: everything (overall, per class, downstream per node), a plain output.
    metrics_path, full_path = out / "metrics.json", out / "evaluation.json"
    atomic_write_text(metrics_path, json.dumps(dvc_metrics(metrics), indent=2) + "\n")
    atomic_write_text(full_path, json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    outputs["metrics"], outputs["evaluation"] = metrics_path, full_path

    report_path = out / "report.md"
    outputs["report"] = report_path
    # What MLflow did (run id, reachable or not, restored-from-cache checkpoints without provenance)
    # is not part of the evaluation: report.md, a DVC output, is written before it and never says;
    # the returned notes do (the CLI prints them).
    atomic_write_text(report_path, report.render(metrics, info, outputs, out, notes))
    flat = flatten({k: v for k, v in metrics.items() if k != "round"})
    run_id = header.get("mlflow_run_id") or (header.get("provenance") or {}).get("mlflow_run_id")
    from feda2v.tracking.tags import prepared_dataset

    _log_to_mlflow(cfg, run_id, flat, list(outputs.values()), metrics["round"], notes,
                   # its own name: MLflow keeps one context per (dataset, run), training's
                   prepared_dataset(prepared, cfg.data.prepared_dir, f"{cfg.data.name}/test"))
    return {"metrics": metrics, "outputs": {k: str(v) for k, v in outputs.items()}, "notes": notes}


# The evaluation's DVC metrics (the rest is in evaluation.json); accuracies in full mode are the
# training's (train_metrics.json).
DVC_METRICS = ("tstr_acc", "trtr_acc", "frechet", "mmd", "precision", "recall")


def dvc_metrics(metrics: dict) -> dict:
    return {k: metrics["overall"][k] for k in DVC_METRICS if k in metrics["overall"]}


def derive_eval_seed(cfg) -> int:
    """The evaluation's seed: evaluate.seed mixed with the run seed, so both settings matter."""
    from feda2v.seeding import derive_seed

    return derive_seed(cfg.seed, "evaluate", cfg.evaluate.seed) % (2**31)
