"""What a tracker does when the MLflow store fails: give up fast and quietly, warn once, keep, replay.

:func:`connect` gives an ``MlflowClient`` whose HTTP retries give up within seconds (:data:`HTTP_SETTINGS`)
and filters what MLflow and urllib3 log about failures a tracker handles itself. :func:`warn_outage` reports
an outage once per store and process, as one line on the ``raydistill.tracking`` logger.

What the store did not take goes to the run's backlog, ``<local_dir>/metrics.jsonl``: JSON objects, one a
line, each append led by a ``{"kind": "run", ...}`` header naming the run (its id, or what creates it when
the store was down from the start). :func:`replay` sends the records in order once the store answers and
notes in ``metrics.sent`` how far it got and which runs it created, so a replay cut short by another outage
resumes where it stopped instead of sending records twice. Metrics would survive a second send (MLflow's
SQL store drops a metric equal in key, step, value and timestamp, and records keep their timestamps), but a
final status sent again could end a run that was re-opened since, and an artifact would be uploaded again.
When everything is sent both files are removed. The driver and the rank-0 Train worker of a run share
``local_dir``: appends and replays hold an exclusive lock on ``.metrics.lock``, so one process's replay
never drops another's new records.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from raydistill import tracking_store as store

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock: there a local_dir must be one process's
    fcntl = None

_logger = logging.getLogger("raydistill.tracking")

BACKLOG_FILE = "metrics.jsonl"
_SENT_FILE = "metrics.sent"
_LOCK_FILE = ".metrics.lock"
_MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit, and how far back a cut-short replay resumes

# Error codes with which a store refuses a record for good (a param logged again with another value, an
# invalid name): sending it again cannot help, so the record is dropped with a warning.
_REFUSED = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"})

HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""MLflow's HTTP retry settings for tracking, applied unless already in the environment (set for a job).

MLflow's defaults retry a failed request for about 4 minutes (7 retries, backoff factor 2, 120 s timeout)
before the caller hears of it; a tracker keeps what the store does not take and sends it later, so it gives
up after a few seconds instead. The SQLite store has no such settings: MLflow waits up to 20 s for a locked
database (``PRAGMA busy_timeout`` in ``mlflow.store.db.utils``, fixed).
"""

_state = threading.Lock()
_down: set[str] = set()  # tracking URIs that failed in this process and have not answered since
_quiet_runs: set[str] = set()  # runs whose trackers report their own failures

Record = dict[str, Any]


class _StoreNoise(logging.Filter):
    """Drops what MLflow and urllib3 log about a failure that a tracker also receives as an exception.

    Left alone they print a traceback or a retry line per attempt, many per outage, where the tracker keeps
    the records and warns once. Only these records go: MLflow's async-logging error for a run that is not
    a tracker's, and everything else these loggers say, still show.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "urllib3.connectionpool":
            return not (message.startswith("Retrying") and "/mlflow" in message)
        if record.name == "mlflow.utils.async_logging.async_logging_queue":
            with _state:
                return not any(f"Run Id {run_id}:" in message for run_id in _quiet_runs)
        # mlflow.store.db.utils logs an OperationalError with its traceback, then raises it to the caller.
        return not message.startswith(("SQLAlchemy database error", "SQLAlchemy engine could not be created"))


_NOISY_LOGGERS = ("urllib3.connectionpool", "mlflow.utils.async_logging.async_logging_queue", "mlflow.store.db.utils")
_noise = _StoreNoise()


def connect(tracking_uri: str) -> Any:
    """An ``MlflowClient`` for ``tracking_uri``, with :data:`HTTP_SETTINGS` and MLflow's failure noise filtered.

    Raises:
        sqlite3.OperationalError: If an existing SQLite store cannot be opened (its storage is not mounted,
            a folder sits at its path). MLflow would retry creating its engine 10 times with growing sleeps,
            about 100 s, and has no setting for it; this check takes milliseconds. A locked database
            passes: MLflow waits for the lock itself.
    """
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).addFilter(_noise)  # once: a filter already there is not added again
    db = store.sqlite_db_path(tracking_uri)
    if db is not None and db.exists():
        try:
            with closing(sqlite3.connect(f"{db.as_uri()}?mode=rw", uri=True, timeout=0)) as con:
                con.execute("PRAGMA schema_version")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def quiet_run(run_id: str) -> None:
    """Filter MLflow's async-logging error messages for ``run_id`` (its tracker reports failures itself)."""
    with _state:
        _quiet_runs.add(run_id)


