"""MLflow tracking: log one run without ever stopping training, and send later what the store missed.

:class:`Tracker` logs one run through MLflow's asynchronous logging and keeps what the store does not take
in the run's backlog (:mod:`raydistill.tracking_backlog`), sent later by the tracker, by a tracker that
re-opens the run, or by :func:`replay_backlog`. The store's URI, names and reading runs back are in
:mod:`raydistill.tracking_store`; their public names are re-exported here. MLflow is imported lazily:
``import mlflow`` takes seconds, and commands that do not track should not pay for it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from raydistill import tracking_backlog as backlog
from raydistill import tracking_store as store
from raydistill.tracking_backlog import replay_backlog
from raydistill.tracking_store import (
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    TrackingConfigError,
    flatten_config,
    resolve_tracking_uri,
    sanitize_key,
)

__all__ = ["LOCAL_METRICS_FILE", "Tracker", "TrackingConfigError", "flatten_config", "read_runs",
           "replay_backlog", "resolve_tracking_uri", "sanitize_key"]

_logger = logging.getLogger(__name__)

LOCAL_METRICS_FILE = backlog.BACKLOG_FILE
"""Name of the file (in a tracker's ``local_dir``) that holds records the store did not take."""

_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Metric batches handed to MLflow's async logging and not yet confirmed; one more waits for the oldest. Each
# tracker waits on the RunOperations that log_batch(synchronous=False) returns: MLflow 3.17 has no flush for
# one client's store (mlflow.flush_async_logging() flushes the store of the global tracking URI), and
# mlflow.config.enable_async_logging() only switches the default of the fluent API, which a tracker does not
# use. MLflow keeps queued batches in memory only and drops a batch that fails, after logging an error;
# there is no spool or replay to rely on, hence tracking_backlog.
_MAX_IN_FLIGHT = 16

_trackers: weakref.WeakSet[Tracker] = weakref.WeakSet()  # this process's, for read_runs
_trackers_lock = threading.Lock()


class Tracker:
    """Logs one MLflow run; tracking failures never reach the training code.

    Metrics are buffered for ``flush_every`` calls, then handed to MLflow's asynchronous logging
    (``log_batch(..., synchronous=False)``), which writes them from its own threads; :meth:`flush`,
    :meth:`finish` and :func:`read_runs` wait until MLflow has written them. Params, tags, artifacts and
    the final status are sent at once. When the store fails (server down, SQLite locked longer than MLflow
    waits, storage gone) the tracker warns once per outage, appends the unsent records to
    ``<local_dir>/metrics.jsonl`` and keeps appending there, without calling the store, until a
    :meth:`flush` or :meth:`finish` replays that backlog. Metrics keep their step and timestamp, so a late
    send records them as they were.

    Usage::

        with Tracker(uri, "flickr30k", run_name="dsmd-small", local_dir=run_dir) as tracker:
            tracker.log_params(flatten_config(cfg))
            tracker.log_metrics({"loss/total": 1.2}, step=10)
        # leaving the block marks the run FINISHED (FAILED on an exception, KILLED on Ctrl-C)

    Args:
        tracking_uri: Absolute tracking URI (see :func:`resolve_tracking_uri`).
        experiment: Experiment name; created if missing.
        run_name: Display name of the run (MLflow makes one up when None).
        tags: Run tags set at creation.
        parent_run_id: Parent run (e.g. the Tune sweep); sets the ``mlflow.parentRunId`` tag.
        local_dir: Folder of the run's backlog.
        enabled: When False every method does nothing and ``run_id`` is None.
        run_id: Log into this existing run (resuming it): the backlog in ``local_dir`` is replayed first,
            then the run is marked RUNNING again.
        flush_every: Hand metrics to MLflow after this many :meth:`log_metrics` calls (1: every call).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        *,
        local_dir: Path,
        enabled: bool = True,
        run_id: str | None = None,
        flush_every: int = 1,
    ) -> None:
        if not experiment or not str(experiment).strip():
            raise TrackingConfigError(f"tracking experiment name must be a non-empty string, got {experiment!r}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self._tracking_uri = tracking_uri
        self._experiment = str(experiment)
        self._run_name = run_name
        self._tags = _clean_tags(tags or {})
        if parent_run_id:
            self._tags[store.PARENT_TAG] = parent_run_id
        self._local_dir = Path(local_dir)
        self._enabled = enabled
        self._run_id = run_id
        self._flush_every = flush_every
        self._lock = threading.RLock()
        self._client: Any = None
        self._pending: list[backlog.Record] = []  # metrics of the calls since the last hand-over
        self._calls = 0
        self._in_flight: list[tuple[list[backlog.Record], Any]] = []  # (records, their RunOperations)
        self._offline = False
        self._finished = False
        if enabled:
            with _trackers_lock:
                _trackers.add(self)
            with self._lock:
                self._open()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while disabled or before the store was ever reached."""
        return self._run_id

    @property
    def tracking_uri(self) -> str:
        """The tracking URI this tracker logs to."""
        return self._tracking_uri

    @property
    def local_path(self) -> Path:
        """The backlog file, holding records the store did not take."""
        return self._local_dir / LOCAL_METRICS_FILE

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log run params; nested mappings are flattened, values stringified and cut to MLflow's limit."""
        if self._enabled and params:
            flat = {sanitize_key(k): v[:MAX_PARAM_VALUE_LENGTH] for k, v in flatten_config(params).items()}
            self._send({"kind": "params", "params": flat})

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log metric values at ``step`` (anything ``float()`` accepts: numbers, 0-d tensors, numpy).

        Raises:
            ValueError: If a value is not a number or ``step`` is not an integer.
        """
        if not self._enabled or not metrics:
            return
        try:
            step_int = int(step)  # numpy and torch integers too
        except (TypeError, ValueError):
            step_int = None
        if isinstance(step, bool) or step_int is None or step_int != step:
            raise ValueError(f"metric step must be an integer, got {step!r}")
        timestamp = _now_ms()
        records = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key!r} must be a number, got {value!r}") from None
            records.append({"kind": "metric", "key": sanitize_key(key), "value": number, "step": step_int,
                            "timestamp": timestamp})
        with self._lock:
            self._pending += records
            self._calls += 1
            if self._calls >= self._flush_every:
                self._hand_over()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified and cut to MLflow's limit)."""
        if self._enabled and tags:
            self._send({"kind": "tags", "tags": _clean_tags(tags)})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Log a file or folder as an artifact (a kept one is uploaded on replay, if it still exists then).

        Args:
            path: Local file or folder.
            artifact_path: Folder inside the run's artifacts (None: the top level).

        Raises:
            ValueError: If ``path`` does not exist.
        """
        if not self._enabled:
            return
        local = Path(path).expanduser().resolve()
        if not local.exists():
            raise ValueError(f"artifact path {str(path)!r} does not exist")
        self._send({"kind": "artifact", "path": str(local), "artifact_path": artifact_path})

    def flush(self) -> bool:
        """Hand over buffered metrics, wait until MLflow has written them, replay the backlog if there is one.

        Returns:
            True when nothing is left unsent.
        """
        if not self._enabled:
            return True
        with self._lock:
            self._hand_over()
            self._wait_in_flight(0)
            return self._replay()

    def finish(self, status: str = "FINISHED") -> None:
        """Send everything pending and mark the run ended with ``status``; later calls do nothing.

        With the store down, the status joins the backlog and is applied when the backlog is replayed.

        Args:
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.

        Raises:
            ValueError: For another status.
        """
        if status not in _RUN_STATUSES:
            raise ValueError(f"run status must be one of {list(_RUN_STATUSES)}, got {status!r}")
        if not self._enabled:
            return
        with self._lock:
            if not self._finished:
                self.flush()
                self._send({"kind": "status", "status": status, "end_time": _now_ms()})
                self._finished = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    # -- sending, or keeping for later ---------------------------------------------------------------------

    def _open(self) -> None:
        """Create the run, or re-open ``run_id``: replay what an earlier attempt left, mark it RUNNING."""
        if self._run_id is None:
            try:
                self._run_id = _twice(lambda: store.open_run(self._connect(), self._header()))
            except Exception as exc:  # any store failure: tracking must never stop training
                self._went_offline(exc, [])
        else:
            self._replay()  # a final status kept by the last attempt goes before RUNNING
            self._send({"kind": "status", "status": "RUNNING", "end_time": None})
            if self._tags:
                self._send({"kind": "tags", "tags": dict(self._tags)})
        if self._run_id:
            backlog.quiet_run(self._run_id)

    def _send(self, record: backlog.Record) -> None:
        with self._lock:
            if self._offline or self._run_id is None:
                self._keep([record])
                return
            try:
                _twice(lambda: backlog.send(self._connect(), self._run_id, [record]))
            except Exception as exc:
                self._went_offline(exc, [record])

    def _hand_over(self) -> None:
        """Give the buffered metrics to MLflow's asynchronous logging."""
        records, self._pending, self._calls = self._pending, [], 0
        self._wait_in_flight(_MAX_IN_FLIGHT - 1)
        if not records:
            return
        if self._offline or self._run_id is None:
            self._keep(records)
            return
        try:
            metrics = [backlog.to_metric(r) for r in records]
            self._in_flight.append((records, self._connect().log_batch(self._run_id, metrics, synchronous=False)))
        except Exception as exc:
            self._went_offline(exc, records)

    def _wait_in_flight(self, keep: int) -> None:
        """Wait for the oldest batches handed to MLflow until at most ``keep`` are left unconfirmed."""
        while len(self._in_flight) > keep:
            records, operations = self._in_flight.pop(0)
            try:
                operations.wait()
            except Exception as exc:
                # RunOperations.wait() folds the batch's error into its message, so a refused record and an
                # outage look alike here: keep the batch; its replay (synchronous) tells them apart.
                self._went_offline(exc, records)

    def _replay(self) -> bool:
        """Replay the backlog of ``local_dir``, if any; True when nothing is left unsent."""
        if not backlog.exists(self._local_dir):
            self._offline = False  # records that could not be written are lost; the next send will tell
            return True
        result = backlog.replay(self._local_dir, self._connect)
        if self._run_id is None and backlog.header_key(self._header()) in result.created:
            self._run_id = result.created[backlog.header_key(self._header())]
            backlog.quiet_run(self._run_id)
        if result.error is not None:
            self._went_offline(result.error, [])
            return False
        self._offline = False
        backlog.store_answered(self._tracking_uri)
        return True

    def _went_offline(self, error: BaseException, records: list[backlog.Record]) -> None:
        self._offline = True
        if records:
            self._keep(records)
        backlog.warn_outage(self._tracking_uri, error, self.local_path)

    def _keep(self, records: list[backlog.Record]) -> None:
        try:
            backlog.append(self._local_dir, records, self._header())
        except OSError as exc:
            _logger.error("could not keep %d tracking records in %s: %s", len(records), self.local_path, exc)

    def _header(self) -> backlog.Record:
        return {"kind": "run", "tracking_uri": self._tracking_uri, "experiment": self._experiment,
                "run_name": self._run_name, "run_id": self._run_id, "tags": self._tags}

    def _connect(self) -> Any:
        if self._client is None:
            self._client = backlog.connect(self._tracking_uri)
        return self._client


def read_runs(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """The runs of an experiment as plain dicts (see :func:`raydistill.tracking_store.read_runs`).

    Metrics that this process's trackers handed to MLflow's async logging for the same store are written
    first, so a process reads what it logged.
    """
    with _trackers_lock:
        trackers = [t for t in _trackers if t.tracking_uri == tracking_uri]
    for tracker in trackers:
        with tracker._lock:
            tracker._wait_in_flight(0)
    return store.read_runs(tracking_uri, experiment, parent_run_id)


def _twice(call: Callable[[], Any]) -> Any:
    """``call()``, tried once more if it fails.

    MLflow's HTTP retries cover the exchange with the server only, and 3.17 also fails beside it: its
    telemetry thread removes an environment variable (once per process, when it cannot reach its own
    server) while ``requests`` reads the environment for proxies, and the call raises ``KeyError``. A run
    that is not created leaves the Train workers untracked, so synchronous calls get a second try.
    """
    try:
        return call()
    except Exception:
        return call()


def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {sanitize_key(k): store.param_value(v)[:MAX_TAG_VALUE_LENGTH] for k, v in tags.items()}


def _now_ms() -> int:
    return int(time.time() * 1000)
