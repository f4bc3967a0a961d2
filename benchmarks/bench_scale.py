"""Scale: shared-mode peak memory and round time at 10, 100 and 1,000 nodes over the same total data,
and building a per_class store of 500 keys (time and peak RSS) against the naive loop.

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


BUILD_CHILD = r"""
import gc, json, statistics, sys, time, torch
sys.path.insert(0, {here!r})
from common import make_store
from feda2v.models import build_model
torch.set_num_threads(1)
mode, gtype, keys = {mode!r}, {gtype!r}, {keys}

def naive():  # the published layout: per key its own modules (same seeded values) and own AdamWs
    probe = make_store(gtype, "unified")
    o = probe.spec.optimizer
    out = []
    for k in range(keys):
        for role in probe.roles:
            cls, kwargs = probe._role_arch[role]
            m = build_model(cls, kwargs, gen=torch.Generator().manual_seed(k))
            out.append((m, torch.optim.AdamW(m.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                             weight_decay=o.weight_decay, fused=True)))
    return out

build = (lambda: make_store(gtype, "per_class", classes=keys)) if mode == "store" else naive
def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

make_store(gtype, "per_class", classes=2)  # imports and first-use costs out of the measurement
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # peak RSS (VmHWM) := current RSS, so the peak is the build's
    f.write("5")
rss0 = status_kb("VmRSS") * 1024
times = []
for i in range(2):
    t0 = time.perf_counter()
    built = build()
    times.append(time.perf_counter() - t0)
    if i == 0:
        peak = status_kb("VmHWM") * 1024
        params = (sum(p.numel() for m in built._modules.values() for p in m.parameters()) if mode == "store"
                  else sum(p.numel() for m, _ in built for p in m.parameters())) * 4
        # the generator's moving average (generator.ema_decay): state the store holds from its build
        ema = sum(t.numel() for t in built._ema.values()) * 4 if mode == "store" else 0
    del built  # the only reference: the second build runs on the first one's freed memory, as the naive loop's does
    gc.collect()
print(json.dumps({{"mode": mode, "type": gtype, "keys": keys, "build_s": statistics.median(times),
                   "peak_growth_mb": (peak - rss0) / 2**20, "params_mb": params / 2**20, "ema_mb": ema / 2**20}}))
"""


def measure_build(mode: str, gtype: str, keys: int) -> dict:
    code = BUILD_CHILD.format(here=str(Path(__file__).parent), mode=mode, gtype=gtype, keys=keys)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_table(quick: bool) -> list[dict]:
    """A per_class store of many keys against the naive loop (K modules, K AdamWs) building the same
    seeded parameters (the store also builds its generators' moving average, which the naive loop,
    like the published system, has not); peak RSS growth over the state a trained store holds
    (parameters, AdamW's two moments, created at its first step, and the moving average) and over
    the parameters alone."""
    keys = 50 if quick else 500
    rows = []
    for gtype in ("cvae", "gan"):
        store, naive = measure_build("store", gtype, keys), measure_build("naive", gtype, keys)
        state = 3 * store["params_mb"] + store["ema_mb"]
        rows.append({"type": gtype, "keys": keys, "store_build_s": store["build_s"], "naive_build_s": naive["build_s"],
                     "store_over_naive": store["build_s"] / naive["build_s"], "params_mb": store["params_mb"],
                     "store_peak_growth_mb": store["peak_growth_mb"], "naive_peak_growth_mb": naive["peak_growth_mb"],
                     "store_peak_over_state": store["peak_growth_mb"] / state,
                     "store_peak_over_params": store["peak_growth_mb"] / store["params_mb"]})
    return rows


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
    builds = build_table(quick)
    summary += ("; building a per_class store of " + ", ".join(
        f"{r['keys']} {r['type']} keys {r['store_build_s']:.2f} s = {r['store_over_naive']:.2f}x the naive loop, "
        f"peak RSS growth {r['store_peak_growth_mb']:.0f} MB = {r['store_peak_over_state']:.2f}x the state "
        f"(parameters + moments + moving average; {r['store_peak_over_params']:.2f}x the parameters)" for r in builds))
    return {"summary": summary, "table": table, "tables": {"building a store of many keys": builds}}