class Replay(NamedTuple):
    """What one :func:`replay` did: the runs it created (:func:`header_key` to run id), how many records the
    store took, and the failure that stopped it (None: the backlog is empty now)."""

    created: dict[str, str]
    sent: int
    error: Exception | None


def replay_backlog(local_dir: str | os.PathLike[str], tracking_uri: str | None = None) -> int:
    """Send what a tracker of a run kept in ``local_dir`` and has not sent yet. Never raises.

    Call it before reading a run whose training may have ended during an outage; a
    :class:`~raydistill.tracking.Tracker` that re-opens the run does the same. Records already sent are not
    sent again.

    Args:
        local_dir: The tracker's ``local_dir``.
        tracking_uri: The store to send to (default: the one the tracker used).

    Returns:
        How many records were sent; the rest (store still unreachable) stay for the next replay.
    """
    local_dir = Path(local_dir)
    try:
        with open(local_dir / BACKLOG_FILE, encoding="utf-8") as fh:
            uri = tracking_uri or json.loads(fh.readline())["tracking_uri"]
    except FileNotFoundError:
        return 0  # nothing kept, or another process sent it just now
    result = replay(local_dir, lambda: connect(uri))
    if result.error is not None:
        warn_outage(uri, result.error, local_dir / BACKLOG_FILE)
    else:
        store_answered(uri)
    return result.sent


def exists(local_dir: Path) -> bool:
    """Whether ``local_dir`` holds records not yet sent."""
    return (local_dir / BACKLOG_FILE).exists()


def append(local_dir: Path, records: list[Record], header: Record) -> None:
    """Append ``records`` to the backlog after ``header``, the run they belong to.

    Every append names its run, so that a folder holding records of two runs (a resumed run whose first
    attempt never reached the store) replays each record to its own run.

    Raises:
        OSError: If the folder or file cannot be written.
    """
    with _locked(local_dir), open(local_dir / BACKLOG_FILE, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in [header, *records]))


