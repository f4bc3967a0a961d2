"""profiling/: traces with the generator_step ranges on the configured schedule, a summary with
step-time percentiles and top operators, nothing at all when off, and results unchanged."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from torch.profiler import record_function

from feda2v.config import load_config
from feda2v.errors import ConfigError
from feda2v.profiling import RANGES, StepProfiler, percentile
from feda2v.seeding import torch_generator


def _pcfg(tmp_path, **kw):
    return load_config({"data": {"name": "digits"},
                        "profiler": {"enabled": True, "dir": str(tmp_path / "profile"), **kw}}
                       ).profiler


def toy_training(prof: StepProfiler, steps: int = 8) -> dict[str, torch.Tensor]:
    """Deterministic toy generator loop using the same record_function ranges as the store."""
    torch.manual_seed(123)  # the profiler must not consume from this either
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch_generator("toy", 0)
    with prof:
        for _ in range(steps):
            x = torch.randn(32, 6, generator=g)
            with record_function("generator_step"):
                with record_function("generator_step/forward"):
                    loss = (model(x + 0.1 * torch.randn(32, 6)) - x).pow(2).mean()
                with record_function("generator_step/backward"):
                    opt.zero_grad()
                    loss.backward()
                with record_function("generator_step/optimizer"):
                    opt.step()
            prof.step()
    state = {f"p/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        state.update({f"o/{i}/{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    state["rng/global"] = torch.get_rng_state()
    return state


def _trace_events(trace: Path) -> set[str]:
    return {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}


def test_percentile_matches_linear_interpolation():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([10.0], 95) == 10.0
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)


def test_disabled_profiler_does_nothing(tmp_path):
    cfg = load_config({"data": {"name": "digits"},
                       "profiler": {"enabled": False, "dir": str(tmp_path / "p")}}).profiler
    prof = StepProfiler(cfg, "off")
    with prof:
        for _ in range(5):
            prof.step()
    assert not (tmp_path / "p").exists()
    assert prof.step_times == [] and prof.summary_path is None and prof._prof is None


def test_enabled_writes_trace_with_generator_ranges_and_summary(tmp_path):
    prof = StepProfiler(_pcfg(tmp_path, wait=1, warmup=1, active=3, repeat=1), "toy run")
    toy_training(prof, steps=8)
    run_dir = tmp_path / "profile" / "toy_run"
    assert prof.out_dir == run_dir
    traces = sorted(run_dir.glob("*.pt.trace.json"))
    assert len(traces) == 1 and prof.traces == traces
    names = _trace_events(traces[0])
    assert set(RANGES) <= names, set(RANGES) - names
    assert any(n.startswith("ProfilerStep#") for n in names)
    summary = (run_dir / "summary.md").read_text()
    assert "p50" in summary and "p95" in summary
    assert "Top operators by self CPU time" in summary and "aten::" in summary
    assert "`generator_step/backward`" in summary
    assert len(prof.step_times) == 8 and all(t > 0 for t in prof.step_times)


def test_schedule_repeat_gives_one_trace_per_cycle(tmp_path):
    prof = StepProfiler(_pcfg(tmp_path, wait=1, warmup=1, active=2, repeat=2), "rep")
    toy_training(prof, steps=12)
    assert len(list((tmp_path / "profile" / "rep").glob("*.pt.trace.json"))) == 2
    assert "2 recorded cycle(s)" in prof.summary_path.read_text()


def test_too_few_steps_says_so(tmp_path):
    prof = StepProfiler(_pcfg(tmp_path, wait=2, warmup=2, active=3), "short")
    toy_training(prof, steps=3)
    text = prof.summary_path.read_text()
    assert "No profiler cycle completed" in text and "wait+warmup+active = 7" in text


def test_bad_schedule_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="profiler.active"):
        with StepProfiler(_pcfg(tmp_path, active=0), "bad"):
            pass


def test_profiler_on_or_off_never_changes_results(tmp_path):
    off = toy_training(StepProfiler(_pcfg(tmp_path, enabled=False), "off"))
    on = toy_training(StepProfiler(_pcfg(tmp_path, wait=0, warmup=1, active=4, repeat=0,
                                          record_shapes=True, profile_memory=True,
                                          with_stack=True), "on"))
    assert off.keys() == on.keys()
    for k in off:
        assert torch.equal(off[k], on[k]), k


# -- the real GeneratorStore -----------------------------------------------------------------
def _store_run(prof: StepProfiler):
    from feda2v.store import GeneratorStore, StoreSpec

    spec = StoreSpec(type="cvae", granularity="per_class", classes=("a", "b", "c"),
                     feature_dim=8, condition_dim=3, latent_dim=4, hidden_dim=16)
    store = GeneratorStore(spec, torch.eye(3))
    g = torch_generator("data", 0)
    with prof:
        for r in range(7):
            x = torch.randn(30, 8, generator=g)
            y = torch.arange(30) % 3
            store.train_batch(x, y, gen=torch_generator("step", r), node="node/000", round=r)
            prof.step()
    return store.state_dict()[0]


def test_real_store_step_is_profiled_and_unchanged(tmp_path):
    pytest.importorskip("feda2v.store")
    off = _store_run(StepProfiler(_pcfg(tmp_path, enabled=False), "store-off"))
    prof = StepProfiler(_pcfg(tmp_path, wait=1, warmup=1, active=3), "store-on")
    on = _store_run(prof)
    assert off.keys() == on.keys()
    assert all(torch.equal(off[k], on[k]) for k in off)
    names = _trace_events(prof.traces[0])
    assert set(RANGES) <= names, set(RANGES) - names


# -- TensorBoard's PyTorch profiler plugin ---------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tensorboard_plugin_lists_the_run(tmp_path):
    prof = StepProfiler(_pcfg(tmp_path, wait=1, warmup=1, active=3), "tb_run")
    toy_training(prof, steps=6)
    port = _free_port()
    tb = Path(sys.executable).with_name("tensorboard")
    proc = subprocess.Popen(
        [str(tb), "--logdir", str(tmp_path / "profile"), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler/runs"
        runs, deadline = None, time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.loads(r.read())
                runs = body.get("runs", body) if isinstance(body, dict) else body
                if runs and "tb_run" in runs and not (isinstance(body, dict)
                                                      and body.get("loading")):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        assert runs and "tb_run" in runs, f"plugin runs: {runs!r}"
        views = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler/views?run=tb_run",
            timeout=10).read())
        assert "Overview" in views or "Trace" in views, views
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_store_step_opens_no_profiler_range_unless_a_profiler_records():
    """profiling.step_range: an unprofiled step enters no record_function (each one is a dispatcher
    call even with nothing recording); under torch.profiler the same step records every range."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from feda2v.profiling import RANGES
    from feda2v.store import GeneratorStore, StoreSpec

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    spec = StoreSpec(type="gan", granularity="unified", classes=("a", "b"), feature_dim=4, condition_dim=3,
                     latent_dim=2, hidden_dim=8)
    store = GeneratorStore(spec, torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1] * 3)

    def step():
        store.train_batch(x, y, gen=torch.Generator().manual_seed(2), node="n", round=0)

    with Ops() as ops:
        step()
    assert ops.names and not [n for n in ops.names if "record_function" in n]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    assert set(RANGES) <= {e.key for e in prof.key_averages()}
