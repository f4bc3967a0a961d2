"""End to end: `feda2v-ckpt migrate` prints (and writes beside OUT) the overrides that resume the
migrated file, and `feda2v-train <those> train.resume=OUT` trains on from the legacy state."""
from __future__ import annotations

import pytest
import torch

from feda2v.checkpoint import read_checkpoint
from feda2v.cli.ckpt import main as ckpt_main
from test_legacy_migration import CASES, save_case


@pytest.fixture(scope="module")
def prep_dir(tmp_path_factory):
    from feda2v.config import load_config
    from feda2v.data import prepare

    d = tmp_path_factory.mktemp("prep") / "prepared"
    prepare(load_config({"data": {"name": "digits", "condition": "onehot", "prepared_dir": str(d), "nodes": 2,
                                  "partition": {"scheme": "iid"}}}))
    return str(d)


def _train_with(overrides: list[str]):
    """What ``feda2v-train <overrides>`` does: the CLI's override checks and rewrites, Hydra's
    composition of conf/, the train job."""
    from feda2v.cli._app import conf_dir, prepare_overrides
    from feda2v.config import load_config
    from feda2v.config.files import compose_conf
    from feda2v.pipeline.train import train

    train(load_config(compose_conf(conf_dir(), prepare_overrides(overrides))))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_migrated_run_resumes_with_the_printed_overrides(tmp_path, monkeypatch, capsys, prep_dir, name):
    monkeypatch.chdir(tmp_path)
    case = CASES[name]()
    paths = [str(p) for p in save_case(tmp_path, case)]
    flags = ["--fresh-discriminator"] if case.flags.get("fresh_discriminator") else []
    # overrides and flags anywhere on the line: before, between and after the files
    argv = ["migrate", *case.overrides[:1], paths[0], "--prepared", prep_dir, *flags, *paths[1:], "out.ckpt",
            *case.overrides[1:]]
    with pytest.raises(SystemExit) as e:
        ckpt_main(argv)
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "resume with" in printed and "train.resume=out.ckpt" in printed
    overrides = (tmp_path / "out.ckpt.overrides").read_text().splitlines()
    assert any(o.startswith("generator.arch=") for o in overrides)
    t0, h0 = read_checkpoint("out.ckpt")
    legacy_round = h0["round"]
    _train_with([*overrides, "train.resume=out.ckpt", f"federation.rounds={legacy_round + 1}",
                 "tracking.enabled=false", "train.progress=off", "checkpoint.dir=ck",
                 "train.reports_dir=reports/train"])
    t1, h1 = read_checkpoint(tmp_path / "ck" / "latest.ckpt")
    assert h1["round"] == legacy_round + 1
    assert h1["config"]["generator"] == h0["config"]["generator"]
    for kr, o in h1["stores"]["server"]["optimizers"].items():
        assert o["step"] > h0["stores"]["server"]["optimizers"][kr]["step"]  # trained on, from the legacy steps
        assert (o["lr"], o["weight_decay"]) == (h0["stores"]["server"]["optimizers"][kr]["lr"],
                                                h0["stores"]["server"]["optimizers"][kr]["weight_decay"])
    # it continued the legacy parameters, not a fresh init
    name0 = next(k for k in t0 if "/generator/param/" in k and k.endswith("weight"))
    drift = (t1[name0] - t0[name0]).abs().max().item()
    assert 0 < drift < 1.0
    assert torch.isfinite(t1[name0]).all()


PUBLISHED = [("vae", "fedgfe", "per_class"), ("cvae", "fedgfe", "unified"), ("cvae", "fedgfe_multimodal", "per_group"),
             ("gan", "fedgfe", "per_group")]


@pytest.mark.slow
@pytest.mark.parametrize("gtype, arch, granularity", PUBLISHED, ids=[f"{t}-{a}-{g}" for t, a, g in PUBLISHED])
def test_published_architectures_train_and_resume_bit_identically(tmp_path, gtype, arch, granularity):
    """generator.arch=fedgfe* for a new run: the grouped step trains them (dropout drawn from the
    batch's derived generator), and k rounds + resume + the rest = all rounds, bit for bit."""
    from test_train import assert_same, run
    from feda2v.config import load_config
    from feda2v.data import prepare

    prep = tmp_path / "prepared"
    prepare(load_config({"seed": 0, "data": {"name": "digits", "nodes": 4, "condition": "onehot",
                                             "prepared_dir": str(prep), "max_samples": 600,
                                             "partition": {"scheme": "classes_per_node", "classes_per_node": 4}}}))
    sections = {"generator": {"type": gtype, "arch": arch, "granularity": granularity, "fusion_dim": 6}}
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight, prep, rounds=3, **sections)
    run(split, prep, rounds=1, **sections)
    run(split, prep, rounds=3, resume="latest", **sections)
    assert_same(straight / "ckpt" / "latest.ckpt", split / "ckpt" / "latest.ckpt")
    t, h = read_checkpoint(straight / "ckpt" / "latest.ckpt")
    assert h["config"]["generator"]["arch"] == arch
    cls = h["stores"]["server"]["arch"][f"{h['keys'][0]}/generator"]["class"]
    assert cls.startswith("Fedgfe")
    assert all(torch.isfinite(v).all() for k, v in t.items() if "/param/" in k)
