"""federated-train: ownership modes, exact resume, determinism, faults and bad input."""
import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from conftest import ROOT, cli
from feda2v.checkpoint import diff_checkpoints, read_checkpoint, verify_checkpoint
from feda2v.config import load_config
from feda2v.errors import CheckpointError, ConfigError, NonFiniteLossError

NODES = 4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from feda2v.data import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(load_config({"seed": 0, "data": {"name": "digits", "nodes": NODES, "condition": "onehot",
                                              "prepared_dir": str(out), "max_samples": 600,
                                              "partition": {"scheme": "classes_per_node",
                                                            "classes_per_node": 4}}}))
    return out


def make_cfg(tmp, prepared, *, rounds=3, resume=None, **sections):
    """A tiny, fast config rooted in ``tmp`` (tracking off, small generator)."""
    classes = json.loads((prepared / "manifest.json").read_text())["classes"]
    raw = {
        "seed": 0,
        "data": {"name": "digits", "nodes": NODES, "condition": "onehot", "prepared_dir": str(prepared),
                 "max_samples": 600,
                 "partition": {"scheme": "classes_per_node", "classes_per_node": 4}},
        "generator": {"hidden_dim": 32, "latent_dim": 8, "beta_warmup_steps": 10,
                      "class_groups": {"low": classes[:5], "high": classes[5:]}},
        "federation": {"rounds": rounds, "batch_size": 64, "local_epochs": 1},
        "checkpoint": {"dir": "ckpt", "every": 1, "keep_last": 2},
        "train": {"resume": resume, "reports_dir": "reports/train", "progress": "off"},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return load_config(raw)


def run(tmp, prepared, **kw):
    """Train in ``tmp`` (relative output paths, as a pipeline run has)."""
    from feda2v.pipeline.train import train

    tmp.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(tmp)
    try:
        return train(make_cfg(tmp, prepared, **kw))
    finally:
        os.chdir(here)


def assert_same(a, b):
    diffs = diff_checkpoints(a, b)
    assert not diffs, diffs[:5]
    assert a.read_bytes() != b"" and verify_checkpoint(a)


MATRIX = [(s, g, t, r) for s in ("shared", "local", "fedavg") for g in ("unified", "per_class", "per_group")
          for t in ("vae", "cvae", "gan") for r in (False, True)]


@pytest.mark.parametrize("sharing, granularity, gtype, reset", MATRIX,
                         ids=[f"{s}-{g}-{t}-{'reset' if r else 'keep'}" for s, g, t, r in MATRIX])
def test_resume_is_bit_identical(tmp_path, prepared, sharing, granularity, gtype, reset):
    # decay_rounds: the cosine lr's horizon is the run's 3 rounds, also while it stops after 1
    sections = {"federation": {"sharing": sharing, "reset_on_class_change": reset},
                "generator": {"type": gtype, "granularity": granularity, "optimizer": {"decay_rounds": 3}}}
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight, prepared, rounds=3, **sections)
    run(split, prepared, rounds=1, **sections)
    run(split, prepared, rounds=3, resume="latest", **sections)
    assert_same(straight / "ckpt" / "latest.ckpt", split / "ckpt" / "latest.ckpt")
    assert (straight / "reports/train/round_losses.csv").read_text() == \
        (split / "reports/train/round_losses.csv").read_text()


CONDITIONAL_PRIOR = [("shared", "unified", True), ("local", "per_class", False), ("fedavg", "per_group", True)]


@pytest.mark.parametrize("sharing, granularity, reset", CONDITIONAL_PRIOR,
                         ids=[f"{s}-{g}-{'reset' if r else 'keep'}" for s, g, r in CONDITIONAL_PRIOR])
def test_resume_with_the_conditional_prior_is_bit_identical(tmp_path, prepared, sharing, granularity, reset):
    sections = {"federation": {"sharing": sharing, "reset_on_class_change": reset},  # the cVAE's default: on
                "generator": {"type": "cvae", "granularity": granularity, "optimizer": {"decay_rounds": 3}}}
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight, prepared, rounds=3, **sections)
    run(split, prepared, rounds=1, **sections)
    run(split, prepared, rounds=3, resume="latest", **sections)
    assert_same(straight / "ckpt" / "latest.ckpt", split / "ckpt" / "latest.ckpt")
    tensors, _ = read_checkpoint(straight / "ckpt" / "latest.ckpt")
    assert any(n.endswith("/generator/param/prior.0.weight") for n in tensors)


def test_same_config_twice_gives_identical_checkpoints_and_metrics(tmp_path, prepared):
    for name in ("a", "b"):
        run(tmp_path / name, prepared, federation={"sharing": "fedavg"},
            generator={"granularity": "per_class"})
    assert_same(tmp_path / "a/ckpt/latest.ckpt", tmp_path / "b/ckpt/latest.ckpt")
    for f in ("reports/train/losses.csv", "reports/train/round_losses.csv"):
        assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text()


def test_shared_mode_relays_one_store_and_its_optimizer_state(tmp_path, prepared):
    """One store for the federation; the unified optimizer's step count is every node's steps summed."""
    import math

    from feda2v.data import load_prepared

    # no resets, so that every step counts (the default policy resets in round 1: see test_reset_policy)
    run(tmp_path, prepared, rounds=2, federation={"reset_on_class_change": "never"})
    _, header = read_checkpoint(tmp_path / "ckpt/latest.ckpt")
    assert list(header["stores"]) == ["server"]
    batches = sum(math.ceil(len(nd.train_y) / 64) for nd in load_prepared(prepared).nodes)
    assert header["optimizers"]["unified/generator"]["step"] == 2 * batches


