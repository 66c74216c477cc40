"""MLflow tracking: pick the store, log one run without ever stopping training, read runs back.

* :func:`resolve_tracking_uri` turns the config value (or ``$MLFLOW_TRACKING_URI``, or the default
  ``<workdir>/mlflow.db``) into an ABSOLUTE URI: Ray workers run in other folders and on other nodes, and
  MLflow's own default ``sqlite:///mlflow.db`` is relative to the working directory.
* :class:`Tracker` logs params, metrics, tags and artifacts of one run through
  ``mlflow.tracking.MlflowClient`` with explicit run ids (no global active run, so a Train worker, a Tune
  trial and the driver can each hold their own). Every call goes through one guarded path: records join
  a backlog, the backlog is sent with retries, and when the store stays unreachable (server down, SQLite
  "database is locked", storage not mounted) the tracker warns once, appends the pending records to
  ``<local_dir>/metrics.jsonl`` and keeps trying on later calls, so training never stops for tracking
  and the metrics reach the store when it comes back.
* :func:`read_runs` returns the runs of an experiment as plain dicts for ``raydistill compare``.

For an HTTP tracking server, each attempt also runs MLflow's own HTTP retries (about 4 minutes by default
before it gives up); set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` low in
the job's environment for a quick fallback to the local file.

MLflow is imported lazily: ``import mlflow`` takes seconds, and commands that do not track should not
pay for it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

_logger = logging.getLogger(__name__)

LOCAL_METRICS_FILE = "metrics.jsonl"
"""Name of the file (in a tracker's ``local_dir``) that holds records the store did not take."""

# MLflow's limits (mlflow.utils.validation in 3.17), repeated here so that building records does not
# import mlflow.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100

# Error codes with which a store rejects a record for good (a param logged twice with different values,
# an invalid name): retrying cannot help, so such records are dropped (and kept in the local file).
_REJECTED_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"})
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_PARENT_TAG = "mlflow.parentRunId"
_FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"


class TrackingConfigError(ValueError):
    """A tracking URI or experiment that cannot be used; the message says what is allowed."""


class TrackingUnavailableWarning(RuntimeWarning):
    """The tracking store did not take the records; they are kept in a local file instead."""


# --------------------------------------------------------------------------------------------------------
# Tracking URI
# --------------------------------------------------------------------------------------------------------


def resolve_tracking_uri(uri: str | None, workdir: Path) -> str:
    """The absolute tracking URI to use for a run.

    Precedence: ``uri`` (the config value), then ``$MLFLOW_TRACKING_URI``, then
    ``sqlite:///<absolute workdir>/mlflow.db``. A relative SQLite path in the config is taken relative to
    ``workdir``; one from the environment relative to the current directory (where MLflow itself would
    put it). Server URLs (``http(s)://``), databases (``postgresql://``...) and ``databricks`` pass through.

    Args:
        uri: The configured tracking URI, or None/empty for the next source.
        workdir: The run's output folder (``output_dir`` in the config).

    Returns:
        A URI whose local paths are absolute, e.g. ``sqlite:////data/runs/mlflow.db``.

    Raises:
        TrackingConfigError: For a plain file store (``file:``, ``./mlruns``), which MLflow 3.17 refuses,
            unless ``MLFLOW_ALLOW_FILE_STORE=true``.
    """
    workdir = Path(workdir).expanduser().resolve()
    if uri and uri.strip():
        return _absolute_uri(uri.strip(), base=workdir, source="tracking.uri")
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return _absolute_uri(env, base=Path.cwd(), source="$MLFLOW_TRACKING_URI")
    return _sqlite_uri(workdir / "mlflow.db")


def _sqlite_uri(path: Path) -> str:
    # sqlite:/// + "/abs/path" gives the four-slash form SQLAlchemy reads as an absolute path.
    return "sqlite:///" + path.as_posix()


def _absolute_uri(uri: str, base: Path, source: str) -> str:
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "sqlite":
        return _absolute_sqlite(uri, base)
    # A one-letter "scheme" is a Windows drive letter: a path, so a file store.
    if scheme in ("", "file") or len(scheme) == 1:
        if os.environ.get(_FILE_STORE_ENV, "").strip().lower() not in ("1", "true", "yes"):
            raise TrackingConfigError(
                f"{source}={uri!r} is a plain file store, which MLflow 3.17 refuses. Use a SQLite store "
                f"(e.g. 'sqlite:///mlflow.db', made absolute against the run folder; the default when the "
                f"URI is unset) or a tracking server URL ('http://<head>:5000'), or set "
                f"{_FILE_STORE_ENV}=true to keep the file store."
            )
        path = Path(urlsplit(uri).path if scheme == "file" else uri).expanduser()
        return (path if path.is_absolute() else base / path).resolve().as_uri()
    return uri


def _absolute_sqlite(uri: str, base: Path) -> str:
    rest = uri[len("sqlite:") :]
    if not rest.startswith("///"):
        # "sqlite://" (in memory) or "sqlite://host/..." forms: nothing local to make absolute.
        return uri
    path, sep, query = rest[3:].partition("?")
    if not path or path == ":memory:":
        return uri
    db = Path(path).expanduser()
    db = db if db.is_absolute() else base / db
    return _sqlite_uri(db.resolve()) + sep + query


def _sqlite_db_path(uri: str) -> Path | None:
    """The database file of an absolute ``sqlite:////...`` URI, else None."""
    if not uri.lower().startswith("sqlite:////"):
        return None
    return Path(uri[len("sqlite:///") :].partition("?")[0])


# --------------------------------------------------------------------------------------------------------
# Params and keys
# --------------------------------------------------------------------------------------------------------


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params: ``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``.

    Strings stay as they are; numbers, booleans and None are JSON-encoded (``1e-4`` -> ``"0.0001"``,
    ``True`` -> ``"true"``, ``None`` -> ``"null"``); lists and tuples are JSON-encoded whole; an empty
    nested mapping becomes ``"{}"`` so its key is not lost; anything else goes through ``str``.

    Args:
        d: The (possibly nested) mapping.
        prefix: Prefix for every key (joined with ``.``).

    Returns:
        A flat ``{key: str}`` dict.
    """
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, name) if value else {name: "{}"})
        else:
            flat[name] = _param_value(value)
    return flat


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=str)
    return str(value)


_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def sanitize_key(key: str) -> str:
    """``key`` made acceptable to MLflow as a param, metric or tag name.

    MLflow accepts alphanumerics, ``_ - . / : `` and spaces, and names that stay the same under path
    normalisation (no leading ``/``, no ``//``, ``.`` or ``..`` segments) and do not start with ``..``; names
    are at most 250 chars. Other characters become ``_``, empty and dot segments are dropped (``..`` becomes
    ``__``), and the dots of a leading run of two or more become ``_`` (``..0`` becomes ``__0``).

    Args:
        key: Any name, e.g. ``"loss/contrastive"`` or ``"weight[img→txt]"``.

    Returns:
        A valid name (``"_"`` if nothing usable is left).
    """
    segments = []
    for segment in _BAD_KEY_CHARS.sub("_", str(key)).split("/"):
        if segment in ("", "."):
            continue
        segments.append("__" if segment == ".." else segment)
    name = "/".join(segments)
    if name.startswith(".."):  # MLflow refuses any name that starts with "..", not only a ".." segment
        dots = len(name) - len(name.lstrip("."))
        name = "_" * dots + name[dots:]
    name = name[:MAX_KEY_LENGTH].rstrip("/")
    # Truncation can leave a trailing "." segment; path normalisation would change it.
    while name and posixpath.normpath(name) != name:
        name = name[:-1].rstrip("/")
    return name or "_"


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a :class:`Tracker` tries before it falls back to its local file, and when it tries again.

    MLflow retries inside each try too (an HTTP request up to ~4 minutes by default, opening a SQLite
    database that cannot be opened ~100 s), so the budget and the growing recheck interval are what keep
    an outage from stalling training more than once in a while.

    Attributes:
        attempts: Tries per send (the first try included).
        backoff_s: Sleep before the second try; doubles for each further try.
        budget_s: No further try starts once this many seconds have passed since the first.
        recheck_after_s: Once offline, how long to wait before trying the store again; records logged in
            between go straight to the local file.
        max_recheck_s: The wait doubles after each failed recheck, up to this.
    """

    attempts: int = 3
    backoff_s: float = 0.2
    budget_s: float = 10.0
    recheck_after_s: float = 30.0
    max_recheck_s: float = 600.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        for name in ("backoff_s", "budget_s", "recheck_after_s", "max_recheck_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"RetryPolicy.{name} must be >= 0, got {getattr(self, name)}")


class Tracker:
    """Logs one MLflow run; tracking failures never reach the training code.

    Records (params, metrics, tags, artifact paths, the final status) go to a backlog that is sent in
    order, metrics in ``log_batch`` chunks to keep SQLite writes few. When a send fails after the retries
    of ``retry``, the tracker warns once (:class:`TrackingUnavailableWarning`), appends the unsent records
    to ``<local_dir>/metrics.jsonl`` (one JSON object per line, after one ``{"kind": "run", ...}`` header)
    and tries again on later calls and in :meth:`finish`. Metrics keep their original step and timestamp,
    so a late send records them as they were.

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
        local_dir: Folder for the fallback ``metrics.jsonl`` and for files written by :meth:`log_dict`
            and :meth:`log_figure` (under ``artifacts/``).
        enabled: When False every method does nothing and ``run_id`` is None.
        run_id: Log into this existing run instead of creating one (resuming a run).
        retry: Retry and backoff settings.
        flush_every: Send metrics after this many :meth:`log_metrics` calls (1: every call). Params, tags,
            artifacts, :meth:`flush` and :meth:`finish` always send everything pending.
        max_backlog: Records kept in memory while the store is unreachable; older ones (already in the
            local file) are then only in the file.
        client: An ``MlflowClient`` (or an object with its methods) to use instead of
            ``MlflowClient(tracking_uri)``.
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
        retry: RetryPolicy = RetryPolicy(),
        flush_every: int = 1,
        max_backlog: int = 100_000,
        client: MlflowClient | None = None,
    ) -> None:
        if not experiment or not str(experiment).strip():
            raise TrackingConfigError(f"tracking experiment name must be a non-empty string, got {experiment!r}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self._tracking_uri = tracking_uri
        self._experiment = str(experiment)
        self._run_name = run_name
        self._tags = {sanitize_key(k): _param_value(v)[:MAX_TAG_VALUE_LENGTH] for k, v in (tags or {}).items()}
        if parent_run_id:
            self._tags[_PARENT_TAG] = parent_run_id
        self._local_dir = Path(local_dir)
        self._enabled = enabled
        self._run_id = run_id
        self._retry = retry
        self._flush_every = flush_every
        self._max_backlog = max_backlog
        self._client = client

        self._lock = threading.RLock()
        self._backlog: list[dict[str, Any]] = []
        self._spilled = 0  # how many leading backlog records are already in the local file
        self._unsent_metric_calls = 0
        self._offline_since: float | None = None  # time.monotonic() of the last failed send
        self._recheck_s = retry.recheck_after_s
        self._warned = False
        self._header_written = False
        self._trim_warned = False
        self._finished = False
        if enabled and run_id is not None:
            # Resuming: the run may have been marked FAILED by the interrupted attempt.
            self._backlog.append({"kind": "status", "status": "RUNNING", "end_time": None})
            if self._tags:
                self._backlog.append({"kind": "tags", "tags": dict(self._tags)})
        if enabled:
            with self._lock:
                self._send(force=True)  # creates the run now, so run_id is known early

    # -- public API ---------------------------------------------------------------------------------------

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
        """The fallback file holding records the store did not take."""
        return self._local_dir / LOCAL_METRICS_FILE

    @property
    def offline(self) -> bool:
        """Whether the last send failed (records are then kept in :attr:`local_path`)."""
        return self._offline_since is not None

    @property
    def pending(self) -> int:
        """Records logged but not yet taken by the store."""
        return len(self._backlog)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log run params; nested mappings are flattened, values stringified and cut to MLflow's limit."""
        if not self._enabled or not params:
            return
        flat = {sanitize_key(k): v[:MAX_PARAM_VALUE_LENGTH] for k, v in flatten_config(params).items()}
        self._record({"kind": "params", "params": flat})

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
        step = step_int
        timestamp = _now_ms()
        records = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key!r} must be a number, got {value!r}") from None
            records.append(
                {"kind": "metric", "key": sanitize_key(key), "value": number, "step": step, "timestamp": timestamp}
            )
        with self._lock:
            self._unsent_metric_calls += 1
            self._record(*records, send=self._unsent_metric_calls >= self._flush_every)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified and cut to MLflow's limit)."""
        if not self._enabled or not tags:
            return
        clean = {sanitize_key(k): _param_value(v)[:MAX_TAG_VALUE_LENGTH] for k, v in tags.items()}
        self._record({"kind": "tags", "tags": clean})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Log a file or folder as an artifact (uploaded when the store takes it; it must still exist then).

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
        self._record({"kind": "artifact", "path": str(local), "artifact_path": artifact_path})

    def log_dict(self, obj: Any, name: str) -> None:
        """Write ``obj`` as JSON (or YAML for ``.yaml``/``.yml``) under ``local_dir/artifacts`` and log it.

        Args:
            obj: A JSON-serialisable object (e.g. an eval table).
            name: Relative artifact file name, e.g. ``"eval/recall.json"``.
        """
        if not self._enabled:
            return
        path = self._artifact_file(name, (".json", ".yaml", ".yml"))
        if path.suffix == ".json":
            text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
        else:
            import yaml

            text = yaml.safe_dump(obj, sort_keys=True)
        _atomic_write_text(path, text)
        self.log_artifact(path, artifact_path=_parent_of(name))

    def log_figure(self, fig: Figure, name: str) -> None:
        """Save a matplotlib figure under ``local_dir/artifacts`` and log it.

        Args:
            fig: The figure (left open; the caller owns it).
            name: Relative artifact file name with an image suffix, e.g. ``"plots/weights.png"``.
        """
        if not self._enabled:
            return
        from raydistill.plots import save_figure

        path = self._artifact_file(name, (".png", ".svg", ".pdf", ".jpg", ".jpeg"))
        save_figure(fig, path)
        self.log_artifact(path, artifact_path=_parent_of(name))

    def flush(self) -> bool:
        """Try to send everything pending now (even while offline).

        Returns:
            True when nothing is left unsent.
        """
        if not self._enabled:
            return True
        with self._lock:
            self._send(force=True)
            return not self._backlog

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ended with ``status`` and send everything pending; later calls do nothing.

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
            if self._finished:
                return
            self._finished = True
            self._record({"kind": "status", "status": status, "end_time": _now_ms()}, send=False)
            self._send(force=True)
            if self._backlog:
                _logger.warning(
                    "%d tracking records were not sent to %s; they are kept in %s",
                    len(self._backlog),
                    self._tracking_uri,
                    self.local_path,
                )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    # -- the guarded path ---------------------------------------------------------------------------------

    def _record(self, *records: dict[str, Any], send: bool = True) -> None:
        with self._lock:
            if self._finished and records and records[0]["kind"] != "status":
                _logger.warning("tracker for run %s is finished; dropping %d records", self._run_id, len(records))
                return
            self._backlog.extend(records)
            if send:
                self._send(force=False)
            elif self.offline:
                self._spill()

    def _send(self, force: bool) -> None:
        """Send the backlog with retries; on failure keep it in the local file. Never raises."""
        if self.offline and not force and time.monotonic() - self._offline_since < self._recheck_s:
            self._spill()
            return
        error: BaseException | None = None
        started = time.monotonic()
        for attempt in range(self._retry.attempts):
            if attempt:
                if time.monotonic() - started > self._retry.budget_s:
                    break
                time.sleep(self._retry.backoff_s * 2 ** (attempt - 1))
            try:
                self._send_backlog()
            except Exception as exc:  # any store failure: tracking must never stop training
                error = exc
                _logger.debug("tracking send attempt %d to %s failed: %s", attempt + 1, self._tracking_uri, exc)
                continue
            if self.offline:
                _logger.warning("tracking store %s is reachable again; pending records sent", self._tracking_uri)
            self._offline_since = None
            self._recheck_s = self._retry.recheck_after_s
            return
        if self.offline:  # a failed recheck: wait longer before the next one
            self._recheck_s = min(2 * self._recheck_s, max(self._retry.max_recheck_s, self._retry.recheck_after_s))
        self._offline_since = time.monotonic()
        self._warn_once(error)
        self._spill()

    def _send_backlog(self) -> None:
        client = self._get_client()
        if self._run_id is None:
            self._run_id = self._create_run(client)
        self._unsent_metric_calls = 0
        while self._backlog:
            group = _next_group(self._backlog)
            try:
                _send_group(client, self._run_id, group)
            except Exception as exc:
                if not _is_rejection(exc):
                    raise
                parts = _split(group)
                if len(parts) == 1:
                    self._reject(parts[0], exc)
                else:
                    # One bad entry fails the whole batch: send the entries one by one, drop the bad ones.
                    for part in parts:
                        self._send_single(client, part)
            self._pop(len(group))

    def _send_single(self, client: Any, record: dict[str, Any]) -> None:
        try:
            _send_group(client, self._run_id, [record])
        except Exception as exc:
            if not _is_rejection(exc):
                raise
            self._reject(record, exc)

    def _reject(self, record: dict[str, Any], exc: BaseException) -> None:
        """Drop a record the store refuses for good, keeping it (with the reason) in the local file."""
        _logger.warning("tracking store rejected %s: %s", _describe(record), exc)
        self._append_local([{**record, "error": str(exc)[:500]}])

    def _pop(self, count: int) -> None:
        del self._backlog[:count]
        self._spilled = max(0, self._spilled - count)

    def _get_client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self._tracking_uri)
        return self._client

    def _create_run(self, client: Any) -> str:
        experiment_id = _get_or_create_experiment(client, self._experiment, self._tracking_uri)
        run = client.create_run(experiment_id, tags=dict(self._tags), run_name=self._run_name)
        return run.info.run_id

    # -- local fallback -----------------------------------------------------------------------------------

    def _warn_once(self, error: BaseException | None) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"MLflow tracking at {self._tracking_uri} failed ({type(error).__name__}: {str(error)[:300]}); "
            f"training continues, metrics are kept locally at {self.local_path} and sent when the store "
            f"is reachable again",
            TrackingUnavailableWarning,
            stacklevel=2,
        )

    def _spill(self) -> None:
        """Append the backlog records not yet in the local file to it. Never raises."""
        if not self._append_local(self._backlog[self._spilled :]):
            return
        self._spilled = len(self._backlog)
        if len(self._backlog) > self._max_backlog:
            # Everything is in the file already; keep memory bounded during a long outage.
            self._pop(len(self._backlog) - self._max_backlog)
            if not self._trim_warned:
                self._trim_warned = True
                _logger.warning(
                    "tracking backlog over %d records; older ones are only in %s", self._max_backlog, self.local_path
                )

    def _append_local(self, records: list[dict[str, Any]]) -> bool:
        """Append ``records`` to the local file (after a one-time run header). Never raises.

        Returns:
            Whether the records were written.
        """
        if not records:
            return True
        lines = list(records)
        if not self._header_written:
            header = {
                "kind": "run",
                "tracking_uri": self._tracking_uri,
                "experiment": self._experiment,
                "run_name": self._run_name,
                "run_id": self._run_id,
                "tags": self._tags,
            }
            lines.insert(0, header)
        try:
            self._local_dir.mkdir(parents=True, exist_ok=True)
            with open(self.local_path, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
        except OSError as exc:
            _logger.error("could not write tracking records to %s: %s", self.local_path, exc)
            return False
        self._header_written = True
        return True

    def _artifact_file(self, name: str, suffixes: tuple[str, ...]) -> Path:
        clean = posixpath.normpath(str(name).replace("\\", "/"))
        if not name or clean.startswith(("/", "..")) or clean == ".":
            raise ValueError(f"artifact name must be a relative file name inside the run, got {name!r}")
        if Path(clean).suffix.lower() not in suffixes:
            raise ValueError(f"artifact name {name!r} must end with one of {list(suffixes)}")
        return self._local_dir / "artifacts" / clean


# --------------------------------------------------------------------------------------------------------
# Sending records
# --------------------------------------------------------------------------------------------------------


def _next_group(backlog: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leading records that go in one store call: consecutive metrics (up to 1000) or one record."""
    first = backlog[0]
    if first["kind"] != "metric":
        return [first]
    group = [first]
    for record in backlog[1:_MAX_METRICS_PER_BATCH]:
        if record["kind"] != "metric":
            break
        group.append(record)
    return group


def _split(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A group as single-entry records: each metric, or each key of one params/tags record."""
    if len(group) > 1 or group[0]["kind"] not in ("params", "tags"):
        return group
    kind = group[0]["kind"]
    return [{"kind": kind, kind: {key: value}} for key, value in group[0][kind].items()]


def _send_group(client: Any, run_id: str, group: list[dict[str, Any]]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    kind = group[0]["kind"]
    if kind == "metric":
        metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in group]
        client.log_batch(run_id, metrics=metrics, synchronous=True)
    elif kind in ("params", "tags"):
        items = list(group[0][kind].items())
        entity = Param if kind == "params" else RunTag
        for start in range(0, len(items), _MAX_PARAMS_TAGS_PER_BATCH):
            chunk = [entity(k, v) for k, v in items[start : start + _MAX_PARAMS_TAGS_PER_BATCH]]
            client.log_batch(run_id, **{kind: chunk}, synchronous=True)
    elif kind == "artifact":
        if not Path(group[0]["path"]).exists():
            raise _RejectedRecord(f"artifact {group[0]['path']} no longer exists")
        if Path(group[0]["path"]).is_dir():
            client.log_artifacts(run_id, group[0]["path"], group[0]["artifact_path"])
        else:
            client.log_artifact(run_id, group[0]["path"], group[0]["artifact_path"])
    elif kind == "status" and group[0]["status"] == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    elif kind == "status":
        client.set_terminated(run_id, status=group[0]["status"], end_time=group[0]["end_time"])
    else:  # pragma: no cover - records are built in this module only
        raise AssertionError(f"unknown tracking record kind {kind!r}")


class _RejectedRecord(Exception):
    """A record that can never be sent (its artifact file is gone)."""


def _is_rejection(exc: BaseException) -> bool:
    return isinstance(exc, _RejectedRecord) or getattr(exc, "error_code", None) in _REJECTED_CODES


def _describe(record: dict[str, Any]) -> str:
    if record["kind"] == "metric":
        return f"metric {record['key']!r} at step {record['step']}"
    if record["kind"] == "artifact":
        return f"artifact {record['path']}"
    return f"{record['kind']} record"


def _get_or_create_experiment(client: Any, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        db = _sqlite_db_path(tracking_uri)
        if db is not None:
            # MLflow's default artifact root for a SQLite store is ./mlruns under the CURRENT directory;
            # keep artifacts beside the database instead, where every worker finds them.
            artifact_location = (db.parent / "mlartifacts" / sanitize_key(name).replace("/", "_")).as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except Exception:
            # Another process may have created it between our lookup and create: use theirs.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingConfigError(
            f"MLflow experiment {name!r} at {tracking_uri} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or use another name"
        )
    return experiment.experiment_id


def _parent_of(name: str) -> str | None:
    parent = posixpath.dirname(posixpath.normpath(name.replace("\\", "/")))
    return parent or None


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------
# Reading runs back
# --------------------------------------------------------------------------------------------------------


def read_runs(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """The (not deleted) runs of an experiment, oldest first, as plain dicts.

    Args:
        tracking_uri: Absolute tracking URI (see :func:`resolve_tracking_uri`).
        experiment: Experiment name.
        parent_run_id: Only the child runs of this run (e.g. the trials of one Tune sweep).

    Returns:
        One dict per run: ``run_id``, ``run_name``, ``status``, ``start_time``, ``end_time`` (ms since the
        epoch), ``params`` and ``tags`` (``{str: str}``), ``metrics`` (latest value of each, ``{str: float}``).

    Raises:
        TrackingConfigError: If the experiment does not exist (the message lists those that do).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments(max_results=50))
        raise TrackingConfigError(
            f"MLflow experiment {experiment!r} not found at {tracking_uri}; experiments there: {names}"
        )
    filter_string = ""
    if parent_run_id:
        if "'" in parent_run_id:
            raise TrackingConfigError(f"parent run id must not contain quotes, got {parent_run_id!r}")
        filter_string = f"tags.`{_PARENT_TAG}` = '{parent_run_id}'"
    runs: list[dict[str, Any]] = []
    page_token = None
    while True:
        page = client.search_runs(
            [found.experiment_id], filter_string=filter_string, max_results=1000, page_token=page_token
        )
        for run in page:
            runs.append(
                {
                    "run_id": run.info.run_id,
                    "run_name": run.info.run_name,
                    "status": run.info.status,
                    "start_time": run.info.start_time,
                    "end_time": run.info.end_time,
                    "params": dict(run.data.params),
                    "metrics": {k: float(v) for k, v in run.data.metrics.items()},
                    "tags": dict(run.data.tags),
                }
            )
        page_token = page.token
        if not page_token:
            break
    runs.sort(key=lambda r: (r["start_time"] or 0, r["run_id"]))
    return runs
