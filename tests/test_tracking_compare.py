"""Runs that can be compared in MLflow (issue 18): key-independent round losses, the store as a
LoggedModel (example, schema, params, metrics against model and dataset; loads by models:/ URI),
the prepared data as a dataset input, system metrics, source tags, the checkpoint upload policy,
unique run names, evaluations that do not duplicate points, the experiment's kind."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

mlflow = pytest.importorskip("mlflow")

from feda2v.config import load_config  # noqa: E402
from feda2v.federation.server import KEY_INDEPENDENT_LOSSES, key_independent_losses  # noqa: E402
from feda2v.tracking import make_tracker, unique_run_name  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from mlflow_runs import ROUNDS, RUNS  # noqa: E402


# -- pure ----------------------------------------------------------------------------------------
def _node(losses: dict, samples: dict) -> SimpleNamespace:
    return SimpleNamespace(losses=losses, samples_per_key=samples, steps=1)


def test_vae_losses_are_sample_weighted_over_keys_and_nodes():
    nodes = [
        _node({"class/a": {"loss": 3.0, "recon": 2.0, "kl": 4.0, "beta": 0.25},
               "class/b": {"loss": 9.0, "recon": 8.0, "kl": 2.0, "beta": 0.5}},
              {"class/a": 30, "class/b": 10}),
        _node({"class/a": {"loss": 1.0, "recon": 1.0, "kl": 0.0, "beta": 0.25}}, {"class/a": 60}),
    ]
    got = key_independent_losses(nodes)
    assert set(got) == {"loss/generator", "loss/neg_elbo", "loss/recon", "loss/kl"}
    assert got["loss/generator"] == pytest.approx((30 * 3 + 10 * 9 + 60 * 1) / 100)
    assert got["loss/neg_elbo"] == pytest.approx((30 * 6 + 10 * 10 + 60 * 1) / 100)
    assert got["loss/recon"] == pytest.approx((30 * 2 + 10 * 8 + 60 * 1) / 100)
    assert got["loss/kl"] == pytest.approx((30 * 4 + 10 * 2) / 100)


def test_gan_losses_have_their_own_names_and_share_only_the_generator_loss():
    nodes = [_node({"unified": {"g_loss": 0.7, "d_loss": 1.3}}, {"unified": 50}),
             _node({"unified": {"g_loss": 0.9, "d_loss": 1.1}}, {"unified": 150}),
             _node({}, {})]  # a node with no data
    got = key_independent_losses(nodes)
    assert set(got) == {"loss/generator", "loss/gan_g", "loss/gan_d"}
    assert got["loss/generator"] == got["loss/gan_g"] == pytest.approx((50 * .7 + 150 * .9) / 200)
    assert got["loss/gan_d"] == pytest.approx((50 * 1.3 + 150 * 1.1) / 200)
    assert "loss/neg_elbo" not in got  # a G loss is never charted as an ELBO
    assert set(KEY_INDEPENDENT_LOSSES) >= set(got)


def test_run_names_are_unique_and_say_what_differs():
    cfg = load_config({"data": {"name": "digits"}})
    a, b = unique_run_name(cfg, now=0), unique_run_name(cfg, now=1)
    assert a != b and a.startswith("cvae-unified-shared-digits-s0-r")
    prof = unique_run_name(load_config({"data": {"name": "digits"}, "profiler": {"enabled": True}}),
                           now=0)
    assert prof != a and "-prof-" in prof
    assert "-resume-" in unique_run_name(cfg, resumed=True, now=0)
    named = load_config({"tracking": {"run_name": "mine"}})
    assert unique_run_name(named, now=0) == "mine"  # the user's own name is kept as given


@pytest.mark.parametrize("policy,expected", [("last", ["round_0005.ckpt"]),
                                             ("keep_last", ["round_0004.ckpt", "round_0005.ckpt"]),
                                             ("all", [f"round_000{i}.ckpt" for i in range(1, 6)])])
def test_checkpoint_upload_policy(tmp_path, policy, expected):
    cfg = load_config({"tracking": {"uri": f"sqlite:///{tmp_path}/m.db", "experiment": "up",
                                    "upload_checkpoints": policy, "system_metrics": False},
                       "checkpoint": {"keep_last": 2}})
    tracker = make_tracker(cfg)
    tracker.start("up")
    for i in range(1, 6):
        p = tmp_path / f"round_000{i}.ckpt"
        p.write_bytes(bytes([i]) * 100)
        tracker.log_checkpoint(p)
        if i > 2:  # what CheckpointManager's pruning to keep_last=2 does
            (tmp_path / f"round_000{i - 2}.ckpt").unlink()
    tracker.end()
    client = mlflow.MlflowClient(cfg.tracking.uri)
    got = sorted(Path(a.path).name for a in client.list_artifacts(tracker.run_id, "checkpoints"))
    assert got == expected


# -- two real runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import subprocess

    work = tmp_path_factory.mktemp("compare")
    # In a process of its own, as users train: in-process, the first run into a second SQLite
    # store of the same process logged no system metrics (the browser test trains its own pair
    # into another store first); that case is noted in the README's tracking section.
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from mlflow_runs import train_two_runs; train_two_runs(Path(sys.argv[2]), evaluate_twice=True)")
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(work)], check=True,
                   capture_output=True, timeout=600)
    out = {"db": work / "mlflow.db", "prepared": work / "prepared"}
    client = mlflow.MlflowClient(f"sqlite:///{out['db']}")
    exp = client.get_experiment_by_name("compare")
    found = {}
    for r in client.search_runs([exp.experiment_id]):
        found[tuple(r.data.tags["generator"].split("/"))] = r
    return {**out, "client": client, "exp": exp, "runs": found}


@pytest.mark.slow
def test_runs_of_other_type_and_granularity_share_a_round_loss(runs):
    client = runs["client"]
    assert set(runs["runs"]) == set(RUNS)
    for run in runs["runs"].values():
        hist = client.get_metric_history(run.info.run_id, "loss/generator")
        assert sorted(m.step for m in hist) == list(range(1, ROUNDS + 1))
        assert "round_seconds" in run.data.metrics  # wall time per round
    vae, gan = runs["runs"][RUNS[0]], runs["runs"][RUNS[1]]
    assert "loss/neg_elbo" in vae.data.metrics and "loss/neg_elbo" not in gan.data.metrics
    assert {"loss/gan_g", "loss/gan_d"} <= set(gan.data.metrics)
    assert any(k.startswith("gen/g_loss/class/") for k in gan.data.metrics)  # per key stays
    assert vae.info.run_name != gan.info.run_name


@pytest.mark.slow
def test_experiment_opens_as_a_model_development_experiment(runs):
    assert runs["exp"].tags.get("mlflow.experimentKind") == "custom_model_development"


@pytest.mark.slow
def test_runs_carry_source_user_dataset_and_system_metrics(runs):
    manifest = json.loads((runs["prepared"] / "manifest.json").read_text())
    for run in runs["runs"].values():
        tags = run.data.tags
        assert tags.get("mlflow.user") and tags.get("mlflow.source.name")
        assert tags.get("mlflow.source.type") == "LOCAL"
        by_context = {t.value: d.dataset for d in run.inputs.dataset_inputs for t in d.tags
                      if t.key == "mlflow.data.context"}
        assert set(by_context) == {"training", "evaluation"}
        for ds in by_context.values():
            assert ds.digest == manifest["hash"][:36]
            assert json.loads(ds.profile)["digest"] == manifest["hash"]
            assert json.loads(ds.source)["uri"] == runs["prepared"].resolve().as_uri()
            assert "mlflow_tensorspec" in json.loads(ds.schema)
        assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), \
            sorted(run.data.metrics)[:5]


@pytest.mark.slow
def test_default_run_uploads_only_its_last_checkpoint_once(runs):
    for run in runs["runs"].values():
        arts = [a.path for a in runs["client"].list_artifacts(run.info.run_id, "checkpoints")]
        assert not [a for a in arts if a.endswith(".ckpt")], arts  # the model holds it
        model_id = run.outputs.model_outputs[0].model_id
        assert run.data.tags["feda2v.final_checkpoint"] == \
            f"models:/{model_id} (artifacts/latest.ckpt)"


def test_final_checkpoint_is_uploaded_when_no_model_holds_it(tmp_path):
    cfg = load_config({"tracking": {"uri": f"sqlite:///{tmp_path}/m.db", "experiment": "nomodel",
                                    "system_metrics": False}})
    tracker = make_tracker(cfg)
    tracker.start("no-model")
    p = tmp_path / "round_000001.ckpt"
    p.write_bytes(b"x" * 64)
    tracker.log_checkpoint(p)
    tracker.end("FAILED")  # e.g. the run failed before its model was logged
    client = mlflow.MlflowClient(cfg.tracking.uri)
    assert [a.path for a in client.list_artifacts(tracker.run_id, "checkpoints")] == \
        ["checkpoints/round_000001.ckpt"]


@pytest.mark.slow
def test_store_model_is_a_logged_model_users_can_trust(runs, monkeypatch):
    client = runs["client"]
    # how a user points models:/ at the store (set_tracking_uri would leak into other tests)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{runs['db']}")
    classes = json.loads((runs["prepared"] / "manifest.json").read_text())["classes"]
    for (kind, gran), run in runs["runs"].items():
        outputs = run.outputs.model_outputs
        assert len(outputs) == 1
        model = client.get_logged_model(outputs[0].model_id)
        assert model.name == "store_model" and str(model.status) in ("READY", "LoggedModelStatus.READY")
        assert model.params["generator.type"] == kind
        assert model.params["generator.granularity"] == gran
        assert model.tags["feda2v.generator"] == f"{kind}/{gran}"
        # eval metrics against the model and the evaluation dataset, once each despite 2 evaluations
        evals = [m for m in model.metrics if m.key.startswith("eval/")]
        assert {m.key for m in evals} >= {"eval/overall/frechet", "eval/overall/tstr_acc"}
        assert len(evals) == len({m.key for m in evals})
        assert {(m.dataset_name, m.step) for m in evals} == {("digits/test", ROUNDS)}
        hist = client.get_metric_history(run.info.run_id, "eval/overall/frechet")
        assert len(hist) == 1, hist  # the repeated evaluation added no point
        # the training's final round metrics come with it too
        assert any(m.key == "loss/generator" and m.step == ROUNDS for m in model.metrics)

        info = mlflow.models.get_model_info(f"models:/{model.model_id}")
        assert [c.name for c in info.signature.outputs.inputs] == ["class", "embedding"]
        assert info.saved_input_example_info["type"] == "dataframe"
        loaded = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
        pred = loaded.predict({"class": classes[:2], "count": [2, 1]}, params={"seed": 4})
        assert list(pred["class"]) == [classes[0]] * 2 + [classes[1]]
        assert len(pred["embedding"][0]) == 64
        again = loaded.predict({"class": classes[:2], "count": [2, 1]}, params={"seed": 4})
        assert all((a == b).all() for a, b in zip(pred["embedding"], again["embedding"]))
