"""federation.engine=flower: the same rounds through Flower's ServerApp/ClientApp (Message API).

Fast tests cover the wire format and a node visit without Flower's runtime; the slow ones run the
Flower simulation (Ray: ~10-25 s start-up each) and compare final checkpoints bit for bit with the
in-process engine's, including resume from a checkpoint written by either engine.
"""
import json
import os

import pytest
import torch

from feda2v.checkpoint import diff_checkpoints, read_checkpoint, verify_checkpoint, write_checkpoint
from feda2v.config import load_config
from feda2v.errors import CheckpointError, ConfigError, Feda2vError

NODES = 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from feda2v.data import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(load_config(_raw(out)))
    return out


def _raw(prepared, **sections):
    raw = {
        "seed": 0,
        "data": {"name": "digits", "nodes": NODES, "condition": "onehot", "prepared_dir": str(prepared),
                 "max_samples": 300, "partition": {"scheme": "classes_per_node", "classes_per_node": 4}},
        "generator": {"hidden_dim": 32, "latent_dim": 8, "beta_warmup_steps": 10},
        "federation": {"rounds": 2, "batch_size": 64, "sharing": "shared"},
        "checkpoint": {"dir": "ckpt", "every": 1, "keep_last": 3},
        "train": {"reports_dir": "reports/train", "progress": "off"},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def train_in(workdir, prepared, engine, *, rounds=2, resume=None, **sections):
    """Train in ``workdir`` (relative output paths, so configs of both engines compare equal)."""
    from feda2v.pipeline.train import train

    sections.setdefault("federation", {}).update({"engine": engine, "rounds": rounds})
    sections.setdefault("train", {}).update({"resume": resume})
    workdir.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(workdir)
    try:
        return train(load_config(_raw(prepared, **sections)))
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def inprocess_shared(prepared, tmp_path_factory):
    work = tmp_path_factory.mktemp("inprocess_shared")
    train_in(work, prepared, "inprocess")
    return work / "ckpt"


# -- fast: wire format and one node visit, no Flower runtime ------------------------------------
def _federation(prepared, **sections):
    from feda2v.data import load_prepared
    from feda2v.federation.server import Federation

    return Federation(load_config(_raw(prepared, **sections)), load_prepared(prepared))


def test_store_message_is_the_checkpoint_container(prepared, tmp_path):
    from feda2v.federation.flower_app import decode_store, encode_store

    store = _federation(prepared).stores["server"]
    blob = encode_store(store, store_name="server", round_=1, node="node/000")
    tensors, meta = store.state_dict()
    # the message payload is byte-for-byte what write_checkpoint puts on disk
    header = {"kind": "feda2v-store-message", "store_name": "server", "round": 1, "node": "node/000",
              "store": meta}
    write_checkpoint(tmp_path / "s.ckpt", tensors, header)
    assert (tmp_path / "s.ckpt").read_bytes() == blob
    got, h = decode_store(blob, label="test")
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert h["store"] == json.loads(json.dumps(meta))
    bad = bytearray(blob)
    bad[-3] ^= 0x10  # one bit of an optimizer/parameter tensor
    with pytest.raises(CheckpointError, match="sha256"):
        decode_store(bytes(bad), label="test")


@pytest.mark.parametrize("sharing", ["shared", "fedavg"])
def test_one_visit_equals_in_process_training(prepared, sharing):
    """The ClientApp's work (bytes -> rebuilt store -> train_generators -> bytes) is exactly the
    in-process node step, optimizer moments and step counters included."""
    from feda2v.federation.flower_app import decode_store, encode_store, make_task, node_result_from_json, visit
    from feda2v.federation.node import node_name, train_generators

    fed = _federation(prepared, federation={"sharing": sharing})
    nd = fed.data.nodes[1]
    name = node_name(nd.node_id)
    store_name = "server" if sharing == "shared" else name
    store = fed.store_for(name)
    blob = encode_store(store, store_name=store_name, round_=1, node=name)
    out, result = visit(blob, make_task(fed, nd.node_id, 1, store_name), nd.node_id)

    c = fed.cfg.federation
    ref = train_generators(store, nd, classes=fed.classes, seed=fed.cfg.seed, round_=1,
                           local_epochs=c.local_epochs, batch_size=c.batch_size,
                           reset_on_change=c.reset_on_class_change)
    want_t, want_meta = store.state_dict()
    got_t, header = decode_store(out, label="reply")
    assert set(got_t) == set(want_t)
    differ = [k for k in want_t if not torch.equal(got_t[k], want_t[k])]
    assert not differ, differ[:5]
    assert any("exp_avg_sq" in k and got_t[k].abs().sum() > 0 for k in got_t)  # moments travelled
    assert header["store"] == json.loads(json.dumps(want_meta))
    res = node_result_from_json(result)
    assert (res.node, res.steps, res.losses, res.samples_per_key) == (ref.node, ref.steps, ref.losses,
                                                                      ref.samples_per_key)


def test_visit_refuses_misrouted_or_foreign_data(prepared, tmp_path):
    from feda2v.federation.flower_app import encode_store, make_task, visit

    fed = _federation(prepared)
    blob = encode_store(fed.stores["server"], store_name="server", round_=1, node="node/000")
    task = make_task(fed, 0, 1, "server")
    with pytest.raises(Feda2vError, match="delivered to partition 2"):
        visit(blob, task, 2)
    with pytest.raises(Feda2vError, match="manifest hash"):
        visit(blob, dict(task, manifest_hash="0" * 64), 0)


# -- slow: the Flower simulation runtime (Ray) ---------------------------------------------------
@pytest.fixture(scope="module")
def flower_shared(prepared, tmp_path_factory):
    work = tmp_path_factory.mktemp("flower_shared")
    train_in(work, prepared, "flower")
    return work / "ckpt"


@pytest.mark.slow
def test_simulation_matches_in_process_bit_for_bit(inprocess_shared, flower_shared):
    a, b = inprocess_shared / "latest.ckpt", flower_shared / "latest.ckpt"
    assert verify_checkpoint(b)["round"] == 2
    assert diff_checkpoints(a, b) == []
    for r in (1, 2):  # every round's checkpoint, not only the last
        name = f"round_{r:06d}.ckpt"
        assert diff_checkpoints(inprocess_shared / name, flower_shared / name) == []
    _, h = read_checkpoint(b)
    assert h["provenance"]["engine"] == "flower"
    assert any(o["step"] > 0 for o in h["optimizers"].values())


@pytest.mark.slow
@pytest.mark.parametrize("written_by", ["inprocess", "flower"])
def test_simulation_resumes_from_either_engines_checkpoint(prepared, inprocess_shared, flower_shared,
                                                           tmp_path, written_by):
    """Round 1 written by either engine, round 2 through Flower == 2 straight in-process rounds."""
    src = (inprocess_shared if written_by == "inprocess" else flower_shared) / "round_000001.ckpt"
    assert read_checkpoint(src)[1]["provenance"]["engine"] == written_by
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "round_000001.ckpt").write_bytes(src.read_bytes())
    train_in(tmp_path, prepared, "flower", resume=str(tmp_path / "ckpt" / "round_000001.ckpt"))
    out = tmp_path / "ckpt" / "latest.ckpt"
    assert verify_checkpoint(out)["round"] == 2
    assert diff_checkpoints(inprocess_shared / "latest.ckpt", out) == []


