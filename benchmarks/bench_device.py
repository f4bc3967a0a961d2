"""The generator step on each device (CPU, and CUDA where there is one): step time for unified and
per_class stores with 10, 100 and 500 keys (one step with its read-back, ``train_batch``; and a step
of a visit, queued with the visit's other steps and one read-back at its end, as a node runs them),
against the device's measured GEMM rate at the step's own matmul shapes ("share of the GEMM bound": the time the step's batched matmuls alone take at that
rate, over the step's time; 100% = the step is nothing but its matmuls).

    python benchmarks/bench_device.py [--out DIR] [--quick] [--devices cpu,cuda]

writes DIR/bench_device.json, DIR/bench_device.md and DIR/bench_device.png (default reports/gpu_check).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import make_store  # noqa: E402

FEATURE, CONDITION, HIDDEN, LATENT = 128, 384, 128, 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(fn, device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def linear_shapes(module: torch.nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def gemm_bound(device: torch.device, k: int, n: int, shapes, repeats: int) -> tuple[float, float]:
    """(seconds, FLOPs) of the step's batched matmuls alone: per layer the forward baddbmm and the
    two backward bmms, at [K, n, in] x [K, in, out]."""
    g = torch.Generator().manual_seed(0)
    ops = []
    flops = 0.0
    for i, o in shapes:
        x = torch.randn(k, n, i, generator=g).to(device)
        w = torch.randn(k, o, i, generator=g).to(device)
        b = torch.randn(k, 1, o, generator=g).to(device)
        gy = torch.randn(k, n, o, generator=g).to(device)
        ops.append((x, w, b, gy))
        flops += 3 * 2.0 * k * n * i * o

    def run():
        for x, w, b, gy in ops:
            torch.baddbmm(b, x, w.transpose(1, 2))
            torch.bmm(gy, w)
            torch.bmm(gy.transpose(1, 2), x)

    return _median(run, device, repeats), flops


def bench(device: torch.device, granularity: str, keys: int, batch: int, repeats: int) -> dict:
    store = make_store("cvae", granularity, classes=keys, feature_dim=FEATURE, condition_dim=CONDITION,
                       hidden_dim=HIDDEN, latent_dim=LATENT).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, FEATURE, generator=g).to(device)  # features on the device (once per visit)
    y = torch.arange(batch) % keys  # labels on the host, as a node passes them
    noise = torch.Generator().manual_seed(1)
    t = _median(lambda: store.train_batch(x, y, gen=noise, node="bench", round=0), device, repeats)

    def visit():  # steps queued as a node runs them: one read-back at the visit's end
        v = store.visit(node="bench", round=0)
        for _ in range(repeats):
            v.step(x, y, gen=noise)
        v.finish()

    tv = _median(visit, device, 1, warmup=1) / repeats
    k = 1 if granularity == "unified" else keys
    n = batch // k
    shapes = linear_shapes(store.module(store.keys[0]).encoder) + linear_shapes(store.module(store.keys[0]).decoder)
    gt, flops = gemm_bound(device, k, n, shapes, repeats)
    return {"device": str(device), "granularity": granularity, "keys": keys, "batch": batch,
            "step_ms": t * 1e3, "queued_step_ms": tv * 1e3, "gemm_ms": gt * 1e3, "gemm_tflops": flops / gt / 1e12,
            "share_of_gemm_bound": gt / t}


CASES = [("unified", 10), ("per_class", 10), ("per_class", 100), ("per_class", 500)]


def run(quick: bool = False, out: Path | str = "reports/gpu_check", devices: list[str] | None = None) -> dict:
    """The benchmarks/run.py convention (``run(quick) -> {"summary", ...}``), plus where to write."""
    out = Path(out)
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cases = CASES[:3] if quick else CASES
    for d in devices:
        device = torch.device(d)
        for gran, keys in cases:
            batch = max(256, 8 * keys)  # 8 samples per key for per_class
            # (the CPU at 100+ keys takes seconds a step: fewer repeats keep gpu_check under 5 minutes)
            repeats = 3 if quick or (device.type == "cpu" and keys >= 100) else 10
            rows.append(bench(device, gran, keys, batch, repeats=repeats))
    by = {(r["granularity"], r["keys"]): {} for r in rows}
    for r in rows:
        by[(r["granularity"], r["keys"])][r["device"].split(":")[0]] = r
    md = ["| store | batch | device | step (ms) | step in a visit (ms) | GEMM-only (ms) | GEMM rate (TFLOP/s) |"
          " share of GEMM bound | speed-up vs CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for (gran, keys), per in by.items():
        cpu = per.get("cpu")
        for dev, r in per.items():
            speed = f"{cpu['step_ms'] / r['step_ms']:.2f}x" if cpu else "-"
            md.append(f"| {gran} K={keys if gran != 'unified' else 1} ({keys} classes) | {r['batch']} | {dev} | "
                      f"{r['step_ms']:.3f} | {r['queued_step_ms']:.3f} | {r['gemm_ms']:.3f} | {r['gemm_tflops']:.3f} | "
                      f"{r['share_of_gemm_bound']:.1%} | {speed} |")
    (out / "bench_device.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "bench_device.md").write_text("\n".join(md) + "\n")
    _figure(out / "bench_device.png", by)
    cuda_rows = [r for r in rows if r["device"].startswith("cuda")]
    summary = "; ".join(
        f"{r['granularity']} {r['keys']} classes: {r['device']} {r['step_ms']:.2f} ms/step, "
        f"{r['share_of_gemm_bound']:.0%} of its GEMM bound"
        + (f", {by[(r['granularity'], r['keys'])]['cpu']['step_ms'] / r['step_ms']:.1f}x the CPU"
           if r["device"].startswith("cuda") and "cpu" in by[(r["granularity"], r["keys"])] else "")
        for r in (cuda_rows or rows))
    return {"summary": summary, "rows": rows, "table": "\n".join(md)}


def _figure(path: Path, by: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{g}\n{k} classes" for g, k in by]
    devs = sorted({d for per in by.values() for d in per})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(devs)
    for j, d in enumerate(devs):
        xs = [i + j * width for i in range(len(labels))]
        a1.bar(xs, [per[d]["step_ms"] if d in per else 0 for per in by.values()], width, label=d)
        a2.bar(xs, [100 * per[d]["share_of_gemm_bound"] if d in per else 0 for per in by.values()], width, label=d)
    for a, title in ((a1, "generator step (ms, log)"), (a2, "share of the GEMM bound (%)")):
        a.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=8)
        a.set_title(title)
        a.legend()
    a1.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/gpu_check")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(run(args.quick, Path(args.out), args.devices.split(","))["table"])


if __name__ == "__main__":
    main()
