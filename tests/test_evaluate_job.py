"""The evaluation job on stand-in stores and data: metrics, files written, errors, MLflow hand-off.

The real store/checkpoint/data parts are exercised end to end in test_evaluate_e2e.py; here a
stand-in store with a known sampling distribution makes the expected metric values known.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import feda2v.data
import feda2v.evaluate.job as job
from feda2v.config import load_config
from feda2v.errors import CheckpointError, ConfigError, DataError
from feda2v.evaluate import evaluate
from feda2v.evaluate.plots import read_losses

CLASSES = ["alpha", "beta", "gamma"]
MEANS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
HASH = "ab" * 32


class BlobStore:
    """Samples class c from N(MEANS[c + shift], I): shift 0 = a perfect generator."""

    roles = ("generator",)
    keys = ["unified"]

    def __init__(self, shift: int = 0, with_encoder: bool = True):
        self.shift = shift
        self.spec = SimpleNamespace(classes=tuple(CLASSES))
        self._module = _IdentityVAE() if with_encoder else torch.nn.Linear(4, 4)

    def sample(self, class_idx, *, gen):
        m = MEANS[(class_idx + self.shift) % len(CLASSES)]
        return m + torch.randn(len(class_idx), 4, generator=gen)

    def key_for_class(self, name):
        return "unified"

    def module(self, key, role):
        return self._module


class _IdentityVAE(torch.nn.Module):
    """encode -> mu = x/2; decode -> 2 z: a perfect reconstruction, conditional (checks cond shape)."""

    conditional = True

    def encode(self, x, cond):
        assert cond.shape == (len(x), 2)
        return x / 2, torch.zeros_like(x)

    def decode(self, z, cond):
        return 2 * z


def _prepared(n_train=120, n_test=60, nodes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    node_list = []
    for nid in range(nodes):
        parts = {}
        for split, n in (("train", n_train), ("test", n_test)):
            y = torch.arange(len(CLASSES)).repeat_interleave(n // len(CLASSES))
            parts[f"{split}_x"] = MEANS[y] + torch.randn(len(y), 4, generator=g)
            parts[f"{split}_y"] = y
        node_list.append(SimpleNamespace(node_id=nid, **parts))
    return SimpleNamespace(classes=list(CLASSES), conditions=torch.ones(len(CLASSES), 2), nodes=node_list,
                           manifest_hash=HASH, feature_dim=4, condition_dim=2)


def _cfg(tmp_path, **evaluate):
    return load_config({
        "data": {"name": "digits", "prepared_dir": str(tmp_path / "prepared")},
        "train": {"reports_dir": str(tmp_path / "reports" / "train")},
        "tracking": {"enabled": False},
        "evaluate": {"checkpoint": str(tmp_path / "ckpt" / "latest.ckpt"),
                     "reports_dir": str(tmp_path / "reports"), "samples_per_class": 60, **evaluate},
    })


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """evaluate() with the checkpoint and data readers replaced; returns a dict to tweak them."""
    state = {"store": BlobStore(), "header": {"round": 4, "data_manifest_hash": HASH, "mlflow_run_id": None},
             "prepared": _prepared()}
    monkeypatch.setattr(job, "load_trained_store", lambda p: (state["store"], state["header"], "server"))
    monkeypatch.setattr(feda2v.data, "load_prepared", lambda p: state["prepared"], raising=False)
    return state


@pytest.fixture
def no_figures(monkeypatch):
    """Metric-only tests skip matplotlib (seconds per figure on a small CI machine)."""
    import feda2v.evaluate.plots as plots

    monkeypatch.setattr(plots, "write_figures", lambda *a, **k: {})


def _write_train_reports(tmp_path, downstream=True):
    d = tmp_path / "reports" / "train"
    d.mkdir(parents=True)
    rows = [["round", "node", "key", "metric", "value"]]
    for r in range(1, 4):
        for node in ("node/000", "node/001"):
            for key in ("class/alpha", "class/beta"):
                rows.append([r, node, key, "loss", 10.0 / r + (node == "node/001")])
                rows.append([r, node, key, "kl", 0.5 * r])
    with open(d / "losses.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    if downstream:
        (d / "downstream.json").write_text(json.dumps({
            "global_acc_fedavg": 0.61, "global_acc_distilled": 0.67, "synthetic_samples": 300,
            "per_node": {"node/000": {"fedavg": 0.5, "distilled": 0.6},
                         "node/001": {"fedavg": 0.7, "distilled": 0.72}}}))


# ------------------------------------------------------------------ metrics through the job


def test_perfect_generator_scores_like_real_data(stand_in, no_figures, tmp_path):
    res = evaluate(_cfg(tmp_path))
    ov = res["metrics"]["overall"]
    assert ov["trtr_acc"] > 0.85
    assert abs(ov["tstr_acc"] - ov["trtr_acc"]) < 0.05
    assert ov["precision"] > 0.8 and ov["recall"] > 0.8
    assert ov["frechet"] < 1.0
    assert abs(ov["mmd"]) < 0.05
    assert ov["recon_mse"] == pytest.approx(0.0, abs=1e-12)  # the stand-in reconstructs exactly
    pc = res["metrics"]["per_class"]
    assert list(pc) == CLASSES
    for c in CLASSES:
        assert pc[c]["n_real"] == 40 and isinstance(pc[c]["n_real"], int)  # 2 nodes x 20 test samples
        assert {"frechet", "mmd", "precision", "recall", "tstr_acc", "trtr_acc", "recon_mse"} <= set(pc[c])
    assert res["metrics"]["round"] == 4


def test_wrong_generator_scores_far_worse(stand_in, no_figures, tmp_path):
    good = evaluate(_cfg(tmp_path))["metrics"]["overall"]
    stand_in["store"] = BlobStore(shift=1)  # every class sampled where the next class lives
    bad = evaluate(_cfg(tmp_path))["metrics"]
    ov = bad["overall"]
    assert ov["tstr_acc"] < 0.2 < ov["trtr_acc"] - 0.5
    # class-balanced sets: the pooled distribution is unchanged, per class it is not
    for c in CLASSES:
        assert bad["per_class"][c]["frechet"] > 15  # squared mean distance 25 or 50
        assert bad["per_class"][c]["precision"] < 0.25  # outlier reals have wide k-NN balls
        assert bad["per_class"][c]["frechet"] > 20 * max(good["frechet"], 0.05)


def test_results_are_deterministic_and_follow_the_seed(stand_in, no_figures, tmp_path):
    a = evaluate(_cfg(tmp_path))["metrics"]
    b = evaluate(_cfg(tmp_path))["metrics"]
    assert a == b
    c = evaluate(_cfg(tmp_path, seed=1))["metrics"]
    assert c["overall"]["frechet"] != a["overall"]["frechet"]


def test_gan_like_store_has_no_reconstruction_error(stand_in, no_figures, tmp_path):
    stand_in["store"] = BlobStore(with_encoder=False)
    m = evaluate(_cfg(tmp_path))["metrics"]
    assert "recon_mse" not in m["overall"]
    assert all("recon_mse" not in d for d in m["per_class"].values())


# ------------------------------------------------------------------ outputs


def test_outputs_written_with_downstream_and_losses(stand_in, tmp_path):
    _write_train_reports(tmp_path)
    res = evaluate(_cfg(tmp_path))
    out = tmp_path / "reports"
    m = json.loads((out / "evaluation.json").read_text())
    assert m == json.loads(json.dumps(res["metrics"]))
    assert m["downstream"]["global_acc_distilled"] == 0.67
    assert m["downstream"]["per_node"]["node/001"] == {"fedavg": 0.7, "distilled": 0.72}
    headline = json.loads((out / "metrics.json").read_text())  # DVC metrics: flat, a few columns
    assert headline == {k: m["overall"][k] for k in ("tstr_acc", "trtr_acc", "frechet", "mmd",
                                                      "precision", "recall")}

    def numbers_only(d):
        return all(numbers_only(v) if isinstance(v, dict) else isinstance(v, (int, float)) for v in d.values())

    assert numbers_only(m)  # DVC metrics: every leaf is a number

    with open(out / "plots" / "tstr_per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == CLASSES
    assert float(rows[0]["tstr"]) == pytest.approx(m["per_class"]["alpha"]["tstr_acc"], abs=1e-5)
    with open(out / "plots" / "embedding_2d.csv") as f:
        emb = list(csv.DictReader(f))
    assert len(emb) == 3 * (40 + 60) and {r["source"] for r in emb} == {"real", "synthetic"}
    with open(out / "plots" / "loss_per_round.csv") as f:
        loss_rows = list(csv.DictReader(f))
    assert [r["round"] for r in loss_rows] == ["1", "2", "3"]
    assert float(loss_rows[0]["class/alpha"]) == pytest.approx(10.5)  # mean of 10 and 11 over nodes
    assert float(loss_rows[1]["mean"]) == pytest.approx(5.5)  # mean over keys
    with open(out / "plots" / "embedding_2d_synthetic.csv") as f:
        assert len(list(csv.DictReader(f))) == 3 * 60
    for name in ("loss_curves", "tstr_vs_trtr", "embedding_2d", "per_node_accuracy"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (out / "report.md").read_text()
    for name in ("loss_curves", "tstr_vs_trtr", "embedding_2d", "per_node_accuracy"):
        assert f"(figures/{name}.png)" in report
    assert "| alpha |" in report and "global_acc_distilled" in report
    assert not list(out.rglob(".*.tmp"))  # no temporary files left behind


def test_without_train_reports_figures_are_skipped_with_a_note(stand_in, tmp_path):
    res = evaluate(_cfg(tmp_path))
    out = tmp_path / "reports"
    assert "downstream" not in res["metrics"]
    assert not (out / "figures" / "loss_curves.png").exists()
    assert not (out / "figures" / "per_node_accuracy.png").exists()
    assert any("losses.csv not found" in n for n in res["notes"])
    assert (out / "figures" / "tstr_vs_trtr.png").exists()


def test_losses_csv_aggregation_and_bad_file(tmp_path):
    _write_train_reports(tmp_path, downstream=False)
    losses = read_losses(tmp_path / "reports" / "train" / "losses.csv")
    assert losses["loss"]["class/beta"] == pytest.approx({1: 10.5, 2: 5.5, 3: 10 / 3 + 0.5})
    assert losses["kl"]["class/alpha"][2] == 1.0
    bad = tmp_path / "bad.csv"
    bad.write_text("round,key,value\n1,unified,0.3\n")
    with pytest.raises(DataError, match="lacks columns"):
        read_losses(bad)


def test_bad_losses_csv_fails_before_anything_is_written(stand_in, no_figures, tmp_path):
    d = tmp_path / "reports" / "train"
    d.mkdir(parents=True)
    (d / "losses.csv").write_text("round,node,key,metric,value\nfirst,node/000,unified,loss,1.0\n")
    with pytest.raises(DataError, match="losses.csv:2: round/value are not numbers"):
        evaluate(_cfg(tmp_path))
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["train"]


def test_corrupt_downstream_json_is_a_clear_error(stand_in, no_figures, tmp_path):
    d = tmp_path / "reports" / "train"
    d.mkdir(parents=True)
    (d / "downstream.json").write_text("{not json")
    with pytest.raises(DataError, match="downstream.json is not valid JSON"):
        evaluate(_cfg(tmp_path))


# ------------------------------------------------------------------ errors and MLflow


def test_manifest_mismatch_is_a_data_error(stand_in, no_figures, tmp_path):
    stand_in["header"]["data_manifest_hash"] = "cd" * 32
    with pytest.raises(DataError, match="trained on data manifest cdcdcdcdcdcd.*feda2v-prepare"):
        evaluate(_cfg(tmp_path))
    assert not (tmp_path / "reports" / "metrics.json").exists()


def test_class_mismatch_is_a_data_error(stand_in, no_figures, tmp_path):
    stand_in["store"].spec = SimpleNamespace(classes=("x", "y", "z"))
    with pytest.raises(DataError, match="classes"):
        evaluate(_cfg(tmp_path))


def test_non_finite_samples_are_a_clear_error(stand_in, no_figures, tmp_path):
    class NaNStore(BlobStore):
        def sample(self, class_idx, *, gen):
            return torch.full((len(class_idx), 4), float("nan"))

    stand_in["store"] = NaNStore()
    with pytest.raises(DataError, match="NaN/inf samples"):
        evaluate(_cfg(tmp_path))


def test_bad_evaluate_settings(stand_in, no_figures, tmp_path):
    with pytest.raises(ConfigError, match="knn_k"):
        evaluate(_cfg(tmp_path, knn_k=60))
    with pytest.raises(ConfigError, match="samples_per_class"):
        evaluate(_cfg(tmp_path, samples_per_class=1))


def test_mlflow_logging_into_the_training_run(stand_in, tmp_path, monkeypatch):
    import feda2v.tracking

    calls = []

    class FakeTracker:
        def log_dataset(self, name, digest, source, *, context, schema=None, profile=None):
            calls.append(("dataset", name, context))

        def find_store_model(self):
            return "m-1"

        def log_model_metrics(self, metrics, step, *, model_id=None):
            calls.append(("metrics", dict(metrics), step, model_id))
            return len(metrics)

        def log_artifact(self, path, artifact_path=None):
            calls.append(("artifact", Path(path).name, artifact_path))

        def end(self, status="FINISHED"):
            calls.append(("end", status))

    monkeypatch.setattr(feda2v.tracking, "open_run", lambda cfg, run_id: FakeTracker())
    stand_in["header"]["mlflow_run_id"] = "run123"
    cfg = load_config({**_cfg(tmp_path), "tracking": {"enabled": True}})
    res = evaluate(cfg)
    metrics_call = next(c for c in calls if c[0] == "metrics")
    assert metrics_call[2] == 4  # logged at the checkpoint's round
    assert metrics_call[3] == "m-1"  # and against the run's store model
    assert ("dataset", "digits/test", "evaluation") in calls  # the test split, its own name
    assert metrics_call[1]["eval/overall/tstr_acc"] == res["metrics"]["overall"]["tstr_acc"]
    assert "eval/per_class/alpha/frechet" in metrics_call[1]
    arts = {c[1] for c in calls if c[0] == "artifact"}
    assert {"metrics.json", "report.md", "tstr_vs_trtr.png", "embedding_2d.csv"} <= arts
    assert calls[-1] == ("end", "FINISHED")
    assert any("run123" in n for n in res["notes"])


def test_mlflow_failure_is_a_note_not_a_failure(stand_in, no_figures, tmp_path, monkeypatch):
    import feda2v.tracking

    def broken(cfg, run_id):
        raise ConnectionError("server down")

    monkeypatch.setattr(feda2v.tracking, "open_run", broken)
    stand_in["header"]["mlflow_run_id"] = "run123"
    res = evaluate(load_config({**_cfg(tmp_path), "tracking": {"enabled": True}}))
    assert any("server down" in n for n in res["notes"])
    # report.md is a DVC output: the same bytes whatever MLflow did (the CLI prints the notes)
    assert "server down" not in (tmp_path / "reports" / "report.md").read_text()
    stand_in["header"]["mlflow_run_id"] = None
    res = evaluate(load_config({**_cfg(tmp_path), "tracking": {"enabled": True}}))
    assert any("names no MLflow run" in n for n in res["notes"])


# ------------------------------------------------------------------ missing / corrupted checkpoint


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.ckpt; run feda2v-train"):
        job.load_trained_store(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x00" * 4096])
def test_corrupted_checkpoint_is_a_clear_error(tmp_path, content):
    p = tmp_path / "bad.ckpt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        job.load_trained_store(p)
    assert "\n" not in str(e.value) and str(e.value)


def test_cli_missing_checkpoint_one_line_exit_2(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", "from feda2v.cli.evaluate import main; main()",
         f"evaluate.checkpoint={tmp_path}/missing.ckpt", f"evaluate.reports_dir={tmp_path}/r"],
        cwd=repo, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("feda2v: error: checkpoint not found:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
