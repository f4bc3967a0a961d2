"""Flower rounds over a Grid without Flower's runtime: a fake Grid delivers each message to the real
ClientApp handlers in this process, so slices, reply validation, the failure policy and data
locality are tested fast and bit for bit against the in-process engine."""
import json
import re
import shutil
import uuid
from types import SimpleNamespace

import pytest
import torch

from feda2v.config import load_config
from feda2v.errors import DataError, Feda2vError

flower_app = pytest.importorskip("feda2v.federation.flower_app")

NODES = 3


def _raw(prepared, **sections):
    raw = {
        "seed": 0,
        "data": {"name": "digits", "nodes": NODES, "condition": "onehot", "prepared_dir": str(prepared),
                 "max_samples": 300, "partition": {"scheme": "classes_per_node", "classes_per_node": 4}},
        "generator": {"hidden_dim": 32, "latent_dim": 8, "beta_warmup_steps": 10, "granularity": "per_class"},
        "federation": {"rounds": 2, "batch_size": 64, "sharing": "shared", "local_epochs": 2,
                       "flower": {"reply_timeout_s": 0.3, "poll_s": 0.001, "connect_timeout_s": 1.0}},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        for k, v in values.items():
            if isinstance(v, dict):
                raw.setdefault(section, {}).setdefault(k, {}).update(v)
            else:
                raw.setdefault(section, {})[k] = v
    return raw


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from feda2v.data import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(load_config(_raw(out)))
    return out


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's Message() reads the running task's identity (set by its runtimes); play a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _federation(prepared, state_dir=None, **sections):
    """In-process (``state_dir`` None) or as the Flower engine builds it: node-resident stores,
    the nodes' own checkpoints under ``state_dir``, and the server reads only the manifest and
    conditions (+ full mode's test splits) of ``prepared`` (load_server_view)."""
    from feda2v.data import load_prepared
    from feda2v.data.prepared import load_server_view
    from feda2v.federation.server import Federation

    if state_dir is None:
        return Federation(load_config(_raw(prepared, **sections)), load_prepared(prepared))
    fed = sections.get("federation", {})
    sections = dict(sections, federation={**fed, "flower": {**fed.get("flower", {}),
                                                            "node_state_dir": str(state_dir)}})
    cfg = load_config(_raw(prepared, **sections))
    return Federation(cfg, load_server_view(prepared, test_sets=cfg.federation.mode == "full"),
                      node_resident=True)


class FakeGrid:
    """Grid.get_node_ids/push_messages/pull_messages; a message to a live node is answered at once
    by the ClientApp's handlers; a dead node never answers."""

    def __init__(self, partitions, data_dirs=None):
        self.nodes = dict(partitions)  # Flower node id -> partition id
        self.data_dirs = data_dirs or {}
        self.dead: set = set()
        self.replies: dict = {}
        self.sent: list = []  # (node id, message type, payload bytes)
        self.tamper = None  # fn(reply Message) -> Message
        self.on_lost = None  # called when a message goes to a dead node

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, msgs):
        ids = []
        for m in msgs:
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            nid = m.metadata.dst_node_id
            ids.append(mid)
            payload = m.content["state"]["ckpt"].data if "state" in m.content else b""
            self.sent.append((nid, m.metadata.message_type, payload))
            if nid in self.dead or nid not in self.nodes:
                if self.on_lost:
                    self.on_lost(self, nid)
                continue
            config = {"partition-id": self.nodes[nid]}
            if self.nodes[nid] in self.data_dirs:
                config["data-dir"] = str(self.data_dirs[self.nodes[nid]])
            ctx = SimpleNamespace(node_config=config)
            handler = {flower_app.MSG_QUERY: flower_app.handle_query, flower_app.MSG_TRAIN: flower_app.handle_train,
                       flower_app.MSG_CLASSIFIER: flower_app.handle_classifier}[m.metadata.message_type]
            reply = handler(m, ctx)
            if self.tamper and m.metadata.message_type == flower_app.MSG_TRAIN:
                reply = self.tamper(reply, m)
            self.replies[mid] = reply
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _grid(**kw):
    return FakeGrid({100 + p: p for p in range(NODES)}, **kw)


def _state(fed):
    out = {}
    for name, store in fed.stores.items():
        t, meta = store.state_dict()
        out[name] = (t, json.loads(json.dumps(meta)))
    return out


def _scope(fed):
    from feda2v.checkpoint.nodestate import run_scope

    return run_scope(fed.cfg.checkpoint.dir)


def _node_dir(fed, node):
    from feda2v.checkpoint.nodestate import node_state_dir

    return node_state_dir(fed.cfg.federation.flower.node_state_dir, node, _scope(fed))


def node_states(fed):
    """A node-resident federation's node stores, read (verified) from each node's own checkpoint
    of the round the server records (a fresh store where the node never trained)."""
    from feda2v.checkpoint.nodestate import load_node_state
    from feda2v.checkpoint.runstate import state_config
    from feda2v.store import GeneratorStore

    out = {}
    for node, r in fed.node_rounds.items():
        if r == 0:
            t, meta = GeneratorStore(fed.spec, fed.data.conditions).state_dict()
        else:
            t, meta = load_node_state(fed.cfg.federation.flower.node_state_dir, node, r,
                                      config=state_config(fed.cfg), manifest_hash=fed.data.manifest_hash,
                                      scope=_scope(fed))
        out[node] = (dict(t), json.loads(json.dumps(meta)))
    return out


