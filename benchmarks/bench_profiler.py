"""Profiler overhead: generator steps inside the profiler's active window vs unprofiled (target <= 3x)."""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

from common import make_batch, make_store


def _steps(store, x, y, n, on_step=None) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        store.train_batch(x, y, gen=gen, node="bench", round=0)
        times.append(time.perf_counter() - t0)
        if on_step:
            on_step()
    return times


def run(quick: bool = False) -> dict:
    from feda2v.config import load_config
    from feda2v.profiling import StepProfiler

    n = 10 if quick else 40
    table = []
    for batch in (64, 1024):
        store = make_store("cvae", "per_class")
        x, y = make_batch(batch)
        _steps(store, x, y, 5)
        plain = statistics.median(_steps(store, x, y, n))
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config({"profiler": {"enabled": True, "wait": 0, "warmup": 1, "active": n,
                                            "repeat": 1, "dir": tmp}})
            with StepProfiler(cfg.profiler, "bench") as prof:
                prof_times = _steps(store, x, y, n + 1, on_step=prof.step)[1:]  # skip the warm-up step
        profiled = statistics.median(prof_times)
        table.append({"batch": batch, "plain_ms": plain * 1e3, "profiled_ms": profiled * 1e3,
                      "ratio": profiled / plain})
    worst = max(r["ratio"] for r in table)
    return {"summary": f"active-window step time up to {worst:.2f}x unprofiled (target <= 3x)",
            "table": table}
