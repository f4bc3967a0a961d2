"""MLflow implementation of the tracking interface.

Design points (README "Experiment tracking (MLflow)" has the user side):
- Default store: a SQLite file (``sqlite:///mlflow.db``, relative to the cwd, made absolute here so
  a later chdir cannot split a run). Experiments get an explicit artifact root beside the DB
  (``<db dir>/mlartifacts/<experiment>``) so MLflow never falls back to ``./mlruns``.
- Metrics are queued and sent by one background thread that merges whatever is queued into one
  ``log_batch`` call (at most 1000 metrics each); ``end`` waits for the queue to drain. (MLflow's
  own ``log_batch(synchronous=False)`` queue was tried: its worker polls with a 1 s timeout, so
  ending a run cost ~1 s, too much for short trainings.)
- Reachability is checked when the tracker is made, before training: an unreachable server with
  ``tracking.required=false`` gives one warning and a NullTracker; with ``required=true`` a
  TrackingError. A failure later in the run does the same (warn once and stop logging, or raise).
"""
from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

from feda2v.errors import TrackingError
from feda2v.tracking.base import NullTracker, Tracker

# Bounds on MLflow's HTTP client (defaults are 7 retries with exponential backoff and a 120 s
# timeout: minutes of stall per call when a server dies). Applied with setdefault, so a user's
# own environment wins.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# MLflow draws a tqdm bar on stderr for every artifact download (model logging does some);
# it would interleave with training progress output.
QUIET_ENV_DEFAULTS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
PROBE_TIMEOUT_S = 3.0
_PARAM_BATCH = 100  # MLflow's per-request limit for params (and tags)
_METRIC_BATCH = 1000


class TrackingUnavailableWarning(UserWarning):
    """Tracking was requested but is off for this run; training goes on."""


def _tracking_section(cfg: Any) -> Any:
    return cfg.tracking if "tracking" in cfg else cfg


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def resolve_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute (relative to the cwd now) and ensure its
    folder exists; other URIs are returned unchanged."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if str(path) in ("", ":memory:"):
            return uri
        path = path if path.is_absolute() else Path.cwd() / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return "sqlite:///" + str(path.resolve())
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """Explicit artifact root for a new experiment; None lets an http server choose (with
    ``--serve-artifacts`` it proxies them, so clients never write to a local path)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in experiment)
        return (db.parent / "mlartifacts" / safe).resolve().as_uri()
    return None


def probe_http(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise OSError unless an HTTP server answers at ``uri`` within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read(64)
    except urllib.error.HTTPError:
        return  # something answered; the experiment lookup below tells whether it is MLflow
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"{reason}") from e


@contextmanager
def _fluent_context(uri: str, experiment_id: str):
    """MLflow's model logging reads the global tracking URI and the fluent active experiment
    (else it files the model under experiment 0 of the default store); point both at ours for
    the call and restore them after."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tu

    old_uri, old_exp = tu._tracking_uri, fluent._active_experiment_id
    tu.set_tracking_uri(uri)
    fluent._active_experiment_id = experiment_id
    try:
        yield
    finally:
        fluent._active_experiment_id = old_exp
        tu.set_tracking_uri(old_uri)


def _client(uri: str, timeout: float):
    """An MlflowClient for ``uri``; an http server is probed first (bounded retries and timeout)."""
    if _is_http(uri):
        for k, v in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        probe_http(uri, timeout)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _connect(uri: str, experiment: str, timeout: float):
    """(client, experiment_id), or raise with the reason. Creates the experiment if missing."""
    from mlflow.exceptions import MlflowException

    client = _client(uri, timeout)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            return client, client.create_experiment(
                experiment, artifact_location=artifact_location(uri, experiment))
        except MlflowException:
            exp = client.get_experiment_by_name(experiment)  # a parallel job created it first
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise OSError(f"experiment '{experiment}' is deleted in {uri}; restore it or pick another "
                      "tracking.experiment")
    return client, exp.experiment_id


def _unavailable(uri: str, err: BaseException, required: bool, when: str) -> NullTracker:
    msg = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    if required:
        raise TrackingError(
            f"tracking server {uri} is not reachable {when} ({msg}); start it, fix tracking.uri, "
            "or set tracking.required=false to train without tracking") from err
    warnings.warn(
        f"tracking disabled: {uri} is not reachable {when} ({msg}); training continues and "
        "every artifact stays on disk", TrackingUnavailableWarning, stacklevel=3)
    return NullTracker(reason=f"unreachable: {msg}")