def test_checkpoints_keep_last_and_latest(tmp_path, prepared):
    run(tmp_path, prepared, rounds=4)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("round_"))
    assert names == ["round_000003.ckpt", "round_000004.ckpt"]
    _, header = read_checkpoint(tmp_path / "ckpt/latest.ckpt")
    assert header["round"] == 4
    metrics = json.loads((tmp_path / "reports/train_metrics.json").read_text())
    assert set(metrics) == {"gen/loss", "resets"}  # few DVC metrics, no timing
    timing = json.loads((tmp_path / "reports/timing/train.json").read_text())
    assert 0 <= timing["engine_overhead_share"] < 1 and timing["train_wall_seconds"] > 0


def test_full_mode_distils_and_reports_downstream(tmp_path, prepared):
    run(tmp_path, prepared, rounds=2, federation={"mode": "full"})
    down = json.loads((tmp_path / "reports/train/downstream.json").read_text())
    assert 0 <= down["global_acc_fedavg"] <= 1 and 0 <= down["global_acc_distilled"] <= 1
    assert set(down["per_node"]) == {f"node/{i:03d}" for i in range(NODES)}
    tensors, _ = read_checkpoint(tmp_path / "ckpt/latest.ckpt")
    assert any(k.startswith("classifier/") for k in tensors)


def test_resume_errors(tmp_path, prepared):
    with pytest.raises(CheckpointError, match="latest"):
        run(tmp_path / "none", prepared, resume="latest")
    with pytest.raises(CheckpointError, match="nope.ckpt"):
        run(tmp_path / "none", prepared, resume=str(tmp_path / "nope.ckpt"))
    run(tmp_path / "a", prepared, rounds=1)
    with pytest.raises(CheckpointError, match="generator.type"):
        run(tmp_path / "a", prepared, rounds=2, resume="latest", generator={"type": "gan"})


def test_group_map_missing_a_class_is_a_clear_error(tmp_path, prepared):
    with pytest.raises(ConfigError, match="group"):
        run(tmp_path, prepared, generator={"granularity": "per_group", "class_groups": {"few": ["0"]}})


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, prepared, monkeypatch):
    run(tmp_path, prepared, rounds=2, generator={"optimizer": {"decay_rounds": 4}})  # resumed to 4 below
    good = (tmp_path / "ckpt/latest.ckpt").read_bytes()
    import feda2v.data as data_mod

    real = data_mod.load_prepared

    def poisoned(path):
        d = real(path)
        d.nodes[1].train_x[0, 0] = float("nan")
        return d

    monkeypatch.setattr(data_mod, "load_prepared", poisoned)
    with pytest.raises(NonFiniteLossError, match="node/001"):
        run(tmp_path, prepared, rounds=4, resume="latest", generator={"optimizer": {"decay_rounds": 4}})
    assert (tmp_path / "ckpt/latest.ckpt").read_bytes() == good
    assert verify_checkpoint(tmp_path / "ckpt/latest.ckpt")["round"] == 2


def _train_cmd(prepared, tmp, rounds, resume=None):
    args = [cli("feda2v-train"), f"data.prepared_dir={prepared}", "data=digits", f"data.nodes={NODES}",
            "data.condition=onehot", "data.max_samples=600", "data.partition.scheme=classes_per_node",
            "data.partition.classes_per_node=4", "generator.hidden_dim=32", "generator.latent_dim=8",
            "generator.granularity=per_class", f"federation.rounds={rounds}", "federation.local_epochs=3",
            "tracking=none", "train.progress=lines", "checkpoint.dir=ckpt", "train.reports_dir=reports/train"]
    if resume:
        args.append(f"train.resume={resume}")
    return args


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, prepared):
    """Kill training with SIGKILL at random moments (after a random round's progress line plus a
    random delay, so sometimes mid-round, sometimes mid-checkpoint), resume from latest each time,
    and end bit-identical to an uninterrupted run."""
    rounds = 10
    ref = tmp_path / "ref"
    ref.mkdir()
    subprocess.run(_train_cmd(prepared, ref, rounds), cwd=ref, check=True, capture_output=True, timeout=300)
    work = tmp_path / "work"
    work.mkdir()
    rng = random.Random(1234)
    kills = 0
    for attempt in range(12):
        resume = "latest" if (work / "ckpt/latest.ckpt").exists() else None
        proc = subprocess.Popen(_train_cmd(prepared, work, rounds, resume), cwd=work,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        done = verify_checkpoint(work / "ckpt/latest.ckpt")["round"] if resume else 0
        if kills < 4 and done < rounds - 1:
            target = min(done + rng.randint(1, 3), rounds - 1)  # a round this process has still to run
            for line in proc.stdout:  # "round k/N: ..." once round k is done
                if line.startswith("round ") and int(line.split()[1].split("/")[0]) >= target:
                    time.sleep(rng.uniform(0.0, 0.05))
                    break
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        if (work / "ckpt/latest.ckpt").exists():
            verify_checkpoint(work / "ckpt/latest.ckpt")  # loadable after every kill
    assert proc.returncode == 0, err
    assert kills >= 3
    out = subprocess.run([cli("feda2v-ckpt"), "diff", str(ref / "ckpt/latest.ckpt"),
                          str(work / "ckpt/latest.ckpt")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
