"""Run experiments on a Ray cluster: ``raydistill submit``, ``raydistill jobs ...`` and ``raydistill mlflow-server``.

``raydistill submit configs/x.yaml [overrides] --address http://<head>:8265 [--follow]`` sends the project to
the cluster through the Ray Jobs API and runs ``raydistill run configs/x.yaml [overrides] --json`` there (or
``raydistill tune ... --space <space> --json`` with ``--tune``):

* the working directory (the project) is uploaded minus :data:`UPLOAD_EXCLUDES` (data, caches, run outputs,
  MLflow stores, ``.git``, credentials), and on top of what Ray itself skips through ``.gitignore``;
* no environment variable of the submitting shell reaches the job except ``MLFLOW_TRACKING_URI`` (from
  ``--mlflow-uri`` or the environment) and those named with ``--env NAME``;
* the submission id and the dashboard URL are printed; ``--follow`` streams the logs and exits with the
  job's outcome (0 only for SUCCEEDED).

Token authentication (Ray >= 2.52): with ``RAY_AUTH_MODE=token`` (or an explicit ``RAY_AUTH_TOKEN`` /
``RAY_AUTH_TOKEN_PATH``) every request carries ``Authorization: Bearer <token>``; the token is read from
``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``, in that order (Ray's own
order). The token is never printed.

``raydistill mlflow-server`` runs an MLflow tracking server with a SQLite store (an absolute path, as Ray
workers need) and proxied artifacts (a folder or ``s3://...``), bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydistill.errors import UserError
from raydistill.paths import is_uri

#: gitwildmatch patterns (relative to the working directory) that never travel with a job (Ray caps the upload
#: at 512 MiB, and model weights belong on the nodes or in object storage). Patterns with a
#: leading slash apply to the top level only: ``raydistill/data/`` is source code, ``/data/`` is a dataset.
UPLOAD_EXCLUDES: tuple[str, ...] = (
    # version control and tool caches
    ".git/",
    "__pycache__/",
    ".pytest_cache/",
    ".hypothesis/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".venv/",
    "venv/",
    "*.egg-info/",
    # datasets, caches, run outputs, checkpoints, MLflow stores
    "/data/",
    "/tests/data/",  # the test suite's fixture files: a job never reads them
    "/cache/",
    "/checkpoints/",
    "/models/",
    "*.pth",
    "*.pt",
    "*.ckpt",
    "*.safetensors",
    # ... except the demo teacher raydistill ships (20 MB): the working directory's raydistill/ comes first on
    # the job's Python path, and without its weights a `teacher.kind: demo` job would refit it on first use.
    "!/raydistill/assets/demo-teacher/model.safetensors",
    "raydistill_runs/",
    "ray_results/",
    "mlruns/",
    "mlartifacts/",
    "*.db",
    "*.db-journal",
    # credentials
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_ed25519*",
    ".aws/",
    ".ssh/",
    ".gcp/",
    ".azure/",
    ".kube/",
    ".netrc",
    ".pypirc",
    "credentials",
    "credentials.json",
    "*service-account*.json",
    "auth_token",
)

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
DEFAULT_DASHBOARD_PORT = 8265
_TOKEN_ENV, _TOKEN_PATH_ENV, _MODE_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"
_ADDRESS_ENVS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class JobsError(UserError, ValueError):
    """A submission or job command cannot go on; the message says why and what to do."""


# --------------------------------------------------------------------------------------------- address, auth
def resolve_address(address: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The Jobs API URL: ``--address``, else ``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS`` if an http(s) URL.

    Raises:
        JobsError: nothing usable was given.
    """
    if address:
        value = address.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise JobsError(
                f"--address {address!r}: give the dashboard's URL, e.g. http://<head>:{DEFAULT_DASHBOARD_PORT}"
            )
        return value
    for name in _ADDRESS_ENVS:
        value = environ.get(name, "").strip().rstrip("/")
        if value.startswith(("http://", "https://")):
            return value
    raise JobsError(
        f"no cluster address: pass --address http://<head>:{DEFAULT_DASHBOARD_PORT} "
        f"(after `ray dashboard clusters/aws.yaml`: http://127.0.0.1:{DEFAULT_DASHBOARD_PORT})"
    )


