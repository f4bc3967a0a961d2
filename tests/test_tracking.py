"""tracking/: runs land in the MLflow store complete (params, per-step metrics, tags, artifacts),
unreachable servers degrade or fail as configured, and existing runs can be reopened."""
from __future__ import annotations

import hashlib
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

from feda2v.config import load_config
from feda2v.errors import TrackingError
from feda2v.tracking import NullTracker, default_run_name, flatten, git_info, make_tracker
from feda2v.tracking import open_run, run_tags

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from feda2v.tracking.mlflow_tracker import MlflowTracker, TrackingUnavailableWarning  # noqa: E402


def _cfg(**tracking):
    return load_config({"data": {"name": "digits"}, "seed": 3, "tracking": tracking})


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def simulated_training(tracker, cfg, workdir: Path, steps: int = 6) -> dict:
    """A deterministic toy 'training': per-step metrics and a checkpoint-like file per step."""
    tracker.start(default_run_name(cfg), flatten(cfg), run_tags(cfg, stage="train",
                                                                 manifest_hash="abc123"))
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    ckpt = workdir / "checkpoints" / "round_0001.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    for step in range(steps):
        loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tracker.log_metrics({"class/a/loss": loss.item(), "round_time_s": 0.01 * step}, step=step)
    ckpt.write_bytes(b"\x00\x01feda2v" + bytes(range(256)) * 40)
    tracker.log_artifact(ckpt, "checkpoints")
    tracker.end("FINISHED")
    return {"losses": losses, "ckpt": ckpt}


# -- pure helpers ------------------------------------------------------------------------------
def test_flatten_uses_dotted_keys_and_yaml_spelling():
    flat = flatten({"a": {"b": {"c": 1}, "d": True}, "l": [0.9, 0.999], "e": {}, "n": None})
    assert flat == {"a.b.c": "1", "a.d": "true", "l": "[0.9, 0.999]", "e": "{}", "n": "null"}
    cfg = _cfg()
    flat = flatten(cfg)
    assert flat["generator.optimizer.eps"] == str(cfg.generator.optimizer.eps)
    assert flat["tracking.uri"] == "sqlite:///mlflow.db"
    assert flat["seed"] == "3"
    assert all(isinstance(v, str) for v in flat.values())


def test_run_params_log_the_values_a_type_default_resolved_to():
    """What MLflow shows is what trained: a null meaning "the type's default" is logged resolved, so
    a cvae and a gan run differ in the lr column and a width filter finds runs that left it null."""
    from feda2v.pipeline.train import run_params
    from feda2v.store.spec import StoreSpec

    for typ, lr, betas, hidden, ema, schedule in (("cvae", "0.003", "[0.9, 0.999]", "512", "0.995", "cosine"),
                                                   ("gan", "0.001", "[0.5, 0.99]", "256", "0.995", "constant"),
                                                   ("vae", "0.002", "[0.9, 0.999]", "128", "0.0", "constant")):
        cfg = load_config({"data": {"name": "digits"}, "generator": {"type": typ}})
        assert cfg.generator.optimizer.lr is None and cfg.generator.hidden_dim is None
        flat = flatten(run_params(cfg))
        assert (flat["generator.optimizer.lr"], flat["generator.optimizer.betas"], flat["generator.hidden_dim"],
                flat["generator.ema_decay"]) == (lr, betas, hidden, ema), typ
        spec = StoreSpec.from_config(cfg, classes=["a"], feature_dim=4, condition_dim=4)  # what trains
        assert (str(spec.optimizer.lr), str(list(spec.optimizer.betas))) == (lr, betas)
        assert flat["generator.optimizer.schedule"] == schedule == spec.optimizer.schedule
        assert flat["generator.conditional_prior"] == ("true" if typ == "cvae" else "false")
        assert flat["generator.film"] == ("false" if typ == "vae" else "true") == str(spec.film).lower()
        assert cfg.generator.optimizer.lr is None  # the run's config itself is left as it was
    per_class = load_config({"data": {"name": "digits"}, "generator": {"type": "cvae", "granularity": "per_class"}})
    assert flatten(run_params(per_class))["generator.film"] == "false"  # the granularity's resolution
    assert flatten(run_params(per_class))["generator.hidden_dim"] == "256"
    assert (flatten(run_params(per_class))["generator.optimizer.schedule"],
            flatten(run_params(per_class))["generator.optimizer.lr"]) == ("constant", "0.002")
    cfg = load_config({"data": {"name": "digits"}, "generator": {"type": "gan", "hidden_dim": 64,
                                                                  "optimizer": {"lr": 0.01}}})
    flat = flatten(run_params(cfg))
    assert (flat["generator.optimizer.lr"], flat["generator.hidden_dim"]) == ("0.01", "64")  # set: kept


