"""The generator step on CUDA (issue 16). Marked ``cuda``: deselected on a machine without a GPU;
``scripts/gpu_check.sh [DIR]`` runs them all and the device benchmark, writing figures and numbers
to DIR (default reports/gpu_check).

``FEDA2V_CUDA_TEST_DEVICE=cpu`` runs the same tests on the CPU (a dry run of every code path that is
not CUDA-specific; the CUDA-only assertions are skipped).
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from feda2v.checkpoint import diff_checkpoints, read_checkpoint
from feda2v.config import load_config

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get("FEDA2V_CUDA_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
OUT = Path(os.environ.get("FEDA2V_GPU_REPORT", ROOT / "reports" / "gpu_check"))
NODES = 3


def record(name: str, value) -> None:
    """Each test's measured facts go to OUT/results.json (what the issue note quotes)."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = value
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from feda2v.data import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(load_config({"seed": 0, "data": {"name": "digits", "nodes": NODES, "condition": "onehot",
                                              "prepared_dir": str(out), "max_samples": 600,
                                              "partition": {"classes_per_node": 4}}}))
    return out


def train_in(tmp: Path, prepared: Path, *, device: str, rounds: int, resume=None, **sections):
    from feda2v.pipeline.train import train

    classes = json.loads((prepared / "manifest.json").read_text())["classes"]
    raw = {"seed": 0,
           "data": {"name": "digits", "nodes": NODES, "condition": "onehot", "prepared_dir": str(prepared),
                    "max_samples": 600, "partition": {"classes_per_node": 4}},
           "generator": {"hidden_dim": 64, "latent_dim": 8, "class_groups": {"hi": classes[5:], "lo": classes[:5]}},
           "federation": {"rounds": rounds, "local_epochs": 1},
           "checkpoint": {"dir": "ckpt"}, "train": {"resume": resume, "device": device, "progress": "off",
                                                    "reports_dir": "rep"},
           "tracking": {"enabled": False}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    tmp.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(tmp)
    try:
        return train(load_config(raw))
    finally:
        os.chdir(here)


@pytest.mark.parametrize("sharing, granularity, gtype", [("shared", "per_class", "cvae"), ("fedavg", "unified", "gan"),
                                                         ("local", "per_group", "vae")])
def test_resume_on_the_device_is_bit_identical(tmp_path, prepared, sharing, granularity, gtype):
    sec = {"federation": {"sharing": sharing}, "generator": {"type": gtype, "granularity": granularity}}
    train_in(tmp_path / "a", prepared, device=DEVICE, rounds=3, **sec)
    train_in(tmp_path / "b", prepared, device=DEVICE, rounds=1, **sec)
    train_in(tmp_path / "b", prepared, device=DEVICE, rounds=3, resume="latest", **sec)
    diffs = diff_checkpoints(tmp_path / "a/ckpt/latest.ckpt", tmp_path / "b/ckpt/latest.ckpt")
    record(f"resume_bit_identical/{sharing}-{granularity}-{gtype}", not diffs)
    assert not diffs, diffs[:5]
    if ON_CUDA:
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") and torch.are_deterministic_algorithms_enabled()


def _max_param_diff(a: Path, b: Path) -> float:
    ta, _ = read_checkpoint(a)
    tb, _ = read_checkpoint(b)
    return max(float((ta[n].double() - tb[n].double()).abs().max()) for n in ta
               if "/param/" in n and ta[n].numel())


def test_checkpoints_move_between_cpu_and_the_device(tmp_path, prepared):
    """A device run resumes on the CPU (and back) and stays close to the straight run: the state is
    CPU tensors in the file, the random numbers are drawn on the host either way."""
    sec = {"generator": {"type": "cvae", "granularity": "per_class"}}
    train_in(tmp_path / "dev", prepared, device=DEVICE, rounds=3, **sec)
    train_in(tmp_path / "mix", prepared, device=DEVICE, rounds=2, **sec)
    train_in(tmp_path / "mix", prepared, device="cpu", rounds=3, resume="latest", **sec)
    train_in(tmp_path / "back", prepared, device="cpu", rounds=2, **sec)
    train_in(tmp_path / "back", prepared, device=DEVICE, rounds=3, resume="latest", **sec)
    to_cpu = _max_param_diff(tmp_path / "dev/ckpt/latest.ckpt", tmp_path / "mix/ckpt/latest.ckpt")
    to_dev = _max_param_diff(tmp_path / "dev/ckpt/latest.ckpt", tmp_path / "back/ckpt/latest.ckpt")
    record("portability/max_abs_param_diff_device_then_cpu", to_cpu)
    record("portability/max_abs_param_diff_cpu_then_device", to_dev)
    # Stated tolerance (README): float32 rounding differences grow through training; after a round
    # of a few dozen Adam steps they stay well below the parameters' scale (~0.1).
    assert to_cpu < 1e-3 and to_dev < 1e-3, (to_cpu, to_dev)
    if not ON_CUDA:
        assert to_cpu == to_dev == 0.0


def _store(granularity="per_class", keys=10, gtype="cvae"):
    from feda2v.store import GeneratorStore, StoreSpec

    names = tuple(f"c{i}" for i in range(keys))
    spec = StoreSpec(type=gtype, granularity=granularity, classes=names, feature_dim=32, condition_dim=16,
                     latent_dim=8, hidden_dim=64)
    return GeneratorStore(spec, torch.randn(keys, 16, generator=torch.Generator().manual_seed(0)), device=DEVICE)


def _sync_sites(fn) -> list[str]:
    """Every synchronising CUDA call ``fn`` makes (torch.cuda.set_sync_debug_mode), by the Python
    line that made it."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("gtype", ["cvae", "gan"])
@pytest.mark.parametrize("granularity", ["unified", "per_class"])
def test_no_host_sync_inside_a_visit(gtype, granularity):
    """The steps of a visit queue their work and never wait for the device: the batch layout, the
    copies to the device, the stacked forward/backward, the on-device finiteness checks and loss
    sums, and the fused optimizer with its found-inf veto. Only ``finish()`` reads back (once)."""
    s = _store(granularity, gtype=gtype)
    x = torch.randn(64, 32).to(s.device)
    y = torch.arange(64) % 10  # labels on the host
    gen = torch.Generator().manual_seed(0)
    warm = s.visit(node="n", round=0)  # lazy optimizer state, cuBLAS handles, the allocator's pools
    for _ in range(3):
        warm.step(x, y, gen=gen)
    warm.finish()

    def steps(n=5):
        v = s.visit(node="n", round=0)
        for _ in range(n):
            v.step(x, y, gen=gen)
        return v

    if not ON_CUDA:
        assert set(steps().finish()) == set(s.keys)  # the dry run: the same code path on the CPU
        pytest.skip("sync debug mode is CUDA's")
    sites = _sync_sites(steps)
    record(f"syncs_inside_a_visit_of_5_steps/{gtype}-{granularity}", {x: sites.count(x) for x in sorted(set(sites))})
    assert not sites, sorted(set(sites))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside the steps raises
    try:
        v = steps()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(v.finish()) == set(s.keys)
    finish_sites = _sync_sites(steps().finish)
    record(f"syncs_at_finish/{gtype}-{granularity}", len(finish_sites))
    assert len(finish_sites) == 1, finish_sites


def test_a_nodes_visit_waits_for_the_device_once():
    """train_generators (what every engine runs on a node): one sync per visit, the read-back."""
    from types import SimpleNamespace

    from feda2v.federation.node import train_generators

    s = _store()
    y = torch.arange(96) % 10
    data = SimpleNamespace(node_id=0, train_x=torch.randn(96, 32), train_y=y)

    def visit():
        return train_generators(s, data, classes=[f"c{i}" for i in range(10)], seed=0, round_=1,
                                local_epochs=2, batch_size=16, reset_on_change="never")

    res = visit()  # warm-up
    assert res.steps == 12 and set(res.losses) == set(s.keys)
    if not ON_CUDA:
        pytest.skip("sync debug mode is CUDA's")
    sites = _sync_sites(visit)
    record("syncs_per_node_visit_of_12_steps", {x: sites.count(x) for x in sorted(set(sites))})
    assert len(sites) == 1 and sites[0].startswith("store/steps.py"), sites


def test_fused_adamw_on_the_device():
    s = _store()
    opt = s.optimizer("class/c0")
    assert opt.defaults["fused"] is True
    assert all(p.device == s.device for g in opt.param_groups for p in g["params"])
    s.train_batch(torch.randn(20, 32).to(s.device), torch.arange(20) % 10, gen=torch.Generator(), node="n", round=0)
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert st["exp_avg"].device == s.device and st["step"].device == s.device


def test_profiler_trace_has_device_kernels_under_the_step_ranges(tmp_path):
    from types import SimpleNamespace

    from feda2v.profiling import StepProfiler

    s = _store()
    x, y = torch.randn(64, 32).to(s.device), torch.arange(64) % 10
    cfg = SimpleNamespace(enabled=True, wait=1, warmup=1, active=3, repeat=1, record_shapes=False,
                          profile_memory=False, with_stack=False, dir=str(OUT / "profile"))
    gen = torch.Generator().manual_seed(0)
    with StepProfiler(cfg, f"cuda_check_{DEVICE.replace(':', '')}") as prof:
        for _ in range(6):
            s.train_batch(x, y, gen=gen, node="n", round=0)
            prof.step()
    assert prof.traces, "no trace written"
    events = json.loads(prof.traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"generator_step", "generator_step/forward", "generator_step/backward",
            "generator_step/optimizer"} <= names
    summary = prof.summary_path.read_text()
    if not ON_CUDA:
        return
    kernels = [e for e in events if e.get("cat") == "kernel"]
    ranges = [e for e in events if e.get("cat") == "gpu_user_annotation" and str(e.get("name")).startswith(
        "generator_step")]
    inside = [k for k in kernels if any(r["ts"] <= k["ts"] <= r["ts"] + r.get("dur", 0) for r in ranges)]
    record("profiler/kernels_in_trace", len(kernels))
    record("profiler/kernels_under_generator_step", len(inside))
    assert kernels and inside
    assert "self CUDA (ms)" in summary and "total CUDA (ms)" in summary


def test_device_benchmark_writes_its_figures():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_device

    devices = ["cpu", DEVICE] if ON_CUDA else ["cpu"]
    res = bench_device.run(quick=not ON_CUDA, out=OUT, devices=devices)
    record("bench_device", res["rows"])
    assert (OUT / "bench_device.png").stat().st_size > 0 and (OUT / "bench_device.md").exists()
