"""End to end: a migrated published-system checkpoint resumes training (moments carried over)."""
from __future__ import annotations

import os

import pytest
import torch

from feda2v.checkpoint import inspect_checkpoint, migrate_legacy, read_checkpoint
from test_legacy_migration import LegacyCVAE, trained


@pytest.mark.slow
def test_migrated_checkpoint_resumes_training(tmp_path, monkeypatch):
    from feda2v.config import load_config
    from feda2v.data import prepare
    from feda2v.pipeline.train import train

    monkeypatch.chdir(tmp_path)
    prepare(load_config({"data": {"name": "digits", "condition": "onehot", "prepared_dir": "prep", "nodes": 2,
                                  "partition": {"scheme": "iid"}}}))
    g, o = trained(LegacyCVAE(d=64, c=10))
    torch.save({"checkpoint_type": "server", "round": 3, "generator_state_dict": g.state_dict(),
                "optimizer_state_dict": o.state_dict()}, "legacy.pt")
    header = migrate_legacy("legacy.pt", "migrated.ckpt", prepared_dir="prep")
    conf = header["config"]
    conf["federation"]["rounds"] = 4
    conf["tracking"]["enabled"] = False
    conf["train"].update(resume="migrated.ckpt", progress="off", reports_dir="reports/train")
    conf["checkpoint"]["dir"] = "ck"
    train(load_config(conf))
    before = inspect_checkpoint("migrated.ckpt")["optimizers"]["unified/generator"]
    after = inspect_checkpoint(os.path.join("ck", "latest.ckpt"))
    assert before == {"step": 2, "lr": 0.002, "weight_decay": 0.05}
    assert after["round"] == 4
    opt = after["optimizers"]["unified/generator"]
    assert opt["step"] > 2 and opt["lr"] == 0.002 and opt["weight_decay"] == 0.05
    # the resumed run started from the legacy parameters, not a fresh init
    t0, _ = read_checkpoint("migrated.ckpt")
    t1, _ = read_checkpoint(os.path.join("ck", "latest.ckpt"))
    name = "store/server/unified/generator/param/decoder.4.weight"
    drift = (t1[name] - t0[name]).abs().max().item()
    assert 0 < drift < 0.5