def diff_node_resident(ip_work, fl_work, name="latest.ckpt"):
    """In-process checkpoint vs the Flower server's, with the nodes' own checkpoints filled in
    (node-resident sharing: the server holds no node store; ``feda2v-ckpt diff --nodes``)."""
    from feda2v.checkpoint.nodestate import diff_with_nodes

    return diff_with_nodes(ip_work / "ckpt" / name, fl_work / "ckpt" / name, [fl_work / "ckpt" / "nodes"])


@pytest.mark.slow
@pytest.mark.parametrize("sharing", ["fedavg", "local"])
def test_simulation_node_resident_matches_in_process(prepared, tmp_path, sharing):
    """fedavg / local: each node's store lives on its (simulated) node, checkpointed there; node
    visits go out in parallel, merged in participant order -> still bit-identical."""
    sections = {"federation": {"sharing": sharing}, "generator": {"granularity": "per_class"}}
    train_in(tmp_path / "ip", prepared, "inprocess", **sections)
    train_in(tmp_path / "fl", prepared, "flower", **sections)
    for name in ("round_000001.ckpt", "latest.ckpt"):
        assert diff_node_resident(tmp_path / "ip", tmp_path / "fl", name) == []
    _, h = read_checkpoint(tmp_path / "fl" / "ckpt" / "latest.ckpt")
    assert h["node_rounds"] == {f"node/{i:03d}": 2 for i in range(NODES)}
    assert sorted(h["stores"]) == (["server"] if sharing == "fedavg" else [])


