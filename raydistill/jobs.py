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

import argparse
import asyncio
import contextlib
import json
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
def _print_json(obj: Any) -> None:
    sys.stdout.flush()
    print(json.dumps(obj, default=str), flush=True)


def cmd_submit(args: argparse.Namespace) -> int:
    """``raydistill submit``: upload the project and run one experiment (or a Tune search) as a Ray job."""
    address = resolve_address(args.address)
    working_dir = Path(args.working_dir or Path.cwd())
    submission = build_submission(args.config, args.overrides, working_dir, tune_space=args.tune, env=args.env,
                                  mlflow_uri=args.mlflow_uri, submission_id=args.submission_id)
    warning = _relative_output_warning(working_dir.resolve() / submission.metadata["raydistill_config"], args.overrides)
    if warning:
        print(f"[raydistill] warning: {warning}", file=sys.stderr)
    client = connect(address)
    with _cluster_errors(address, "submitting the job"):
        sid = client.submit_job(entrypoint=submission.entrypoint, runtime_env=submission.runtime_env,
                                submission_id=submission.submission_id, metadata=submission.metadata,
                                entrypoint_num_cpus=args.entrypoint_num_cpus)
    url = dashboard_url(address, sid)
    forwarded = sorted(submission.runtime_env.get("env_vars", {}))
    print(f"submitted {sid}\n  entrypoint: {submission.entrypoint}\n  dashboard:  {url}"
          + (f"\n  env:        {', '.join(forwarded)}" if forwarded else ""), file=sys.stderr, flush=True)
    try:
        with _cluster_errors(address, f"following job {sid}"):
            if args.follow:
                status = follow_logs(client, sid, lambda text: (sys.stderr.write(text), sys.stderr.flush()))
            elif args.no_wait:
                status = job_status(client, sid)
            else:
                status = wait_for(client, sid, lambda s: s != "PENDING", timeout_s=args.start_timeout)
    except KeyboardInterrupt:
        # Interrupting the client leaves the job running: say how to get back to it, or stop it.
        print(f"\njob {sid} keeps running: raydistill jobs logs {sid} --follow --address {address}\n"
              f"  to stop it: raydistill jobs stop {sid} --address {address}", file=sys.stderr)
        return 130
    print(f"job {sid}: {status}" + ("" if args.follow or status in TERMINAL_STATUSES else
                                     f" (follow with: raydistill jobs logs {sid} --follow --address {address})"),
          file=sys.stderr, flush=True)
    if args.json:
        _print_json({"submission_id": sid, "status": status, "dashboard_url": url, "address": address,
                     "entrypoint": submission.entrypoint, "env_vars": forwarded})
    if args.follow or status in TERMINAL_STATUSES:
        return exit_code(status)
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """``raydistill jobs list``: the cluster's jobs, newest first."""
    address = resolve_address(args.address)
    client = connect(address)
    with _cluster_errors(address, "listing jobs"):
        jobs = client.list_jobs()
    rows = sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)
    if args.json:
        _print_json([{"submission_id": j.submission_id, "status": str(j.status), "entrypoint": j.entrypoint,
                      "start_time": j.start_time, "end_time": j.end_time, "metadata": j.metadata or {}}
                     for j in rows])
        return 0
    print(f"{'submission id':<52} {'status':<10} {'started (UTC)':<20} entrypoint")
    for j in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(j.start_time / 1000)) if j.start_time else "-"
        entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
        print(f"{j.submission_id or j.job_id or '-':<52} {str(j.status):<10} {started:<20} {entry}")
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    """``raydistill jobs status ID``: prints the status and message; exits 0 (the query worked)."""
    address = resolve_address(args.address)
    client = connect(address)
    with _cluster_errors(address, f"reading job {args.submission_id}"):
        info = client.get_job_info(args.submission_id)
    status = str(info.status)
    if args.json:
        _print_json({"submission_id": args.submission_id, "status": status, "message": info.message,
                     "entrypoint": info.entrypoint, "dashboard_url": dashboard_url(address, args.submission_id)})
    else:
        print(f"{args.submission_id}: {status}" + (f" ({info.message})" if info.message else ""))
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    """``raydistill jobs logs ID [--follow]``: the job's output; with --follow, exit code = outcome."""
    address = resolve_address(args.address)
    client = connect(address)
    with _cluster_errors(address, f"reading the logs of job {args.submission_id}"):
        if not args.follow:
            sys.stdout.write(client.get_job_logs(args.submission_id) or "")
            sys.stdout.flush()
            return 0
        status = follow_logs(client, args.submission_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    print(f"job {args.submission_id}: {status}", file=sys.stderr)
    return exit_code(status)


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    """``raydistill jobs stop ID``: ask the cluster to stop a job and wait until it has."""
    address = resolve_address(args.address)
    client = connect(address)
    with _cluster_errors(address, f"stopping job {args.submission_id}"):
        stopped = client.stop_job(args.submission_id)
        status = wait_for(client, args.submission_id, lambda s: s in TERMINAL_STATUSES, timeout_s=args.timeout)
    print(f"job {args.submission_id}: {status}" + ("" if stopped else " (it had already ended)"), file=sys.stderr)
    return 0 if status in TERMINAL_STATUSES else 1


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


def cmd_mlflow_server(args: argparse.Namespace) -> int:
    """``raydistill mlflow-server``: replace this process with an MLflow tracking server."""
    if not 0 < args.port < 65536:
        raise JobsError(f"--port {args.port}: must be between 1 and 65535")
    if args.workers < 1:
        raise JobsError(f"--workers {args.workers}: must be at least 1")
    store = Path(args.store).expanduser()
    argv = mlflow_server_command(store, args.artifacts, args.host, args.port, args.workers, args.allowed_hosts,
                                 args.backend_store_uri)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    store.mkdir(parents=True, exist_ok=True)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"[raydistill] MLflow tracking server on {args.host}:{args.port}; point runs at it with\n"
          f"  export MLFLOW_TRACKING_URI=http://{shown}:{args.port}    (or raydistill submit --mlflow-uri ...)",
          file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("[raydistill] warning: the server has no authentication; anyone who reaches this port can read and "
              "write runs. Keep it inside a private network (security group, firewall, SSH tunnel).",
              file=sys.stderr)
    sys.stderr.flush()
    # exec: the server gets this process's id, so `kill $(cat server.pid)` and signals reach it directly.
    os.execv(argv[0], argv)
    return 0  # pragma: no cover - execv does not return


# --------------------------------------------------------------------------------------------- CLI
def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=f"the Ray dashboard URL, e.g. http://<head>:{DEFAULT_DASHBOARD_PORT} "
                                      "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")