def test_git_info_commit_and_dirty_flag(tmp_path):
    assert git_info(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown", "git_dirty_files": ""}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout
    info = git_info(tmp_path)
    assert info == {"git_commit": head.strip(), "git_dirty": "false", "git_dirty_files": ""}
    (tmp_path / "untracked.db").write_text("outputs do not make a run dirty")
    assert git_info(tmp_path)["git_dirty"] == "false"
    (tmp_path / "a.txt").write_text("2")
    assert git_info(tmp_path)["git_dirty"] == "true"


def test_run_tags_carry_seed_engine_stage_manifest(tmp_path):
    tags = run_tags(_cfg(), stage="train", manifest_hash="f00d", cwd=tmp_path)
    assert tags["seed"] == "3" and tags["engine"] == "inprocess" and tags["stage"] == "train"
    assert tags["data_manifest_hash"] == "f00d"
    assert tags["mlflow.source.git.commit"] == tags["git_commit"]
    assert "git_dirty" in tags


def test_disabled_gives_null_tracker():
    t = make_tracker(_cfg(enabled=False))
    assert isinstance(t, NullTracker) and t.run_id is None and not t.active
    t.start("x", {"a": 1}, {})
    t.log_metrics({"a": 1.0}, step=0)
    t.end()


# -- sqlite store --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    # one DB for the module: creating MLflow's tables costs ~2 s; tests use their own experiment
    return tmp_path_factory.mktemp("mlflow_store")


def test_simulated_training_lands_in_sqlite_store(store_dir, tmp_path, monkeypatch):
    # The default relative URI resolves against the cwd at make_tracker time.
    monkeypatch.chdir(store_dir)
    cfg = _cfg(uri="sqlite:///mlflow.db", experiment="sim")
    tracker = make_tracker(cfg)
    assert isinstance(tracker, MlflowTracker)
    assert tracker.uri == f"sqlite:///{store_dir.resolve()}/mlflow.db"
    out = simulated_training(tracker, cfg, tmp_path)

    client = MlflowClient(tracker.uri)
    exp = client.get_experiment_by_name("sim")
    assert exp.artifact_location == (store_dir / "mlartifacts" / "sim").resolve().as_uri()
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == default_run_name(cfg)
    assert run.data.params == flatten(cfg)
    assert run.data.tags["stage"] == "train" and run.data.tags["seed"] == "3"
    assert run.data.tags["data_manifest_hash"] == "abc123"
    hist = client.get_metric_history(run.info.run_id, "class/a/loss")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(6))
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx(out["losses"])
    times = sorted(client.get_metric_history(run.info.run_id, "round_time_s"),
                   key=lambda m: m.step)
    assert [m.value for m in times] == pytest.approx([0.01 * s for s in range(6)])
    got = client.download_artifacts(run.info.run_id, "checkpoints/round_0001.ckpt",
                                     str(tmp_path / "dl"))
    assert _sha(got) == _sha(out["ckpt"])
    # never the deprecated ./mlruns file store
    assert not (store_dir / "mlruns").exists() and not Path("mlruns").exists()


def test_metric_failure_midrun_warns_once_and_training_continues(store_dir, tmp_path):
    cfg = _cfg(uri=f"sqlite:///{store_dir}/mlflow.db", experiment="midrun")
    tracker = make_tracker(cfg)
    tracker.start("r", {}, {})
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise ConnectionError("server went away")

    tracker.client.log_batch = broken
    tracker.client.log_artifact = broken
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for step in range(5):
            tracker.log_metrics({"loss": 1.0}, step=step)
            tracker.flush()
        tracker.log_artifact(__file__)
        tracker.end()
    msgs = [str(x.message) for x in w if issubclass(x.category, TrackingUnavailableWarning)]
    assert len(msgs) == 1 and "server went away" in msgs[0], msgs
    assert len(calls) == 1  # after the first failure the tracker stops calling the server


