"""The final store as an MLflow pyfunc model: logged from a real checkpoint, loaded back with
mlflow.pyfunc.load_model, predict returns the store's own samples (deterministic per seed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

mlflow = pytest.importorskip("mlflow")

from feda2v.checkpoint import write_checkpoint  # noqa: E402
from feda2v.config import load_config  # noqa: E402
from feda2v.errors import DataError  # noqa: E402
from feda2v.seeding import torch_generator  # noqa: E402
from feda2v.store import GeneratorStore, StoreSpec  # noqa: E402
from feda2v.tracking import make_tracker  # noqa: E402
from feda2v.tracking.pyfunc import save_store_model, split_store  # noqa: E402

CLASSES = ("alto", "bass", "cello")


def _trained_store(kind: str = "cvae", granularity: str = "per_class") -> GeneratorStore:
    spec = StoreSpec(type=kind, granularity=granularity, classes=CLASSES, feature_dim=6,
                     condition_dim=3, latent_dim=4, hidden_dim=16)
    store = GeneratorStore(spec, torch.eye(3))
    g = torch.Generator().manual_seed(1)
    for r in range(3):
        x = torch.randn(24, 6, generator=g)
        y = torch.arange(24) % 3
        store.train_batch(x, y, gen=torch_generator("t", r), node="node/000", round=r)
    return store


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    store = _trained_store()
    tensors, meta = store.state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "round_0003.ckpt"
    # a node store first, to check the model picks the primary (server) store, not the first
    other_t, other_m = _trained_store("vae", "unified").state_dict()
    all_t = {f"store/node/000/{k}": v for k, v in other_t.items()}
    all_t.update({f"store/server/{k}": v for k, v in tensors.items()})
    write_checkpoint(path, all_t, {"stores": {"node/000": other_m, "server": meta},
                                   "primary_store": "server", "round": 3})
    return path, store


def _expected(store, idx, seed):
    return store.sample(torch.tensor(idx), gen=torch_generator("pyfunc", seed)).numpy()


def test_saved_model_loads_and_predicts_store_samples(ckpt, tmp_path):
    path, store = ckpt
    save_store_model(path, tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    out = model.predict({"class": ["alto", "cello"], "count": [3, 2]}, params={"seed": 7})
    assert list(out["class"]) == ["alto"] * 3 + ["cello"] * 2
    emb = np.stack(out["embedding"].to_list())
    assert emb.shape == (5, 6) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, _expected(store, [0, 0, 0, 2, 2], 7))
    again = np.stack(model.predict({"class": ["alto", "cello"], "count": [3, 2]},
                                   params={"seed": 7})["embedding"].to_list())
    np.testing.assert_array_equal(emb, again)
    other = np.stack(model.predict({"class": ["alto", "cello"], "count": [3, 2]},
                                   params={"seed": 8})["embedding"].to_list())
    assert not np.array_equal(emb, other)


def test_predict_rejects_bad_requests(ckpt, tmp_path):
    path, _ = ckpt
    save_store_model(path, tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    with pytest.raises(Exception, match="unknown class 'oboe'"):
        model.predict({"class": ["oboe"], "count": [1]})
    with pytest.raises(Exception, match="non-negative integer"):
        model.predict({"class": ["alto"], "count": [-1]})
    empty = model.predict({"class": ["alto"], "count": [0]})
    assert len(empty) == 0


def test_split_store_errors_name_the_problem():
    from feda2v.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no generator store"):
        split_store({}, {"round": 1})
    x = {"store/node/000/x": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="no store 'server'"):
        split_store(x, {"round": 1, "stores": {"node/000": {}}}, "server")
    name, own, _ = split_store(x, {"round": 1, "stores": {"node/000": {}}})
    assert name == "node/000" and list(own) == ["x"]


def test_logged_model_loads_from_tracking_store(ckpt, tmp_path, monkeypatch):
    path, store = ckpt
    monkeypatch.chdir(tmp_path / ".." )  # nothing may land in the cwd (no ./mlruns, ./mlflow.db)
    cwd_before = set(Path.cwd().iterdir())
    cfg = load_config({"data": {"name": "digits"},
                       "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "m"}})
    tracker = make_tracker(cfg)
    tracker.start("with-model", {}, {})
    tracker.log_store_model(path)
    tracker.end()
    assert tracker.model_uri and tracker.model_uri.startswith("models:/")
    assert set(Path.cwd().iterdir()) == cwd_before
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)  # how a user points load_model at it
    for uri in (tracker.model_uri, f"runs:/{tracker.run_id}/store_model"):
        model = mlflow.pyfunc.load_model(uri)
        out = model.predict({"class": ["bass"], "count": [4]}, params={"seed": 0})
        np.testing.assert_array_equal(np.stack(out["embedding"].to_list()),
                                      _expected(store, [1] * 4, 0))
    client = mlflow.MlflowClient(tracker.uri)
    models = client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert [m.source_run_id for m in models] == [tracker.run_id]
    # stored beside the experiment's other artifacts, holding the checkpoint and no pickle
    root = Path(models[0].artifact_location.removeprefix("file://"))
    assert root.is_relative_to(tmp_path / "mlartifacts" / "m")
    files = {p.name for p in root.rglob("*") if p.is_file()}
    assert "round_0003.ckpt" in files and "MLmodel" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files
