"""prepare -> train -> evaluate on tiny digits runs, through the real data/store/checkpoint parts."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from feda2v.config import load_config
from feda2v.errors import CheckpointError, DataError

pytestmark = pytest.mark.slow


def _cfg(root: Path, **over) -> dict:
    cfg = {
        "seed": 0,
        "data": {"name": "digits", "nodes": 3, "condition": "onehot", "prepared_dir": str(root / "prepared"),
                 "partition": {"scheme": "iid"}},
        "generator": {"hidden_dim": 32, "latent_dim": 8},
        "federation": {"rounds": 2, "batch_size": 128},
        "checkpoint": {"dir": str(root / "ckpt")},
        "train": {"reports_dir": str(root / "reports" / "train"), "progress": "off",
                  "metrics_path": str(root / "reports" / "train_metrics.json"),
                  "timing_path": str(root / "reports" / "timing" / "train.json")},
        "tracking": {"enabled": False},
        "evaluate": {"checkpoint": str(root / "ckpt" / "latest.ckpt"), "reports_dir": str(root / "reports"),
                     "samples_per_class": 40},
    }
    for dotted, v in over.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return cfg


def _train(root: Path, **over):
    from feda2v.data import prepare
    from feda2v.pipeline.train import train

    cfg = load_config(_cfg(root, **over))
    prepare(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One full-mode run (generator + classifier, downstream.json) tracked in a local MLflow db."""
    root = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return root, _train(root, federation__mode="full", tracking__enabled=True, tracking__uri=uri)


@pytest.fixture(scope="module")
def evaluated(trained):
    from feda2v.evaluate import evaluate

    root, cfg = trained
    return root, cfg, evaluate(cfg)


def test_evaluate_real_checkpoint(evaluated):
    from feda2v.evaluate.job import compute_metrics, derive_eval_seed, load_trained_store
    from feda2v.data import load_prepared

    root, cfg, res = evaluated
    m = res["metrics"]
    ov = m["overall"]
    assert m["round"] == 2
    # TRTR on digits with a linear classifier is high; a 2-round generator is worse but not random
    assert ov["trtr_acc"] > 0.9
    assert 0.0 <= ov["tstr_acc"] <= 1.0 and ov["tstr_acc"] < ov["trtr_acc"]
    assert ov["frechet"] > 0 and 0 <= ov["precision"] <= 1 and 0 <= ov["recall"] <= 1
    assert ov["recon_mse"] > 0  # cvae default: an encoder exists
    assert len(m["per_class"]) == 10
    on_disk = json.loads((root / "reports" / "evaluation.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    headline = json.loads((root / "reports" / "metrics.json").read_text())  # the DVC metrics
    assert headline == {k: ov[k] for k in ("tstr_acc", "trtr_acc", "frechet", "mmd", "precision", "recall")}
    for f in ("figures/loss_curves.png", "figures/tstr_vs_trtr.png", "figures/embedding_2d.png",
              "figures/per_node_accuracy.png", "plots/tstr_per_class.csv", "plots/embedding_2d.csv",
              "plots/loss_per_round.csv", "plots/per_node_accuracy.csv", "report.md"):
        assert (root / "reports" / f).is_file(), f
    # deterministic: the same checkpoint and seed give the same numbers
    store, _, _ = load_trained_store(cfg.evaluate.checkpoint)
    again, _ = compute_metrics(store, load_prepared(cfg.data.prepared_dir), samples_per_class=40,
                               knn_k=cfg.evaluate.knn_k, seed=derive_eval_seed(cfg))
    assert again["overall"] == ov and again["per_class"] == m["per_class"]


def test_full_mode_downstream_and_mlflow(evaluated):
    """downstream.json is picked up, and everything lands in the training's MLflow run."""
    from mlflow import MlflowClient

    from feda2v.checkpoint import read_checkpoint

    root, cfg, res = evaluated
    _, header = read_checkpoint(Path(cfg.evaluate.checkpoint))
    run_id = header.get("mlflow_run_id") or header["provenance"]["mlflow_run_id"]
    ds = res["metrics"]["downstream"]
    assert {"global_acc_fedavg", "global_acc_distilled"} <= set(ds) and len(ds["per_node"]) == 3
    assert "global_acc_distilled" in (root / "reports" / "report.md").read_text()
    assert any(f"into run {run_id}" in n for n in res["notes"]), res["notes"]
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(run_id)
    assert run.data.metrics["eval/overall/tstr_acc"] == pytest.approx(res["metrics"]["overall"]["tstr_acc"])
    assert run.data.metrics["eval/downstream/global_acc_distilled"] == pytest.approx(ds["global_acc_distilled"])
    names = {a.path for a in client.list_artifacts(run_id, "evaluate")}
    assert {"evaluate/metrics.json", "evaluate/report.md", "evaluate/tstr_vs_trtr.png"} <= names


def test_manifest_mismatch_with_real_data(trained, tmp_path):
    from feda2v.data import prepare
    from feda2v.evaluate import evaluate

    root, cfg = trained
    other = load_config({**_cfg(root), "seed": 1, "data": {**_cfg(root)["data"],
                                                           "prepared_dir": str(tmp_path / "other")}})
    prepare(other)  # same source, other seed -> other split -> other manifest hash
    ev = load_config({**_cfg(root), "data": {**_cfg(root)["data"], "prepared_dir": str(tmp_path / "other")},
                      "evaluate": {**_cfg(root)["evaluate"], "reports_dir": str(tmp_path / "r")}})
    with pytest.raises(DataError, match="trained on data manifest"):
        evaluate(ev)
    assert not (tmp_path / "r").exists()


def test_corrupted_real_checkpoint_is_a_clear_error(trained, tmp_path):
    from feda2v.evaluate import evaluate

    root, cfg = trained
    good = Path(cfg.evaluate.checkpoint).read_bytes()
    for name, data in {"flipped": good[:-100] + bytes([good[-100] ^ 0xFF]) + good[-99:],
                       "truncated": good[: len(good) // 2]}.items():
        bad = tmp_path / f"{name}.ckpt"
        bad.write_bytes(data)
        c = load_config({**_cfg(root), "evaluate": {**_cfg(root)["evaluate"], "checkpoint": str(bad),
                                                     "reports_dir": str(tmp_path / name)}})
        with pytest.raises(CheckpointError) as e:
            evaluate(c)
        assert "\n" not in str(e.value) and str(bad) in str(e.value), str(e.value)
        assert not (tmp_path / name).exists()