def auth_headers(environ: Mapping[str, str] = os.environ, home: Path | None = None) -> dict[str, str]:
    """The ``Authorization`` header for Ray's token authentication, or ``{}`` when it is off.

    Token auth is on with ``RAY_AUTH_MODE=token``, or when ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` is set
    and ``RAY_AUTH_MODE`` is not ``disabled``. The default file ``~/.ray/auth_token`` is only read with
    ``RAY_AUTH_MODE=token``, so a local token is never sent to a cluster that did not ask for one.

    Raises:
        JobsError: token auth is on but no token can be read.
    """
    mode = environ.get(_MODE_ENV, "").strip().lower()
    if mode == "disabled":
        return {}
    if mode not in ("", "token"):
        raise JobsError(f"{_MODE_ENV}={environ[_MODE_ENV]!r}: allowed values are 'token' and 'disabled'")
    token = environ.get(_TOKEN_ENV, "").strip()
    if not token and environ.get(_TOKEN_PATH_ENV, "").strip():
        path = Path(environ[_TOKEN_PATH_ENV].strip()).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise JobsError(f"{_TOKEN_PATH_ENV}={path}: cannot read the token file ({err.strerror})") from None
        if not token:
            raise JobsError(f"{_TOKEN_PATH_ENV}={path}: the token file is empty")
    if not token and mode == "token":
        default = (home or Path.home()) / ".ray" / "auth_token"
        if default.is_file():
            token = default.read_text(encoding="utf-8").strip()
        if not token:
            raise JobsError(
                f"{_MODE_ENV}=token but no token found: set {_TOKEN_ENV} (the cluster's token, "
                f"`ray get-auth-token` on the head), {_TOKEN_PATH_ENV}, or put it in {default}"
            )
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _without_env(names: tuple[str, ...]) -> Iterator[None]:
    """Hide variables for a moment: Ray's client lets ``$RAY_ADDRESS`` override an explicit address."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _cluster_errors(address: str, action: str) -> Iterator[None]:
    """Turn the Jobs client's errors into a :class:`JobsError` that names the cluster and the fix."""
    from ray.exceptions import RayError  # AuthenticationError is one

    try:
        yield
    except (RuntimeError, OSError, RayError) as err:
        text = str(err)
        hint = ""
        if "401" in text or "Missing authentication" in text:
            hint = f" (the cluster uses token authentication: export {_MODE_ENV}=token and {_TOKEN_ENV}=<its token>)"
        elif "403" in text or "Invalid authentication" in text:
            hint = f" (the token was refused: check {_TOKEN_ENV} / {_TOKEN_PATH_ENV} / ~/.ray/auth_token)"
        raise JobsError(f"{action} at {address} failed: {text.strip()}{hint}") from None


def connect(address: str, environ: Mapping[str, str] = os.environ) -> Any:
    """A ``JobSubmissionClient`` for ``address``, with the token header when token auth is on."""
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers(environ)
    with _cluster_errors(address, "connecting to the Ray Jobs API"), _without_env(_ADDRESS_ENVS):
        return JobSubmissionClient(address, headers=headers or None)


def dashboard_url(address: str, submission_id: str) -> str:
    """The dashboard page of one job."""
    return f"{address.rstrip('/')}/#/jobs/{submission_id}"


# --------------------------------------------------------------------------------------------- submission
@dataclass
class Submission:
    """Everything sent to the Jobs API for one ``raydistill submit``."""

    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str] = field(default_factory=dict)


