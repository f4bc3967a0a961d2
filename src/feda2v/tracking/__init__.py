"""tracking part (see DESIGN.md): MLflow logging behind a small interface, with a no-op twin.

``make_tracker(cfg)`` -> MlflowTracker | NullTracker; ``open_run(cfg, run_id)`` logs into an
existing run; ``flatten`` / ``run_tags`` / ``default_run_name`` / ``unique_run_name`` build what
a run is identified by. MLflow itself is imported only when tracking is on.
"""
from feda2v.tracking.base import NullTracker, Tracker
from feda2v.tracking.tags import default_run_name, flatten, git_info, run_tags, unique_run_name


def make_tracker(cfg, **kw):
    from feda2v.tracking.mlflow_tracker import make_tracker as _make

    return _make(cfg, **kw)


def open_run(cfg, run_id, **kw):
    from feda2v.tracking.mlflow_tracker import open_run as _open

    return _open(cfg, run_id, **kw)


def __getattr__(name):  # lazy: importing MLflow costs ~1.5 s
    if name in ("MlflowTracker", "TrackingUnavailableWarning"):
        from feda2v.tracking import mlflow_tracker

        return getattr(mlflow_tracker, name)
    raise AttributeError(name)


__all__ = ["Tracker", "NullTracker", "MlflowTracker", "TrackingUnavailableWarning",
           "make_tracker", "open_run", "flatten", "run_tags", "git_info", "default_run_name",
           "unique_run_name"]
