"""Benchmark: `prepare` wall time per data source at its conf/data default, cold and cached, and
the size of the prepared dir and of the cache.

Each measurement runs in a fresh process (as `feda2v-prepare` / `dvc repro` do), so cold includes
loading the MiniLM text model and rendering audio; cached is a second process on the same cache.
Run: ``.venv/bin/python benchmarks/bench_prepare.py`` (``--quick``: small settings, smoke only).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from omegaconf import OmegaConf
from feda2v.config import load_config
from feda2v.data import prepare
data = OmegaConf.to_container(OmegaConf.load(sys.argv[1]))
data.update(json.loads(sys.argv[2]))
report = {}
prepare(load_config({"seed": 0, "data": data}), report=report)
print(json.dumps({"prepare_s": report["seconds"], "process_s": time.perf_counter() - t0,
                  "cache": report["cache"], "train": report["manifest"]["sizes"]["train"],
                  "test": report["manifest"]["sizes"]["test"], "nodes": report["manifest"]["nodes"]}))
"""


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _once(source: str, over: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, str(REPO / "conf/data" / f"{source}.yaml"), json.dumps(over)],
                       capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{source}: {r.stderr.strip().splitlines()[-1:]}")
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "wall_s": wall}


def run(quick: bool) -> dict:
    small = {
        "digits": {},
        "fashion_mnist": {"max_samples": 5000, "nodes": 20},
        "instruments": {"instruments": {"classes": 4, "clips_per_class": 20}},
    }
    table = []
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        for source in ("digits", "fashion_mnist", "instruments"):
            base = Path(tmp) / source
            over = {"prepared_dir": str(base / "prepared"),
                    "instruments": {"cache_dir": str(base / "cache")}}
            if quick:
                extra = small[source]
                over = {**extra, **over, "instruments": {**extra.get("instruments", {}), **over["instruments"]}}
            cold = _once(source, over)
            cached = _once(source, over)
            table.append({
                "source": source, "nodes": cold["nodes"], "samples": cold["train"] + cold["test"],
                "cold_prepare_s": round(cold["prepare_s"], 2), "cold_process_s": round(cold["wall_s"], 2),
                "cached_prepare_s": round(cached["prepare_s"], 2), "cached_process_s": round(cached["wall_s"], 2),
                "prepared_MB": round(_size(base / "prepared") / 1e6, 2),
                "cache_MB": round(_size(base / "cache") / 1e6, 2),
            })
    summary = "; ".join(f"{r['source']}: cold {r['cold_process_s']} s, cached {r['cached_process_s']} s, "
                        f"{r['prepared_MB']} MB" for r in table)
    return {"summary": summary, "table": table}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
