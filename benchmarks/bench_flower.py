"""Flower engine vs in-process engine on the same config, side by side: per-round wall time, the
cost of one node visit (message hop), the simulation's start-up/shutdown, whether both engines end
in the identical state (they must), and the bytes one visit's message carries (the slice of the keys
the node trains) for unified and per_class stores."""
from __future__ import annotations

import os
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


def _store_state(fed) -> dict:
    return {f"{name}/{k}": v for name, store in fed.stores.items() for k, v in store.state_dict()[0].items()}


def _visit_bytes(fed) -> dict:
    """Bytes of round 1's visit messages: the slice each node is sent, against the whole store."""
    from feda2v.federation.flower_app import encode_store, visit_keys
    from feda2v.federation.node import node_name

    sent = []
    for nd in fed.participants(1):
        store = fed.store_for(node_name(nd.node_id))
        keys = visit_keys(store, fed.classes, fed.data.manifest["counts"]["train"][nd.node_id])
        sent.append(len(encode_store(store, store_name="x", round_=1, node="x", keys=keys)))
    whole = len(encode_store(fed.store_for(node_name(fed.participants(1)[0].node_id)), store_name="x",
                             round_=1, node="x"))
    return {"visit_message_bytes_median": statistics.median(sent), "whole_store_bytes": whole}


def message_bytes() -> list[dict]:
    """Per-visit message size of a 20-class GAN store (the issue's case) when a node holds 4
    classes: unified (1 key: the whole store) and per_class (4 of 20 keys travel)."""
    from common import make_store
    from feda2v.federation.flower_app import encode_store, visit_keys

    rows = []
    for granularity in ("unified", "per_class"):
        store = make_store("gan", granularity, classes=20)
        counts = [50 if i < 4 else 0 for i in range(20)]
        keys = visit_keys(store, [f"c{i}" for i in range(20)], counts)
        rows.append({"granularity": granularity, "type": "gan", "classes": 20, "node_classes": 4,
                     "keys_sent": len(keys), "keys_total": len(store.keys),
                     "visit_message_bytes": len(encode_store(store, store_name="x", round_=1, node="x", keys=keys)),
                     "whole_store_bytes": len(encode_store(store, store_name="x", round_=1, node="x"))})
    return rows


def deployed(rounds: int = 3) -> dict:
    """scripts/flower_deploy.sh on this machine (SuperLink + 2 SuperNodes on 127.0.0.1, shared relay,
    digits): its round lines give the deployed and the in-process round time of the same config;
    per visit = round / 2 nodes. Where a deployed visit's seconds go (Flower 1.42): the SuperNode
    starts a fresh `flwr-clientapp` process per message (pull one task, run, exit), which imports
    torch and feda2v and reads its own partition; the server pulls replies every poll_s."""
    import os
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, ROUNDS=str(rounds), LINK_PORT=os.environ.get("BENCH_LINK_PORT", "18711"),
                   NODE_PORT0=os.environ.get("BENCH_NODE_PORT0", "19711"))
        t0 = time.perf_counter()
        out = subprocess.run(["bash", str(root / "scripts" / "flower_deploy.sh"), tmp], env=env,
                             capture_output=True, text=True, timeout=900)
        total = time.perf_counter() - t0
    text = out.stdout + out.stderr
    if out.returncode != 0:
        return {"error": (text.strip().splitlines() or ["no output"])[-1]}
    secs = [float(m) for m in re.findall(r"round \d+/\d+: .*? ([\d.]+)s$", text, re.M)]
    dep, ip = secs[:rounds], secs[rounds:2 * rounds]  # flwr run's rounds come first, then in-process
    later = lambda xs: statistics.median(xs[1:] or xs)  # noqa: E731
    return {"nodes": 2, "rounds": rounds, "deployed_round_s_median": later(dep),
            "inprocess_round_s_median": later(ip), "deployed_round_s_first": dep[0],
            "deployed_per_visit_s": later(dep) / 2, "inprocess_per_visit_s": later(ip) / 2,
            "deployed_overhead_per_visit_s": (later(dep) - later(ip)) / 2, "script_total_s": total,
            "identical_state": "bit-identical" in text}


def _drive(engine, cfg, data) -> dict:
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
    state = _store_state(fed)
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
        **_visit_bytes(fed),
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
    if not quick and os.environ.get("BENCH_FLOWER_DEPLOY", "1") != "0":
        dep = deployed()
        if "error" not in dep:
            summary += (f"; deployed (2 SuperNodes on this machine): {dep['deployed_per_visit_s']:.2f} s per visit "
                        f"against {dep['inprocess_per_visit_s'] * 1e3:.0f} ms in-process "
                        f"(+{dep['deployed_overhead_per_visit_s']:.2f} s)")
        table.append({"engine": "flower-deployment", "sharing": "shared", **dep})
    sizes = message_bytes()
    summary += "; visit message, 20-class GAN, node with 4 classes: " + ", ".join(
        f"{r['granularity']} {r['visit_message_bytes'] / 1e6:.2f} MB of {r['whole_store_bytes'] / 1e6:.2f} MB"
        for r in sizes)
    return {"summary": summary, "table": table, "message_bytes": sizes}


if __name__ == "__main__":
    import json
    import sys

    out = run(quick="--quick" in sys.argv)
    print(json.dumps(out, indent=2))
