"""The Flower deployment job (`flwr run` against a SuperLink): a ServerApp whose main runs the
``federated-train`` job with an engine built on that ServerApp's Grid.

`flwr run` app components: ``serverapp = "feda2v.pipeline.flower_job:server_app"``,
``clientapp = "feda2v.federation.flower_app:client_app"`` (scripts/flower_deploy.sh writes them).
Run config: ``config-json`` = path of a resolved feda2v config (JSON/YAML, paths absolute),
optional ``workdir`` (the job's working directory: checkpoints, reports).
"""
from __future__ import annotations

import json
import os

from flwr.serverapp import ServerApp

from feda2v.errors import ConfigError, Feda2vError, TrainingStopped


def deployment_main(grid, context) -> None:
    from omegaconf import OmegaConf

    from feda2v.config import load_config
    from feda2v.federation.flower_engine import FlowerEngine
    from feda2v.pipeline.train import train

    path = context.run_config.get("config-json")
    if not path:
        raise ConfigError("flwr run needs --run-config 'config-json=\"/abs/path/config.json\"'")
    raw = OmegaConf.to_container(OmegaConf.load(str(path)), resolve=True)
    raw.setdefault("federation", {})["engine"] = "flower"
    cfg = load_config(raw)
    workdir = context.run_config.get("workdir")
    if workdir:
        os.chdir(str(workdir))
    try:
        summary = train(cfg, engine=FlowerEngine(grid=grid))
    except (Feda2vError, TrainingStopped) as e:  # the one line the deploy script and `flwr log` show; Flower marks the run failed
        print(f"feda2v: error: {e}", flush=True)
        raise
    print(f"feda2v: flower deployment run finished: {json.dumps(summary, sort_keys=True, default=str)}",
          flush=True)


server_app = ServerApp()
server_app.main()(deployment_main)
