"""MLflow failures are told apart (issue 20): an unreachable store, an invalid experiment name, a
refused permission, a deleted experiment: one line each, and no MLflow INFO line before it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from conftest import ROOT, cli  # noqa: E402
from feda2v.config import load_config  # noqa: E402
from feda2v.errors import TrackingError  # noqa: E402
from feda2v.tracking import NullTracker, make_tracker  # noqa: E402
from feda2v.tracking.mlflow_tracker import TrackingUnavailableWarning  # noqa: E402


def _cfg(**tracking):
    return load_config({"tracking": {"system_metrics": False, **tracking}})


class _Refusing(BaseHTTPRequestHandler):
    """Answers /health like an MLflow server behind auth, refuses every API call."""
    status, body = 403, {"error_code": "PERMISSION_DENIED", "message": "no access to experiments"}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.startswith("/health"):
            self._send(200, b"OK", "text/plain")
        elif isinstance(self.body, dict):
            self._send(self.status, json.dumps(self.body).encode(), "application/json")
        else:
            self._send(self.status, self.body.encode(), "text/plain")

    do_POST = do_GET

    def _send(self, code, data, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(params=[(403, {"error_code": "PERMISSION_DENIED", "message": "no access"}),
                        (401, "You are not authenticated. Please see the documentation")],
                ids=["403-json", "401-text"])
def refusing_server(request):
    handler = type("H", (_Refusing,), {"status": request.param[0], "body": request.param[1]})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _section(**tracking):
    """A tracking section as the API takes it (no config validation in front)."""
    from omegaconf import OmegaConf

    return OmegaConf.create({**dict(_cfg().tracking), **tracking})


@pytest.mark.parametrize("name,why", [("x" * 501, "501 characters"), ("", "empty"),
                                      ("  ", "empty")])
def test_invalid_experiment_name_is_named_as_such(tmp_path, name, why):
    cfg = _section(uri=f"sqlite:///{tmp_path}/m.db", experiment=name, required=True)
    with pytest.raises(TrackingError) as e:
        make_tracker(cfg)
    msg = str(e.value)
    assert "not a valid MLflow experiment name" in msg and why in msg and "\n" not in msg
    assert "not reachable" not in msg
    with pytest.warns(TrackingUnavailableWarning, match="not a valid MLflow experiment name"):
        t = make_tracker(_section(uri=f"sqlite:///{tmp_path}/m.db", experiment=name))
    assert isinstance(t, NullTracker) and t.reason.startswith("invalid_name")
    assert not (tmp_path / "m.db").exists()  # refused before the store was touched


def test_empty_experiment_name_is_refused_with_the_config():
    from feda2v.errors import ConfigError

    with pytest.raises(ConfigError, match="tracking.experiment"):
        _cfg(experiment="")


def test_refused_permission_is_not_called_unreachable(refusing_server):
    with pytest.raises(TrackingError) as e:
        make_tracker(_cfg(uri=refusing_server, required=True))
    msg = str(e.value)
    assert "refused access" in msg and "MLFLOW_TRACKING_TOKEN" in msg, msg
    assert "not reachable" not in msg and "\n" not in msg


def test_unreachable_server_is_still_unreachable():
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(TrackingError, match="is not reachable before training") as e:
        make_tracker(_cfg(uri=uri, required=True))
    assert "valid MLflow experiment name" not in str(e.value)


def test_deleted_experiment_says_how_to_restore(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    make_tracker(_cfg(uri=uri, experiment="gone"))
    client = MlflowClient(uri)
    client.delete_experiment(client.get_experiment_by_name("gone").experiment_id)
    with pytest.raises(TrackingError, match="experiment 'gone' is deleted .* restore"):
        make_tracker(_cfg(uri=uri, experiment="gone", required=True))


@pytest.mark.slow
def test_cli_invalid_name_is_one_line_with_no_mlflow_info_before(tmp_path):
    """The reported case: feda2v-train with a name MLflow refuses (over 500 characters) and
    tracking.required=true on a store that does not exist yet."""
    from feda2v.data import prepare

    prepared = tmp_path / "prepared"
    data = {"name": "digits", "nodes": 2, "condition": "onehot", "prepared_dir": str(prepared),
            "partition": {"scheme": "iid"}}
    prepare(load_config({"data": data}))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    env.update({"FEDA2V_CONF": str(ROOT / "conf"), "HF_HUB_OFFLINE": "1"})
    out = subprocess.run(
        [cli("feda2v-train"), "data=digits", "data.nodes=2", "data.condition=onehot",
         "data.partition.scheme=iid", f"data.prepared_dir={prepared}", f"tracking.experiment={'x' * 501}", "tracking.required=true",
         "train.progress=off"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("feda2v: error: tracking.experiment='xxx")
    assert "not a valid MLflow experiment name" in lines[0]
    assert "INFO" not in out.stdout + out.stderr
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))  # failed before any training step


def test_a_fresh_store_is_created_without_mlflow_info_lines(tmp_path):
    code = ("from feda2v.config import load_config; from feda2v.tracking import make_tracker; "
            f"t = make_tracker(load_config({{'tracking': {{'uri': 'sqlite:///{tmp_path}/new.db'}}}})); "
            "t.start('quiet'); t.end(); print(type(t).__name__)")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "MlflowTracker"
    assert out.stderr == "", out.stderr  # MLflow logs table creation and system metrics at INFO
