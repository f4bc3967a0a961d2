"""Sharing modes are strategy objects (federation/sharing.py); no other module branches on the name."""
import ast
from pathlib import Path

import pytest
import torch

import feda2v
from feda2v.errors import ConfigError
from feda2v.federation.sharing import MODES, SERVER, sharing_mode

SRC = Path(feda2v.__file__).parent
OWNER = SRC / "federation" / "sharing.py"


def _mentions_sharing(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr == "sharing":
            return True
        if isinstance(n, ast.Name) and n.id == "sharing":
            return True
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.split(".")[-1] == "sharing":
            return True  # cfg["sharing"], fed.get("sharing"), "federation.sharing"
    return False


def _mode_names(node: ast.AST) -> set:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in MODES}


def sharing_branches(tree: ast.AST, filename: str) -> list[str]:
    """Comparisons that test the sharing mode by name: an operand mentions `sharing`, or the
    comparison is against two or more mode names (``x in ("shared", "fedavg")``)."""
    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Compare):
            operands = [n.left, *n.comparators]
            if any(_mentions_sharing(o) for o in operands) or len(_mode_names(n)) >= 2:
                hits.append(f"{filename}:{n.lineno}: {ast.unparse(n)}")
    return hits


def test_no_sharing_branch_outside_the_strategy_module():
    hits = []
    for p in sorted(SRC.rglob("*.py")):
        if p != OWNER:
            hits += sharing_branches(ast.parse(p.read_text()), str(p.relative_to(SRC)))
    assert hits == []


def test_the_branch_finder_finds_branches():
    code = ('if cfg.federation.sharing == "shared": pass\n'
            'if fed.get("sharing") != "local": pass\n'
            'if mode in ("shared", "fedavg"): pass\n'
            'if cfg.federation.mode == "full": pass\n')
    assert [h.split(":")[1] for h in sharing_branches(ast.parse(code), "x.py")] == ["1", "2", "3"]


def test_modes_answer_their_questions():
    nodes = ["node/000", "node/001"]
    shared, local, fedavg = (sharing_mode(n) for n in ("shared", "local", "fedavg"))
    assert shared.store_names(nodes) == [SERVER] and shared.store_name_for("node/001") == SERVER
    assert local.store_names(nodes) == nodes and local.store_name_for("node/001") == "node/001"
    assert fedavg.store_names(nodes) == [SERVER, *nodes] and fedavg.store_name_for("node/001") == "node/001"
    assert (shared.sequential, local.sequential, fedavg.sequential) == (True, False, False)
    assert shared.primary_store([SERVER]) == SERVER
    assert local.primary_store(nodes) == "node/000"
    assert fedavg.primary_store([SERVER, *nodes]) == SERVER
    assert (shared.has_server_store, local.has_server_store, fedavg.has_server_store) == (True, False, True)
    # what travels on a distributed engine: the relay lends its state, fedavg parameters, local nothing
    assert [(m.lends_state, m.lends_parameters, m.node_resident) for m in (shared, local, fedavg)] == [
        (True, False, False), (False, False, True), (False, True, True)]
    assert local.store_names(nodes, resident=True) == [] and local.primary_store([]) is None
    assert fedavg.store_names(nodes, resident=True) == [SERVER] and shared.store_names(nodes, resident=True) == [SERVER]
    with pytest.raises(ConfigError, match="federation.sharing='ring' is not one of shared, local, fedavg"):
        sharing_mode("ring")


def test_fedavg_rounds_start_global_and_average_by_samples(tmp_path):
    from types import SimpleNamespace

    class Store:  # just the parameter surface FedAvg touches
        spec = SimpleNamespace(classes=["a", "b"])

        def __init__(self, value):
            self.keys = ["unified"]
            self.p = {"unified/w": torch.full((2,), float(value))}

        def key_for_class(self, name):
            return "unified"

        def parameter_tensors(self):
            return {k: v.clone() for k, v in self.p.items()}

        def load_parameter_tensors(self, t):
            self.p = {k: v.clone() for k, v in t.items()}

    stores = {SERVER: Store(1.0), "node/000": Store(5.0), "node/001": Store(7.0)}
    mode = sharing_mode("fedavg")
    holds = SimpleNamespace(train_y=torch.tensor([0, 1]))
    mode.before_round(stores, [(holds, "node/000"), (holds, "node/001")])
    assert all(torch.equal(stores[n].p["unified/w"], torch.ones(2)) for n in ("node/000", "node/001"))
    stores["node/000"].p["unified/w"] = torch.full((2,), 2.0)
    stores["node/001"].p["unified/w"] = torch.full((2,), 5.0)
    results = [SimpleNamespace(node="node/000", samples_per_key={"unified": 1}),
               SimpleNamespace(node="node/001", samples_per_key={"unified": 3})]
    mode.after_round(stores, results)
    assert torch.allclose(stores[SERVER].p["unified/w"], torch.full((2,), (2.0 * 1 + 5.0 * 3) / 4))


def test_full_mode_without_a_server_store_is_refused_in_one_line(tmp_path):
    """The strategy owns "no server-side store to distil from"; the Federation asks it."""
    from feda2v.config import load_config
    from feda2v.data import load_prepared, prepare
    from feda2v.federation.server import Federation

    raw = {"data": {"name": "digits", "nodes": 2, "condition": "onehot", "max_samples": 100,
                    "partition": {"scheme": "iid"},
                    "prepared_dir": str(tmp_path / "p")},
           "federation": {"mode": "full", "sharing": "local"}, "tracking": {"enabled": False}}
    cfg = load_config(raw)
    prepare(cfg)
    with pytest.raises(ConfigError) as e:
        Federation(cfg, load_prepared(tmp_path / "p"))
    assert str(e.value).startswith("federation.mode=full needs sharing=shared or fedavg: with sharing=local")
    assert "\n" not in str(e.value)