def assert_same_state(a, b):
    """``a`` in-process, ``b`` (maybe node-resident): every store bit for bit, node stores from
    the nodes' own checkpoints."""
    sa, sb = _state(a), _state(b)
    if b.node_resident:
        assert not set(sb) & set(b.node_rounds)  # the server holds no node store
        sb.update(node_states(b))
    assert sa.keys() == sb.keys()
    for name in sa:
        (ta, ma), (tb, mb) = sa[name], sb[name]
        assert ma == mb, name
        assert ta.keys() == tb.keys(), name
        differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not differ, (name, differ[:5])


def _run(fed, grid, rounds=2):
    rounds_ = flower_app.GridRounds(grid, fed)
    return [rounds_.run_round(r) for r in range(1, rounds + 1)]


def _inprocess(fed, rounds=2, drop=None):
    """In-process rounds; ``drop(round) -> node ids`` whose visits are left out (the skip reference)."""
    out = []
    for r in range(1, rounds + 1):
        gone = set(drop(r)) if drop else set()

        def train_visits(round_, visits, on_step=None):
            return fed.train_visits(round_, [v for v in visits if v[0].node_id not in gone], on_step)

        out.append(fed.run_round(r, train_visits=train_visits))
    return out


@pytest.mark.parametrize("sharing, granularity", [("shared", "per_class"), ("fedavg", "per_class"),
                                                   ("local", "per_class"), ("shared", "unified"),
                                                   ("fedavg", "unified")])
def test_grid_rounds_are_bit_identical_to_in_process(prepared, sharing, granularity, tmp_path):
    """shared + unified: the one relayed key meets new classes at each node, so resets happen
    (their log must travel back)."""
    sections = {"federation": {"sharing": sharing}, "generator": {"granularity": granularity}}
    ref, fed = _federation(prepared, **sections), _federation(prepared, tmp_path / "nodes", **sections)
    want = _inprocess(ref)
    got = _run(fed, _grid())
    assert_same_state(ref, fed)
    if (sharing, granularity) == ("shared", "unified"):  # the relayed key meets new classes
        assert len(fed.stores["server"].events) > 0
    if fed.node_resident:  # the checkpoints, as `feda2v-ckpt diff --nodes` compares them
        from feda2v.checkpoint import diff_checkpoints
        from feda2v.checkpoint.runstate import write_run_state
        from feda2v.cli.ckpt import main

        ip, fl = tmp_path / "ip.ckpt", tmp_path / "fl.ckpt"
        write_run_state(ip, ref.state_dict())
        write_run_state(fl, fed.state_dict())
        assert any("only in" in d for d in diff_checkpoints(ip, fl))  # the server lacks the node stores
        with pytest.raises(SystemExit) as done:
            main(["diff", str(ip), str(fl), "--nodes", str(tmp_path / "nodes")])
        assert done.value.code in (0, None)
    for w, g in zip(want, got):
        assert [n.node for n in g.nodes] == [n.node for n in w.nodes]
        assert {k: v for k, v in g.metrics.items() if "seconds" not in k and "share" not in k} == \
               {k: v for k, v in w.metrics.items() if "seconds" not in k and "share" not in k}
        assert g.missing == [] and g.metrics["nodes_missing"] == 0.0


@pytest.mark.parametrize("sharing", ["shared", "fedavg"])
def test_full_mode_classifiers_train_on_the_nodes_bit_identically(prepared, sharing, tmp_path):
    sections = {"federation": {"sharing": sharing, "mode": "full"}}
    ref, fed = _federation(prepared, **sections), _federation(prepared, tmp_path / "nodes", **sections)
    want = _inprocess(ref)
    grid = _grid()
    got = _run(fed, grid)
    assert_same_state(ref, fed)
    assert all(torch.equal(a, b) for a, b in zip(ref.classifier.state_dict().values(),
                                                 fed.classifier.state_dict().values()))
    assert [g.downstream for g in got] == [w.downstream for w in want]
    kinds = [kind for _, kind, _ in grid.sent]
    assert kinds.count(flower_app.MSG_CLASSIFIER) == 2 * NODES  # the classifier steps ran on the nodes


def test_messages_carry_only_the_keys_the_visit_trains(prepared):
    from feda2v.checkpoint.container import read_checkpoint_bytes

    fed = _federation(prepared)
    grid = _grid()
    _run(fed, grid, rounds=1)
    store = fed.stores["server"]
    whole = len(flower_app.encode_store(store, store_name="server", round_=1, node="x"))
    trains = [(nid, blob) for nid, kind, blob in grid.sent if kind == flower_app.MSG_TRAIN]
    assert len(trains) == NODES
    for nid, blob in trains:
        part = grid.nodes[nid]
        counts = fed.data.manifest["counts"]["train"][part]
        keys = flower_app.visit_keys(store, fed.classes, counts)
        assert 0 < len(keys) < len(store.keys)  # 4 of 10 classes per node
        tensors, header = read_checkpoint_bytes(blob, label="t")
        assert header["keys"] == keys
        assert {n.split("/generator/")[0] for n in tensors} == set(keys)
        assert len(blob) < whole * 0.6