def make_tracker(cfg: Any, *, timeout: float = PROBE_TIMEOUT_S) -> Tracker:
    """The tracker for a run from the validated config (or its ``tracking`` section).

    Connects now, so an unreachable server is known before any training step.
    """
    t = _tracking_section(cfg)
    if not t.enabled:
        return NullTracker()
    uri = str(t.uri)
    for k, v in QUIET_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    try:
        uri = resolve_uri(uri)
        client, exp_id = _connect(uri, str(t.experiment), timeout)
    except Exception as e:  # any failure to reach/open the store means "unavailable"
        return _unavailable(uri, e, bool(t.required), "before training")
    return MlflowTracker(client, uri, exp_id, required=bool(t.required))


def open_run(cfg: Any, run_id: str, *, timeout: float = PROBE_TIMEOUT_S) -> Tracker:
    """A tracker that logs into an existing run (``evaluate`` adds its reports to the training
    run). Its ``end`` only flushes: the run keeps the status training gave it."""
    t = _tracking_section(cfg)
    if not t.enabled:
        return NullTracker()
    uri = str(t.uri)
    try:
        uri = resolve_uri(uri)
        client = _client(uri, timeout)
        run = client.get_run(run_id)
    except Exception as e:
        return _unavailable(uri, e, bool(t.required), f"or has no run {run_id}")
    tr = MlflowTracker(client, uri, run.info.experiment_id, required=bool(t.required))
    tr._run_id, tr._owns_run = run.info.run_id, False
    return tr


