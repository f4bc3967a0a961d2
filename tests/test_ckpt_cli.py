"""The feda2v-ckpt console script: exit codes, stdout/stderr shape, no tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from feda2v.checkpoint import FORMAT_VERSION, write_checkpoint
from feda2v.cli.ckpt import main as ckpt_main

EXE = str(Path(sys.executable).parent / "feda2v-ckpt")


def make(path: Path, value: float = 1.0, round_: int = 2) -> Path:
    tensors = {"store/server/unified/generator/param/w": torch.full((3, 2), value),
               "store/server/unified/generator/optim/w/step": torch.tensor(5.0)}
    header = {"round": round_, "keys": ["unified"], "roles": ["generator"],
              "optimizers": {"unified/generator": {"step": 5, "lr": 0.001, "weight_decay": 0.01}}}
    write_checkpoint(path, tensors, header)
    return path


def run(*args):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_console_script_end_to_end(tmp_path):
    """Three real processes (each imports torch); the other paths are covered in-process below."""
    a = make(tmp_path / "a.ckpt")
    c = make(tmp_path / "c.ckpt", value=2.0, round_=3)
    r = run("inspect", a)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format_version"] == FORMAT_VERSION and info["round"] == 2 and info["keys"] == ["unified"]
    assert info["optimizers"] == {"unified/generator": {"step": 5, "lr": 0.001, "weight_decay": 0.01}}
    assert len(info["sha256"]) == 64
    r = run("diff", a, c)
    assert r.returncode == 1
    assert "tensor store/server/unified/generator/param/w: 6 of 6 values differ" in r.stdout
    assert "header round: 2 vs 3" in r.stdout
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(a.read_bytes()[:-3])
    r = run("verify", bad)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("feda2v: error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def _main(capsys, *args):
    with pytest.raises(SystemExit) as e:
        ckpt_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_in_process_commands(tmp_path, capsys):
    a, b = make(tmp_path / "a.ckpt"), make(tmp_path / "b.ckpt")
    code, out, err = _main(capsys, "verify", a)
    assert code == 0 and out.startswith("ok: ") and err == ""
    code, out, _ = _main(capsys, "diff", a, b)
    assert code == 0 and out.strip() == "identical"
    code, out, err = _main(capsys, "diff", a, make(tmp_path / "c.ckpt", value=1.5))
    assert code == 1 and "values differ" in out and "1 difference(s)" in err
    code, out, err = _main(capsys, "verify", tmp_path / "missing.ckpt")
    assert code == 2 and err == f"feda2v: error: checkpoint not found: {tmp_path / 'missing.ckpt'}\n"
    code, _, err = _main(capsys, "diff", a)
    assert code == 2 and err.startswith("feda2v: error: ") and err.count("\n") == 1
    code, _, err = _main(capsys, "frobnicate")
    assert code == 2 and err.startswith("feda2v: error: ") and err.count("\n") == 1
    code, _, err = _main(capsys, "migrate", tmp_path / "nope.pt", tmp_path / "o.ckpt")
    assert code == 2 and "legacy checkpoint not found" in err


def test_debug_env_shows_traceback(tmp_path, monkeypatch):
    from feda2v.errors import CheckpointError

    monkeypatch.setenv("FEDA2V_DEBUG", "1")
    with pytest.raises(CheckpointError):
        ckpt_main(["verify", str(tmp_path / "missing.ckpt")])