@pytest.mark.slow
def test_simulation_full_mode_matches_in_process(prepared, tmp_path):
    """full mode: node classifiers train on the Flower nodes, the server averages and distils."""
    sections = {"federation": {"mode": "full", "sharing": "fedavg"}}
    train_in(tmp_path / "ip", prepared, "inprocess", **sections)
    train_in(tmp_path / "fl", prepared, "flower", **sections)
    b = tmp_path / "fl" / "ckpt" / "latest.ckpt"
    assert diff_node_resident(tmp_path / "ip", tmp_path / "fl") == []
    tensors, _ = read_checkpoint(b)
    assert any(k.startswith("classifier/") for k in tensors)
    assert (tmp_path / "ip" / "reports" / "train" / "downstream.json").read_bytes() == \
           (tmp_path / "fl" / "reports" / "train" / "downstream.json").read_bytes()



def test_the_clientapp_path_imports_no_config_tracking_or_pipeline_stack():
    """Flower starts a fresh `flwr-clientapp` process per message: what a node imports for a visit
    is paid every visit. torch is needed to train; omegaconf/yaml (config), mlflow, hydra, dvc and
    the data-making stack are not (measured: ~0.1 s of ours instead of ~0.3 s, README)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import feda2v.federation.flower_app as f\n"
        "from feda2v.checkpoint.nodestate import load_node_state, save_node_state\n"
        "from feda2v.checkpoint.runstate import check_resumable\n"
        "from feda2v.federation.node import train_generators\n"
        "from feda2v.store import GeneratorStore, StoreSpec\n"
        "from feda2v.data.sites import load_partition\n"
        "from feda2v.models.classifier import Classifier\n"
        "check_resumable({'a': 1}, type('S', (), {'data_manifest_hash': None, 'config': {'a': 1}})(), None, 'x')\n"
        "heavy = ('omegaconf', 'yaml', 'mlflow', 'hydra', 'dvc', 'feda2v.pipeline', 'feda2v.tracking',\n"
        "         'feda2v.data.sources', 'feda2v.data.partition', 'feda2v.evaluate')\n"
        "print(sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_fresh_node_process_visits_without_torch_dynamo_and_the_same_bytes(prepared, tmp_path):
    """What Flower's per-message `flwr-clientapp` process pays: a node-resident visit there (after
    ``lighten_torch``, as handle_train does in that process) imports neither torch._dynamo nor
    sympy (~1.5-3.5 s on this machine) and replies the same bytes as this process's visit."""
    import subprocess
    import sys

    from feda2v.checkpoint.runstate import state_config
    from feda2v.data.prepared import load_server_view
    from feda2v.federation import flower_app
    from feda2v.federation.server import Federation
    from feda2v.federation.sharing import SERVER

    cfg = load_config(_raw(prepared, federation={"sharing": "fedavg", "flower": {"node_state_dir": str(tmp_path)}},
                           generator={"granularity": "per_class"}))
    fed = Federation(cfg, load_server_view(prepared), node_resident=True)
    counts = fed.data.manifest["counts"]["train"][1]
    keys = flower_app.visit_keys(fed.stores[SERVER], fed.classes, counts)
    blob = flower_app.parameters_bytes(fed.stores[SERVER], keys, round_=1, node="node/001")
    task = dict(flower_app.make_task(fed, 1, 1, "node/001"), resident={
        "from_round": 0, "keys": keys, "parameters": True, "keep": 2, "state_dir": "", "scope": "run-test",
        "config": state_config(cfg), "spec": fed.spec.to_json()})
    (tmp_path / "blob").write_bytes(blob)
    (tmp_path / "task.json").write_text(json.dumps(task))
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "import feda2v.federation.flower_app as f\n"
        "f.lighten_torch()\n"
        f"d = Path({str(tmp_path)!r})\n"
        "out, _ = f.resident_visit((d / 'blob').read_bytes(), json.loads((d / 'task.json').read_text()), 1,\n"
        "                          state_dir=str(d / 'sub'))\n"
        "(d / 'out').write_bytes(out)\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
    here, _ = flower_app.resident_visit(blob, task, 1, state_dir=str(tmp_path / "here"))
    assert (tmp_path / "out").read_bytes() == here
    assert (tmp_path / "sub" / "run-test" / "node_001" / "round_000001.ckpt").read_bytes() == \
           (tmp_path / "here" / "run-test" / "node_001" / "round_000001.ckpt").read_bytes()
