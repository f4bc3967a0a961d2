"""A real cross-site Flower deployment on one machine (scripts/flower_netns.sh): a SuperLink and three
SuperNodes, each in its own network namespace (veth pairs to a bridge inside the SuperLink's
namespace), TLS from a CA made by the test, SuperNode authentication with a key per SuperNode
registered before it starts, and each SuperNode able to read only its own site bundle (the
server's folder and the other sites are hidden in its mount namespace). The SuperLink's namespace
holds no partition either (the sites' folder, with the whole prepared data of the in-process
reference, is hidden there): the server of a run reads only the site bundles' ``server/``: the
manifest, the conditions and (what full mode's server evaluates on) the partitions' test splits, no
training sample.

For shared relay, fedavg and full mode (over fedavg) the deployed run's checkpoints are
bit-identical to the in-process engine's, every round (``feda2v-ckpt diff``, with ``--nodes`` for
the stores fedavg keeps on the nodes). A SuperNode SIGKILLed while it holds a visit: with
``on_node_failure=skip`` the run finishes and records who was missing (round metric
``nodes_missing``, checkpoint header ``missing_nodes``); with ``fail`` it exits non-zero with one
line on stderr. Every checkpoint verifies either way. The module's fixture stops every process it
started by PID and deletes its namespaces, also when a test fails.

Needs root and iproute2 (CI runs as root; scripts/setup.sh installs iproute2). Takes 4-7 min on a
busy 2-core machine: every Flower message starts a fresh flwr-clientapp process that imports torch.
"""
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli
from feda2v.checkpoint import read_checkpoint, verify_checkpoint
from feda2v.checkpoint.nodestate import diff_with_nodes
from feda2v.config import load_config, to_plain

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]

NODES = 3
SCRIPT = ROOT / "scripts" / "flower_netns.sh"
KILLED = 2  # the partition whose SuperNode is SIGKILLed
LOST_TIMEOUT_S = 30.0  # reply_timeout_s in the failure tests: one visit takes 2-8 s here


def _raw(work: Path, **federation) -> dict:
    return {
        "seed": 0,
        "data": {"name": "digits", "nodes": NODES, "condition": "onehot", "prepared_dir": str(work / "prepared"),
                 "max_samples": 300, "partition": {"scheme": "classes_per_node", "classes_per_node": 4}},
        "generator": {"hidden_dim": 32, "latent_dim": 8, "beta_warmup_steps": 10},
        "federation": {"rounds": 2, "batch_size": 64, "local_epochs": 1, "sharing": "shared", **federation},
        "checkpoint": {"every": 1, "keep_last": 5},
        "train": {"progress": "lines"},
        "tracking": {"enabled": False},
    }


def _deployed(raw: dict, server: Path) -> dict:
    """The server holds no partition: the manifest, the conditions and the test splits (full mode's
    held-out set) of the site bundles' server/ are its whole data."""
    raw = json.loads(json.dumps(raw))
    raw["data"]["prepared_dir"] = str(server / "bundle")
    return raw


def _with_dirs(raw: dict, run_dir: Path) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["checkpoint"]["dir"] = str(run_dir / "ckpt")
    raw["train"]["reports_dir"] = str(run_dir / "reports")
    raw["train"]["metrics_path"] = str(run_dir / "train_metrics.json")
    raw["train"]["timing_path"] = str(run_dir / "timing.json")
    return raw


class Deployment:
    def __init__(self, work: Path):
        self.work = work  # deployment state: TLS, keys, logs, PIDs (scripts/flower_netns.sh up)
        self.server = work / "server"  # what the SuperLink's site holds (hidden from SuperNodes)
        self.sites = work / "sites"  # site bundles, each visible to its SuperNode only

    def sh(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), args[0], str(self.work / "deploy"), *map(str, args[1:])],
                              capture_output=True, text=True, timeout=timeout)

    def node_states(self) -> list[Path]:
        """Where each SuperNode keeps its own store (node config state-dir; local/fedavg)."""
        return [self.work / "deploy" / "state" / f"site{i}" for i in range(NODES)]

    def node_log(self, i: int) -> Path:
        return self.work / "deploy" / "logs" / f"supernode{i}.log"

    def restart_until_active(self, i: int) -> bool:
        """Start SuperNode ``i`` again as a supervisor would (systemd Restart=always) until the SuperLink
        takes it: under SuperNode authentication its node id belongs to its key, and Flower refuses
        to activate that id (the SuperNode exits 305) while the killed session still counts as
        online, up to 2 missed heartbeats x 30 s."""
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            offset = self.node_log(i).stat().st_size
            if self.sh("start-node", i).returncode != 0:
                return False
            until = time.monotonic() + 30
            while time.monotonic() < until:
                with open(self.node_log(i), "rb") as f:
                    f.seek(offset)
                    text = f.read()
                if b"SuperNode ID:" in text:  # connected and activated
                    return True
                if b"Exit Code:" in text:  # refused: try again in a while
                    break
                time.sleep(0.2)
            time.sleep(5)
        return False

    def run(self, name: str, raw: dict, *, kill_on: str | None = None) -> tuple[subprocess.CompletedProcess, Path]:
        """`flwr run` of ``raw`` in the SuperLink's namespace. ``kill_on``: SIGKILL SuperNode KILLED
        as soon as its log shows it received that message (a node holding a visit)."""
        run_dir = self.server / "runs" / name
        run_dir.mkdir(parents=True)
        cfg = run_dir / "config.json"
        cfg.write_text(json.dumps(to_plain(load_config(_with_dirs(_deployed(raw, self.server), run_dir))), indent=1))
        killer = None
        if kill_on:
            killer = _Killer(self, self.node_log(KILLED), kill_on)
            killer.start()
        res = subprocess.run(["bash", str(SCRIPT), "run", str(self.work / "deploy"), str(cfg), str(run_dir)],
                             capture_output=True, text=True, timeout=600)
        if killer:
            killer.stop.set()
            killer.join()
            assert killer.killed, f"SuperNode {KILLED} never received {kill_on!r}:\n{res.stdout[-3000:]}"
        return res, run_dir


