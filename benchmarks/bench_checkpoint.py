"""Checkpoint speed and size: save / load / verify MB/s and file-size ratio for a ~50 MB state.

Run: .venv/bin/python benchmarks/bench_checkpoint.py [--full]
"""
from __future__ import annotations

import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

from feda2v.checkpoint import CheckpointManager, read_checkpoint, verify_checkpoint, write_checkpoint


def _state(total_mb: float) -> dict[str, torch.Tensor]:
    """Store-shaped tensors: per key, params + exp_avg + exp_avg_sq (float32) + step scalars."""
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    per_key = 3 * (512 * 512 + 512 + 512 * 256 + 256) * 4  # bytes of one key's 2-layer MLP + moments
    keys = max(1, round(total_mb * 1e6 / per_key))
    for k in range(keys):
        for name, shape in (("l0.weight", (512, 512)), ("l0.bias", (512,)), ("l1.weight", (256, 512)), ("l1.bias", (256,))):
            base = f"class/k{k:03d}/generator"
            tensors[f"{base}/param/{name}"] = torch.randn(*shape, generator=g)
            tensors[f"{base}/optim/{name}/exp_avg"] = torch.randn(*shape, generator=g)
            tensors[f"{base}/optim/{name}/exp_avg_sq"] = torch.rand(*shape, generator=g)
            tensors[f"{base}/optim/{name}/step"] = torch.tensor(100.0)
    return tensors


def run(quick: bool = True) -> dict:
    tensors = _state(50.0)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    mb = tensor_bytes / 1e6
    header = {"round": 1, "config": {"note": "benchmark"}}
    repeats = 2 if quick else 5
    saves, loads, verifies, managed = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "bench.ckpt"
        for _ in range(repeats):
            t0 = time.perf_counter()
            write_checkpoint(p, tensors, header)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            read_checkpoint(p)
            loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            verify_checkpoint(p)
            verifies.append(time.perf_counter() - t0)
        m = CheckpointManager(Path(d) / "managed", keep_last=2)
        for r in range(repeats):
            t0 = time.perf_counter()
            m.save(r, tensors, {"config": header["config"]})
            managed.append(time.perf_counter() - t0)
        size = p.stat().st_size
        (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    out = {
        "state_mb": round(mb, 2),
        "tensors": len(tensors),
        "file_mb": round(size / 1e6, 3),
        "header_bytes": 8 + n,
        "size_ratio": round(size / tensor_bytes, 5),
        "size_ratio_excluding_header": round((size - 8 - n) / tensor_bytes, 5),
        "save_mb_s": round(mb / statistics.median(saves), 1),
        "load_mb_s": round(mb / statistics.median(loads), 1),
        "verify_mb_s": round(mb / statistics.median(verifies), 1),
        "managed_save_mb_s": round(mb / statistics.median(managed), 1),
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
    }
    out["summary"] = (
        f"{out['state_mb']} MB state ({len(tensors)} tensors): save {out['save_mb_s']} MB/s "
        f"(with latest+prune {out['managed_save_mb_s']} MB/s), load {out['load_mb_s']} MB/s "
        f"(every check + sha256), file = {out['size_ratio']} x tensor bytes"
    )
    out["table"] = [{k: out[k] for k in ("state_mb", "save_mb_s", "managed_save_mb_s", "load_mb_s",
                                          "verify_mb_s", "size_ratio", "header_bytes")}]
    return out


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