def test_metric_failure_midrun_raises_when_required(store_dir):
    cfg = _cfg(uri=f"sqlite:///{store_dir}/mlflow.db", experiment="midrun_req", required=True)
    tracker = make_tracker(cfg)
    tracker.start("r", {}, {})
    tracker.client.log_batch = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("gone"))
    tracker.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(TrackingError, match="gone"):
        tracker.flush()


def test_open_run_logs_into_existing_run_and_keeps_status(store_dir, tmp_path):
    cfg = _cfg(uri=f"sqlite:///{store_dir}/mlflow.db", experiment="reopen")
    t1 = make_tracker(cfg)
    simulated_training(t1, cfg, tmp_path, steps=2)
    report = tmp_path / "report.json"
    report.write_text('{"fid": 1.5}')
    t2 = open_run(cfg, t1.run_id)
    assert t2.run_id == t1.run_id
    t2.log_metrics({"eval/knn_acc": 0.75}, step=0)
    t2.log_artifact(report, "evaluate")
    t2.end()
    client = MlflowClient(t1.uri)
    run = client.get_run(t1.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/knn_acc"] == 0.75
    assert {a.path for a in client.list_artifacts(t1.run_id, "evaluate")} == {
        "evaluate/report.json"}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_open_run_unknown_id(store_dir):
    cfg = _cfg(uri=f"sqlite:///{store_dir}/mlflow.db", experiment="reopen")
    with pytest.warns(TrackingUnavailableWarning, match="no run"):
        assert isinstance(open_run(cfg, "0" * 32), NullTracker)
    with pytest.raises(TrackingError, match="no run"):
        open_run(_cfg(uri=f"sqlite:///{store_dir}/mlflow.db", required=True), "0" * 32)


# -- unreachable server ----------------------------------------------------------------------------
def test_unreachable_server_not_required_warns_once_and_training_continues(tmp_path):
    cfg = _cfg(uri=f"http://127.0.0.1:{_closed_port()}", required=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tracker = make_tracker(cfg)
        out = simulated_training(tracker, cfg, tmp_path, steps=3)
    elapsed = time.perf_counter() - t0
    msgs = [str(x.message) for x in w if issubclass(x.category, TrackingUnavailableWarning)]
    assert len(msgs) == 1, msgs
    assert "not reachable" in msgs[0] and "training continues" in msgs[0]
    assert isinstance(tracker, NullTracker)
    assert out["ckpt"].is_file() and len(out["losses"]) == 3  # artifacts stay on disk
    assert elapsed < 15, f"an unreachable server stalled training for {elapsed:.1f} s"


def test_unreachable_server_required_fails_before_training():
    cfg = _cfg(uri=f"http://127.0.0.1:{_closed_port()}", required=True)
    t0 = time.perf_counter()
    with pytest.raises(TrackingError) as ei:
        make_tracker(cfg)
    assert time.perf_counter() - t0 < 15
    msg = str(ei.value)
    assert "not reachable" in msg and "tracking.required=false" in msg and "\n" not in msg


def test_unwritable_sqlite_location_is_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    cfg = _cfg(uri=f"sqlite:///{blocker}/sub/mlflow.db", required=True)
    with pytest.raises(TrackingError):
        make_tracker(cfg)


def test_end_flushes_every_metric_and_stops_the_sender_thread(store_dir, tmp_path):
    cfg = _cfg(uri=f"sqlite:///{store_dir}/mlflow.db", experiment="flush")
    tracker = make_tracker(cfg)
    tracker.start("many", {}, {})
    for step in range(300):  # more than one log_batch worth (1000 metrics)
        tracker.log_metrics({f"k{i}": step + i / 10 for i in range(5)}, step=step)
    with pytest.warns(TrackingUnavailableWarning, match="does not exist"):
        tracker.log_artifact(tmp_path / "missing.ckpt")
    tracker.end()
    client = MlflowClient(tracker.uri)
    hist = client.get_metric_history(tracker.run_id, "k4")
    assert sorted(m.step for m in hist) == list(range(300))
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    tracker._batcher._thread.join(timeout=5)
    assert not tracker._batcher._thread.is_alive(), "metric sender thread still alive after end()"
