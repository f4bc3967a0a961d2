"""Shared-mode scale: peak memory and round time at 10, 100 and 1,000 nodes over the same total data.

Each node count runs in its own process so peak RSS is its own; memory should stay flat (one store
for the federation), time linear in samples (so flat here, the samples being the same)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {here!r})
from feda2v.config import load_config
from feda2v.data import NodeData, PreparedData
from feda2v.federation.server import Federation

nodes, total, dim, classes = {nodes}, {total}, 128, 10
g = torch.Generator().manual_seed(0)
x = torch.randn(total, dim, generator=g)
y = torch.arange(total) % classes
parts = torch.arange(total).chunk(nodes)
empty_x, empty_y = torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
data = PreparedData(classes=[f"c{{i}}" for i in range(classes)], conditions=torch.eye(classes),
                    nodes=[NodeData(i, x[p], y[p], empty_x, empty_y) for i, p in enumerate(parts)],
                    manifest={{}}, manifest_hash="bench", feature_dim=dim, condition_dim=classes)
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rss0 = rss_mb()
torch.set_num_threads(1)
cfg = load_config({{"data": {{"name": "digits", "nodes": nodes}},
                   "federation": {{"rounds": 1, "batch_size": 64, "local_epochs": 1}},
                   "generator": {{"type": "cvae", "granularity": "per_class"}}}})
fed = Federation(cfg, data)
t0 = time.perf_counter()
res = fed.run_round(1)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"nodes": nodes, "peak_rss_mb": peak / 1024, "peak_growth_mb": (peak - base) / 1024,
                   "federation_rss_mb": rss_mb() - rss0,
                   "round_s": wall, "train_step_s": res.train_seconds, "steps": sum(r.steps for r in res.nodes)}}))
"""


def measure(nodes: int, total: int) -> dict:
    code = CHILD.format(here=str(Path(__file__).parent), nodes=nodes, total=total)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    total = 4_000 if quick else 32_000
    counts = [10, 100] if quick else [10, 100, 1000]
    table = [measure(n, total) for n in counts]
    base = table[0]
    for row in table:
        row["peak_vs_10_nodes"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        row["time_vs_10_nodes"] = row["round_s"] / base["round_s"]
    last = table[-1]
    summary = (f"{total} samples; peak RSS at {last['nodes']} nodes = {last['peak_vs_10_nodes']:.2f}x "
               f"that at 10 nodes (target <= 1.2x); memory the federation added "
               + ", ".join(f"{r['nodes']} nodes {r['federation_rss_mb']:.1f} MB" for r in table)
               + f"; round time {last['time_vs_10_nodes']:.2f}x (steps: "
               + ", ".join(str(r["steps"]) for r in table) + ")")
    return {"summary": summary, "table": table}
