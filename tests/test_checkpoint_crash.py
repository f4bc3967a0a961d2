"""Crash safety: a writer SIGKILLed at random moments always leaves latest.ckpt loadable."""
from __future__ import annotations

import os
import random
import signal
import time

import torch

from feda2v.checkpoint import CheckpointManager, container, read_checkpoint


def round_state(r: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(r)
    # ~1 MB so a kill often lands inside a write, not only between files
    return {"w": torch.randn(512, 256, generator=g), "m": torch.randn(512, 256, generator=g),
            "round": torch.tensor(r)}


def _writer(directory, first_round: int) -> None:
    """Child body: save round after round until killed."""
    try:
        torch.set_num_threads(1)
        container._WRITE_CHUNK = 1 << 16  # many payload pieces: kills land between writeback starts too
        m = CheckpointManager(directory, keep_last=2)
        r = first_round
        while True:
            m.save(r, round_state(r), {"node_cursor": r % 3})
            r += 1
    finally:
        os._exit(0)


def test_sigkill_at_random_moments_never_breaks_latest(tmp_path):
    rng = random.Random(20240501)
    d = tmp_path / "ck"
    CheckpointManager(d, keep_last=2).save(0, round_state(0), {"node_cursor": 0})
    last_round = 0
    kills = 0
    deadline = time.monotonic() + 4.0
    while kills < 40 and time.monotonic() < deadline:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            _writer(d, last_round + 1)
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        kills += 1
        tensors, header = read_checkpoint(d / "latest.ckpt")  # verifies every byte
        r = header["round"]
        assert r >= last_round  # latest never goes back
        expected = round_state(r)
        assert all(torch.equal(tensors[k], expected[k]) for k in expected)
        # every complete round file that is left is intact too
        for p in d.glob("round_*.ckpt"):
            read_checkpoint(p)
        last_round = r
    assert kills >= 10
    assert last_round > 0  # the writer made progress between kills
    # the next writer cleans up what killed ones left behind
    CheckpointManager(d, keep_last=2).save(last_round + 1, round_state(last_round + 1), {})
    leftovers = [p.name for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == []
