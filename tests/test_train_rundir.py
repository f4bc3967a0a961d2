"""No run overwrites another run's files; same state, same bytes; the data config is the data's;
SIGTERM/SIGINT stop cleanly (issue 13, defects 3, 4, 5 and 7). Real runs, real files."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cli
from feda2v.checkpoint import diff_checkpoints, inspect_checkpoint, read_run_state, verify_checkpoint
from feda2v.config import load_config
from feda2v.errors import DataError, NonFiniteLossError, RunDirError, TrainingStopped

NODES = 3
DATA = {"name": "digits", "nodes": NODES, "condition": "onehot", "max_samples": 300,
        "partition": {"scheme": "iid"}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from feda2v.data import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(load_config({"seed": 0, "data": {**DATA, "prepared_dir": str(out)}}))
    return out


def make_cfg(prepared, *, rounds=2, **sections):
    raw = {"seed": 0, "data": {**DATA, "prepared_dir": str(prepared)},
           "generator": {"hidden_dim": 16, "latent_dim": 4},
           "federation": {"rounds": rounds, "batch_size": 64, "local_epochs": 1},
           "checkpoint": {"dir": "ckpt", "every": 1, "keep_last": 3},
           "train": {"reports_dir": "reports/train", "progress": "off"},
           "tracking": {"enabled": False}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return load_config(raw)


def run_in(where: Path, prepared, **kw):
    from feda2v.pipeline.train import train

    where.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(where)
    try:
        return train(make_cfg(prepared, **kw))
    finally:
        os.chdir(here)


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def train_cmd(prepared, rounds, *extra):
    return [cli("feda2v-train"), "data=digits", f"data.nodes={NODES}", "data.condition=onehot",
            "data.max_samples=300", "data.partition.scheme=iid", f"data.prepared_dir={prepared}",
            "generator.hidden_dim=16", "generator.latent_dim=4", f"federation.rounds={rounds}",
            "federation.batch_size=64", "federation.local_epochs=1", "checkpoint.dir=ckpt",
            "train.reports_dir=reports/train", "train.progress=lines", *extra]


# -- defect 3: a fresh run never replaces another run's files -----------------------------------

def test_fresh_run_into_a_used_dir_exits_2_touching_nothing(tmp_path, prepared):
    work = tmp_path / "w"
    run_in(work, prepared)
    before = hashes(work)
    assert any(name.startswith("ckpt/round_") for name in before)
    out = subprocess.run(train_cmd(prepared, 2, "tracking=none"), cwd=work, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("feda2v: error: checkpoint.dir=ckpt holds another run's "
                                               "checkpoints"), out.stderr
    assert "train.resume=latest" in err[0] and "train.start_over=true" in err[0]
    assert hashes(work) == before


def test_reports_of_another_run_are_refused_too(tmp_path, prepared):
    work = tmp_path / "w"
    run_in(work, prepared)
    for p in (work / "ckpt").glob("*.ckpt"):  # only the reports are left
        p.unlink()
    before = hashes(work)
    with pytest.raises(RunDirError, match=r"train.reports_dir=reports/train holds another run's reports \(losses.csv"):
        run_in(work, prepared)
    assert hashes(work) == before


def test_start_over_deletes_nothing_before_its_first_checkpoint(tmp_path, prepared, monkeypatch):
    work = tmp_path / "w"
    run_in(work, prepared, rounds=3)
    before = hashes(work)
    import feda2v.data as data_mod

    real = data_mod.load_prepared

    def poisoned(path):  # the new run fails in round 1, before writing any checkpoint
        d = real(path)
        d.nodes[0].train_x[0, 0] = float("nan")
        return d

    monkeypatch.setattr(data_mod, "load_prepared", poisoned)
    with pytest.raises(NonFiniteLossError):
        run_in(work, prepared, rounds=1, train={"start_over": True})
    after = hashes(work)
    assert {k: v for k, v in after.items() if k in before} == before  # every old file intact
    monkeypatch.setattr(data_mod, "load_prepared", real)
    run_in(work, prepared, rounds=1, train={"start_over": True})
    names = sorted(p.name for p in (work / "ckpt").glob("*.ckpt"))
    assert names == ["latest.ckpt", "round_000001.ckpt"]  # the old rounds 2, 3 are gone
    assert verify_checkpoint(work / "ckpt/latest.ckpt")["round"] == 1
    rounds = {line.split(",")[0] for line in (work / "reports/train/round_losses.csv").read_text().splitlines()[1:]}
    assert rounds == {"1"}
    sidecar = json.loads((work / "ckpt/provenance.json").read_text())
    assert [e["file"] for e in sidecar["checkpoints"].values()] == ["round_000001.ckpt"]


# -- defect 4: the data config must be the prepared data's ----------------------------------------

@pytest.mark.parametrize("data, message", [
    ({"nodes": 4}, "data.nodes=4 but the prepared data in .* was made with 3"),
    ({"condition": "text"}, "data.condition='text' but the prepared data in .* was made with 'onehot'"),
    ({"partition": {"scheme": "dirichlet"}}, "data.partition.scheme='dirichlet' but .* was made with 'iid'"),
    ({"name": "fashion_mnist"}, "data.name='fashion_mnist' but .* was made with 'digits'"),
])
def test_config_that_contradicts_the_manifest_is_one_line(tmp_path, prepared, data, message):
    with pytest.raises(DataError, match=message) as e:
        run_in(tmp_path, prepared, data=data)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("*.ckpt"))


# -- defect 5: same state, same bytes -------------------------------------------------------------

@pytest.mark.slow
def test_identical_runs_with_tracking_write_identical_bytes(tmp_path, prepared, capsys):
    """Tracking on (a real MLflow store, so two run ids) and other output folders: the files are
    byte-identical and `diff --strict` says so; provenance is beside them, and inspect shows it."""
    from feda2v.cli.ckpt import main as ckpt_main

    tracking = {"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "same"}
    run_in(tmp_path / "a", prepared, tracking=tracking)
    run_in(tmp_path / "b", prepared, tracking=tracking, train={"reports_dir": "elsewhere/reports"},
           checkpoint={"dir": "other_ckpt"})
    a, b = tmp_path / "a/ckpt/latest.ckpt", tmp_path / "b/other_ckpt/latest.ckpt"
    assert a.read_bytes() == b.read_bytes()
    for name in ("round_000001.ckpt", "round_000002.ckpt"):
        assert (tmp_path / "a/ckpt" / name).read_bytes() == (tmp_path / "b/other_ckpt" / name).read_bytes()
    with pytest.raises(SystemExit) as e:
        ckpt_main(["diff", "--strict", str(a), str(b)])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "identical"
    ia, ib = inspect_checkpoint(a), inspect_checkpoint(b)
    assert ia["provenance"]["mlflow_run_id"] and ib["provenance"]["mlflow_run_id"]
    assert ia["provenance"]["mlflow_run_id"] != ib["provenance"]["mlflow_run_id"]
    assert ib["provenance"]["operational"]["checkpoint.dir"] == "other_ckpt"
    header = verify_checkpoint(a)
    assert "provenance" not in header and "train" not in header["config"] and "tracking" not in header["config"]


@pytest.mark.slow
def test_other_thread_counts_train_the_same_bytes(tmp_path, prepared):
    """train.threads is operational: the checkpoint (header and tensors) must not depend on it.
    Through the console script, so the numerics pins are in force as for every user."""
    for threads in (1, 2):
        where = tmp_path / f"t{threads}"
        where.mkdir()
        out = subprocess.run(train_cmd(prepared, 2, "tracking=none", f"train.threads={threads}"), cwd=where,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    a, b = tmp_path / "t1/ckpt/latest.ckpt", tmp_path / "t2/ckpt/latest.ckpt"
    assert diff_checkpoints(a, b, strict=True) == []
    assert a.read_bytes() == b.read_bytes()


def test_state_round_trips_through_the_run_state_module(tmp_path, prepared):
    run_in(tmp_path, prepared, federation={"sharing": "local"})
    state = read_run_state(tmp_path / "ckpt/latest.ckpt")
    assert list(state.stores) == [f"node/{i:03d}" for i in range(NODES)]
    assert state.primary_store == "node/000" and state.round == 2 and state.rng is not None


# -- defect 7: SIGTERM / SIGINT -------------------------------------------------------------------

def test_sigint_stops_at_a_safe_point_keeps_latest_and_says_so(tmp_path, prepared, monkeypatch):
    from feda2v.pipeline import train as train_mod

    horizon = {"optimizer": {"decay_rounds": 4}}  # the cosine lr's: the run goes on to 4 rounds
    run_in(tmp_path, prepared, rounds=2, generator=horizon)
    latest = (tmp_path / "ckpt/latest.ckpt").read_bytes()
    sent = []
    # what the process had: default_int_handler, or SIG_IGN where a shell started it in the background
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def interrupt(self, node_result):  # Ctrl-C in the middle of round 3
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_mod.Progress, "node_done", interrupt)
    with pytest.raises(TrainingStopped) as e:
        run_in(tmp_path, prepared, rounds=4, train={"resume": "latest"}, generator=horizon)
    assert e.value.exit_code == 130 and "\n" not in str(e.value)
    assert str(e.value).startswith("stopped by SIGINT; ckpt/latest.ckpt (round 2) is the last complete checkpoint")
    assert (tmp_path / "ckpt/latest.ckpt").read_bytes() == latest
    assert {s: signal.getsignal(s) for s in before} == before  # handlers put back


def test_stop_on_signal_puts_back_the_handlers_it_found():
    """Whatever was installed before training (SIG_IGN of a background job, a caller's own
    handler) is what is installed after it, on a normal exit and on a stop."""
    from feda2v.pipeline.stopping import StopOnSignal

    mine = lambda signum, frame: None  # noqa: E731
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, mine)
        with StopOnSignal(lambda s: f"stopped by {s}"):
            assert signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, mine)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(TrainingStopped):
            with StopOnSignal(lambda s: f"stopped by {s}"):
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@pytest.mark.slow
def test_concurrent_run_is_refused_and_sigterm_ends_the_run_as_killed(tmp_path, prepared):
    """Run A trains (tracking on); run B into the same folder exits 2 naming A's pid and changes
    nothing; SIGTERM then stops A: exit 143, one line, latest intact, MLflow run KILLED."""
    import mlflow

    work = tmp_path / "w"
    work.mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    track = ["tracking=sqlite", f"tracking.uri={uri}", "tracking.experiment=sig"]
    a = subprocess.Popen(train_cmd(prepared, 200, *track), cwd=work, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        for line in a.stdout:
            if line.startswith("round 2/"):
                break
        os.kill(a.pid, signal.SIGSTOP)  # freeze A so the files cannot change under the check
        before = hashes(work)
        b = subprocess.run(train_cmd(prepared, 2, "tracking=none"), cwd=work, capture_output=True,
                           text=True, timeout=300)
        assert b.returncode == 2, b.stderr
        err = b.stderr.strip().splitlines()
        assert len(err) == 1 and f"in use by another feda2v run (pid {a.pid})" in err[0], b.stderr
        assert hashes(work) == before
        os.kill(a.pid, signal.SIGCONT)
        os.kill(a.pid, signal.SIGTERM)
        _, a_err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 143, a_err
    lines = [ln for ln in a_err.strip().splitlines() if ln.startswith("feda2v:")]
    assert len(lines) == 1 and lines[0].startswith("feda2v: error: stopped by SIGTERM; ckpt/latest.ckpt (round "), a_err
    done = verify_checkpoint(work / "ckpt/latest.ckpt")["round"]
    assert done >= 2 and f"(round {done})" in lines[0]
    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("sig").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert (work / "ckpt" / ".feda2v-run.lock").read_bytes() == b""  # released and emptied