class _MetricBatcher:
    """One daemon thread sending queued metrics in merged batches; errors surface on the next
    ``put``/``flush`` of the caller's thread."""

    def __init__(self, send):
        self._send = send
        self._items: list = []
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="feda2v-mlflow-metrics",
                                        daemon=True)
        self._thread.start()

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def put(self, items: list) -> None:
        with self._cv:
            self._raise_error()
            self._items.extend(items)
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._closed:
                    self._cv.wait()
                if not self._items:  # closed and drained
                    return
                batch, self._items = self._items[:_METRIC_BATCH], self._items[_METRIC_BATCH:]
                self._busy = True
            try:
                self._send(batch)
            except BaseException as e:  # kept for the caller; queued items are dropped
                with self._cv:
                    self._error, self._items = e, []
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def flush(self) -> None:
        with self._cv:
            while self._items or self._busy:
                self._cv.wait()
            self._raise_error()

    def close(self) -> None:
        """Let the thread exit once the queue is empty (call after flush)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class MlflowTracker(Tracker):
    active = True

    def __init__(self, client, uri: str, experiment_id: str, *, required: bool = False):
        self.client, self.uri, self.experiment_id = client, uri, experiment_id
        self.required = required
        self._run_id: str | None = None
        self._owns_run = True
        self._batcher: _MetricBatcher | None = None
        self._broken = False
        self._ended = False
        self.model_uri: str | None = None  # set by log_store_model
        self._uploads: list = []  # (name, Future) of background artifact uploads
        self._pool = None
        self._staging = None
        self.log_seconds = 0.0  # wall time spent inside tracker calls (overhead accounting)

    def __repr__(self) -> str:
        return f"MlflowTracker(uri={self.uri!r}, run_id={self._run_id!r})"

    @property
    def run_id(self) -> str | None:
        return self._run_id

    # -- failure policy -------------------------------------------------------------------
    def _fail(self, what: str, err: BaseException) -> None:
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        if self.required:
            raise TrackingError(
                f"tracking to {self.uri} failed while {what} ({msg}); tracking.required=true, so "
                "the run stops here (checkpoints on disk are kept)") from err
        if not self._broken:
            warnings.warn(
                f"tracking stopped: {what} failed on {self.uri} ({msg}); training continues and "
                "every artifact stays on disk", TrackingUnavailableWarning, stacklevel=3)
        self._broken = True

    def _call(self, what: str, fn, *args, **kwargs):
        if self._broken or self._run_id is None and what != "starting the run":
            return None
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except TrackingError:
            raise
        except Exception as e:
            self._fail(what, e)
            return None
        finally:
            self.log_seconds += time.perf_counter() - t0

    # -- interface ------------------------------------------------------------------------
    def start(self, run_name: str, params: Mapping[str, object] | None = None,
              tags: Mapping[str, object] | None = None) -> None:
        if self._run_id is not None:
            raise RuntimeError("MlflowTracker.start called twice")

        def _start():
            from mlflow.entities import Param

            run = self.client.create_run(
                self.experiment_id, run_name=run_name,
                tags={k: str(v) for k, v in (tags or {}).items()})
            self._run_id = run.info.run_id
            items = [Param(str(k), str(v)) for k, v in (params or {}).items()]
            for i in range(0, len(items), _PARAM_BATCH):
                self.client.log_batch(self._run_id, params=items[i:i + _PARAM_BATCH])

        self._call("starting the run", _start)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        def _log():
            from mlflow.entities import Metric

            if self._batcher is None:
                run_id = self._run_id
                self._batcher = _MetricBatcher(
                    lambda batch: self.client.log_batch(run_id, metrics=batch))
            ts = int(time.time() * 1000)
            self._batcher.put([Metric(str(k), float(v), ts, int(step))
                               for k, v in metrics.items()])

        self._call("logging metrics", _log)

    def flush(self) -> None:
        """Block until every queued metric and artifact is stored."""
        if self._batcher is not None:
            self._call("logging metrics", self._batcher.flush)
        self._wait_uploads()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Files are uploaded by a background thread from a hard-linked snapshot (so pruning or
        replacing the original cannot race the upload); folders are logged in the caller's thread."""
        p = Path(path)
        if not p.exists():
            warnings.warn(f"tracking: artifact {p} does not exist; not logged",
                          TrackingUnavailableWarning, stacklevel=2)
            return
        if p.is_dir() or self._broken or self._run_id is None:
            self._call(f"logging artifact {p.name}", self.client.log_artifact,
                       self._run_id, str(p), artifact_path)
            return
        # staging copies into TMPDIR, which can be full or read-only: a tracking failure like any other
        staged = self._call(f"staging artifact {p.name}", self._stage, p)
        if staged is None:
            return
        t0 = time.perf_counter()
        self._uploads.append((p.name, self._uploader().submit(self._upload, staged, artifact_path)))
        self.log_seconds += time.perf_counter() - t0

    def _stage(self, p: Path) -> Path:
        import shutil
        import tempfile

        if self._staging is None:
            self._staging = tempfile.TemporaryDirectory(prefix="feda2v-mlflow-")
        folder = Path(self._staging.name) / str(len(self._uploads))
        folder.mkdir()
        staged = folder / p.name  # same name: MLflow names the artifact after the file
        try:
            os.link(p, staged)
        except OSError:  # another file system: a copy is the snapshot
            shutil.copy2(p, staged)
        return staged

    def _uploader(self):
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feda2v-mlflow-artifacts")
        return self._pool

    def _upload(self, staged: Path, artifact_path: str | None) -> None:
        try:
            self.client.log_artifact(self._run_id, str(staged), artifact_path)
        finally:
            staged.unlink(missing_ok=True)

    def _wait_uploads(self) -> None:
        t0 = time.perf_counter()
        uploads, self._uploads = self._uploads, []
        for name, fut in uploads:
            err = fut.exception()
            if err is not None:
                self._fail(f"logging artifact {name}", err)
        self.log_seconds += time.perf_counter() - t0

    def log_store_model(self, checkpoint_path: str | Path, name: str = "store_model") -> None:
        """Log the checkpoint's final store as an MLflow pyfunc model (see tracking.pyfunc)."""
        if not Path(checkpoint_path).is_file():
            warnings.warn(f"tracking: checkpoint {checkpoint_path} does not exist; store model "
                          "not logged", TrackingUnavailableWarning, stacklevel=2)
            return
        from feda2v.tracking.pyfunc import log_store_model

        def _log():
            with _fluent_context(self.uri, self.experiment_id):
                info = log_store_model(checkpoint_path, run_id=self._run_id, name=name)
            self.model_uri = info.model_uri

        self._call("logging the store model", _log)

    def end(self, status: str = "FINISHED") -> None:
        if self._ended:
            return
        self._ended = True
        self.flush()
        if self._batcher is not None:
            self._batcher.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._staging is not None:
            self._staging.cleanup()
        if self._owns_run:
            self._call("ending the run", self.client.set_terminated, self._run_id, status)
