"""Safety: pickle files carrying a payload are never executed by verify, inspect, migrate or resume."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from feda2v.checkpoint import CheckpointManager, inspect_checkpoint, migrate_legacy, read_checkpoint, verify_checkpoint
from feda2v.cli.ckpt import main as ckpt_main
from feda2v.errors import CheckpointError


class Payload:
    """Unpickling this creates a file (what an attacker's code execution would look like)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_files(tmp_path):
    marker = tmp_path / "PWNED"
    torch_file = tmp_path / "evil.pt"
    torch.save({"generator_state_dict": {"w": torch.zeros(2)}, "extra": Payload(marker)}, torch_file)
    raw_pickle = tmp_path / "evil.pkl"
    raw_pickle.write_bytes(pickle.dumps({"generator_state_dict": Payload(marker)}, protocol=4))
    ckpt_named = tmp_path / "latest.ckpt"  # a pickle posing as a checkpoint
    ckpt_named.write_bytes(torch_file.read_bytes())
    return marker, [torch_file, raw_pickle, ckpt_named]


def test_payload_is_live(tmp_path):
    """Guard: the payload really runs when unpickled unsafely (so the other tests mean something)."""
    marker, files = evil_files(tmp_path)
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", code, str(files[0])], check=True, cwd=tmp_path)
    assert marker.exists()


@pytest.mark.parametrize("which", [0, 1, 2])
def test_never_runs_payload(tmp_path, which, capsys):
    marker, files = evil_files(tmp_path)
    f = files[which]
    for fn in (verify_checkpoint, read_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match="pickle/torch.save file.*not opened because unpickling can run arbitrary code"):
            fn(f)
    with pytest.raises(CheckpointError, match="needs unpickling of arbitrary objects"):
        migrate_legacy(f, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()
    # training's resume path: resolve, then read (what feda2v-train resume=... does)
    m = CheckpointManager(tmp_path)
    path = m.resolve("latest") if f.name == "latest.ckpt" else m.resolve(f)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    for cmd in (["verify", str(f)], ["inspect", str(f)], ["migrate", str(f), str(tmp_path / "o2.ckpt")],
                ["diff", str(f), str(f)]):
        with pytest.raises(SystemExit) as e:
            ckpt_main(cmd)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("feda2v: error: ") and err.count("\n") == 1
    assert not marker.exists()


def test_safetensors_file_without_feda2v_header_is_refused(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, p)
    with pytest.raises(CheckpointError, match="safetensors file without a feda2v header"):
        verify_checkpoint(p)
