"""Flower rounds over a Grid without Flower's runtime: a fake Grid delivers each message to the real
ClientApp handlers in this process, so slices, reply validation, the failure policy and data
locality are tested fast and bit for bit against the in-process engine."""
import json
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


def _federation(prepared, **sections):
    from feda2v.data import load_prepared
    from feda2v.federation.server import Federation

    return Federation(load_config(_raw(prepared, **sections)), load_prepared(prepared))


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


def assert_same_state(a, b):
    sa, sb = _state(a), _state(b)
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
def test_grid_rounds_are_bit_identical_to_in_process(prepared, sharing, granularity):
    """shared + unified: the one relayed key meets new classes at each node, so resets happen
    (their log must travel back)."""
    sections = {"federation": {"sharing": sharing}, "generator": {"granularity": granularity}}
    ref, fed = _federation(prepared, **sections), _federation(prepared, **sections)
    want = _inprocess(ref)
    got = _run(fed, _grid())
    assert_same_state(ref, fed)
    if (sharing, granularity) == ("shared", "unified"):  # the relayed key meets new classes
        assert len(fed.stores["server"].events) > 0
    for w, g in zip(want, got):
        assert [n.node for n in g.nodes] == [n.node for n in w.nodes]
        assert {k: v for k, v in g.metrics.items() if "seconds" not in k and "share" not in k} == \
               {k: v for k, v in w.metrics.items() if "seconds" not in k and "share" not in k}
        assert g.missing == [] and g.metrics["nodes_missing"] == 0.0


@pytest.mark.parametrize("sharing", ["shared", "fedavg"])
def test_full_mode_classifiers_train_on_the_nodes_bit_identically(prepared, sharing):
    sections = {"federation": {"sharing": sharing, "mode": "full"}}
    ref, fed = _federation(prepared, **sections), _federation(prepared, **sections)
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
    ref, fed = _federation(prepared, **sections), _federation(prepared, **sections)
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


def test_skip_then_a_restarted_node_rejoins_by_partition(prepared):
    sections = {"federation": {"flower": {"on_node_failure": "skip"}, "sharing": "fedavg"}}
    ref, fed = _federation(prepared, **sections), _federation(prepared, **sections)
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


def test_wait_policy_resends_to_the_restarted_node(prepared):
    sections = {"federation": {"flower": {"on_node_failure": "wait", "retries": 1}}}
    ref, fed = _federation(prepared, **sections), _federation(prepared, **sections)
    grid = _grid()
    rounds = flower_app.GridRounds(grid, fed)
    grid.dead.add(101)

    def restart(g, nid):  # the lost node comes back under a new id
        g.nodes.pop(nid, None)
        g.nodes[555] = 1
        g.on_lost = None

    grid.on_lost = restart
    got = [rounds.run_round(r) for r in (1, 2)]
    _inprocess(ref)
    assert_same_state(ref, fed)  # nothing lost: the visit was trained again from the same state
    assert [g.missing for g in got] == [[], []]

    grid.dead.add(555)  # lost again, and never back: retries run out -> one line
    with pytest.raises(Feda2vError, match=r"^node node/001 \(partition 1\) .* after 1 retries; the run stops"):
        rounds.run_round(3)


def _retamper(fn):
    """Reply tampering: decode the reply's slice, let ``fn`` change (tensors, header, result), re-pack."""
    from feda2v.checkpoint.container import checkpoint_bytes

    def tamper(reply, msg):
        blob, task = flower_app._unpack(reply.content)
        tensors, header = flower_app.decode_store(blob, label="t")
        header = {k: v for k, v in header.items()  # the container adds these itself
                  if k not in ("format_version", "header_sha256", "sha256", "tensors")}
        tensors, header, result = fn(dict(tensors), header, task["node_result"], msg)
        return flower_app.Message(flower_app._pack(checkpoint_bytes(tensors, header), {"node_result": result}),
                                  reply_to=msg)
    return tamper


def test_replies_with_foreign_keys_or_wrong_weights_are_refused(prepared):
    fed = _federation(prepared, federation={"sharing": "fedavg"})

    def extra_key(tensors, header, result, msg):
        t, _ = fed.stores["server"].state_dict()
        foreign = next(n for n in t if not flower_app._of_keys(n, header["keys"]) and n != "conditions")
        tensors[foreign] = t[foreign]
        return tensors, header, result

    def inflated(tensors, header, result, msg):
        result["samples_per_key"] = {k: v * 10 for k, v in result["samples_per_key"].items()}
        return tensors, header, result

    def impostor(tensors, header, result, msg):
        result["node"] = "node/000"
        return tensors, header, result

    for fn, what in [(extra_key, "state of keys it was not lent"), (inflated, "samples_per_key"),
                     (impostor, "its result names 'node/000'")]:
        grid = _grid()
        grid.tamper = lambda reply, msg, fn=fn: (_retamper(fn)(reply, msg)
                                                 if grid.nodes.get(msg.metadata.dst_node_id) == 1 else reply)
        fed = _federation(prepared, federation={"sharing": "fedavg"})
        with pytest.raises(Feda2vError) as e:
            _run(fed, grid, rounds=1)
        assert str(e.value).startswith("node node/001 (partition 1) sent an invalid reply: ")
        assert what in str(e.value) and "\n" not in str(e.value)
        # refused before merging: node 1's store still holds what the round handed out (the global
        # parameters, untrained), while node 0's reply was merged
        glob, mine = fed.stores["server"].parameter_tensors(), fed.stores["node/001"].parameter_tensors()
        assert all(torch.equal(glob[k], mine[k]) for k in glob)
        assert any(not torch.equal(glob[k], v) for k, v in fed.stores["node/000"].parameter_tensors().items())


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
    for i in range(NODES):
        for f in (bundles / f"node_{i:03d}").iterdir():
            assert (tmp_path / f"node_{i:03d}" / f.name).read_bytes() == f.read_bytes()


def test_nodes_read_only_their_own_bundle(prepared, bundles, tmp_path):
    """Each node's data-dir holds only its bundle; the rounds are still bit-identical."""
    dirs = {}
    for i in range(NODES):
        dirs[i] = tmp_path / f"site{i}"
        shutil.copytree(bundles / f"node_{i:03d}", dirs[i])
    sections = {"federation": {"sharing": "fedavg"}}
    ref, fed = _federation(prepared, **sections), _federation(prepared, **sections)
    _inprocess(ref)
    _run(fed, _grid(data_dirs=dirs))
    assert_same_state(ref, fed)
    (dirs[2] / "node_002.safetensors").unlink()
    flower_app._DATA_CACHE.clear()
    with pytest.raises(DataError, match=r"^site data for partition 2 at .*site2 is missing node_002"):
        _run(_federation(prepared, **sections), _grid(data_dirs=dirs), rounds=1)
