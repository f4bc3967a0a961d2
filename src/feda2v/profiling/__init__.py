"""profiling part (see DESIGN.md): torch.profiler around the generator step, traces, summary.

``StepProfiler(cfg.profiler, run_name)`` is a context manager; call ``.step()`` once per
generator step. Off by default and free when off; never changes training results.
"""
from feda2v.profiling.profiler import RANGES, StepProfiler, percentile

__all__ = ["StepProfiler", "RANGES", "percentile"]
