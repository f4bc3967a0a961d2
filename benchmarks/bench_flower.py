"""Flower against the in-process engine on the same config, measured in one run: per-visit cost
in-process, on Flower's simulation runtime and on a real deployment (scripts/flower_netns.sh: a
SuperLink and 3 SuperNodes in their own network namespaces, TLS, SuperNode authentication; needs
root), whether each ends in the in-process state (it must), where a deployed visit's seconds go
(ours: importing feda2v/torch in Flower's per-message ClientApp process, the handler, the server's
encode/merge; Flower's: the rest, timed by benchmarks/flower_probe.py inside the ClientApp
process), the simulation's start-up/shutdown, and the bytes one visit's message carries (the slice
of the keys the node trains) for unified and per_class stores. BENCH_FLOWER_DEPLOY=0 skips the
deployment; --quick (CI smoke) never runs it."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path


def _raw(prepared: Path, rounds: int, sharing: str, max_samples: int) -> dict:
    return {
        "seed": 0,
        "data": {"name": "digits", "nodes": 3, "condition": "onehot", "prepared_dir": str(prepared),
                 "max_samples": max_samples, "partition": {"scheme": "classes_per_node", "classes_per_node": 4}},
        "generator": {"hidden_dim": 64, "latent_dim": 8},
        "federation": {"rounds": rounds, "batch_size": 64, "sharing": sharing, "local_epochs": 1},
        "tracking": {"enabled": False},
    }


def _config(prepared: Path, rounds: int, sharing: str, max_samples: int):
    from feda2v.config import load_config

    raw = _raw(prepared, rounds, sharing, max_samples)
    # where the simulated nodes keep their own stores (fedavg): beside the data, never the cwd
    raw["federation"]["flower"] = {"node_state_dir": str(prepared.parent / f"nodes-{sharing}")}
    return load_config(raw)


def _store_state(fed) -> dict:
    return {f"{name}/{k}": v for name, store in fed.stores.items() for k, v in store.state_dict()[0].items()}


def _visit_bytes(fed) -> dict:
    """Bytes of round 1's visit messages, against the whole store: shared relay sends the slice of
    the node's keys with optimizer state; fedavg only the parameters of those keys (the node keeps
    its store). Measured on the in-process federation (a node-resident one holds no node stores)."""
    from feda2v.federation.flower_app import encode_store, parameters_bytes, visit_keys
    from feda2v.federation.node import node_name

    if fed.node_resident:
        return {"visit_message_bytes_median": None, "whole_store_bytes": None}
    sent = []
    for nd in fed.participants(1):
        name = node_name(nd.node_id)
        store = fed.store_for(name)
        keys = visit_keys(store, fed.classes, fed.data.manifest["counts"]["train"][nd.node_id])
        blob = (parameters_bytes(store, keys, round_=1, node=name) if fed.sharing.node_resident else
                encode_store(store, store_name="x", round_=1, node="x", keys=keys))
        sent.append(len(blob))
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


def _server_side_s(cfg, data, reps: int = 20) -> float:
    """The server's own part of one deployed visit (ours): encode the slice it lends, decode the
    reply, merge it back; measured here on the bench's store (the ServerApp does exactly this)."""
    from feda2v.federation.flower_app import decode_store, encode_store, merge_slice, visit_keys
    from feda2v.federation.node import node_name
    from feda2v.federation.server import Federation

    fed = Federation(cfg, data)
    nd = fed.participants(1)[0]
    store = fed.store_for(node_name(nd.node_id))
    keys = visit_keys(store, fed.classes, fed.data.manifest["counts"]["train"][nd.node_id])
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        blob = encode_store(store, store_name="server", round_=1, node=node_name(nd.node_id), keys=keys)
        tensors, header = decode_store(blob, label="bench reply")
        merge_slice(store, {k: v.clone() for k, v in tensors.items()}, header["store"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def deployed(raw: dict, *, server_side_s: float, supernode: str = "feda2v") -> dict:
    """A real deployment (scripts/flower_netns.sh: a SuperLink and one SuperNode per node, each in
    its own network namespace, TLS, SuperNode authentication, each site holding only its bundle) of
    the bench's config, shared relay. The FAB's ClientApp is benchmarks/flower_probe.py (feda2v's
    handlers, timed), so a visit's seconds split into what is ours (importing feda2v and torch in
    Flower's per-message `flwr-clientapp` process, the handler: partition read and verify, decode,
    train, encode; the server's encode/decode/merge) and what is Flower's (starting that process,
    delivering the message both ways: SuperNode and server polling, TLS, HTTP). ``supernode``:
    feda2v (feda2v-supernode, Flower's SuperNode with its idle waits capped at 0.1 s) or flower
    (plain flower-supernode: a fixed 3 s idle sleep, 0.5 s reply polling). Needs root."""
    import json
    import re
    import shutil
    import subprocess

    from feda2v.config import load_config, to_plain
    from feda2v.data import prepare
    from feda2v.data.sites import write_site_bundles

    if os.geteuid() != 0 or shutil.which("ip") is None:
        return {"error": "the deployed measurement needs root and iproute2 (network namespaces)"}
    root = Path(__file__).resolve().parents[1]
    script = [str(root / "scripts" / "flower_netns.sh")]
    nodes, rounds = raw["data"]["nodes"], raw["federation"]["rounds"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server, sites, probe, work, run_dir = (tmp / n for n in ("server", "sites", "probe", "deploy", "server/run"))
        probe.mkdir()
        raw = json.loads(json.dumps(raw))
        raw["data"]["prepared_dir"] = str(server / "prepared")
        raw["checkpoint"] = {"dir": str(run_dir / "ckpt")}
        raw["train"] = {"reports_dir": str(run_dir / "reports"), "progress": "lines"}
        prepare(load_config(raw))
        write_site_bundles(server / "prepared", sites)
        cfg_path = server / "config.json"
        cfg_path.write_text(json.dumps(to_plain(load_config(raw))))
        env = dict(os.environ, FEDA2V_FLOWER_PROBE=str(probe), SUPERNODE=supernode, IDLE_POLL_S="0.1")
        from feda2v.numerics import OPT_OUT, PINNED_ENV

        if any(os.environ.get(k) != v for k, v in PINNED_ENV.items()):
            # this process runs the libraries' native code paths (the bench does not pin): so must
            # the deployment's processes, or the in-process state it is compared with differs
            env[OPT_OUT] = "1"
        sh = lambda *a, timeout=300: subprocess.run(["bash", *script, *map(str, a)], env=env,  # noqa: E731
                                                    capture_output=True, text=True, timeout=timeout)
        try:
            up = sh("up", work, server, sites)
            if up.returncode != 0:
                return {"error": (up.stderr.strip().splitlines() or ["flower_netns.sh up failed"])[-1]}
            shutil.copy(Path(__file__).with_name("flower_probe.py"), work / "app" / "flower_probe.py")
            pp = work / "app" / "pyproject.toml"
            pp.write_text(pp.read_text().replace('"feda2v.federation.flower_app:client_app"',
                                                 '"flower_probe:client_app"'))
            t0 = time.perf_counter()
            res = sh("run", work, cfg_path, run_dir, timeout=1800)
            run_s = time.perf_counter() - t0
            log = (run_dir / "flwr_run.log").read_text() if (run_dir / "flwr_run.log").exists() else ""
            final = None
            if res.returncode == 0:
                from feda2v.checkpoint.runstate import read_run_state

                final = {f"{name}/{k}": v for name, (tensors, _) in
                         read_run_state(run_dir / "ckpt" / "latest.ckpt").stores.items() for k, v in tensors.items()}
        finally:
            sh("down", work, timeout=120)
        if res.returncode != 0:
            return {"error": (res.stderr.strip().splitlines() or ["flwr run failed"])[-1]}
        recs = sorted((json.loads(p.read_text()) for p in probe.glob("*.json")), key=lambda r: r["handler_start"])
    secs = [float(m) for m in re.findall(r"^round \d+/\d+: .*? ([\d.]+)s$", log, re.M)]
    if len(secs) != rounds:
        return {"error": f"found {len(secs)} round lines for {rounds} rounds in the flwr run log"}
    visits = [r for r in recs if r["kind"] == "train.generators"]
    steady = visits[nodes:] or visits  # after round 1
    med = lambda key: statistics.median(key(r) for r in steady)  # noqa: E731
    per_visit = statistics.median(secs[1:] or secs) / nodes
    clientapp_start = med(lambda r: r["module_start"] - r["process_start"])
    feda2v_import = med(lambda r: r["feda2v_imported"] - r["module_start"])
    before_handler = med(lambda r: r["handler_start"] - r["feda2v_imported"])
    handler = med(lambda r: r["handler_end"] - r["handler_start"])
    training = med(lambda r: r["train_seconds"])
    partition = med(lambda r: r["partition_read_s"])
    in_process = med(lambda r: r["handler_end"] - r["process_start"])
    ours = feda2v_import + handler + server_side_s
    return {
        "supernode": supernode, "nodes": nodes, "rounds": rounds, "visits_timed": len(steady), "flwr_run_s": run_s,
        "deployed_round_s_median_after_first": statistics.median(secs[1:] or secs),
        "deployed_round_s_first": secs[0],
        "deployed_per_visit_s": per_visit,
        # ours
        "visit_ours_s": ours,
        "visit_ours_feda2v_import_s": feda2v_import,
        "visit_ours_handler_s": handler,
        "visit_ours_training_s": training,
        "visit_ours_partition_read_s": partition,  # read + verify its partition (fresh process: every visit)
        "visit_ours_handler_other_s": handler - training - partition,  # lazy imports, decode, encode
        "visit_ours_server_s": server_side_s,
        # Flower's (the rest of the visit's wall time)
        "visit_flower_s": per_visit - ours,
        "visit_flower_clientapp_start_s": clientapp_start,  # process start to loading our app
        "visit_flower_after_import_s": before_handler,  # app loaded to our handler called
        "visit_flower_delivery_s": per_visit - in_process - server_side_s,  # messages both ways, polling
        "message_bytes_in_median": statistics.median(r["bytes_in"] for r in steady),
        "message_bytes_out_median": statistics.median(r["bytes_out"] for r in steady),
        "clientapp_processes": len({r["pid"] for r in recs}),
        "messages": len(recs),
        "_state": final,
    }


def _node_resident_state(fed) -> dict:
    """The stores a node-resident federation's nodes keep (their last round's checkpoint in
    federation.flower.node_state_dir), named like ``_store_state``'s."""
    from feda2v.checkpoint.manager import round_filename
    from feda2v.checkpoint.nodestate import node_state_dir, run_scope
    from feda2v.checkpoint.runstate import read_run_state

    out = {}
    scope = run_scope(fed.cfg.checkpoint.dir)
    for node, r in fed.node_rounds.items():
        state = read_run_state(node_state_dir(fed.cfg.federation.flower.node_state_dir, node, scope)
                               / round_filename(r))
        out.update({f"{node}/{k}": v for k, v in state.stores[node][0].items()})
    return out


def _drive(engine, cfg, data) -> dict:
    from feda2v.federation.server import Federation

    # the Flower engine keeps local/fedavg stores on their nodes (node_state_dir), as deployed
    fed = Federation(cfg, data, node_resident=getattr(engine, "node_resident", False))
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
    if fed.node_resident:
        state.update(_node_resident_state(fed))
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
    nodes = 3
    table, engines, states = [], [], {}
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
                engines.append({"engine": name, "sharing": sharing, "rounds": rounds, "nodes": nodes,
                                "identical_state": same, **{k: v for k, v in r.items() if not k.startswith("_")}})
                table.append(_row(name, sharing, rounds, r["round_s_first"], r["round_s_median_after_first"],
                                  same))
            states[sharing] = ip["_state"]
        server_s = _server_side_s(_config(prepared, rounds, "shared", max_samples), data)
    shared = {r["engine"]: r for r in engines if r["sharing"] == "shared"}
    for r in shared.values():
        r["per_visit_s"] = r["round_s_median_after_first"] / nodes
    ip, fl = shared["inprocess"], shared["flower-simulation"]
    summary = (f"per round (shared relay, 3 nodes, digits): in-process {ip['round_s_median_after_first'] * 1e3:.0f} ms, "
               f"Flower simulation {fl['round_s_median_after_first'] * 1e3:.0f} ms after round 1 "
               f"(+{fl['per_visit_overhead_s'] * 1e3:.0f} ms per node visit; round 1 {fl['round_s_first']:.1f} s; "
               f"start-up {fl['startup_s']:.1f} s, shutdown {fl['shutdown_s']:.1f} s); "
               f"identical final state: {all(r['identical_state'] for r in engines)}; in-process is "
               f"{fl['round_s_median_after_first'] / ip['round_s_median_after_first']:.0f}x faster per round "
               f"(target >= 20x)")
    breakdown = None
    if not quick and os.environ.get("BENCH_FLOWER_DEPLOY", "1") != "0":
        # the same config, same run: a real deployment beside the two engines above, with our
        # SuperNode launcher (Flower's waits capped) and with Flower's own timing
        for supernode in ("feda2v", "flower"):
            dep = deployed(_raw(prepared, rounds, "shared", max_samples), server_side_s=server_s,
                           supernode=supernode)
            final = dep.pop("_state", None)
            engine = "flower-deployment" + ("" if supernode == "feda2v" else " (flower-supernode)")
            engines.append({"engine": engine, "sharing": "shared", "rounds": rounds, "nodes": nodes, **dep})
            if "error" in dep:
                summary += f"; deployed ({supernode}-supernode): FAILED: {dep['error']}"
                continue
            if supernode == "feda2v":
                breakdown = {k: v for k, v in dep.items() if k.startswith("visit_")}
            ref = states["shared"]
            same = set(final) == set(ref) and all(torch.equal(final[k], ref[k]) for k in ref)
            table.append(_row(engine, "shared", rounds, dep["deployed_round_s_first"],
                              dep["deployed_round_s_median_after_first"], same))
            summary += (f"; per visit (shared), {supernode}-supernode: in-process {ip['per_visit_s'] * 1e3:.0f} ms, "
                        f"simulation {fl['per_visit_s'] * 1e3:.0f} ms, deployed {dep['deployed_per_visit_s']:.2f} s "
                        f"(netns, TLS, SuperNode auth; +{dep['deployed_per_visit_s'] - ip['per_visit_s']:.2f} s, "
                        f"target <= 3 s): ours {dep['visit_ours_s']:.2f} s (feda2v+torch import "
                        f"{dep['visit_ours_feda2v_import_s']:.2f} s, handler {dep['visit_ours_handler_s']:.2f} s of "
                        f"which training {dep['visit_ours_training_s']:.2f} s and partition read "
                        f"{dep['visit_ours_partition_read_s']:.2f} s, server {dep['visit_ours_server_s'] * 1e3:.1f} ms), "
                        f"Flower's {dep['visit_flower_s']:.2f} s (clientapp process start "
                        f"{dep['visit_flower_clientapp_start_s']:.2f} s, app-to-handler "
                        f"{dep['visit_flower_after_import_s']:.2f} s, delivery both ways "
                        f"{dep['visit_flower_delivery_s']:.2f} s); deployed message "
                        f"{dep['message_bytes_in_median'] / 1e3:.0f} kB in / {dep['message_bytes_out_median'] / 1e3:.0f} kB out; "
                        f"identical to in-process: {same}")
    sizes = message_bytes()
    summary += "; visit message, 20-class GAN, node with 4 classes: " + ", ".join(
        f"{r['granularity']} {r['visit_message_bytes'] / 1e6:.2f} MB of {r['whole_store_bytes'] / 1e6:.2f} MB"
        for r in sizes)
    return {"summary": summary, "table": table, "engines": engines, "message_bytes": sizes,
            "deployed_visit_breakdown": breakdown}


def _row(engine: str, sharing: str, rounds: int, first: float, steady: float, same: bool) -> dict:
    """One line of the report's table: per-visit cost = a steady round's wall time / nodes (every
    node visits once per round)."""
    return {"engine": engine, "sharing": sharing, "rounds": rounds, "nodes": 3, "round_s_first": first,
            "round_s_median_after_first": steady, "per_visit_s": steady / 3, "identical_to_inprocess": same}


if __name__ == "__main__":
    import json
    import sys

    out = run(quick="--quick" in sys.argv)
    print(json.dumps(out, indent=2))
