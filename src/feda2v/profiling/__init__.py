"""profiling part (see DESIGN.md): torch.profiler around the generator step, traces, summary.

``StepProfiler(cfg.profiler, run_name)`` is a context manager; call ``.step()`` once per
generator step. Off by default and free when off; never changes training results.
"""
from feda2v.profiling.profiler import StepProfiler, percentile
from feda2v.profiling.ranges import RANGES, step_range

__all__ = ["StepProfiler", "RANGES", "percentile", "step_range"]
