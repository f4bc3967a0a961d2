"""End to end: `feda2v-train -m` with tracking and profiling on, then what MLflow holds."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from conftest import ROOT, cli  # noqa: E402
from feda2v.config import load_config  # noqa: E402
from feda2v.profiling import RANGES  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from feda2v.data import prepare

    work = tmp_path_factory.mktemp("e2e")
    prepared = work / "prepared"
    data = {"name": "digits", "nodes": 3, "condition": "onehot", "prepared_dir": str(prepared),
            "partition": {"scheme": "iid"}}
    prepare(load_config({"seed": 0, "data": data}))
    args = [cli("feda2v-train"), "-m", "seed=0,1", "data=digits", "data.nodes=3",
            "data.condition=onehot", "data.partition.scheme=iid", f"data.prepared_dir={prepared}",
            "generator.hidden_dim=32",
            "generator.latent_dim=8", "federation.rounds=2", "federation.batch_size=128",
            "checkpoint.dir=ckpt_s${seed}", "train.reports_dir=reports/train_s${seed}",
            "train.progress=off", "tracking=sqlite", "tracking.experiment=e2e",
            "profiler=enabled", "profiler.wait=0", "profiler.warmup=1", "profiler.active=2"]
    env = {**os.environ, "FEDA2V_CONF": str(ROOT / "conf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"work": work, "prepared": prepared, "out": out}


@pytest.mark.slow
def test_multirun_makes_one_complete_run_per_job(trained, tmp_path):
    work = trained["work"]
    assert "not reachable" not in trained["out"].stderr
    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    assert exp.artifact_location == (work / "mlartifacts" / "e2e").as_uri()
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]  # two jobs, two runs
    manifest_hash = json.loads((trained["prepared"] / "manifest.json").read_text())["hash"]
    for run in runs:
        seed = run.data.params["seed"]
        assert run.info.status == "FINISHED"
        assert run.data.params["federation.rounds"] == "2"
        assert run.data.params["generator.hidden_dim"] == "32"
        tags = run.data.tags
        assert tags["data_manifest_hash"] == manifest_hash and tags["seed"] == seed
        assert tags["stage"] and tags["engine"] == "inprocess"
        assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"]), tags["git_commit"]
        assert tags["git_dirty"] in ("true", "false")
        # per-round metrics
        some_metric = "gen/loss/unified"
        assert {"gen/recon/unified", "gen/kl/unified", "round_seconds"} <= set(run.data.metrics)
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, some_metric))
        assert steps == [1, 2], (some_metric, steps)

        # the checkpoint the run names downloads byte-identical and verifies
        # (a multirun job may run in its own folder under reports/multirun/<n>/)
        found = [p for p in work.glob(f"**/ckpt_s{seed}/round_*2.ckpt")
                 if "mlartifacts" not in p.parts]
        assert len(found) == 1, found
        ckpt = found[0]
        # tracking.upload_checkpoints=last: the final checkpoint is uploaded once, in the store
        # model, and the run says so; no second copy under checkpoints/
        assert run.data.tags["feda2v.final_checkpoint"].startswith("models:/m-")
        assert not [a for a in client.list_artifacts(run.info.run_id, "checkpoints")
                    if a.path.endswith(".ckpt")]
        model_id = run.data.tags["feda2v.final_checkpoint"].split()[0].removeprefix("models:/")
        mlflow.set_tracking_uri(client.tracking_uri)  # how a user resolves models:/ URIs
        try:
            folder = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}",
                                                              dst_path=str(tmp_path / seed)))
        finally:
            mlflow.set_tracking_uri(None)
        got = folder / "artifacts" / "latest.ckpt"
        assert hashlib.sha256(got.read_bytes()).digest() == \
            hashlib.sha256(ckpt.read_bytes()).digest()
        v = subprocess.run([cli("feda2v-ckpt"), "verify", str(got)], capture_output=True,
                           text=True)
        assert v.returncode == 0, v.stderr

        # the profiler trace, with the generator step ranges, is an artifact of the run
        prof = [a.path for a in client.list_artifacts(run.info.run_id, "profile")]
        assert len(prof) == 1
        files = [a.path for a in client.list_artifacts(run.info.run_id, prof[0])]
        assert any(f.endswith("summary.md") for f in files)
        trace = next(f for f in files if f.endswith(".pt.trace.json"))
        local = client.download_artifacts(run.info.run_id, trace, str(tmp_path / seed))
        names = {e.get("name") for e in json.loads(Path(local).read_text())["traceEvents"]}
        assert set(RANGES) <= names

        # the store model: found through the run, loads, predicts per class
        models = client.search_logged_models(experiment_ids=[exp.experiment_id],
                                             filter_string=f"source_run_id='{run.info.run_id}'")
        assert len(models) == 1
        model = mlflow.pyfunc.load_model(f"{models[0].artifact_location}")
        classes = json.loads((trained["prepared"] / "manifest.json").read_text())["classes"]
        pred = model.predict({"class": classes[:2], "count": [2, 3]}, params={"seed": 1})
        assert list(pred["class"]) == [classes[0]] * 2 + [classes[1]] * 3
        assert len(pred["embedding"][0]) == 64  # digits features