def test_skip_policy_finishes_rounds_without_the_lost_node(prepared, capsys, tmp_path):
    sections = {"federation": {"flower": {"on_node_failure": "skip"}}}
    ref, fed = _federation(prepared, **sections), _federation(prepared, tmp_path / "nodes", **sections)
    grid = _grid()
    rounds = flower_app.GridRounds(grid, fed)
    grid.dead.add(101)  # partition 1 stops answering after start-up
    got = [rounds.run_round(r) for r in (1, 2)]
    _inprocess(ref, drop=lambda r: {1})
    assert_same_state(ref, fed)
    assert [g.missing for g in got] == [["node/001"], ["node/001"]]
    assert [g.metrics["nodes_missing"] for g in got] == [1.0, 1.0]
    assert fed.missing == {1: ["node/001"], 2: ["node/001"]}
    assert "node node/001 (partition 1) did not reply" in capsys.readouterr().out
    # the checkpoint records who was missing, through a real file, and a resume gets it back
    from feda2v.checkpoint.runstate import read_run_state, write_run_state

    write_run_state(tmp_path / "r.ckpt", fed.state_dict())
    state = read_run_state(tmp_path / "r.ckpt")
    assert state.extra["missing_nodes"] == {"1": ["node/001"], "2": ["node/001"]}
    again = _federation(prepared, **sections)
    again.load_state_dict(state)
    assert again.missing == fed.missing
    assert ref.missing == fed.missing  # the in-process reference left the same visits out
    assert "missing_nodes" not in _federation(prepared).state_dict().extra  # none lost: no field


def test_skip_policy_run_records_who_was_missing_in_mlflow(prepared, tmp_path, monkeypatch):
    """Through feda2v's training job (the one a deployed ServerApp runs): the lost node's name is in
    the run's tag and its own metric series, beside the count; the checkpoint still verifies."""
    mlflow = pytest.importorskip("mlflow")
    from feda2v.checkpoint.runstate import read_run_state
    from feda2v.federation.flower_engine import FlowerEngine
    from feda2v.pipeline.train import train

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/m.db"
    raw = _raw(prepared, federation={
        "flower": {"on_node_failure": "skip", "node_state_dir": str(tmp_path / "nodes")}},
        tracking={"enabled": True, "uri": uri, "experiment": "lost", "system_metrics": False},
        checkpoint={"dir": str(tmp_path / "ckpt")},
        train={"reports_dir": str(tmp_path / "reports"), "progress": "off",
               "metrics_path": str(tmp_path / "metrics.json"), "timing_path": str(tmp_path / "timing.json")})
    cfg = load_config(raw)
    grid = _grid()
    push = grid.push_messages

    def push_killing_node_2(msgs):  # partition 2 dies as its first visit arrives
        if any(m.metadata.message_type == flower_app.MSG_TRAIN and m.metadata.dst_node_id == 102 for m in msgs):
            grid.dead.add(102)
        return push(msgs)

    grid.push_messages = push_killing_node_2
    train(cfg, engine=FlowerEngine(grid=grid))
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lost").experiment_id])
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.tags["feda2v.nodes_missing"]) == {"node/002": [1, 2]}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "nodes_missing/node/002")] \
        == [(1, 1.0), (2, 1.0)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "nodes_missing")] == [1.0, 1.0]
    assert "nodes_missing/node/000" not in run.data.metrics  # nodes that answered get no series
    # the same record in the checkpoint, which verifies
    state = read_run_state(tmp_path / "ckpt" / "latest.ckpt")
    assert state.extra["missing_nodes"] == {"1": ["node/002"], "2": ["node/002"]}
    found = client.search_runs([run.info.experiment_id],
                               "tags.`feda2v.nodes_missing` LIKE '%node/002%'")
    assert [r.info.run_id for r in found] == [run.info.run_id]
    # a resumed run, partition 2 back: its run still says who the earlier rounds lost
    raw["federation"]["rounds"], raw["train"]["resume"] = 3, "latest"
    train(load_config(raw), engine=FlowerEngine(grid=_grid()))
    (resumed,) = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run.info.run_id]
    assert json.loads(resumed.data.tags["feda2v.nodes_missing"]) == {"node/002": [1, 2]}
    assert resumed.data.metrics["nodes_missing"] == 0.0
    assert "nodes_missing/node/002" not in resumed.data.metrics


def test_skip_then_a_restarted_node_rejoins_by_partition(prepared, tmp_path):
    sections = {"federation": {"flower": {"on_node_failure": "skip"}, "sharing": "fedavg"}}
    ref, fed = _federation(prepared, **sections), _federation(prepared, tmp_path / "nodes", **sections)
    grid = _grid()
    rounds = flower_app.GridRounds(grid, fed)
    del grid.nodes[101]  # partition 1 is gone in round 1 ...
    first = rounds.run_round(1)
    grid.nodes[777] = 1  # ... and back with a new Flower node id for round 2
    second = rounds.run_round(2)
    _inprocess(ref, drop=lambda r: {1} if r == 1 else set())
    assert_same_state(ref, fed)
    assert (first.missing, second.missing) == (["node/001"], [])
    assert rounds.routes[1] == 777