def path_in_project(path: str | os.PathLike[str], working_dir: Path, what: str) -> str:
    """``path`` relative to the uploaded working directory (POSIX form), which is where the job runs.

    Raises:
        JobsError: the file does not exist or lies outside the working directory.
    """
    p = Path(path).expanduser()
    resolved = (p if p.is_absolute() else Path.cwd() / p).resolve()
    if not resolved.is_file():
        raise JobsError(f"{what} {path}: file not found")
    try:
        return resolved.relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise JobsError(
            f"{what} {path} is outside the uploaded working directory {working_dir}: run from the project "
            "root or pass --working-dir"
        ) from None


def build_entrypoint(config: str, overrides: list[str], tune_space: str | None = None) -> str:
    """The shell command the job runs on the cluster (paths relative to the working directory)."""
    if tune_space is None:
        argv = ["raydistill", "run", config, *overrides, "--json"]
    else:
        argv = ["raydistill", "tune", config, *overrides, "--space", tune_space, "--json"]
    return shlex.join(argv)


def forwarded_env(names: list[str], mlflow_uri: str | None, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The job's environment variables: only ``MLFLOW_TRACKING_URI`` and the ones named with ``--env``.

    ``--env NAME`` forwards the submitting shell's value, ``--env NAME=VALUE`` sets one. A local SQLite
    tracking URI is made absolute first (the job runs in another folder).

    Raises:
        JobsError: ``--env NAME`` for a variable that is not set, or a malformed name.
    """
    out: dict[str, str] = {}
    for item in names:
        name, sep, value = item.partition("=")
        if not name or not (name[0].isalpha() or name[0] == "_") or not all(c.isalnum() or c == "_" for c in name):
            raise JobsError(f"--env {item!r}: give NAME or NAME=VALUE with a variable name (letters, digits, _)")
        if not sep:
            if name not in environ:
                raise JobsError(f"--env {name}: the variable is not set in this shell (or use --env {name}=VALUE)")
            value = environ[name]
        out[name] = value
    uri = mlflow_uri or out.get("MLFLOW_TRACKING_URI") or environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        from raydistill.tracking import resolve_tracking_uri

        out["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(uri, Path.cwd())
    return out


def new_submission_id(config: str) -> str:
    """A readable unique id: ``raydistill-<config name>-<UTC time>-<random>``."""
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(config).stem)[:40]
    return f"raydistill-{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def build_submission(
    config: str,
    overrides: list[str],
    working_dir: Path,
    *,
    tune_space: str | None = None,
    env: list[str] | None = None,
    mlflow_uri: str | None = None,
    submission_id: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Submission:
    """Validate the config locally, then assemble the entrypoint, runtime environment and metadata.

    Raises:
        ConfigError: the config (with its overrides) does not validate, so nothing is uploaded.
        JobsError: files outside the working directory, bad ``--env``.
    """
    from raydistill.config import load_config

    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise JobsError(f"--working-dir {working_dir}: not a folder")
    config_rel = path_in_project(config, working_dir, "config")
    load_config(working_dir / config_rel, overrides)
    space_rel = path_in_project(tune_space, working_dir, "--tune space") if tune_space else None
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(UPLOAD_EXCLUDES)}
    env_vars = forwarded_env(list(env or []), mlflow_uri, environ)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return Submission(
        entrypoint=build_entrypoint(config_rel, list(overrides), space_rel),
        runtime_env=runtime_env,
        submission_id=submission_id or new_submission_id(config_rel),
        metadata={"raydistill_config": config_rel, "raydistill_command": "tune" if tune_space else "run"},
    )


def _relative_output_warning(config: Path, overrides: list[str]) -> str | None:
    """A warning when runs would land inside the job's temporary working directory on the cluster."""
    import yaml

    from raydistill.config import apply_overrides

    raw = apply_overrides(yaml.safe_load(config.read_text(encoding="utf-8")) or {}, overrides)
    out = str(raw.get("output_dir") or "raydistill_runs")
    if is_uri(out) or Path(os.path.expanduser(out)).is_absolute():
        return None
    return (f"output_dir={out!r} is relative: on the cluster it resolves inside the job's temporary working "
            "directory; set output_dir to shared storage (s3://..., an NFS path) to keep runs and checkpoints")


# --------------------------------------------------------------------------------------------- waiting
def job_status(client: Any, submission_id: str) -> str:
    """The job's status as a plain string (``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``STOPPED``)."""
    return str(client.get_job_status(submission_id))


def wait_for(client: Any, submission_id: str, done: Callable[[str], bool], poll_s: float = 1.0,
             timeout_s: float | None = None) -> str:
    """Poll the status until ``done(status)``; returns the last status (also when ``timeout_s`` ran out)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = job_status(client, submission_id)
        if done(status) or (deadline is not None and time.monotonic() >= deadline):
            return status
        time.sleep(poll_s)


def follow_logs(client: Any, submission_id: str, write: Callable[[str], Any], poll_s: float = 1.0) -> str:
    """Stream the job's logs to ``write`` until it ends; returns the final status.

    The Jobs API's log websocket is used first; if it cannot be opened or drops (a proxy, a restart), the
    full log is polled and only the new part written.
    """
    written = 0

    async def stream() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)
            written += len(chunk)

    try:
        asyncio.run(stream())
    except Exception as err:  # any websocket failure: fall back to polling, which needs only HTTP
        print(f"[raydistill] log stream interrupted ({type(err).__name__}); polling the logs instead",
              file=sys.stderr, flush=True)
    while True:
        status = job_status(client, submission_id)
        logs = client.get_job_logs(submission_id) or ""
        if len(logs) > written:
            write(logs[written:])
            written = len(logs)
        if status in TERMINAL_STATUSES:
            return status
        time.sleep(poll_s)


def exit_code(status: str) -> int:
    """0 only for SUCCEEDED; 1 for FAILED or STOPPED (and anything else)."""
    return 0 if status == "SUCCEEDED" else 1


# --------------------------------------------------------------------------------------------- commands
# --------------------------------------------------------------------------------------------- mlflow server
def mlflow_server_command(store: Path, artifacts: str | None = None, host: str = "127.0.0.1", port: int = 5000,
                          workers: int = 1, allowed_hosts: str | None = None,
                          backend_store_uri: str | None = None) -> list[str]:
    """The ``mlflow server`` command line for a store folder.

    Args:
        store: folder of the SQLite database ``mlflow.db`` (and of the artifacts unless ``artifacts`` is given).
        artifacts: where the server puts artifacts (a folder or ``s3://bucket/prefix``); clients upload
            through the server, so they need no storage credentials.
        host: interface to bind; 127.0.0.1 keeps the server local.
        port: TCP port.
        workers: server processes; SQLite takes one writer at a time, so more rarely help.
        allowed_hosts: MLflow's Host-header allow-list (default: localhost and private addresses).
        backend_store_uri: a database URI instead of the SQLite file (e.g. postgresql://...).
    """
    store = Path(store).expanduser().resolve()
    backend = backend_store_uri or "sqlite:///" + (store / "mlflow.db").as_posix()
    artifacts = artifacts or (store / "artifacts").as_posix()
    if not is_uri(artifacts):
        artifacts = Path(artifacts).expanduser().resolve().as_posix()
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--artifacts-destination", artifacts, "--serve-artifacts",
            "--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:
        argv += ["--allowed-hosts", allowed_hosts]
    return argv


def mlflow_server_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the ``mlflow server`` process: ``environ`` (default: this process's) with MLflow's
    server-side job runner off unless it says otherwise. raydistill logs runs and uses none of those jobs (GenAI
    evaluations), and the runner starts a consumer process for each kind of job the server knows."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(os.environ if environ is None else environ)}


# --------------------------------------------------------------------------------------------- CLI
