"""train.device on a machine without CUDA: resolution, refusal of an absent device (one line, exit 2,
nothing written), the plumbing into every store and the classifier, one move of the node data per
visit, and checkpoints that hold CPU tensors and read onto a chosen device."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import cli
from feda2v.config import load_config
from feda2v.errors import ConfigError
from feda2v.store import GeneratorStore, StoreSpec
from feda2v.store.device import resolve_device

CLASSES = ("a", "b", "c")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def spec(**kw):
    args = dict(type="gan", granularity="per_class", classes=CLASSES, feature_dim=4, condition_dim=3,
                latent_dim=2, hidden_dim=5)
    args.update(kw)
    return StoreSpec(**args)


@no_cuda
def test_resolution_without_cuda():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError, match=rf"^train.device={name}: this machine has no usable CUDA device"):
            resolve_device(name)


def test_device_index_beyond_the_machine_and_bad_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"train.device=cuda:2: this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        load_config({"train": {"device": "gpu"}})
    assert load_config({}).train.device == "cpu"


@no_cuda
@pytest.mark.parametrize("app", ["feda2v-train", "feda2v-evaluate"])
def test_cli_refuses_an_absent_device_in_one_line_writing_nothing(tmp_path, app):
    proc = subprocess.run([cli(app), "train.device=cuda", "tracking=none", "checkpoint.dir=ckpt",
                           "train.reports_dir=rep", "evaluate.reports_dir=ev", "data.prepared_dir=nowhere"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("feda2v: error: train.device=cuda: this machine has no "
                                                   "usable CUDA device"), proc.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name != ".hydra" and p.name != "outputs"] == []


def _fake_data(n_nodes=2):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    nodes = [SimpleNamespace(node_id=i, train_x=torch.randn(40, 4, generator=g), train_y=torch.arange(40) % 3,
                             test_x=torch.randn(9, 4, generator=g), test_y=torch.arange(9) % 3)
             for i in range(n_nodes)]
    return SimpleNamespace(classes=list(CLASSES), feature_dim=4, condition_dim=3, conditions=torch.eye(3),
                           nodes=nodes, manifest_hash="h")


@pytest.mark.parametrize("sharing", ["shared", "local", "fedavg"])
def test_federation_puts_every_store_and_the_classifier_on_train_device(monkeypatch, sharing):
    from feda2v.federation.server import Federation

    moved = []
    real_to = GeneratorStore.to
    monkeypatch.setattr(GeneratorStore, "to", lambda self, d: moved.append(torch.device(d)) or real_to(self, d))
    mode = "generator_only" if sharing == "local" else "full"
    cfg = load_config({"federation": {"sharing": sharing, "mode": mode}, "train": {"device": "auto"},
                       "generator": {"hidden_dim": 8, "latent_dim": 2}})
    fed = Federation(cfg, _fake_data())
    assert fed.device == resolve_device("auto")
    assert len(moved) == len(fed.stores) and set(moved) == {fed.device}
    assert all(s.device == fed.device for s in fed.stores.values())
    if fed.classifier is not None:
        assert {p.device for p in fed.classifier.parameters()} == {fed.device}


def test_node_moves_its_features_once_per_visit():
    """The features of a visit go to the store's device in one call, never per step."""
    from feda2v.federation.node import train_generators

    class Counting(torch.Tensor):
        calls = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to and args[0].dim():  # (0-d: the visit's flags and sums)
                cls.calls.append(args[0].shape[0])
            return super().__torch_function__(func, types, args, kwargs or {})

    data = _fake_data(1).nodes[0]
    data.train_x = data.train_x.as_subclass(Counting)
    store = GeneratorStore(spec(type="cvae"), torch.eye(3))
    res = train_generators(store, data, classes=list(CLASSES), seed=0, round_=1, local_epochs=2, batch_size=8,
                           reset_on_change="never")
    assert res.steps == 10
    assert Counting.calls.count(40) == 1  # the whole visit's features: once


