"""Engine overhead: the share of a round spent outside generator steps (routing, fedavg, metrics),
for each ownership mode on the same synthetic federation (target <= 10%)."""
from __future__ import annotations

import statistics

import torch


def federation(sharing: str, nodes: int = 10, total: int = 20_000, granularity: str = "per_class"):
    from feda2v.config import load_config
    from feda2v.data import NodeData, PreparedData
    from feda2v.federation.server import Federation

    dim, classes = 128, 10
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(total, dim, generator=g), torch.arange(total) % classes
    parts = torch.arange(total).chunk(nodes)
    ex, ey = torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
    data = PreparedData(classes=[f"c{i}" for i in range(classes)], conditions=torch.eye(classes),
                        nodes=[NodeData(i, x[p], y[p], ex, ey) for i, p in enumerate(parts)],
                        manifest={}, manifest_hash="bench", feature_dim=dim, condition_dim=classes)
    cfg = load_config({"data": {"name": "digits", "nodes": nodes},
                       "federation": {"rounds": 1, "batch_size": 64, "sharing": sharing, "local_epochs": 1},
                       "generator": {"type": "cvae", "granularity": granularity}})
    return Federation(cfg, data)


def run(quick: bool = False) -> dict:
    rounds = 2 if quick else 5
    table = []
    for sharing in ("shared", "local", "fedavg"):
        for granularity in ("unified", "per_class"):
            fed = federation(sharing, total=2_000 if quick else 20_000, granularity=granularity)
            shares, walls = [], []
            for r in range(1, rounds + 1):
                res = fed.run_round(r)
                shares.append(1 - res.train_seconds / res.wall_seconds)
                walls.append(res.wall_seconds)
            table.append({"sharing": sharing, "granularity": granularity,
                          "round_s": statistics.median(walls),
                          "overhead_share": statistics.median(shares)})
    worst = max(table, key=lambda r: r["overhead_share"])
    summary = (f"engine overhead (time outside generator steps) at most {worst['overhead_share']:.1%} of a "
               f"round ({worst['sharing']}/{worst['granularity']}; target <= 10%)")
    return {"summary": summary, "table": table}