def test_fail_policy_stops_with_one_line_naming_the_node(prepared):
    fed = _federation(prepared)
    grid = _grid()
    rounds = flower_app.GridRounds(grid, fed)
    grid.dead.add(102)
    with pytest.raises(Feda2vError) as e:
        rounds.run_round(1)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("node node/002 (partition 2) did not reply within 0s")
    assert "on_node_failure=fail" in msg


@pytest.mark.parametrize("same_id", [False, True], ids=["new-node-id", "same-node-id"])
def test_wait_policy_resends_to_the_restarted_node(prepared, tmp_path, same_id):
    """A restarted SuperNode comes back under a new Flower node id, or (SuperNode authentication:
    the id belongs to the registered key) under its old one, which must be asked again."""
    sections = {"federation": {"flower": {"on_node_failure": "wait", "retries": 1}}}
    ref, fed = _federation(prepared, **sections), _federation(prepared, tmp_path / "nodes", **sections)
    grid = _grid()
    rounds = flower_app.GridRounds(grid, fed)
    grid.dead.add(101)
    back = 101 if same_id else 555

    def restart(g, nid):  # the lost node comes back
        g.nodes.pop(nid, None)
        g.dead.discard(nid)
        g.nodes[back] = 1
        g.on_lost = None

    grid.on_lost = restart
    got = [rounds.run_round(r) for r in (1, 2)]
    _inprocess(ref)
    assert_same_state(ref, fed)  # nothing lost: the visit was trained again from the same state
    assert [g.missing for g in got] == [[], []]

    grid.dead.add(back)  # lost again, and never back: retries run out -> one line
    with pytest.raises(Feda2vError, match=r"^node node/001 \(partition 1\) .* after 1 retries; the run stops"):
        rounds.run_round(3)


def _retamper(fn):
    """Reply tampering: decode the reply's container, let ``fn`` change (tensors, header, result), re-pack."""
    from feda2v.checkpoint.container import checkpoint_bytes, read_checkpoint_bytes

    def tamper(reply, msg):
        blob, task = flower_app._unpack(reply.content)
        tensors, header = read_checkpoint_bytes(blob, label="t")
        header = {k: v for k, v in header.items()  # the container adds these itself
                  if k not in ("format_version", "header_sha256", "sha256", "tensors")}
        tensors, header, result = fn(dict(tensors), header, task["node_result"], msg)
        return flower_app.Message(flower_app._pack(checkpoint_bytes(tensors, header), {"node_result": result}),
                                  reply_to=msg)
    return tamper


@pytest.mark.parametrize("sharing", ["shared", "fedavg"])
def test_replies_with_foreign_keys_or_wrong_weights_are_refused(prepared, sharing, tmp_path):
    """shared: a lent slice comes back; fedavg (node-resident): parameters come back. Either way a
    reply with state it was not lent, moments it must not send, or wrong weights is refused."""
    resident = sharing == "fedavg"
    sections = {"federation": {"sharing": sharing}}
    template, _ = _federation(prepared, **sections).stores["server"].state_dict()

    def extra_key(tensors, header, result, msg):
        foreign = next(n for n in template if not flower_app._of_keys(n, header["keys"])
                       and "/param/" in n)
        tensors[foreign] = template[foreign]
        return tensors, header, result

    def moments(tensors, header, result, msg):  # fedavg: optimizer state must never come back
        param = next(n for n in tensors if "/param/" in n)  # its exp_avg, named as the store names it
        tensors[param.replace("/param/", "/optim/") + "/exp_avg"] = torch.zeros_like(tensors[param])
        return tensors, header, result

    def inflated(tensors, header, result, msg):
        result["samples_per_key"] = {k: v * 10 for k, v in result["samples_per_key"].items()}
        return tensors, header, result

    def impostor(tensors, header, result, msg):
        result["node"] = "node/000"
        return tensors, header, result

    cases = [(extra_key, "other parameters than those of its keys" if resident else "state of keys it was not lent"),
             (inflated, "samples_per_key"), (impostor, "its result names 'node/000'")]
    if resident:
        cases.append((moments, "carries tensors other than parameters"))
    for i, (fn, what) in enumerate(cases):
        grid = _grid()
        grid.tamper = lambda reply, msg, fn=fn: (_retamper(fn)(reply, msg)
                                                 if grid.nodes.get(msg.metadata.dst_node_id) == 1 else reply)
        fed = _federation(prepared, tmp_path / f"nodes{i}" if resident else None, **sections)
        start = fed.stores["server"].parameter_tensors()
        with pytest.raises(Feda2vError) as e:
            _run(fed, grid, rounds=1)
        assert str(e.value).startswith("node node/001 (partition 1) sent an invalid reply: ")
        assert what in str(e.value) and "\n" not in str(e.value)
        if resident:  # refused before the average: the server's store and records are untouched
            assert all(torch.equal(start[k], v) for k, v in fed.stores["server"].parameter_tensors().items())
            assert fed.node_rounds == {"node/000": 1, "node/001": 0, "node/002": 0}


