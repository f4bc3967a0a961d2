"""Generator step vs the machine's limit: samples/s and GFLOP/s of VAE/cVAE/GAN steps at batch
64..2048, against the measured float32 matmul rate; and where the time goes (profiler top ops)."""
from __future__ import annotations

import torch

from common import make_batch, make_store, matmul_gflops, median_time


def linear_shapes(module: torch.nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def step_flops(store, batch: int) -> float:
    """Matmul FLOPs of one training step: forward 2*B*in*out per linear layer, backward twice that.
    A GAN step runs D on real and fake for the D update and G then D for the G update."""
    g = sum(i * o for i, o in linear_shapes(store.module("unified", "generator")))
    if "discriminator" not in store.roles:
        return 6.0 * batch * g
    d = sum(i * o for i, o in linear_shapes(store.module("unified", "discriminator")))
    d_step = 2 * batch * g + 6.0 * 2 * batch * d  # G forward (no grad), D fwd+bwd on real and fake
    g_step = 6.0 * batch * g + 6.0 * batch * d    # G fwd+bwd through D
    return d_step + g_step


def top_ops(store, x, y) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            store.train_batch(x, y, gen=gen, node="bench", round=0)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "self_share": round(e.self_cpu_time_total / total, 3)} for e in rows]


def run(quick: bool = False) -> dict:
    peak = matmul_gflops(1024 if quick else 2048, 3 if quick else 10)
    batches = [64, 256] if quick else [64, 128, 256, 512, 1024, 2048]
    table = []
    where = {}
    for gtype in ("vae", "cvae", "gan"):
        store = make_store(gtype)
        gen = torch.Generator().manual_seed(0)
        for b in batches:
            x, y = make_batch(b)
            t = median_time(lambda: store.train_batch(x, y, gen=gen, node="bench", round=0),
                            3 if quick else 20)
            gflops = step_flops(store, b) / t / 1e9
            table.append({"type": gtype, "batch": b, "step_ms": t * 1e3, "samples_per_s": b / t,
                          "gflops": gflops, "share_of_matmul_peak": gflops / peak})
        where[gtype] = top_ops(store, *make_batch(batches[-1]))
    largest = [r for r in table if r["batch"] == batches[-1]]
    summary = (f"float32 matmul peak {peak:.1f} GFLOP/s (one thread); at batch {batches[-1]}: "
               + ", ".join(f"{r['type']} {r['share_of_matmul_peak']:.0%}" for r in largest)
               + " of it (target >= 50%). Where the time goes at that batch (profiler, self CPU): "
               + "; ".join(f"{t}: " + ", ".join(f"{o['op']} {o['self_share']:.0%}" for o in ops[:4])
                           for t, ops in where.items()))
    return {"summary": summary, "matmul_peak_gflops": peak, "table": table, "top_ops": where}