class _Killer(threading.Thread):
    """Watches a SuperNode's log from now on; at the first line containing ``needle`` the node
    holds a visit it has not answered: SIGKILL its PID (flower_netns.sh kill-node)."""

    def __init__(self, dep: Deployment, log: Path, needle: str):
        super().__init__(daemon=True)
        self.dep, self.log, self.needle = dep, log, needle
        self.offset = log.stat().st_size
        self.stop, self.killed = threading.Event(), False

    def run(self):
        while not self.stop.is_set():
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                if self.needle.encode() in f.read():
                    time.sleep(0.5)  # the visit's flwr-clientapp is starting: mid-visit
                    self.killed = self.dep.sh("kill-node", KILLED).returncode == 0
                    return
            time.sleep(0.05)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, request):
    from feda2v.data import prepare
    from feda2v.data.sites import write_site_bundles

    if shutil.which("ip") is None:
        pytest.fail("iproute2's 'ip' is missing; scripts/setup.sh installs it")
    dep = Deployment(tmp_path_factory.mktemp("netns"))
    prepare(load_config(_raw(dep.sites)))
    # the whole prepared folder (the in-process reference's data) sits beside the bundles: hidden
    # in the SuperLink's namespace (SITES_DIR) and in every SuperNode's (not its own bundle)
    write_site_bundles(dep.sites / "prepared", dep.sites)
    # what the server reads, in every mode: manifest, conditions, test splits (sites.py)
    shutil.copytree(dep.sites / "server", dep.server / "bundle")
    assert not list((dep.server / "bundle").glob("node_*"))
    # registered before `up`: a failed start-up is torn down too (every PID in the namespaces)
    request.addfinalizer(lambda: dep.sh("down", timeout=60))
    up = dep.sh("up", dep.server, dep.sites, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    yield dep
    down = dep.sh("down", timeout=60)
    assert down.returncode == 0, down.stderr
    state = (dep.work / "deploy" / "state.env")
    assert not state.exists()


def _inprocess(dep: Deployment, name: str, raw: dict) -> Path:
    from feda2v.pipeline.train import train

    run_dir = dep.work / "inprocess" / name
    raw = _with_dirs(raw, run_dir)
    raw["federation"]["engine"] = "inprocess"
    train(load_config(raw))
    return run_dir


def _log(run_dir: Path) -> str:
    return (run_dir / "flwr_run.log").read_text()


def _finished(run_dir: Path) -> dict:
    """The summary of the job's finish line in the `flwr run` log."""
    m = re.search(r"feda2v: flower deployment run finished: (\{.*\})", _log(run_dir))
    assert m, _log(run_dir)[-4000:]
    return json.loads(m.group(1))


def _verify_all(run_dir: Path) -> list[Path]:
    """Every checkpoint of the run verifies (``latest`` through ``feda2v-ckpt verify``)."""
    ckpts = sorted((run_dir / "ckpt").glob("round_*.ckpt"))
    for p in ckpts:
        verify_checkpoint(p)
    v = subprocess.run([cli("feda2v-ckpt"), "verify", str(run_dir / "ckpt" / "latest.ckpt")],
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    return ckpts


def _same_as_inprocess(dep: Deployment, name: str, raw: dict) -> None:
    res, run_dir = dep.run(name, raw)
    assert res.returncode == 0, res.stderr + _log(run_dir)[-4000:]
    assert _finished(run_dir)["nodes_missing"] == 0.0
    ref = _inprocess(dep, name, raw)
    deployed = _verify_all(run_dir)
    assert [p.name for p in deployed] == [f"round_{r:06d}.ckpt" for r in range(1, raw["federation"]["rounds"] + 1)]
    # node-resident stores (fedavg): the server's checkpoint names each node's round, the node's
    # own checkpoint in its state dir holds its store; compared with them filled in
    nodes = [str(d) for d in dep.node_states()] if raw["federation"]["sharing"] != "shared" else []
    for p in deployed:  # every round's state, not only the last
        assert diff_with_nodes(ref / "ckpt" / p.name, p, nodes) == [], p.name
    d = subprocess.run([cli("feda2v-ckpt"), "diff", str(ref / "ckpt" / "latest.ckpt"),
                        str(run_dir / "ckpt" / "latest.ckpt"), *(["--nodes", *nodes] if nodes else [])],
                       capture_output=True, text=True)
    assert d.returncode == 0 and "identical" in d.stdout, d.stdout[-2000:] + d.stderr


def test_every_supernode_sees_only_its_own_site(deployment):
    """The SuperNodes hold their own bundle only: in each one's mount namespace the server's folder
    and the other sites' bundles and state dirs are empty; each runs in its own network namespace."""
    dep = deployment
    states = dep.node_states()
    for d in states:  # something to hide (removed below: the nodes own these folders)
        (d / "visible-to-owner-only").write_text("x")
    for i in range(NODES):
        pid = int(dep.sh("pid", i).stdout)
        root = f"/proc/{pid}/root"  # the SuperNode's own view of the file system
        listing = {d.name: sorted(os.listdir(f"{root}{dep.sites}/{d.name}")) for d in dep.sites.iterdir()}
        assert listing[f"node_{i:03d}"] == ["conditions.safetensors", f"node_{i:03d}.safetensors", "site.json"]
        assert all(v == [] for k, v in listing.items() if k != f"node_{i:03d}"), listing
        assert os.listdir(f"{root}{dep.server}") == []
        assert all(os.listdir(f"{root}{d}") == [] for j, d in enumerate(states) if j != i)
        assert os.listdir(f"{root}{states[i]}") == ["visible-to-owner-only"]
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    for d in states:
        (d / "visible-to-owner-only").unlink()
    # the SuperLink (and the ServerApp it runs) sees no site's data: only the server's folder
    link = int((dep.work / "deploy" / "pids" / "link").read_text())
    root = f"/proc/{link}/root"
    assert os.listdir(f"{root}{dep.sites}") == []
    assert "bundle" in os.listdir(f"{root}{dep.server}")
    assert not list(dep.server.rglob("node_*.safetensors"))  # nothing under it holds a partition
    assert (dep.work / "deploy" / "logs" / "register.log").read_text().count("registered successfully") == NODES


def test_shared_relay_is_bit_identical_to_inprocess(deployment):
    _same_as_inprocess(deployment, "shared", _raw(deployment.sites, sharing="shared"))


def test_fedavg_is_bit_identical_to_inprocess(deployment):
    """Generator-only fedavg: each node's store stays in its state dir, only parameters travel."""
    _same_as_inprocess(deployment, "fedavg", _raw(deployment.sites, sharing="fedavg"))


def test_full_mode_with_fedavg_is_bit_identical_to_inprocess(deployment):
    """Full mode over fedavg: every round each node trains its own node-resident store (kept in its
    state dir; only the parameters of its keys travel) and the server averages them (fedavg's very
    messages and merge), then the nodes' classifiers are averaged and the server distils."""
    _same_as_inprocess(deployment, "full", _raw(deployment.sites, sharing="fedavg", mode="full",
                                                 classifier_hidden=32))


def _failing(dep: Deployment, policy: str) -> dict:
    # shared relay: one visit at a time, so a healthy visit is far inside the reply timeout even on
    # a busy machine (parallel fedavg visits took up to 23 s there)
    return _raw(dep.sites, sharing="shared",
                flower={"on_node_failure": policy, "reply_timeout_s": LOST_TIMEOUT_S})


def test_a_killed_supernode_is_skipped_and_recorded(deployment):
    dep = deployment
    res, run_dir = dep.run("skip", _failing(dep, "skip"), kill_on="Receiving: train.generators")
    assert res.returncode == 0, res.stderr + _log(run_dir)[-4000:]
    lost = f"node/{KILLED:03d}"
    assert _finished(run_dir)["nodes_missing"] == 1.0  # the last round's metric
    ckpts = _verify_all(run_dir)
    assert len(ckpts) == 2
    for p in ckpts:
        _, header = read_checkpoint(p)
        # killed in round 1 and never back: missing from every round up to the checkpoint's
        assert header["missing_nodes"] == {str(r): [lost] for r in range(1, header["round"] + 1)}
    assert dep.restart_until_active(KILLED), "SuperNode did not come back"  # for the next tests


def test_a_killed_supernode_fails_the_run_in_one_line(deployment):
    dep = deployment
    # killed in round 2: round 1's checkpoint exists and must stay intact
    res, run_dir = dep.run("fail", _failing(dep, "fail"), kill_on="ROUND 2]")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("feda2v: error: ") and f"node/{KILLED:03d}" in lines[0], res.stderr
    assert "on_node_failure=fail" in lines[0]
    ckpts = _verify_all(run_dir)
    assert ckpts, "round 1 finished before the kill: its checkpoint must exist"
