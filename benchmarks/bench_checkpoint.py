"""Checkpoint read and write against their floors, measured side by side in one run.

- read: ``read_checkpoint`` (framing, canonical header, header and payload SHA-256, tensor index,
  zero-copy views) vs the time to SHA-256 the file (one streaming pass: the least any
  integrity-checked load must do); ``safetensors.torch.load_file`` alongside for reference (it
  maps the file lazily and checks nothing, so it is not a floor).
- write: ``write_checkpoint`` (payload written and hashed in pieces, each handed to the disk before
  it is hashed; prefix; fsync; rename; fsync of the directory) vs the issue's peer,
  ``safetensors.torch.save_file`` + fsync + SHA-256 of the same tensors. safetensors (0.8) itself
  writes a temp file and renames it over the target, but does not fsync the file before the rename
  nor the directory after it; the "durable peer" adds exactly the steps ours takes (save_file to a
  temp name, fsync, rename, fsync the directory) and is reported beside it. Both overwrite their
  previous file each time (the same page-cache and block-freeing work on both sides).
  ``CheckpointManager.save`` (new round file, ``latest`` link, pruning) is measured in the same rotation.

Stability: every contender runs once per round, the order reversed every other round (one warm-up
round), so load that comes and goes hits all of them; a ratio is the median over rounds of the
per-round ratio (ours / its floor in the same round), with the 25th-75th percentile spread. The
summary names the file system and the load average, since the writes are fsync-bound.
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

from feda2v.checkpoint import CheckpointManager, read_checkpoint, write_checkpoint
from feda2v.checkpoint.container import temp_name
from feda2v.fsutil import fsync_dir

READ_TARGET, WRITE_TARGET = 1.3, 1.2
REPEATS = {40.0: 15, 400.0: 7}  # rounds per size in the full run; quick: 3 at 40 MB


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


def _sha256_tensors(tensors) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _peer_write(path: Path, tensors) -> None:
    """The issue's peer: safetensors' own writer + fsync + a SHA-256 of every tensor."""
    from safetensors.torch import save_file

    _sha256_tensors(tensors)
    save_file(tensors, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _durable_peer_write(path: Path, tensors) -> None:
    """The peer with ours' durability steps: data on disk before the rename, the rename on disk after."""
    from safetensors.torch import save_file

    _sha256_tensors(tensors)
    tmp = temp_name(path)
    save_file(tensors, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _rounds(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each callable, once per round, the order reversed every other round; the
    first round is a warm-up (page cache, allocator) and is not kept."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats + 1):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            if i:
                times[name].append(time.perf_counter() - t0)
    return times


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def _ratio(times: dict, ours: str, floor: str) -> tuple[float, str, float]:
    """Median per-round ratio, its 25th-75th percentile spread (text), and the ratio of the two
    fastest rounds (the least disturbed by other load)."""
    r = [a / b for a, b in zip(times[ours], times[floor])]
    q1, q2, q3 = _quartiles(r)
    return round(q2, 3), f"{q1:.2f}-{q3:.2f}", round(min(times[ours]) / min(times[floor]), 3)


def _filesystem(path: Path) -> str:
    """Device, type and options of the mount holding ``path`` (Linux), else the platform."""
    best = None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype, opts = line.split()[:4]
            if str(path.resolve()).startswith(mnt.rstrip("/") + "/") and (best is None or len(mnt) > len(best[1])):
                best = (dev, mnt, fstype, opts)
    except OSError:
        pass
    return f"{best[2]} on {best[0]} ({best[3]})" if best else sys.platform


def measure(total_mb: float, repeats: int, directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = _state(total_mb)
    mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    header = {"round": 1, "config": {"note": "benchmark"}}
    ours, peer, durable = directory / "ours.ckpt", directory / "peer.safetensors", directory / "durable.safetensors"
    m = CheckpointManager(directory / "managed", keep_last=2)
    r = iter(range(10**6))
    w = _rounds({"ours": lambda: write_checkpoint(ours, tensors, header),
                 "peer": lambda: _peer_write(peer, tensors),
                 "durable_peer": lambda: _durable_peer_write(durable, tensors),
                 "managed": lambda: m.save(next(r), tensors, {"config": header["config"]})}, repeats)
    rd = _rounds({"ours": lambda: read_checkpoint(ours, provenance=False),
                  "sha256": lambda: _sha256_file(ours),
                  "safetensors": lambda: load_file(str(peer))}, repeats)
    med = {k: statistics.median(v) for k, v in w.items()}
    rmed = {k: statistics.median(v) for k, v in rd.items()}
    read_ratio, read_spread, read_fastest = _ratio(rd, "ours", "sha256")
    write_ratio, write_spread, write_fastest = _ratio(w, "ours", "peer")
    durable_ratio, durable_spread, durable_fastest = _ratio(w, "ours", "durable_peer")
    return {
        "state_mb": round(mb, 1), "tensors": len(tensors), "file_mb": round(ours.stat().st_size / 1e6, 1),
        "rounds": repeats,
        "read_s": round(rmed["ours"], 4), "sha256_file_s": round(rmed["sha256"], 4),
        "read_vs_sha256": read_ratio, "read_vs_sha256_iqr": read_spread, "read_vs_sha256_fastest": read_fastest,
        "safetensors_load_s": round(rmed["safetensors"], 4),
        "write_s": round(med["ours"], 4), "write_min_s": round(min(w["ours"]), 4),
        "peer_write_s": round(med["peer"], 4), "peer_write_min_s": round(min(w["peer"]), 4),
        "write_vs_peer": write_ratio, "write_vs_peer_iqr": write_spread, "write_vs_peer_fastest": write_fastest,
        "durable_peer_write_s": round(med["durable_peer"], 4),
        "write_vs_durable_peer": durable_ratio, "write_vs_durable_peer_iqr": durable_spread,
        "write_vs_durable_peer_fastest": durable_fastest,
        "managed_save_s": round(med["managed"], 4),
        "read_mb_s": round(mb / rmed["ours"], 1), "write_mb_s": round(mb / med["ours"], 1),
    }


def run(quick: bool = True) -> dict:
    sizes = (40.0,) if quick else (40.0, 400.0)
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        fs = _filesystem(Path(d))
        for size in sizes:
            rows.append(measure(size, 3 if quick else REPEATS[size], Path(d)))
            for p in Path(d).rglob("*"):
                if p.is_file():
                    p.unlink()
    load_after = os.getloadavg()
    ok = all(r["read_vs_sha256"] <= READ_TARGET and r["write_vs_peer"] <= WRITE_TARGET for r in rows)
    out = {"rows": rows, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "filesystem": fs, "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
           "targets": {"read_vs_sha256": READ_TARGET, "write_vs_peer": WRITE_TARGET}, "targets_met": ok}
    out["summary"] = "; ".join(
        f"{r['state_mb']} MB: read {r['read_vs_sha256']}x the SHA-256 of the file (IQR {r['read_vs_sha256_iqr']}, "
        f"fastest rounds {r['read_vs_sha256_fastest']}x; target <= {READ_TARGET}), write {r['write_vs_peer']}x "
        f"save_file+fsync+SHA-256 (IQR {r['write_vs_peer_iqr']}, fastest {r['write_vs_peer_fastest']}x; target <= "
        f"{WRITE_TARGET}), {r['write_vs_durable_peer']}x the same with ours' durability steps" for r in rows) + (
        f". Medians of per-round ratios over {', '.join(str(r['rounds']) for r in rows)} alternating rounds "
        "(targets judged on these; 'fastest' = fastest round of ours / fastest of the floor); "
        f"temp files on {fs}; 1-min load average {out['load_average_1min'][0]} before, "
        f"{out['load_average_1min'][1]} after, {os.cpu_count()} CPUs.")
    out["table"] = [{k: r[k] for k in ("state_mb", "rounds", "read_s", "sha256_file_s", "read_vs_sha256",
                                       "read_vs_sha256_iqr", "safetensors_load_s", "write_s", "peer_write_s",
                                       "write_vs_peer", "write_vs_peer_iqr", "durable_peer_write_s",
                                       "write_vs_durable_peer", "managed_save_s")}
                    for r in rows]
    return out


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
