"""SIGTERM / SIGINT during training: stop at the next safe point, keep ``latest`` intact.

Schedulers and ``kill`` send SIGTERM, whose default action ends the process on the spot (no
``finally``: the MLflow run would stay RUNNING). While training, both signals raise
:class:`~feda2v.errors.TrainingStopped` instead, at once unless a checkpoint is being written (a
critical section): then right after it, so ``latest.ckpt`` always names a complete checkpoint.
Whatever the round had done in memory is dropped; the run resumes from ``latest``.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from feda2v.errors import TrainingStopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing)."""

    def __init__(self, describe):
        self._describe = describe  # signum -> the one-line message
        self._critical = 0
        self._pending: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self._critical:
            self._pending = signum
            return
        raise TrainingStopped(signum, self._describe(signum))

    @contextmanager
    def critical(self):
        """Signals wait until the block is done (a checkpoint being written and pointed to)."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self._pending is not None:
            signum, self._pending = self._pending, None
            raise TrainingStopped(signum, self._describe(signum))
