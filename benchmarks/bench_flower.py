"""Flower engine vs in-process engine on the same config, side by side: per-round wall time, the
cost of one node visit (message hop), the simulation's start-up/shutdown, and whether both engines
end in the identical state (they must)."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def _config(prepared: Path, rounds: int, sharing: str, max_samples: int):
    from feda2v.config import load_config

    return load_config({
        "seed": 0,
        "data": {"name": "digits", "nodes": 3, "condition": "onehot", "prepared_dir": str(prepared),
                 "max_samples": max_samples, "partition": {"scheme": "classes_per_node", "classes_per_node": 4}},
        "generator": {"hidden_dim": 64, "latent_dim": 8},
        "federation": {"rounds": rounds, "batch_size": 64, "sharing": sharing, "local_epochs": 1},
        "tracking": {"enabled": False},
    })


def _drive(engine, cfg, data) -> dict:
    from feda2v.federation.flower_app import encode_store
    from feda2v.federation.server import Federation

    fed = Federation(cfg, data)
    walls, trains, gaps, hops = [], [], [], 0
    t_start = time.perf_counter()
    t_prev = t_start
    first_yield = None
    for res in engine.run(fed, 1, cfg.federation.rounds):
        now = time.perf_counter()
        if first_yield is None:
            first_yield = now - t_start
        gaps.append(now - t_prev)
        walls.append(res.wall_seconds)
        trains.append(res.train_seconds)
        hops += len(res.nodes)
        t_prev = time.perf_counter()
    total = time.perf_counter() - t_start
    state, _ = fed.state_dict()
    from feda2v.federation.node import node_name

    visited = fed.store_for(node_name(fed.participants(1)[0].node_id))  # what one visit carries
    payload = len(encode_store(visited, store_name="x", round_=0, node="x"))
    steady = walls[1:] or walls
    return {
        "round_s_first": walls[0],
        "round_s_median_after_first": statistics.median(steady),
        "train_step_s_per_round": statistics.median(trains),
        "per_visit_overhead_s": statistics.median(
            [(w - t) / len(fed.participants(1)) for w, t in zip(steady, trains[1:] or trains)]),
        "startup_s": first_yield - walls[0],  # before round 1 began (Ray, actors, node discovery)
        "total_s": total,
        "shutdown_s": total - sum(gaps),  # after the last round (Ray shutdown)
        "hops": hops,
        "store_message_bytes": payload,
        "_state": state,
    }


def run(quick: bool = False) -> dict:
    import torch

    from feda2v.data import load_prepared, prepare
    from feda2v.federation.engine import InProcessEngine
    from feda2v.federation.flower_engine import FlowerEngine

    torch.set_num_threads(1)
    rounds, max_samples = (3, 300) if quick else (6, 1500)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        prepare(_config(prepared, rounds, "shared", max_samples))
        data = load_prepared(prepared)
        for sharing in (("shared",) if quick else ("shared", "fedavg")):
            cfg = _config(prepared, rounds, sharing, max_samples)
            ip = _drive(InProcessEngine(), cfg, data)
            fl = _drive(FlowerEngine(), cfg, data)
            same = set(ip["_state"]) == set(fl["_state"]) and all(
                torch.equal(ip["_state"][k], fl["_state"][k]) for k in ip["_state"])
            for name, r in (("inprocess", ip), ("flower-simulation", fl)):
                row = {k: v for k, v in r.items() if not k.startswith("_")}
                table.append({"engine": name, "sharing": sharing, "rounds": rounds, "nodes": 3,
                              "identical_state": same, **row})
    shared = {r["engine"]: r for r in table if r["sharing"] == "shared"}
    ip, fl = shared["inprocess"], shared["flower-simulation"]
    summary = (f"per round (shared relay, 3 nodes, digits): in-process {ip['round_s_median_after_first'] * 1e3:.0f} ms, "
               f"Flower simulation {fl['round_s_median_after_first'] * 1e3:.0f} ms after round 1 "
               f"(+{fl['per_visit_overhead_s'] * 1e3:.0f} ms per node visit; round 1 {fl['round_s_first']:.1f} s; "
               f"start-up {fl['startup_s']:.1f} s, shutdown {fl['shutdown_s']:.1f} s); "
               f"identical final state: {all(r['identical_state'] for r in table)}; in-process is "
               f"{fl['round_s_median_after_first'] / ip['round_s_median_after_first']:.0f}x faster per round "
               f"(target >= 20x)")
    return {"summary": summary, "table": table}


if __name__ == "__main__":
    import json
    import sys

    out = run(quick="--quick" in sys.argv)
    print(json.dumps(out, indent=2))