# -- node-resident stores (local, fedavg) ---------------------------------------------------------------
class RecordingGrid(FakeGrid):
    """Also keeps every reply's store payload (bytes) and task JSON."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reply_payloads: list = []

    def pull_messages(self, ids):
        out = super().pull_messages(ids)
        for m in out:
            if "task" in m.content and "node_result" in m.content["task"]["json"]:
                blob = m.content["state"]["ckpt"].data if "state" in m.content else b""
                self.reply_payloads.append((blob, m.content["task"]["json"]))
        return out


@pytest.mark.parametrize("sharing", ["shared", "local", "fedavg"])
def test_optimizer_moments_travel_only_with_the_relay(prepared, sharing, tmp_path):
    """Bytes on the wire, both ways: the relay lends its moments (the mode's point); fedavg sends
    the visit keys' parameters only; local sends no store state at all."""
    from feda2v.checkpoint.container import read_checkpoint_bytes

    resident = sharing != "shared"
    fed = _federation(prepared, tmp_path / "nodes" if resident else None, federation={"sharing": sharing})
    grid = RecordingGrid({100 + p: p for p in range(NODES)})
    _run(fed, grid, rounds=2)
    out = [blob for _, kind, blob in grid.sent if kind == flower_app.MSG_TRAIN]
    back = [blob for blob, _ in grid.reply_payloads]
    assert len(out) == len(back) == 2 * NODES
    if sharing == "shared":  # the checks below can fail: moments are named in the container's header
        assert all(b"exp_avg_sq" in blob for blob in back + out[NODES:])  # (a fresh key has none yet)
    for blob in out + back:
        if sharing == "shared":
            continue
        if sharing == "local":
            assert blob == b""  # no store state either way
        else:
            assert b"exp_avg" not in blob and b"/optim/" not in blob
            tensors, header = read_checkpoint_bytes(blob, label="t")
            assert header["kind"] == flower_app.PARAMS_KIND and tensors
            # parameters and the generator's moving averages, which fedavg averages with them
            assert all(("/param/" in n or "/generator/ema/" in n) and flower_app._of_keys(n, header["keys"])
                       for n in tensors)
            assert any("/generator/ema/" in n for n in tensors)
    for _, task in grid.reply_payloads:
        assert "exp_avg" not in task and "param" not in task  # results only
    if resident:  # and the moments are on the nodes, trained
        for node, (t, _) in node_states(fed).items():
            assert any("exp_avg_sq" in n and t[n].abs().sum() > 0 for n in t), node


def test_node_checkpoints_are_verified_round_files(prepared, tmp_path):
    from feda2v.checkpoint import read_run_state, verify_checkpoint

    fed = _federation(prepared, tmp_path / "nodes", federation={"sharing": "fedavg"})
    _run(fed, _grid(), rounds=3)
    assert fed.stores.keys() == {"server"} and fed.node_rounds == {f"node/{i:03d}": 3 for i in range(NODES)}
    d = _node_dir(fed, "node/001")
    # checkpoint.every=1: the newest every + 1 = 2 rounds stay (a server crash before its round-3
    # checkpoint resumes from round 2, which the nodes still hold)
    assert sorted(p.name for p in d.iterdir()) == ["latest.ckpt", "round_000002.ckpt", "round_000003.ckpt"]
    for name in ("round_000002.ckpt", "round_000003.ckpt"):
        assert verify_checkpoint(d / name)["round"] == int(name[6:12])
    state = read_run_state(d / "latest.ckpt")
    assert (state.round, list(state.stores), state.primary_store) == (3, ["node/001"], "node/001")
    assert state.data_manifest_hash == fed.data.manifest_hash
    # the server's checkpoint records each node's state round, not the node stores
    server = fed.state_dict()
    assert list(server.stores) == ["server"] and server.extra["node_rounds"] == fed.node_rounds
    # a damaged node file is refused in one line naming the node (never skipped as a lost node)
    b = bytearray((d / "round_000003.ckpt").read_bytes())
    b[-7] ^= 1
    (d / "round_000003.ckpt").write_bytes(bytes(b))
    with pytest.raises(Feda2vError) as e:
        flower_app.GridRounds(_grid(), fed).run_round(4)
    msg = str(e.value)
    assert msg.startswith("node node/001 (partition 1) refused round 4: ") and "\n" not in msg
    assert "round_000003.ckpt" in msg


def test_a_crashed_node_write_leaves_its_previous_state(prepared, tmp_path, monkeypatch):
    """The node's file is written atomically: a write that dies leaves round 1 whole and latest on it."""
    import feda2v.checkpoint.container as container
    from feda2v.checkpoint import read_run_state

    fed = _federation(prepared, tmp_path / "nodes", federation={"sharing": "local"})
    rounds = flower_app.GridRounds(_grid(), fed)
    rounds.run_round(1)
    d = _node_dir(fed, "node/000")
    before = (d / "round_000001.ckpt").read_bytes()
    real = container.os.replace

    def dies(src, dst, *a, **kw):
        if str(dst).endswith("round_000002.ckpt"):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(container.os, "replace", dies)
    with pytest.raises(Feda2vError, match=r"^node node/000 \(partition 0\) refused round 2: "):
        rounds.run_round(2)
    monkeypatch.undo()
    assert sorted(p.name for p in d.iterdir()) == ["latest.ckpt", "round_000001.ckpt"]
    assert (d / "round_000001.ckpt").read_bytes() == before and read_run_state(d / "latest.ckpt").round == 1


def _crash_after_round_2(prepared, tmp_path, sections, rounds):
    """The in-process reference over ``rounds`` rounds, and a node-resident federation whose server
    saved tmp_path/server2.ckpt after round 2, then ran on to ``rounds`` and "crashed" unsaved."""
    from feda2v.checkpoint.runstate import write_run_state

    ref = _federation(prepared, **sections)
    _inprocess(ref, rounds=rounds)
    fed = _federation(prepared, tmp_path / "nodes", **sections)
    grid_rounds = flower_app.GridRounds(_grid(), fed)
    for r in range(1, rounds + 1):
        grid_rounds.run_round(r)
        if r == 2:
            write_run_state(tmp_path / "server2.ckpt", fed.state_dict())
    return ref, fed


@pytest.mark.parametrize("sharing", ["local", "fedavg"])
def test_resume_after_a_server_crash_between_node_and_server_checkpoints(prepared, sharing, tmp_path):
    """Nodes wrote round 3, the server died before its round-3 checkpoint: resuming from the
    round-2 server checkpoint trains round 3 again from the nodes' round-2 state, bit for bit."""
    from feda2v.checkpoint.runstate import read_run_state

    sections = {"federation": {"sharing": sharing}}
    ref, fed = _crash_after_round_2(prepared, tmp_path, sections, rounds=3)  # nodes wrote round 3
    again = _federation(prepared, tmp_path / "nodes", **sections)
    state = read_run_state(tmp_path / "server2.ckpt")
    assert state.extra["node_rounds"] == {f"node/{i:03d}": 2 for i in range(NODES)}
    again.load_state_dict(state)
    flower_app.GridRounds(_grid(), again).run_round(3)
    assert_same_state(ref, again)

    # a node whose state is from another round than the server's records is refused in one line
    (_node_dir(fed, "node/002") / "round_000002.ckpt").unlink()
    third = _federation(prepared, tmp_path / "nodes", **sections)
    third.load_state_dict(state)
    with pytest.raises(Feda2vError) as e:
        flower_app.GridRounds(_grid(), third).run_round(3)
    msg = str(e.value)
    assert msg.startswith("node node/002 (partition 2) refused round 3: node node/002 holds no state of "
                          "round 2 in ") and "(it holds rounds 3)" in msg and "\n" not in msg


def test_checkpoint_every_n_rounds_nodes_keep_what_the_last_server_checkpoint_names(prepared, tmp_path):
    """checkpoint.every=2: the server's last checkpoint (round 2) names the nodes' round-2 state
    while the nodes go on to write rounds 3 and 4; they keep every + 1 = 3 files, so a crash
    before the server's round-4 checkpoint resumes from round 2, bit for bit."""
    from feda2v.checkpoint.runstate import read_run_state

    sections = {"federation": {"sharing": "fedavg"}, "checkpoint": {"every": 2}}
    ref, fed = _crash_after_round_2(prepared, tmp_path, sections, rounds=4)
    assert sorted(p.name for p in _node_dir(fed, "node/001").glob("round_*")) == [
        "round_000002.ckpt", "round_000003.ckpt", "round_000004.ckpt"]
    again = _federation(prepared, tmp_path / "nodes", **sections)
    again.load_state_dict(read_run_state(tmp_path / "server2.ckpt"))
    resumed = flower_app.GridRounds(_grid(), again)
    for r in (3, 4):
        resumed.run_round(r)
    assert_same_state(ref, again)


def test_runs_sharing_a_sites_state_dir_keep_their_node_states_apart(prepared, tmp_path):
    """A SuperNode's state-dir belongs to the site, not to one run: a second run (another server
    checkpoint.dir) writes its own run folder and never touches the first run's files."""
    from feda2v.checkpoint.nodestate import NodeStateError, diff_with_nodes
    from feda2v.checkpoint.runstate import write_run_state

    site = tmp_path / "site_state"
    sections = {"federation": {"sharing": "fedavg"}}
    first = _federation(prepared, site, checkpoint={"dir": str(tmp_path / "run1")}, **sections)
    _run(first, _grid(), rounds=2)
    before = {p: p.read_bytes() for p in site.rglob("*.ckpt")}
    second = _federation(prepared, site, checkpoint={"dir": str(tmp_path / "run2")}, **sections)
    again = flower_app.GridRounds(_grid(), second)
    again.run_round(1)
    assert all(p.read_bytes() == b for p, b in before.items())  # the first run's files are untouched
    assert sorted(p.name for p in site.iterdir()) == sorted([_scope(first), _scope(second)])
    # diff --nodes SITE finds the run's own node files (round, config and data of the server's checkpoint)
    ref = _federation(prepared, **sections)
    _inprocess(ref, rounds=2)
    ip, fl = tmp_path / "ip.ckpt", tmp_path / "fl.ckpt"
    write_run_state(ip, ref.state_dict())
    write_run_state(fl, first.state_dict())
    assert diff_with_nodes(ip, fl, [site]) == []
    # two runs of one config holding the same round: no guess; the run's folder says which
    again.run_round(2)
    with pytest.raises(NodeStateError, match=r"several runs of this config hold round 2"):
        diff_with_nodes(ip, fl, [site])
    assert diff_with_nodes(ip, fl, [site / _scope(first)]) == []


def test_node_resident_and_in_process_checkpoints_do_not_mix(prepared, tmp_path):
    from feda2v.errors import CheckpointError

    sections = {"federation": {"sharing": "fedavg"}}
    ip, fl = _federation(prepared, **sections), _federation(prepared, tmp_path / "nodes", **sections)
    with pytest.raises(CheckpointError, match="resume it with federation.engine=inprocess"):
        fl.load_state_dict(ip.state_dict())
    with pytest.raises(CheckpointError, match="resume it with federation.engine=flower"):
        ip.load_state_dict(fl.state_dict())
    # sharing=local on Flower: the server holds no store; its checkpoint still writes, reads, resumes
    from feda2v.checkpoint import read_primary_store
    from feda2v.checkpoint.runstate import read_run_state, write_run_state

    loc = _federation(prepared, tmp_path / "nodes", federation={"sharing": "local"})
    _run(loc, _grid(), rounds=1)
    write_run_state(tmp_path / "local.ckpt", loc.state_dict())
    state = read_run_state(tmp_path / "local.ckpt")
    assert (state.stores, state.primary_store, state.extra["node_rounds"]["node/001"]) == ({}, None, 1)
    with pytest.raises(CheckpointError, match=r"holds no generator store: every node's store lives on its node"):
        read_primary_store(tmp_path / "local.ckpt")
    back = _federation(prepared, tmp_path / "nodes", federation={"sharing": "local"})
    back.load_state_dict(state)
    assert back.node_rounds == loc.node_rounds


# -- data locality ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles(prepared, tmp_path_factory):
    from feda2v.data.sites import write_site_bundles

    out = tmp_path_factory.mktemp("sites")
    write_site_bundles(prepared, out)
    return out


def test_site_bundles_hold_one_partition_and_verify_alone(prepared, bundles, tmp_path):
    from feda2v.data import load_prepared
    from feda2v.data.sites import load_partition

    full = load_prepared(prepared)
    for i in range(NODES):
        site_dir = tmp_path / f"site{i}"
        shutil.copytree(bundles / f"node_{i:03d}", site_dir)  # alone, away from everything else
        assert sorted(p.name for p in site_dir.iterdir()) == ["conditions.safetensors",
                                                              f"node_{i:03d}.safetensors", "site.json"]
        site = load_partition(site_dir, i, manifest_hash=full.manifest_hash)
        assert torch.equal(site.node.train_x, full.nodes[i].train_x)
        assert torch.equal(site.conditions, full.conditions)
    with pytest.raises(DataError, match=r"partition 2 .* holds partition 1"):
        load_partition(tmp_path / "site1", 2)
    with pytest.raises(DataError, match=r"partition 1 .*manifest hash"):
        load_partition(tmp_path / "site1", 1, manifest_hash="0" * 64)
    node_file = tmp_path / "site1" / "node_001.safetensors"
    b = bytearray(node_file.read_bytes())
    b[-5] ^= 1
    node_file.write_bytes(bytes(b))
    with pytest.raises(DataError, match=r"^site data for partition 1 at .*site1 has a corrupted node_001"):
        load_partition(tmp_path / "site1", 1)


def test_site_bundles_are_byte_reproducible(prepared, bundles, tmp_path):
    from feda2v.data.sites import write_site_bundles

    write_site_bundles(prepared, tmp_path)
    for d in [f"node_{i:03d}" for i in range(NODES)] + ["server"]:
        assert sorted(f.name for f in (tmp_path / d).iterdir()) == sorted(f.name for f in (bundles / d).iterdir())
        for f in (bundles / d).iterdir():
            assert (tmp_path / d / f.name).read_bytes() == f.read_bytes()


# the server's bundle: manifest, conditions and the partitions' test splits alone (never a training sample)
SERVER_BUNDLE = sorted(["conditions.safetensors", "manifest.json", "test_splits.json"]
                       + [f"test_{i:03d}.safetensors" for i in range(NODES)])


def _copy_sites(bundles, tmp_path):
    """Each site's bundle and the server's bundle, each in a folder of its own:
    ({partition: site dir}, server dir)."""
    dirs = {i: tmp_path / f"site{i}" for i in range(NODES)}
    for i, d in dirs.items():
        shutil.copytree(bundles / f"node_{i:03d}", d)
    server = tmp_path / "server"
    shutil.copytree(bundles / "server", server)
    return dirs, server


@pytest.mark.parametrize("sharing", ["shared", "fedavg"])
def test_nodes_read_only_their_own_bundle(prepared, bundles, tmp_path, sharing):
    """Each node's data-dir holds only its bundle, the server's prepared dir only the manifest and
    conditions (bundles/server); the rounds are still bit-identical."""
    dirs, server = _copy_sites(bundles, tmp_path)
    assert sorted(p.name for p in server.iterdir()) == SERVER_BUNDLE
    sections = {"federation": {"sharing": sharing}}
    ref, fed = _federation(prepared, **sections), _federation(server, tmp_path / "nodes", **sections)
    _inprocess(ref)
    _run(fed, _grid(data_dirs=dirs))
    assert_same_state(ref, fed)
    assert fed.data.manifest_hash == ref.data.manifest_hash
    with pytest.raises(DataError, match=r"^partition 1's training samples stay on its site"):
        fed.data.nodes[1].train_x
    if sharing == "shared":
        return
    (dirs[2] / "node_002.safetensors").unlink()
    flower_app._DATA_CACHE.clear()
    with pytest.raises(DataError, match=r"^site data for partition 2 at .*site2 is missing node_002"):
        _run(_federation(server, tmp_path / "again", **sections), _grid(data_dirs=dirs), rounds=1)


def test_full_mode_server_reads_test_splits_only_and_names_a_missing_partition(prepared, bundles, tmp_path):
    """Full mode's server evaluates on the partitions' test splits: from a plain prepared dir it reads
    them from the node files (verified against the manifest); one that is absent is one line naming
    the partition."""
    from feda2v.data.prepared import load_server_view

    view = load_server_view(prepared, test_sets=True)
    full = _federation(prepared).data
    assert all(torch.equal(v.test_x, n.test_x) and torch.equal(v.test_y, n.test_y)
               for v, n in zip(view.nodes, full.nodes))
    server = tmp_path / "server"
    shutil.copytree(bundles / "server", server)
    (server / "test_splits.json").unlink()  # manifest and conditions only: a plain server folder
    for f in server.glob("test_*.safetensors"):
        f.unlink()
    load_server_view(server)  # generator_only: manifest and conditions are enough
    with pytest.raises(DataError) as e:
        load_server_view(server, test_sets=True)
    assert str(e.value).startswith(f"prepared data {server} is missing node_000.safetensors (partition 0's test split")
    assert "\n" not in str(e.value)


def test_server_bundle_alone_holds_the_test_splits_verified_against_the_manifest(prepared, bundles, tmp_path):
    """DIR/server/ holds each partition's test split alone (no training sample), bit-identical to the
    node files', tied to the manifest by test_splits.json; a damaged, missing or unlisted split is
    one line naming the partition and the server's folder."""

    from safetensors.torch import load_file

    from feda2v.data.prepared import load_server_view

    server = tmp_path / "server"
    shutil.copytree(bundles / "server", server)
    assert sorted(p.name for p in server.iterdir()) == SERVER_BUNDLE
    assert all(sorted(load_file(f)) == ["test_x", "test_y"] for f in server.glob("test_*.safetensors"))
    view = load_server_view(server, test_sets=True)
    full = _federation(prepared).data
    assert view.manifest_hash == full.manifest_hash
    assert all(torch.equal(v.test_x, n.test_x) and torch.equal(v.test_y, n.test_y)
               for v, n in zip(view.nodes, full.nodes))

    def fails(pattern):
        with pytest.raises(DataError) as e:
            load_server_view(server, test_sets=True)
        assert re.match(pattern, str(e.value)), str(e.value)
        assert "\n" not in str(e.value)

    split = server / "test_001.safetensors"
    good = split.read_bytes()
    b = bytearray(good)
    b[-5] ^= 1
    split.write_bytes(bytes(b))
    fails(rf"^server data {re.escape(str(server))} has a corrupted test_001.safetensors \(sha256 differs from "
          r"test_splits.json\) \(partition 1's test split.*DIR/server/\)$")
    split.unlink()
    fails(r"^server data .* is missing test_001.safetensors \(partition 1's test split")
    split.write_bytes(good)
    index = json.loads((server / "test_splits.json").read_text())
    del index["files"]["test_002.safetensors"]
    (server / "test_splits.json").write_text(json.dumps(index))
    fails(r"^server data .* has a test_splits.json that does not list test_002.safetensors \(partition 2's")
    index["manifest_hash"] = "0" * 64
    (server / "test_splits.json").write_text(json.dumps(index))
    fails(r"^server data .* has a test_splits.json of other prepared data \(manifest hash 000000000000")
    (server / "test_splits.json").write_text("{")
    fails(r"^server data .* has a damaged test_splits.json")


@pytest.mark.parametrize("sharing", ["shared", "fedavg"])
def test_full_mode_runs_on_the_server_bundle_alone(prepared, bundles, tmp_path, sharing):
    """Full mode with the server's prepared dir = DIR/server/ only (no node file) and each node its
    own bundle: generators, classifier and downstream metrics bit-identical to in-process."""
    dirs, server = _copy_sites(bundles, tmp_path)
    assert not list(server.glob("node_*"))
    sections = {"federation": {"sharing": sharing, "mode": "full"}}
    ref, fed = _federation(prepared, **sections), _federation(server, tmp_path / "nodes", **sections)
    want = _inprocess(ref)
    got = _run(fed, _grid(data_dirs=dirs))
    assert_same_state(ref, fed)
    assert all(torch.equal(a, b) for a, b in zip(ref.classifier.state_dict().values(),
                                                 fed.classifier.state_dict().values()))
    assert [g.downstream for g in got] == [w.downstream for w in want]
