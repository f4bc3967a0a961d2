"""feda2v-prepare as users run it (a subprocess in a scratch cwd): the summary line, byte-identical
re-runs across processes, and each bad input -> one line on stderr, exit 2, existing data kept."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "feda2v-prepare"


def run(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FEDA2V_CONF": str(REPO / "conf")}
    env.pop("FEDA2V_DEBUG", None)
    return subprocess.run([str(EXE), *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


DIGITS = ("data=digits", "data.nodes=4", "data.condition=onehot")


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    r = run(cwd, *DIGITS)
    assert r.returncode == 0, r.stderr
    return cwd, r, snapshot(cwd / "data/prepared")


def test_prepare_digits_summary_and_layout(prepared_once):
    cwd, r, files = prepared_once
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepared digits: 10 classes, 4 nodes (dirichlet)")
    assert "-> data/prepared" in lines[0]
    m = json.loads(files["manifest.json"])
    assert m["source"] == "digits" and m["nodes"] == 4 and m["hash"][:12] in lines[0]
    assert sorted(files) == ["conditions.safetensors", "manifest.json"] + [f"node_00{i}.safetensors" for i in range(4)]
    assert sorted(os.listdir(cwd)) == ["data"] and os.listdir(cwd / "data") == ["prepared"]  # no Hydra folders


def test_second_process_writes_the_same_bytes(prepared_once, tmp_path):
    _, _, files = prepared_once
    r = run(tmp_path, *DIGITS)
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path / "data/prepared") == files


def test_site_bundles_dir_adds_bundles_and_a_self_sufficient_server_folder(prepared_once, tmp_path):
    """data.site_bundles_dir=DIR leaves data/prepared/ byte-identical and writes DIR/node_NNN/ and
    DIR/server/: manifest, conditions and the test splits alone, enough for full mode's server."""
    import torch

    from feda2v.data import load_prepared
    from feda2v.data.prepared import load_server_view

    _, _, files = prepared_once
    r = run(tmp_path, *DIGITS, "data.site_bundles_dir=sites")
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path / "data/prepared") == files
    assert "site bundles: 4 under sites" in r.stdout and "test splits" in r.stdout
    server = tmp_path / "sites" / "server"
    assert sorted(snapshot(server)) == sorted(["conditions.safetensors", "manifest.json", "test_splits.json"]
                                              + [f"test_00{i}.safetensors" for i in range(4)])
    view, full = load_server_view(server, test_sets=True), load_prepared(tmp_path / "data/prepared")
    assert all(torch.equal(v.test_x, n.test_x) and torch.equal(v.test_y, n.test_y)
               for v, n in zip(view.nodes, full.nodes))


BAD = {
    "unknown_source": (["data.name=cifar"], "data.name: 'cifar' is not one of"),
    "alpha_zero": (["data.partition.scheme=dirichlet", "data.partition.alpha=0"], "alpha must be > 0"),
    "alpha_negative": (["data.partition.alpha=-0.5"], "alpha must be > 0"),
    "more_nodes_than_samples": (["data.nodes=5000"], "data.nodes=5000 is more than the 1797 samples"),
    "node_left_without_samples": (
        ["data.nodes=40", "data.max_samples=200", "data.partition.scheme=dirichlet", "data.partition.alpha=0.01"],
        "was left with 0 sample"),
    "too_many_classes_per_node": (
        ["data.partition.scheme=classes_per_node", "data.partition.classes_per_node=11"],
        "classes_per_node=11 must be between 1 and the 10 classes"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_nonzero_exit_existing_kept(prepared_once, tmp_path, case):
    overrides, expect = BAD[case]
    _, _, files = prepared_once
    # start from a good prepared dir, as a user re-running with a typo would
    (tmp_path / "data/prepared").mkdir(parents=True)
    for name, b in files.items():
        (tmp_path / "data/prepared" / name).write_bytes(b)
    r = run(tmp_path, *DIGITS, *overrides)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert err[0].startswith("feda2v: error: ") and expect in err[0], err[0]
    assert "Traceback" not in r.stderr and r.stdout.strip() == ""
    assert snapshot(tmp_path / "data/prepared") == files
    assert os.listdir(tmp_path / "data") == ["prepared"]  # no temp dir left behind


@pytest.mark.slow
def test_instruments_cli_small_is_reproducible_across_processes_and_caches(tmp_path):
    over = ("data.instruments.classes=3", "data.instruments.clips_per_class=10", "data.nodes=3",
            "data.partition.classes_per_node=1", "data.instruments.feature_skew_nodes=1",
            "data.condition=onehot")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ra = run(a, *over)
    assert ra.returncode == 0, ra.stderr
    assert "prepared instruments: 3 classes, 3 nodes (classes_per_node)" in ra.stdout
    assert "cache 0 hit / 6 rendered" in ra.stdout
    rb = run(b, *over)  # fresh cache: rendered again in another process
    assert rb.returncode == 0, rb.stderr
    assert snapshot(a / "data/prepared") == snapshot(b / "data/prepared")
    again = run(a, *over)
    assert again.returncode == 0 and "cache 6 hit / 0 rendered" in again.stdout
    assert snapshot(a / "data/prepared") == snapshot(b / "data/prepared")
