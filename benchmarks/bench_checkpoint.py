"""Checkpoint read and write against their floors, measured side by side in one run.

- read: ``read_checkpoint`` (framing, canonical header, header and payload SHA-256, tensor index,
  zero-copy views) vs the time to SHA-256 the file (read it into memory + hash it: the least any
  integrity-checked load must do); ``safetensors.torch.load_file`` alongside for reference.
- write: ``write_checkpoint`` (hash + write + fsync + atomic rename) vs ``safetensors.torch.save_file``
  + fsync + SHA-256 of the same tensors (what an integrity-checked safetensors write costs).
Each is timed against its floor in alternating runs.
Targets (issue 21): read <= 1.3x the hash, write <= 1.2x the peer, at 40 and 400 MB (the 400 MB
case only in the full run). State: store-shaped tensors (per key: parameters + AdamW moments +
step scalars, as a per_class store holds them).

Run: .venv/bin/python benchmarks/bench_checkpoint.py [--full]
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import median_time

from feda2v.checkpoint import CheckpointManager, read_checkpoint, write_checkpoint

READ_TARGET, WRITE_TARGET = 1.3, 1.2


def _state(total_mb: float) -> dict[str, torch.Tensor]:
    """Store-shaped tensors: per key, params + exp_avg + exp_avg_sq (float32) + step scalars."""
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    shapes = (("l0.weight", (512, 512)), ("l0.bias", (512,)), ("l1.weight", (256, 512)), ("l1.bias", (256,)))
    g_numel = sum(torch.Size(s).numel() for _, s in shapes)
    d_numel = sum(torch.Size(s).numel() for n, s in shapes if n.startswith("l0"))
    per_key = 3 * (g_numel + d_numel) * 4  # float32 params + two moments, generator + discriminator
    keys = max(1, round(total_mb * 1e6 / per_key))
    for k in range(keys):
        for role in ("generator", "discriminator"):
            base = f"store/server/class/k{k:03d}/{role}"
            for name, shape in shapes:
                if role == "discriminator" and name.startswith("l1"):
                    continue
                tensors[f"{base}/param/{name}"] = torch.randn(*shape, generator=g)
                tensors[f"{base}/optim/{name}/exp_avg"] = torch.randn(*shape, generator=g)
                tensors[f"{base}/optim/{name}/exp_avg_sq"] = torch.rand(*shape, generator=g)
                tensors[f"{base}/optim/{name}/step"] = torch.tensor(100.0)
    return tensors


def _sha256_file(path: Path) -> str:
    """The floor of an integrity-checked read: one streaming SHA-256 pass over the file (what
    ``sha256sum`` does; it keeps nothing in memory, so a real load can only be slower)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _peer_write(path: Path, tensors) -> None:
    """safetensors' own writer + fsync + a SHA-256 of every tensor (an integrity-checked write)."""
    from safetensors.torch import save_file

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    save_file(tensors, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _median(fn, repeats: int) -> float:
    return median_time(fn, repeats, warmup=1)  # one warm-up: page cache, allocator


def _pair(fn, peer, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and of its floor ``peer``, their runs alternating (one warm-up
    each), so a change of the machine's load between them does not become their ratio."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats + 1):
        for f, ts in zip((fn, peer), times):
            t0 = time.perf_counter()
            f()
            if i:
                ts.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def measure(total_mb: float, repeats: int, directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = _state(total_mb)
    mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    header = {"round": 1, "config": {"note": "benchmark"}}
    ours, peer = directory / "ours.ckpt", directory / "peer.safetensors"
    write, peer_write = _pair(lambda: write_checkpoint(ours, tensors, header), lambda: _peer_write(peer, tensors),
                              repeats)
    read, sha = _pair(lambda: read_checkpoint(ours, provenance=False), lambda: _sha256_file(ours), repeats)
    st_load = _median(lambda: load_file(str(peer)), repeats)
    m = CheckpointManager(directory / "managed", keep_last=2)
    r = iter(range(10**6))
    managed = _median(lambda: m.save(next(r), tensors, {"config": header["config"]}), repeats)
    return {
        "state_mb": round(mb, 1), "tensors": len(tensors), "file_mb": round(ours.stat().st_size / 1e6, 1),
        "read_s": round(read, 4), "sha256_file_s": round(sha, 4), "read_vs_sha256": round(read / sha, 3),
        "safetensors_load_s": round(st_load, 4),
        "write_s": round(write, 4), "peer_write_s": round(peer_write, 4),
        "write_vs_peer": round(write / peer_write, 3), "managed_save_s": round(managed, 4),
        "read_mb_s": round(mb / read, 1), "write_mb_s": round(mb / write, 1),
    }


def run(quick: bool = True) -> dict:
    sizes = (40.0,) if quick else (40.0, 400.0)
    repeats = 2 if quick else 5
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for size in sizes:
            rows.append(measure(size, repeats, Path(d)))
            for p in Path(d).glob("*"):
                if p.is_file():
                    p.unlink()
    ok = all(r["read_vs_sha256"] <= READ_TARGET and r["write_vs_peer"] <= WRITE_TARGET for r in rows)
    out = {"rows": rows, "repeats": repeats, "torch_threads": torch.get_num_threads(),
           "targets": {"read_vs_sha256": READ_TARGET, "write_vs_peer": WRITE_TARGET}, "targets_met": ok}
    out["summary"] = "; ".join(
        f"{r['state_mb']} MB: read {r['read_vs_sha256']}x the SHA-256 of the file (target <= {READ_TARGET}), "
        f"write {r['write_vs_peer']}x save_file+fsync+SHA-256 (target <= {WRITE_TARGET})" for r in rows)
    out["table"] = [{k: r[k] for k in ("state_mb", "read_s", "sha256_file_s", "read_vs_sha256",
                                       "safetensors_load_s", "write_s", "peer_write_s", "write_vs_peer",
                                       "managed_save_s")} for r in rows]
    return out


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
