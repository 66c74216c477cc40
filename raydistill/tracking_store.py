"""The MLflow store of a run: its URI, the names it accepts, creating and reading runs.

* :func:`resolve_tracking_uri` turns the config value (or ``$MLFLOW_TRACKING_URI``, or the default
  ``<workdir>/mlflow.db``) into an ABSOLUTE URI: Ray workers run in other folders and on other nodes, and
  MLflow's own default ``sqlite:///mlflow.db`` is relative to the working directory.
* :func:`flatten_config` and :func:`sanitize_key` make config values and names MLflow accepts.
* :func:`open_run` creates a run; :func:`read_runs` returns an experiment's runs as plain dicts for
  ``raydistill compare``.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# MLflow's limits (mlflow.utils.validation in 3.17), repeated here so that building records does not
# import mlflow.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

PARENT_TAG = "mlflow.parentRunId"
_FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"

class TrackingConfigError(ValueError):
    """A tracking URI or experiment that cannot be used; the message says what is allowed."""


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


def sqlite_db_path(uri: str) -> Path | None:
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
            flat[name] = param_value(value)
    return flat


def param_value(value: Any) -> str:
    """One config value as an MLflow param or tag value (see :func:`flatten_config`)."""
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


# --------------------------------------------------------------------------------------------------------
# Creating runs
# --------------------------------------------------------------------------------------------------------


def open_run(client: Any, header: dict[str, Any]) -> str:
    """Create the run a tracker (or a backlog header) describes: ``experiment``, ``run_name``, ``tags``.

    Returns:
        The new run's id.
    """
    experiment_id = _get_or_create_experiment(client, header["experiment"], header["tracking_uri"])
    return client.create_run(experiment_id, tags=dict(header["tags"]), run_name=header["run_name"]).info.run_id


def _get_or_create_experiment(client: Any, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        db = sqlite_db_path(tracking_uri)
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
        filter_string = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
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
