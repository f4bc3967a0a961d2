"""glibc malloc settings for feda2v's own processes (the command-line apps, the benchmarks).

Why: a training step allocates and frees the same few 0.5-2 MB activation and gradient tensors
every step. glibc's defaults serve such blocks by mmap (above a threshold that adapts as blocks
are freed) and hand freed memory at the heap's top back to the OS (above a trim threshold); both
make the next step fault the same pages in again, about a thousand minor page faults a GAN step
at batch 1024 (issue 21: 4-9% of the step's time). With the mmap threshold at 32 MiB and the trim
threshold at 256 MiB the process keeps what it freed for the next step: the same tensors at the
same alignment (torch aligns every CPU block itself), so the same results, in less time; the cost
is up to 256 MiB of freed heap a process may keep instead of returning it.

Applied only where the process is ours (``apply()`` from the entry points), never on import, and
never over a user's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``.
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
SETTINGS = {"MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 32 * 2**20),
            "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 256 * 2**20)}

_applied: dict[str, int | str] | None = None


def apply() -> dict[str, int | str]:
    """Set the thresholds (once per process) the user's environment does not set; returns what
    now holds ({env-style name: bytes ours, the environment's text theirs}), empty where glibc's
    mallopt is not available."""
    global _applied
    if _applied is not None:
        return dict(_applied)
    _applied = {}
    if not sys.platform.startswith("linux"):
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for name, (param, value) in SETTINGS.items():
        if os.environ.get(name):  # the user's choice, which glibc read at start-up
            _applied[name] = os.environ[name]
        elif mallopt(param, value) == 1:
            _applied[name] = value
    return dict(_applied)
