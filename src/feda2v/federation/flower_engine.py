"""``federation.engine=flower``: the same Federation rounds, with node visits as Flower messages.

Two ways to run:
- simulation (default, from ``feda2v-train``): ``FlowerEngine.run`` starts Flower's simulation
  runtime (Ray backend, one virtual SuperNode per data partition) in a background thread. Its
  ServerApp runs in this process and drives the rounds (``flower_app.GridRounds``); after each round
  it hands the RoundResult to this generator and waits until the caller has checkpointed/logged,
  so the caller sees exactly the in-process engine's interface.
- deployment (``flwr run`` against a SuperLink): the whole training job runs inside the ServerApp
  (``pipeline/flower_job.py``), which builds this engine with its Grid (``FlowerEngine(grid=...)``).

Supported: ``federation.mode`` generator_only and full (node classifiers train on their nodes, are
averaged on the server, which distils on synthetic samples), with ``sharing`` shared | local |
fedavg, all bit-identical to the in-process engine (visits are applied in the in-process order).
Profiler steps: generator steps run on the Flower nodes, so ``on_step`` is never called here.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Callable, Iterator, Optional


log = logging.getLogger("feda2v.flower")


class FlowerEngine:
    name = "flower"
    # sharing local/fedavg: each node's store lives on its node (flower_app: node-resident visits)
    node_resident = True
    # the server reads only the manifest and conditions (+ full mode's test splits): load_server_view
    nodes_hold_data = True

    def __init__(self, *, grid=None, num_cpus: Optional[int] = None, client_cpus: float = 1.0):
        """Timeouts, poll interval and the failure policy come from ``federation.flower``."""
        self.grid = grid  # a deployment ServerApp's Grid; None = run Flower's simulation runtime
        self.num_cpus = num_cpus
        self.client_cpus = client_cpus
        self.startup_seconds: Optional[float] = None  # simulation start -> first node reachable

    def run(self, federation, start_round: int, end_round: int,
            on_step: Optional[Callable[[], None]] = None,
            on_node: Optional[Callable[[object], None]] = None) -> Iterator:
        """Yield each round's RoundResult; the caller checkpoints/logs between rounds."""
        from feda2v.checkpoint import capture_rng, restore_rng

        # Importing and running Flower/Ray draws from this process's global RNGs (rich seeds an id
        # counter with random.getrandbits at import, Ray picks ports); training never does. Capture
        # them before the first import and put them back before every yield, so checkpoints match
        # the in-process engine's.
        rng = capture_rng()
        from feda2v.federation import flower_app

        if self.grid is not None:  # inside a deployment ServerApp: talk to the real SuperNodes
            rounds = flower_app.GridRounds(self.grid, federation)
            for r in range(start_round, end_round + 1):
                result = rounds.run_round(r, on_node=on_node)
                restore_rng(*rng)  # heartbeat/retry threads draw from `random`
                yield result
            return
        yield from self._simulate(federation, start_round, end_round, on_node, rng)

    # -- simulation -------------------------------------------------------------------------------
    def _simulate(self, federation, start_round: int, end_round: int, on_node, rng) -> Iterator:
        import time

        from feda2v.checkpoint import restore_rng
        from feda2v.federation import flower_app

        from flwr.serverapp import ServerApp

        rng_tensors, rng_json = rng
        results: queue.Queue = queue.Queue()
        go: queue.Queue = queue.Queue()
        t0 = time.perf_counter()

        def server_main(grid, context) -> None:
            try:
                rounds = flower_app.GridRounds(grid, federation)
                self.startup_seconds = time.perf_counter() - t0
                for r in range(start_round, end_round + 1):
                    results.put(("round", rounds.run_round(r, on_node=on_node)))
                    if go.get() != "go":  # the caller stopped early (error or close)
                        return
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                results.put(("error", e))

        server_app = ServerApp()
        server_app.main()(server_main)
        n_nodes = len(federation.data.nodes)
        cpus = self.num_cpus or max(1, min(os.cpu_count() or 1, n_nodes))
        backend = {"client_resources": {"num_cpus": self.client_cpus, "num_gpus": 0.0},
                   "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                 "logging_level": "ERROR", "log_to_driver": True}}

        def simulate() -> None:
            from flwr.simulation import run_simulation

            try:
                run_simulation(server_app=server_app, client_app=flower_app.client_app,
                               num_supernodes=n_nodes, backend_config=backend)
            except BaseException as e:  # noqa: BLE001
                results.put(("error", e))
            finally:
                results.put(("finished", None))

        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU only; silences a Ray tip
        flwr_log = logging.getLogger("flwr")
        old_level = flwr_log.level
        flwr_log.setLevel(logging.WARNING)  # Flower's INFO chatter would drown the round lines
        th = threading.Thread(target=simulate, name="feda2v-flower-simulation", daemon=True)
        th.start()
        done = start_round
        try:
            while done <= end_round:
                kind, payload = results.get()
                if kind == "error":
                    raise payload
                if kind == "finished":
                    raise RuntimeError("the Flower simulation ended before the last round")
                restore_rng(rng_tensors, rng_json)
                yield payload
                done += 1
                if done <= end_round:
                    go.put("go")
        finally:
            go.put("stop")
            th.join(timeout=120)
            flwr_log.setLevel(old_level)
            restore_rng(rng_tensors, rng_json)
