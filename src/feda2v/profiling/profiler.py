"""torch.profiler around the generator training loop, with a summary of step times and operators.

    with StepProfiler(cfg.profiler, run_name) as prof:
        for batch in batches:
            store.train_batch(...)      # carries the generator_step record_function ranges
            prof.step()

Disabled: ``step`` is one attribute test and nothing else runs. Enabled: torch.profiler on the
configured schedule writes TensorBoard-plugin traces (``*.pt.trace.json``, Chrome trace format, so
Perfetto opens them too) to ``<profiler.dir>/<run_name>/`` and, on exit, ``summary.md`` there.
The profiler only observes: it draws no random numbers and touches no tensors of the model.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

from feda2v.fsutil import atomic_write_text, ensure_dir, writing
from feda2v.profiling.ranges import RANGES


def _safe_run_name(run_name: str) -> str:
    name = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in str(run_name)).strip(".")
    return name or "run"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) without numpy."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class StepProfiler:
    """Context manager; call ``step()`` once per generator step."""

    def __init__(self, cfg: Any, run_name: str, top_k: int = 15):
        self.enabled = bool(cfg.enabled)
        self.cfg = cfg
        self.run_name = _safe_run_name(run_name)
        self.top_k = top_k
        self.out_dir = Path(str(cfg.dir)) / self.run_name
        self.step_times: list[float] = []  # seconds, one per step() call
        self.traces: list[Path] = []
        self.summary_path: Path | None = None
        self._prof = None
        # name -> [self_cpu_us, cpu_total_us, calls, self_device_us, device_total_us]
        self._ops: dict[str, list[float]] = {}
        self._cycles = 0

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "StepProfiler":
        if not self.enabled:
            return self
        import torch
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        c = self.cfg  # the schedule's ranges were checked by load_config
        ensure_dir(self.out_dir)
        self.activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            self.activities.append(ProfilerActivity.CUDA)
        self._schedule = schedule(wait=int(c.wait), warmup=int(c.warmup), active=int(c.active),
                                  repeat=int(c.repeat))
        tb_handler = tensorboard_trace_handler(str(self.out_dir))

        def on_ready(p):
            before = set(self.out_dir.glob("*.pt.trace.json*"))
            with writing(self.out_dir, "write a profiler trace in"):
                tb_handler(p)
            self.traces += sorted(set(self.out_dir.glob("*.pt.trace.json*")) - before)
            self._collect(p)

        self._prof = profile(
            activities=self.activities, schedule=self._schedule, on_trace_ready=on_ready,
            record_shapes=bool(c.record_shapes), profile_memory=bool(c.profile_memory),
            with_stack=bool(c.with_stack))
        self._prof.__enter__()
        self._t = time.perf_counter()
        return self

    def step(self) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        self.step_times.append(now - self._t)
        with warnings.catch_warnings():
            # torch warns that events are cleared per cycle; _collect keeps each cycle's totals
            warnings.filterwarnings("ignore", message=".*clears events", category=UserWarning)
            self._prof.step()
        # Exclude the profiler's own bookkeeping (trace export happens inside step()).
        self._t = time.perf_counter()

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled or self._prof is None:
            return
        try:
            self._prof.__exit__(exc_type, exc, tb)
        finally:
            self._prof = None
            self.summary_path = self._write_summary()

    # -- summary ---------------------------------------------------------------------------
    def _collect(self, p) -> None:
        """Sum operator self/total CPU time over every recorded cycle (key_averages of a
        profile only covers its last cycle)."""
        self._cycles += 1
        for e in p.key_averages():
            acc = self._ops.setdefault(e.key, [0.0, 0.0, 0, 0.0, 0.0])
            acc[0] += e.self_cpu_time_total
            acc[1] += e.cpu_time_total
            acc[2] += e.count
            acc[3] += getattr(e, "self_device_time_total", 0.0) or 0.0
            # a record_function range has no kernels of its own: its CUDA time is its total
            acc[4] += getattr(e, "device_time_total", 0.0) or 0.0

    def _phase_of(self, i: int) -> str:
        from torch.profiler import ProfilerAction

        a = self._schedule(i)
        return {ProfilerAction.NONE: "off", ProfilerAction.WARMUP: "warmup"}.get(a, "recorded")

    def _write_summary(self) -> Path:
        c = self.cfg
        ms = [t * 1e3 for t in self.step_times]
        rec = [t for i, t in enumerate(ms) if self._phase_of(i) == "recorded"]
        off = [t for i, t in enumerate(ms) if self._phase_of(i) == "off"]
        needed = int(c.wait) + int(c.warmup) + int(c.active)

        def row(label, xs):
            if not xs:
                return f"| {label} | 0 | - | - | - |"
            return (f"| {label} | {len(xs)} | {percentile(xs, 50):.3f} | {percentile(xs, 95):.3f}"
                    f" | {sum(xs) / len(xs):.3f} |")

        lines = [
            f"# Profile of `{self.run_name}`", "",
            f"Schedule: wait={c.wait} warmup={c.warmup} active={c.active} repeat={c.repeat}; "
            f"activities: {', '.join(a.name for a in self.activities)}; "
            f"record_shapes={c.record_shapes} profile_memory={c.profile_memory} "
            f"with_stack={c.with_stack}.", "",
            "## Step time (ms, measured around each `step()`)", "",
            "| steps | n | p50 | p95 | mean |", "|---|---|---|---|---|",
            row("all", ms), row("not profiled (wait)", off), row("recorded (active)", rec), "",
        ]
        if self._cycles == 0:
            lines += [f"No profiler cycle completed: {len(ms)} step(s) < wait+warmup+active = "
                      f"{needed}. Train longer or shorten the schedule.", ""]
        else:
            total_self = sum(v[0] for v in self._ops.values()) or 1.0
            top = sorted(self._ops.items(), key=lambda kv: kv[1][0], reverse=True)[: self.top_k]
            cuda = len(self.activities) > 1
            lines += [f"## Top operators by self CPU time ({self._cycles} recorded cycle(s))", "",
                      "| operator | calls | self CPU (ms) | self % | total CPU (ms) |"
                      + (" self CUDA (ms) |" if cuda else ""),
                      "|---|---|---|---|---|" + ("---|" if cuda else "")]
            for name, (self_us, tot_us, n, dev_us, _) in top:
                lines.append(f"| `{name}` | {n} | {self_us / 1e3:.3f} | "
                             f"{100 * self_us / total_self:.1f} | {tot_us / 1e3:.3f} |"
                             + (f" {dev_us / 1e3:.3f} |" if cuda else ""))
            ranges = [r for r in RANGES if r in self._ops]
            if ranges:
                lines += ["", "## Generator step ranges (total CPU time" + (", total CUDA time" if cuda else "")
                          + ")", "", "| range | calls | total CPU (ms) |" + (" total CUDA (ms) |" if cuda else ""),
                          "|---|---|---|" + ("---|" if cuda else "")]
                for r in ranges:
                    _, tot_us, n, _, dev_tot = self._ops[r]
                    lines.append(f"| `{r}` | {n} | {tot_us / 1e3:.3f} |" + (f" {dev_tot / 1e3:.3f} |" if cuda else ""))
            lines += ["", "## Traces", ""]
            lines += [f"- `{t.name}`" for t in self.traces]
            lines += ["", f"Open with `tensorboard --logdir {c.dir}` (PyTorch Profiler tab) or "
                      "load a `.pt.trace.json` in https://ui.perfetto.dev."]
        path = self.out_dir / "summary.md"
        return atomic_write_text(path, "\n".join(lines) + "\n")
