"""The tracker against a real `mlflow server` (127.0.0.1, free port, one worker, SQLite backend,
proxied artifacts) started and stopped by the test; and what a user sees when it goes away."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from feda2v.config import load_config  # noqa: E402
from feda2v.tracking import NullTracker, default_run_name, flatten, make_tracker  # noqa: E402
from feda2v.tracking.mlflow_tracker import MlflowTracker, TrackingUnavailableWarning  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_tracking import simulated_training  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root/'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "root": root, "proc": proc}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.mark.slow
def test_simulated_training_against_real_server(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config({"data": {"name": "digits"}, "seed": 3,
                       "tracking": {"uri": server["url"], "experiment": "srv", "required": True}})
    tracker = make_tracker(cfg)
    assert isinstance(tracker, MlflowTracker)
    out = simulated_training(tracker, cfg, tmp_path, steps=5)

    client = mlflow.MlflowClient(server["url"])
    exp = client.get_experiment_by_name("srv")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == default_run_name(cfg)
    assert run.data.params == flatten(cfg)
    assert run.data.tags["stage"] == "train"
    hist = sorted(client.get_metric_history(run.info.run_id, "class/a/loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(5))
    assert [m.value for m in hist] == pytest.approx(out["losses"])
    got = client.download_artifacts(run.info.run_id, "checkpoints/round_0001.ckpt",
                                    str(tmp_path / "dl"))
    assert hashlib.sha256(Path(got).read_bytes()).digest() == \
        hashlib.sha256(out["ckpt"].read_bytes()).digest()
    # the server kept it under its own artifacts destination; the client wrote nothing locally
    assert list((server["root"] / "artifacts").rglob("round_0001.ckpt"))
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()


@pytest.mark.slow
def test_server_going_away_midrun_warns_once_and_training_finishes(server, tmp_path,
                                                                   monkeypatch):
    # bound MLflow's retries so a dead server costs seconds, not minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = load_config({"data": {"name": "digits"},
                       "tracking": {"uri": server["url"], "experiment": "gone"}})
    tracker = make_tracker(cfg)
    assert isinstance(tracker, MlflowTracker)
    tracker.start("r", {"a": 1}, {})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.flush()
    os.killpg(server["proc"].pid, signal.SIGTERM)  # last test of the module: stop the server
    server["proc"].wait(timeout=20)
    ckpt = tmp_path / "round_0001.ckpt"
    ckpt.write_bytes(b"kept on disk")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for step in range(1, 4):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.log_artifact(ckpt, "checkpoints")
        tracker.end("FINISHED")
    msgs = [str(x.message) for x in w if issubclass(x.category, TrackingUnavailableWarning)]
    assert len(msgs) == 1, msgs
    assert "training continues" in msgs[0]
    assert ckpt.read_bytes() == b"kept on disk"
    assert time.perf_counter() - t0 < 60
    # and a new run now finds it unreachable before training
    with pytest.warns(TrackingUnavailableWarning, match="not reachable"):
        assert isinstance(make_tracker(cfg), NullTracker)