def test_checkpoint_tensors_are_cpu_and_read_onto_a_chosen_device(tmp_path):
    from feda2v.checkpoint import read_checkpoint, write_checkpoint

    s = GeneratorStore(spec(), torch.eye(3), device="cpu")
    g = torch.Generator().manual_seed(1)
    s.train_batch(torch.randn(12, 4, generator=g), torch.arange(12) % 3, gen=g, node="n", round=0)
    tensors, meta = s.state_dict()
    assert {t.device.type for t in tensors.values()} == {"cpu"}
    write_checkpoint(tmp_path / "s.ckpt", tensors, {"store": meta})
    back_t, header = read_checkpoint(tmp_path / "s.ckpt")
    back = GeneratorStore.from_state(back_t, json.loads(json.dumps(header["store"])), device="cpu")
    assert back.device == torch.device("cpu")
    for key in s.keys:
        for role in s.roles:
            opt = back.optimizer(key, role)
            for p in back.module(key, role).parameters():
                assert p.device.type == "cpu"
                for v in opt.state.get(p, {}).values():
                    assert v.device == p.device
    bt, _ = back.state_dict()
    assert all(torch.equal(tensors[n], bt[n]) for n in tensors)


@pytest.mark.parametrize("type_", ["vae", "cvae", "gan"])
def test_a_step_draws_no_default_rng(type_):
    """All randomness comes from the explicit host generators passed in, so a device's default
    generator never decides a result (and needs no capturing for exact resume)."""
    s = GeneratorStore(spec(type=type_), torch.eye(3))
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    before = torch.get_rng_state()
    s.train_batch(x, torch.arange(9) % 3, gen=torch.Generator().manual_seed(0), node="n", round=0)
    s.sample(torch.arange(3), gen=torch.Generator().manual_seed(1))
    s.reset("class/a", node="n", round=0)
    assert torch.equal(torch.get_rng_state(), before)


# -- Flower nodes (issue 16): a ClientApp trains on the task's train.device or its own ---------------
from test_flower import _federation, prepared  # noqa: E402,F401  (the module's prepared digits)


@no_cuda
def test_a_flower_node_trains_on_train_device_or_its_node_config_device(prepared, monkeypatch):  # noqa: F811
    from feda2v.federation.flower_app import encode_store, make_task, visit
    from feda2v.store import device as device_mod

    fed = _federation(prepared, federation={"sharing": "shared"})
    blob = encode_store(fed.stores["server"], store_name="server", round_=1, node="node/001")
    task = make_task(fed, 1, 1, "server")
    assert task["device"] == "cpu"  # the server's train.device travels with every task
    plain, _ = visit(blob, task, 1)
    # an absent device is refused on the node, in one line naming where it came from
    with pytest.raises(ConfigError, match=r"^task device on this node: train.device=cuda: this machine has no usable"):
        visit(blob, dict(task, device="cuda"), 1)
    with pytest.raises(ConfigError, match=r"^node config device on this node: train.device=cuda:1: "):
        visit(blob, task, 1, device="cuda:1")
    # the node config's device wins over the task's, and the result is the same bytes
    assert visit(blob, dict(task, device="cuda"), 1, device="cpu")[0] == plain
    asked = []
    real = device_mod.resolve_device
    monkeypatch.setattr(device_mod, "resolve_device", lambda name: asked.append(name) or real("cpu"))
    built = []  # the device each store of a visit is built on (what resolve_device answered)
    orig = GeneratorStore.__init__

    def spy(self, *a, device=None, **kw):
        built.append(device)
        orig(self, *a, device=device, **kw)

    monkeypatch.setattr(GeneratorStore, "__init__", spy)
    visit(blob, dict(task, device="cuda:3"), 1)
    visit(blob, task, 1, device="cuda:2")
    assert asked == ["cuda:3", "cuda:2"] and built == [torch.device("cpu")] * 2