def register_cli(sub: Any) -> None:
    """Add ``submit``, ``jobs {list,status,logs,stop}`` and ``mlflow-server`` to the ``raydistill`` parser."""
    p = sub.add_parser("submit", help="run an experiment (or a Tune search) on a Ray cluster through the Jobs API",
                       description="Upload the project (minus data, caches, run outputs, .git, credentials) and "
                                   "run `raydistill run CONFIG OVERRIDES --json` (or `raydistill tune ...`) on "
                                   "the cluster. Token auth: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN.")
    p.add_argument("config", help="experiment YAML inside the working directory (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-3")
    _add_address(p)
    p.add_argument("--tune", metavar="SPACE", help="run `raydistill tune` over this search space (tune_spaces/*.yaml)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="forward one environment variable to the job (repeatable); nothing else is forwarded")
    p.add_argument("--mlflow-uri", help="tracking URI for the job (default: $MLFLOW_TRACKING_URI if set, else "
                                        "what the cluster's head exports)")
    p.add_argument("--working-dir", help="folder uploaded as the job's working directory (default: the current one)")
    p.add_argument("--submission-id", help="id for the job (default: raydistill-<config>-<time>-<random>)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0,
                   help="CPUs reserved for the driver (default 0: it runs on the CPU:0 head)")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--follow", action="store_true", help="stream the logs; exit 0 only if the job SUCCEEDED")
    wait.add_argument("--no-wait", action="store_true", help="return right after submitting")
    p.add_argument("--start-timeout", type=float, default=600,
                   help="without --follow/--no-wait: seconds to wait for the job to leave PENDING")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster")
    jsub = p.add_subparsers(dest="jobs_command", required=True)
    j = jsub.add_parser("list", help="all jobs, newest first")
    _add_address(j)
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=cmd_jobs_list)
    j = jsub.add_parser("status", help="a job's status and message")
    j.add_argument("submission_id")
    _add_address(j)
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=cmd_jobs_status)
    j = jsub.add_parser("logs", help="a job's output")
    j.add_argument("submission_id")
    _add_address(j)
    j.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 only if it SUCCEEDED")
    j.set_defaults(func=cmd_jobs_logs)
    j = jsub.add_parser("stop", help="stop a job and wait until it has stopped")
    j.add_argument("submission_id")
    _add_address(j)
    j.add_argument("--timeout", type=float, default=60, help="seconds to wait for the job to stop")
    j.set_defaults(func=cmd_jobs_stop)

    p = sub.add_parser("mlflow-server", help="run an MLflow tracking server (SQLite store, proxied artifacts)",
                       description="Runs `mlflow server` with an absolute SQLite store and proxied artifacts. "
                                   "Bound to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--store", default="raydistill_runs/mlflow-server",
                   help="folder of mlflow.db (and of artifacts unless --artifacts)")
    p.add_argument("--artifacts", help="artifact destination: a folder or s3://bucket/prefix (default <store>/artifacts)")
    p.add_argument("--backend-store-uri", help="a database URI instead of <store>/mlflow.db (e.g. postgresql://...)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; 0.0.0.0 on a cluster head)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="server processes (SQLite: one writer at a time)")
    p.add_argument("--allowed-hosts", help="MLflow's Host-header allow-list, e.g. mlflow.internal,10.0.*")
    p.add_argument("--dry-run", action="store_true", help="print the mlflow command instead of running it")
    p.set_defaults(func=cmd_mlflow_server)
