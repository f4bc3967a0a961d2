"""The small tracking interface the rest of feda2v talks to, and its no-op implementation.

Callers decide *what* to log; a tracker only decides *how*. Every method is safe to call on a
``NullTracker`` so training code never branches on whether tracking is on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping


class Tracker:
    """Interface: ``start`` once, then any number of logs, then ``end`` once."""

    #: False for the no-op tracker (lets callers skip building expensive payloads).
    active: bool = False

    @property
    def run_id(self) -> str | None:
        return None

    def start(self, run_name: str, params: Mapping[str, object] | None = None,
              tags: Mapping[str, object] | None = None) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        raise NotImplementedError

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) run tags after ``start``: facts learnt while the run goes on."""
        raise NotImplementedError

    def log_store_model(self, checkpoint_path: str | Path) -> None:
        raise NotImplementedError

    def log_checkpoint(self, path: str | Path) -> None:
        """A checkpoint was written; uploaded now or at ``end`` by the upload policy."""
        raise NotImplementedError

    def log_dataset(self, name: str, digest: str, source: str | Path, *, context: str,
                    schema: Mapping | None = None, profile: Mapping | None = None) -> None:
        raise NotImplementedError

    def end(self, status: str = "FINISHED") -> None:
        raise NotImplementedError

    # ``with make_tracker(cfg) as t:`` ends the run FAILED on an exception, FINISHED otherwise.
    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")


class NullTracker(Tracker):
    """Logs nothing. ``reason`` says why tracking is off (disabled, or server unreachable)."""

    active = False

    def __init__(self, reason: str = "tracking.enabled=false"):
        self.reason = reason

    def start(self, run_name, params=None, tags=None) -> None:
        pass

    def log_metrics(self, metrics, step) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass

    def log_store_model(self, checkpoint_path) -> None:
        pass

    def log_checkpoint(self, path) -> None:
        pass

    def log_dataset(self, name, digest, source, *, context, schema=None, profile=None) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def __repr__(self) -> str:
        return f"NullTracker(reason={self.reason!r})"
