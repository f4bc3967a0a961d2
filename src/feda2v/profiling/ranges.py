"""The generator step's named ranges (``RANGES``), free unless a profiler is recording.

torch's ``record_function`` enters and leaves a dispatcher op whether or not anything records
(~5-30 us a range here; a GAN step opens 7). ``step_range(name)`` first asks torch whether a
profiler is active on this thread (one C call, ~0.1 us) and, when none is, hands out a shared
no-op context: a profiled step's traces (CPU and CUDA, torch.profiler, the autograd profiler,
emit_nvtx/emit_itt) hold the same ranges as before, and an unprofiled step pays nothing for
them. (A ``record_function`` opened while no profiler is active on the thread records nothing
either, so the answer is the same one torch would reach.)
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.profiler import record_function

RANGES = ("generator_step", "generator_step/forward", "generator_step/backward",
          "generator_step/optimizer")
_OFF = nullcontext()  # stateless: one object serves every unprofiled range, nested or not
_active = torch.autograd._profiler_enabled


def step_range(name: str) -> AbstractContextManager:
    """``record_function(name)`` while a profiler records on this thread, else a no-op context."""
    return record_function(name) if _active() else _OFF