def replay(local_dir: Path, connect: Callable[[], Any]) -> Replay:
    """Send the backlog of ``local_dir`` in order, from where the last replay stopped. Never raises.

    Args:
        local_dir: The run's tracking folder.
        connect: Returns the ``MlflowClient`` to send with.
    """
    if not exists(local_dir):
        return Replay({}, 0, None)
    with _locked(local_dir):
        try:
            lines = (local_dir / BACKLOG_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:  # another process sent it while we waited for the lock
            return Replay({}, 0, None)
        state = _read_state(local_dir)
        done, created, sent = state.get("done", 0), state.get("created", {}), 0
        try:
            entries = [json.loads(line) for line in lines]
            client = connect()
            i, header, run_id = 0, None, None
            while i < len(entries):
                if entries[i]["kind"] == "run":
                    header, run_id = entries[i], _run_of(entries[i], created, client)
                    i += 1
                elif i < done:  # sent by an earlier replay
                    i += 1
                else:
                    group, i = _next_group(entries, i, header)
                    send(client, run_id, group)
                    sent += len(group)
                if i > done:
                    done = i
                    _write_state(local_dir, {"done": done, "created": created})
        except Exception as exc:  # any store failure: keep the rest for the next replay
            return Replay(created, sent, exc)
        (local_dir / BACKLOG_FILE).unlink()
        (local_dir / _SENT_FILE).unlink(missing_ok=True)
        return Replay(created, sent, None)


def header_key(header: Record) -> str:
    """How :attr:`Replay.created` names the run of a header that had no run id."""
    return json.dumps(header, sort_keys=True)


def _run_of(header: Record, created: dict[str, str], client: Any) -> str:
    """The run id of a header; a run the store never had is created (once: ``created`` remembers it)."""
    if header["run_id"] is None and header_key(header) not in created:
        created[header_key(header)] = store.open_run(client, header)
    return header["run_id"] or created[header_key(header)]


def send(client: Any, run_id: str, records: list[Record]) -> None:
    """Send records of one kind now (several only for metrics); drop, with a warning, what the store refuses.

    Raises:
        Exception: Any other store failure (unreachable, locked): the caller keeps the records.
    """
    try:
        _send(client, run_id, records)
    except Exception as exc:
        if not (isinstance(exc, _Gone) or getattr(exc, "error_code", None) in _REFUSED):
            raise
        kind = records[0]["kind"]
        if kind in ("params", "tags") and len(records[0][kind]) > 1:
            # One refused entry fails the whole call: send the entries one by one to keep the others.
            for key, value in records[0][kind].items():
                send(client, run_id, [{"kind": kind, kind: {key: value}}])
        else:
            _logger.warning("tracking store refused a %s record of run %s; dropped: %s", kind, run_id,
                            " ".join(str(exc).split())[:300])


def to_metric(record: Record) -> Any:
    """The ``mlflow.entities.Metric`` of a metric record."""
    from mlflow.entities import Metric

    return Metric(record["key"], record["value"], record["timestamp"], record["step"])


def warn_outage(tracking_uri: str, error: BaseException, kept_in: Path) -> None:
    """Warn, in one line, that ``tracking_uri`` failed; only the first time until :func:`store_answered`."""
    with _state:
        first = tracking_uri not in _down
        _down.add(tracking_uri)
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    if first:
        _logger.warning("MLflow tracking store %s is unreachable (%s); training goes on, records are kept in %s "
                        "and sent when the store answers again", tracking_uri, reason, kept_in)
    else:
        _logger.debug("tracking store %s still unreachable: %s", tracking_uri, reason)


def store_answered(tracking_uri: str) -> None:
    """Note that ``tracking_uri`` took records again: its next failure warns again."""
    with _state:
        was_down = tracking_uri in _down
        _down.discard(tracking_uri)
    if was_down:
        _logger.info("MLflow tracking store %s answers again; kept records sent", tracking_uri)


def _send(client: Any, run_id: str, records: list[Record]) -> None:
    from mlflow.entities import Param, RunTag

    record = records[0]
    kind = record["kind"]
    if kind == "metric":
        client.log_batch(run_id, metrics=[to_metric(r) for r in records], synchronous=True)
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()], synchronous=True)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()], synchronous=True)
    elif kind == "artifact":
        path = Path(record["path"])
        if not path.exists():
            raise _Gone(f"{path} no longer exists")
        upload = client.log_artifacts if path.is_dir() else client.log_artifact
        upload(run_id, str(path), record["artifact_path"])
    elif record["status"] == "RUNNING":  # a re-opened run
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])


class _Gone(Exception):
    """An artifact whose file was removed before it could be sent."""


def _next_group(entries: list[Record], start: int, header: Record | None) -> tuple[list[Record], int]:
    """The records from ``start`` that go in one store call, and the index after them: one record, or
    consecutive metrics (read across the headers of later appends to the same run)."""
    if entries[start]["kind"] != "metric":
        return [entries[start]], start + 1
    group, end = [], start
    while end < len(entries) and len(group) < _MAX_METRICS_PER_CALL:
        if entries[end]["kind"] == "metric":
            group.append(entries[end])
        elif entries[end] != header:
            break
        end += 1
    return group, end


def _read_state(local_dir: Path) -> dict[str, Any]:
    path = local_dir / _SENT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _write_state(local_dir: Path, state: dict[str, Any]) -> None:
    tmp = local_dir / f".{_SENT_FILE}.tmp"
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, local_dir / _SENT_FILE)  # atomic: a crash leaves the old count or the new one


@contextmanager
def _locked(local_dir: Path) -> Iterator[None]:
    local_dir.mkdir(parents=True, exist_ok=True)
    with open(local_dir / _LOCK_FILE, "a") as fh:  # closing the file releases the lock
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
