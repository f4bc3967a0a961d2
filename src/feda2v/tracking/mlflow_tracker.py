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
  What went wrong is classified (``classify_error``): unreachable store, invalid experiment name,
  permission refused, deleted experiment; each has its own one-line message. MLflow's INFO logging
  is off unless ``MLFLOW_LOGGING_LEVEL`` says otherwise, so nothing precedes that line.
- Runs carry MLflow's own source tags (user, entry point, source type) besides feda2v's; the
  experiment is tagged as a model-development experiment so the UI opens on its runs table.
- Checkpoints are uploaded by policy (``tracking.upload_checkpoints``: last | keep_last | all);
  deferred ones are uploaded when the run ends, except the one the store model already holds
  (the run's ``feda2v.final_checkpoint`` tag says where it is).
"""
from __future__ import annotations

import json
import logging
import os
import sys
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
# MLflow's INFO lines ("Creating initial MLflow database tables...", "Started monitoring system
# metrics") would precede feda2v's own output and any one-line error.
QUIET_ENV_DEFAULTS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                      "MLFLOW_LOGGING_LEVEL": "WARNING"}
PROBE_TIMEOUT_S = 3.0
# The UI opens an experiment by its kind; without this tag MLflow 3 shows its GenAI overview.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
MAX_EXPERIMENT_NAME = 500  # MLflow's limit
UPLOAD_POLICIES = ("last", "keep_last", "all")
SYSTEM_METRICS_INTERVAL_S = 2.0  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
SYSTEM_METRICS_STOP_S = 5.0
_PARAM_BATCH = 100  # MLflow's per-request limit for params (and tags)
_METRIC_BATCH = 1000


class TrackingUnavailableWarning(UserWarning):
    """Tracking was requested but is off for this run; training goes on."""


class _InvalidExperiment(ValueError):
    """The experiment name cannot be used (checked before MLflow is asked)."""


class _DeletedExperiment(LookupError):
    """The experiment exists but is deleted."""


def _quiet_mlflow() -> None:
    for k, v in QUIET_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    # MLflow sets its loggers' level when it is imported; if that happened already, set it again
    if "mlflow" in sys.modules and os.environ["MLFLOW_LOGGING_LEVEL"].upper() == "WARNING":
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def _error_chain(err: BaseException) -> str:
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return " | ".join(parts).lower()


def classify_error(err: BaseException) -> str:
    """``invalid_name`` | ``permission`` | ``deleted`` | ``missing_run`` | ``unreachable``."""
    if isinstance(err, _InvalidExperiment):
        return "invalid_name"
    if isinstance(err, _DeletedExperiment):
        return "deleted"
    code = str(getattr(err, "error_code", "") or "")
    text = _error_chain(err)
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or isinstance(err, PermissionError) or any(
            s in text for s in ("error code 401", "error code 403", "permission denied",
                                "readonly database", "read-only file system")):
        return "permission"
    if code == "INVALID_PARAMETER_VALUE" and "experiment name" in text:
        return "invalid_name"
    if code == "RESOURCE_DOES_NOT_EXIST" and "run" in text:
        return "missing_run"
    return "unreachable"


def _check_experiment_name(name: str) -> None:
    if not name.strip():
        raise _InvalidExperiment("empty name")
    if len(name) > MAX_EXPERIMENT_NAME:
        raise _InvalidExperiment(f"{len(name)} characters, MLflow allows {MAX_EXPERIMENT_NAME}")


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

    _check_experiment_name(experiment)
    client = _client(uri, timeout)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            return client, client.create_experiment(
                experiment, artifact_location=artifact_location(uri, experiment),
                tags=dict([EXPERIMENT_KIND_TAG]))
        except MlflowException:
            exp = client.get_experiment_by_name(experiment)  # a parallel job created it first
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise _DeletedExperiment(experiment)
    if EXPERIMENT_KIND_TAG[0] not in exp.tags:  # made before feda2v set the kind, or by hand
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND_TAG)
    return client, exp.experiment_id


def _unavailable(uri: str, err: BaseException, required: bool, when: str,
                 experiment: str | None = None, run_id: str | None = None) -> NullTracker:
    """One line saying what went wrong (see ``classify_error``): a TrackingError when tracking is
    required, else one warning and a NullTracker."""
    kind = classify_error(err)
    msg = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    off = "set tracking.required=false to train without tracking"
    if kind == "invalid_name":
        what = (f"tracking.experiment={experiment!r} is not a valid MLflow experiment name ({msg}); "
                f"use a non-empty name of at most {MAX_EXPERIMENT_NAME} characters")
    elif kind == "deleted":
        what = (f"experiment {experiment!r} is deleted in {uri}; restore it (mlflow experiments "
                f"restore) or pick another tracking.experiment")
    elif kind == "permission":
        what = (f"tracking store {uri} refused access {when} ({msg}); check MLFLOW_TRACKING_USERNAME/"
                f"MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN for a server, the file "
                f"permissions for a local store, or {off}")
    elif kind == "missing_run":
        what = (f"tracking store {uri} has no run {run_id} ({msg}); the checkpoint was tracked in "
                f"another store: set tracking.uri to it, or tracking.enabled=false")
    else:
        what = (f"tracking server {uri} is not reachable {when} ({msg}); start it, fix tracking.uri, "
                f"or {off}")
    if required:
        raise TrackingError(what) from err
    warnings.warn(f"tracking disabled: {what}; training continues and every artifact stays on disk",
                  TrackingUnavailableWarning, stacklevel=3)
    return NullTracker(reason=f"{kind}: {msg}")


def make_tracker(cfg: Any, *, timeout: float = PROBE_TIMEOUT_S) -> Tracker:
    """The tracker for a run from the validated config (or its ``tracking`` section).

    Connects now, so an unreachable server is known before any training step.
    """
    t = _tracking_section(cfg)
    if not t.enabled:
        return NullTracker()
    uri = str(t.uri)
    _quiet_mlflow()
    try:
        uri = resolve_uri(uri)
        client, exp_id = _connect(uri, str(t.experiment), timeout)
    except Exception as e:  # any failure to reach/open the store means "unavailable"
        return _unavailable(uri, e, bool(t.required), "before training", experiment=str(t.experiment))
    return MlflowTracker(client, uri, exp_id, required=bool(t.required),
                         upload_checkpoints=str(t.get("upload_checkpoints", "last")),
                         keep_last=_keep_last(cfg),
                         system_metrics=bool(t.get("system_metrics", False)))


def _keep_last(cfg: Any) -> int:
    try:
        return int(cfg.checkpoint.keep_last)
    except (AttributeError, KeyError, TypeError, ValueError):
        return 1


def open_run(cfg: Any, run_id: str, *, timeout: float = PROBE_TIMEOUT_S) -> Tracker:
    """A tracker that logs into an existing run (``evaluate`` adds its reports to the training
    run). Its ``end`` only flushes: the run keeps the status training gave it."""
    t = _tracking_section(cfg)
    if not t.enabled:
        return NullTracker()
    uri = str(t.uri)
    _quiet_mlflow()
    try:
        uri = resolve_uri(uri)
        client = _client(uri, timeout)
        run = client.get_run(run_id)
    except Exception as e:
        return _unavailable(uri, e, bool(t.required), "for evaluation", run_id=run_id)
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

    def __init__(self, client, uri: str, experiment_id: str, *, required: bool = False,
                 upload_checkpoints: str = "last", keep_last: int = 1,
                 system_metrics: bool = False):
        if upload_checkpoints not in UPLOAD_POLICIES:
            raise ValueError(f"upload_checkpoints must be one of {UPLOAD_POLICIES}, "
                             f"got {upload_checkpoints!r}")
        self.client, self.uri, self.experiment_id = client, uri, experiment_id
        self.required = required
        self.upload_checkpoints, self.keep_last = upload_checkpoints, max(1, int(keep_last))
        self._pending_checkpoints: list[Path] = []  # deferred by the upload policy
        self.system_metrics = system_metrics
        self._system_monitor = None
        self.model_id: str | None = None  # the LoggedModel of this run (log_store_model)
        self._model_ckpt = None  # (dev, inode, size, sha256 thunk) of the checkpoint it holds
        self._model_ckpt_name = ""
        self.dataset: tuple[str, str] | None = None  # (name, digest) of the logged input data
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
                self.experiment_id, run_name=run_name, tags=source_tags(tags))
            self._run_id = run.info.run_id
            items = [Param(str(k), str(v)) for k, v in (params or {}).items()]
            for i in range(0, len(items), _PARAM_BATCH):
                self.client.log_batch(self._run_id, params=items[i:i + _PARAM_BATCH])

        self._call("starting the run", _start)
        if self.system_metrics and self._run_id is not None:
            self._call("starting system metrics", self._start_system_metrics)

    def _start_system_metrics(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Its warnings (a failed sample when the store goes away) would repeat what this
        # tracker's one warning already says, over several lines.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        self._system_monitor = SystemMetricsMonitor(
            self._run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=self.uri)
        self._system_monitor.start()

    def _stop_system_metrics(self) -> None:
        """Stop the sampler even when tracking broke, waiting at most SYSTEM_METRICS_STOP_S: on a
        dead server its last call may hang in MLflow's retries, and the run must not wait for it."""
        monitor, self._system_monitor = self._system_monitor, None
        if monitor is None:
            return
        stopper = threading.Thread(target=monitor.finish, name="feda2v-system-metrics-stop",
                                   daemon=True)
        t0 = time.perf_counter()
        stopper.start()
        stopper.join(SYSTEM_METRICS_STOP_S)
        self.log_seconds += time.perf_counter() - t0

    def log_dataset(self, name: str, digest: str, source: str | Path, *, context: str,
                    schema: Mapping | None = None, profile: Mapping | None = None) -> None:
        """The run's input data as an MLflow dataset: ``digest`` (cut to MLflow's 36 characters;
        the whole one is in the profile), ``source`` a local folder, ``context`` e.g. training."""
        def _log():
            from mlflow.entities import Dataset, DatasetInput, InputTag

            ds = Dataset(name=name, digest=str(digest)[:36], source_type="local",
                         source=json.dumps({"uri": Path(source).resolve().as_uri()}),
                         schema=_tensor_schema(schema) if schema is not None else None,
                         profile=json.dumps({**(profile or {}), "digest": str(digest)}))
            self.client.log_inputs(self._run_id, datasets=[
                DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])
            self.dataset = (ds.name, ds.digest)

        self._call("logging the dataset", _log)

    def log_checkpoint(self, path: str | Path) -> None:
        """Upload a checkpoint now (policy ``all``) or remember it for the end of the run."""
        if self.upload_checkpoints == "all":
            self.log_artifact(path, "checkpoints")
        else:
            self._pending_checkpoints.append(Path(path))

    def _upload_pending_checkpoints(self) -> None:
        # Pruning deleted what checkpoint.keep_last does not keep; what is left is this run's newest.
        alive = [p for p in self._pending_checkpoints if p.is_file()]
        self._pending_checkpoints = []
        keep = 1 if self.upload_checkpoints == "last" else self.keep_last
        for p in alive[-keep:]:
            if self._in_model(p):  # uploaded once already, as the store model's artifact
                self.set_tags({"feda2v.final_checkpoint": f"{self.model_uri} (artifacts/{self._model_ckpt_name})"})
                continue
            self.log_artifact(p, "checkpoints")

    def _in_model(self, path: Path) -> bool:
        """Whether ``path`` holds the very bytes the store model was logged with."""
        if self._model_ckpt is None or self.model_uri is None:
            return False
        st, (dev, ino, size, digest) = path.stat(), self._model_ckpt
        if (st.st_dev, st.st_ino) == (dev, ino):  # latest.ckpt is a hard link of the round file
            return True
        return st.st_size == size and _sha256(path) == digest()

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

    def set_tags(self, tags: Mapping[str, str]) -> None:
        def _tag():
            for k, v in tags.items():
                self.client.set_tag(self._run_id, str(k), str(v))

        self._call("tagging the run", _tag)

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
        # a folder of its own per artifact (a failed staging leaves none behind to collide with)
        folder = Path(tempfile.mkdtemp(dir=self._staging.name))
        staged = folder / p.name  # same name: MLflow names the artifact after the file
        try:
            try:
                os.link(p, staged)
            except OSError:  # another file system: a copy is the snapshot
                shutil.copy2(p, staged)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
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
        """Log the checkpoint's final store as an MLflow LoggedModel (see tracking.pyfunc): the
        run's params, its metrics at the checkpoint's round and the dataset come with it."""
        if not Path(checkpoint_path).is_file():
            warnings.warn(f"tracking: checkpoint {checkpoint_path} does not exist; store model "
                          "not logged", TrackingUnavailableWarning, stacklevel=2)
            return
        from feda2v.tracking.pyfunc import log_store_model

        def _log():
            if self._batcher is not None:
                self._batcher.flush()  # the model takes the run's metrics at its round
            with _fluent_context(self.uri, self.experiment_id):
                info = log_store_model(checkpoint_path, run_id=self._run_id, name=name,
                                       dataset=self.dataset)
            self.model_uri, self.model_id = info.model_uri, info.model_id
            ckpt = Path(checkpoint_path).resolve()
            st = ckpt.stat()
            self._model_ckpt = (st.st_dev, st.st_ino, st.st_size, lambda: _sha256(ckpt))
            self._model_ckpt_name = ckpt.name

        self._call("logging the store model", _log)

    def log_model_metrics(self, metrics: Mapping[str, float], step: int, *,
                          model_id: str | None = None,
                          dataset: tuple[str, str] | None = None) -> int:
        """Log ``metrics`` to the run and against the LoggedModel (and the dataset), skipping
        those whose latest value at ``step`` is already the same (a repeated evaluation adds no
        points). Returns how many were logged."""
        def _log():
            from mlflow.entities import Metric

            model = model_id or self.model_id
            ds = dataset or self.dataset
            latest = {m.key: m for m in self.client.get_run(self._run_id).data._metric_objs}
            ts = int(time.time() * 1000)
            items = []
            for k, v in metrics.items():
                old = latest.get(k)
                if old is not None and old.step == int(step) and old.value == float(v):
                    continue
                items.append(Metric(str(k), float(v), ts, int(step), model_id=model,
                                    dataset_name=ds[0] if ds else None,
                                    dataset_digest=ds[1] if ds else None))
            for i in range(0, len(items), _METRIC_BATCH):
                self.client.log_batch(self._run_id, metrics=items[i:i + _METRIC_BATCH])
            return len(items)

        return self._call("logging model metrics", _log) or 0

    def find_store_model(self, name: str = "store_model") -> str | None:
        """The model_id of the LoggedModel this run produced (``name``), else None."""
        def _find():
            run = self.client.get_run(self._run_id)
            outputs = getattr(run, "outputs", None)
            ids = [o.model_id for o in (outputs.model_outputs if outputs else [])]
            for mid in ids:
                if self.client.get_logged_model(mid).name == name:
                    return mid
            return None

        self.model_id = self._call("finding the store model", _find) or self.model_id
        return self.model_id

    def end(self, status: str = "FINISHED") -> None:
        if self._ended:
            return
        self._ended = True
        self._upload_pending_checkpoints()
        self._stop_system_metrics()
        self.flush()
        if self._batcher is not None:
            self._batcher.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._staging is not None:
            self._staging.cleanup()
        if self._owns_run:
            self._call("ending the run", self.client.set_terminated, self._run_id, status)


def source_tags(tags: Mapping[str, object] | None) -> dict[str, str]:
    """``tags`` plus what MLflow's own run start adds (``mlflow.user``, ``mlflow.source.name``
    and ``.type``; the UI's "Created by" and "Source"); ``tags`` win where both set a key."""
    from mlflow.tracking.context.registry import resolve_tags

    own = {k: str(v) for k, v in (tags or {}).items()}
    try:
        merged = resolve_tags(own)
    except Exception:  # a context provider failing must not cost the run
        merged = dict(own)
    merged.update(own)
    return {k: str(v) for k, v in merged.items()}


def _tensor_schema(schema: Mapping) -> str:
    """MLflow's dataset schema JSON (what the UI shows) from ``{"features": {"dtype", "shape"},
    "label": {...}}``: features as the dataset's features, label as its targets."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types.schema import Schema, TensorSpec

    def spec(name: str):
        d = schema[name]
        return Schema([TensorSpec(np.dtype(d["dtype"]), tuple(d["shape"]), name)])

    return json.dumps(TensorDatasetSchema(
        features=spec("features"), targets=spec("label") if "label" in schema else None).to_dict())


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
