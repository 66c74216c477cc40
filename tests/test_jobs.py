"""``raydistill submit``, ``raydistill jobs`` and ``raydistill mlflow-server``.

Unit tests pin down what a submission carries (entrypoint, working-directory excludes as Ray itself applies
them, forwarded environment, token header) without a cluster. The end-to-end tests start a real head
(``ray start --head --block`` with token authentication, its own ports and ``--temp-dir``) and a real MLflow
server (``raydistill mlflow-server``), submit ``configs/quick.yaml`` (shrunk, with a tiny teacher) through the
CLI and follow it to SUCCEEDED, check its metrics in the MLflow server, and check that a failing job makes
``--follow`` exit non-zero. The head is stopped by signalling the ``ray start --block`` process this test
started (which stops the processes it started); ``ray stop`` would stop every Ray instance on the machine.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import AsyncIterator, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from raydistill.cli import build_parser
from raydistill.cli import main as cli_main
from raydistill.config import ConfigError
from raydistill.jobs import (
    UPLOAD_EXCLUDES,
    JobsError,
    auth_headers,
    build_entrypoint,
    build_submission,
    connect,
    dashboard_url,
    exit_code,
    follow_logs,
    forwarded_env,
    mlflow_server_command,
    mlflow_server_env,
    new_submission_id,
    resolve_address,
)

REPO = Path(__file__).resolve().parents[1]


# ============================================================================ address and token
def test_address_from_flag_or_environment() -> None:
    assert resolve_address("http://10.0.0.5:8265/", {}) == "http://10.0.0.5:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "https://head:8265"}) == "https://head:8265"
    # A GCS address in RAY_ADDRESS (what job drivers have) is not a Jobs API URL; the next one is taken.
    env = {"RAY_API_SERVER_ADDRESS": "http://a:8265", "RAY_ADDRESS": "10.0.0.5:6379"}
    assert resolve_address(None, env) == "http://a:8265"
    with pytest.raises(JobsError, match="--address"):
        resolve_address(None, {"RAY_ADDRESS": "10.0.0.5:6379"})
    with pytest.raises(JobsError, match=r"--address '10.0.0.5:6379'.*http://"):
        resolve_address("10.0.0.5:6379", {})


def test_token_header_sources_and_precedence(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home-file\n")
    token_file = tmp_path / "token"
    token_file.write_text(" from-path-file \n")

    assert auth_headers({}, home) == {}  # mode unset: the local token file is never sent anywhere
    assert auth_headers({"RAY_AUTH_MODE": "token"}, home) == {"Authorization": "Bearer from-home-file"}
    assert auth_headers({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}, home) == {
        "Authorization": "Bearer from-path-file"}
    both = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert auth_headers(both, home) == {"Authorization": "Bearer from-env"}
    # An explicit token turns the header on without RAY_AUTH_MODE; `disabled` turns everything off.
    assert auth_headers({"RAY_AUTH_TOKEN": "t0k"}, home) == {"Authorization": "Bearer t0k"}
    assert auth_headers({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "t0k"}, home) == {}


def test_token_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(JobsError, match="no token found: set RAY_AUTH_TOKEN"):
        auth_headers({"RAY_AUTH_MODE": "token"}, tmp_path)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(JobsError, match="RAY_AUTH_TOKEN_PATH=.*empty"):
        auth_headers({"RAY_AUTH_TOKEN_PATH": str(empty)}, tmp_path)
    with pytest.raises(JobsError, match="cannot read"):
        auth_headers({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path)
    with pytest.raises(JobsError, match="RAY_AUTH_MODE='tokens'.*'token' and 'disabled'"):
        auth_headers({"RAY_AUTH_MODE": "tokens"}, tmp_path)


# ============================================================================ what a submission carries
def _project(root: Path) -> Path:
    """A copy of the project's code and configs: what a user submits from."""
    project = root / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "raydistill", project / "raydistill", ignore=ignore)
    shutil.copytree(REPO / "configs", project / "configs", ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", project / "pyproject.toml")
    return project


def test_entrypoint_round_trips_through_the_shell() -> None:
    overrides = ["tracking.experiment=my experiment", "train.lr=1e-3"]
    entry = build_entrypoint("configs/quick.yaml", overrides)
    import shlex

    assert shlex.split(entry) == ["raydistill", "run", "configs/quick.yaml", *overrides, "--json"]
    tune = build_entrypoint("configs/quick.yaml", ["train.steps=5"], "tune_spaces/balancer.yaml")
    assert shlex.split(tune) == ["raydistill", "tune", "configs/quick.yaml", "train.steps=5",
                                 "--space", "tune_spaces/balancer.yaml", "--json"]


def test_submission_paths_are_relative_to_the_working_dir(tmp_path: Path, monkeypatch) -> None:
    project = _project(tmp_path)
    (project / "tune_spaces").mkdir()
    (project / "tune_spaces" / "lr.yaml").write_text("train.lr: [1.0e-4, 1.0e-3]\n")
    monkeypatch.chdir(project / "configs")  # paths given relative to the shell's folder
    sub = build_submission("quick.yaml", ["train.steps=3"], project, tune_space="../tune_spaces/lr.yaml",
                           submission_id="s-1", environ={})
    assert sub.entrypoint == ("raydistill tune configs/quick.yaml train.steps=3 --space tune_spaces/lr.yaml "
                              "--json")
    assert sub.runtime_env == {"working_dir": str(project.resolve()), "excludes": list(UPLOAD_EXCLUDES)}
    assert sub.submission_id == "s-1"
    assert sub.metadata == {"raydistill_config": "configs/quick.yaml", "raydistill_command": "tune"}


def test_submission_refuses_files_outside_the_project_and_bad_configs(tmp_path: Path) -> None:
    project = _project(tmp_path)
    outside = tmp_path / "elsewhere.yaml"
    shutil.copy(project / "configs" / "quick.yaml", outside)
    with pytest.raises(JobsError, match=r"outside the uploaded working directory.*--working-dir"):
        build_submission(str(outside), [], project, environ={})
    with pytest.raises(JobsError, match="file not found"):
        build_submission(str(project / "configs" / "nope.yaml"), [], project, environ={})
    # The config is validated before anything is uploaded, with the config's own error message.
    with pytest.raises(ConfigError, match=r"train\.batch_size = -4"):
        build_submission(str(project / "configs" / "quick.yaml"), ["train.batch_size=-4"], project, environ={})


def test_only_named_variables_and_the_tracking_uri_are_forwarded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {"HF_TOKEN": "hf-123", "AWS_SECRET_ACCESS_KEY": "never", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert forwarded_env(["HF_TOKEN", "SEED=7"], None, environ) == {
        "HF_TOKEN": "hf-123", "SEED": "7", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    # --mlflow-uri wins over the environment; a relative SQLite store becomes absolute (jobs run elsewhere).
    out = forwarded_env([], "sqlite:///runs/mlflow.db", environ)
    assert out == {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"}
    assert forwarded_env([], None, {"AWS_SECRET_ACCESS_KEY": "never"}) == {}
    with pytest.raises(JobsError, match="--env HF_HOME: the variable is not set"):
        forwarded_env(["HF_HOME"], None, environ)
    with pytest.raises(JobsError, match="NAME or NAME=VALUE"):
        forwarded_env(["1BAD"], None, environ)


def test_warns_when_runs_would_land_in_the_jobs_temporary_folder() -> None:
    from raydistill.jobs import _relative_output_warning

    quick = REPO / "configs" / "quick.yaml"  # no output_dir: the relative default
    assert "output_dir='raydistill_runs' is relative" in _relative_output_warning(quick, [])
    assert _relative_output_warning(quick, ["output_dir=/shared/runs"]) is None
    assert _relative_output_warning(quick, ["output_dir=~/runs"]) is None
    assert _relative_output_warning(REPO / "configs" / "cluster-flickr30k-beit3-base.yaml", []) is None


def test_excludes_as_ray_applies_them(tmp_path: Path) -> None:
    """Zip a project with Ray's own packaging code and the excludes: code stays, data and secrets don't."""
    from ray._private.runtime_env.packaging import _zip_files

    root = tmp_path / "proj"
    kept = ["raydistill/data/sources.py", "raydistill/pipeline/cache.py", "configs/quick.yaml",
            "tests/test_x.py", "pyproject.toml", "clusters/aws.yaml", "docs/clusters.md",
            "raydistill/assets/demo-teacher/model.safetensors"]
    dropped = ["data/flickr30k/1.jpg", "cache/abc/part-0.parquet", "checkpoints/step_10/state.pt",
               "raydistill_runs/runs/quick/result.json", "benchmarks/raydistill_runs/x.json", "mlruns/0/meta.yaml",
               "mlflow.db", "sub/other.db", ".git/HEAD", ".env", ".env.local", "keys/id_rsa", "keys/id_ed25519.pub",
               "deploy/server.pem", ".aws/credentials", "gcp/credentials.json", "my-service-account-key.json",
               "models/beit3/beit3_base.pth", "weights/student.safetensors",
               "sub/raydistill/assets/demo-teacher/model.safetensors", "raydistill/assets/demo-teacher/x.safetensors", "raydistill/__pycache__/x.cpython-311.pyc",
               ".venv/bin/python", "ray_results/run/x", "mlartifacts/1/a.txt"]
    for rel in kept + dropped:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    out = tmp_path / "pkg.zip"
    _zip_files(str(root), list(UPLOAD_EXCLUDES), str(out), include_gitignore=True)
    with zipfile.ZipFile(out) as z:
        files = {n for n in z.namelist() if not n.endswith("/")}
    assert files == set(kept)


def test_follow_streams_then_polls_and_maps_the_outcome() -> None:
    """Log following against a stand-in client: the websocket stream first, the HTTP log for the rest."""

    class Client:
        def __init__(self, fail_stream: bool) -> None:
            self.fail_stream = fail_stream
            self.statuses = iter(["RUNNING", "FAILED"])
            self.log = "line 1\nline 2\nTraceback: boom\n"

        async def tail_job_logs(self, sid: str) -> AsyncIterator[str]:
            if self.fail_stream:
                raise RuntimeError("websocket refused")
            yield "line 1\n"
            yield "line 2\n"

        def get_job_status(self, sid: str) -> str:
            return next(self.statuses)

        def get_job_logs(self, sid: str) -> str:
            return self.log

    for fail in (False, True):
        chunks: list[str] = []
        status = follow_logs(Client(fail), "sid", chunks.append, poll_s=0)
        assert status == "FAILED"
        assert "".join(chunks) == "line 1\nline 2\nTraceback: boom\n"  # nothing twice, nothing lost
    assert [exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING")] == [0, 1, 1, 1]


def test_ids_urls_and_flags() -> None:
    sid = new_submission_id("configs/cluster-flickr30k-beit3-base.yaml")
    assert re.fullmatch(r"raydistill-cluster-flickr30k-beit3-base-\d{8}-\d{6}-[0-9a-f]{6}", sid)
    assert dashboard_url("http://127.0.0.1:8265/", "abc") == "http://127.0.0.1:8265/#/jobs/abc"
    parser = build_parser()
    with pytest.raises(SystemExit), redirect_stdout(io.StringIO()):
        parser.parse_args(["submit", "configs/quick.yaml", "--follow", "--no-wait"])
    args = parser.parse_args(["submit", "configs/quick.yaml", "a.b=1", "--env", "X", "--env", "Y=2",
                              "--address", "http://h:8265", "--follow"])
    assert (args.overrides, args.env, args.follow, args.entrypoint_num_cpus) == (["a.b=1"], ["X", "Y=2"], True, 0)


def test_mlflow_server_command(tmp_path: Path) -> None:
    argv = mlflow_server_command(tmp_path / "store")
    assert argv[1:] == ["-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/store/mlflow.db",
                        "--artifacts-destination", f"{tmp_path}/store/artifacts", "--serve-artifacts",
                        "--host", "127.0.0.1", "--port", "5000", "--workers", "1"]
    argv = mlflow_server_command(tmp_path, "s3://bucket/mlflow", host="0.0.0.0", port=5001, allowed_hosts="mlflow")
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert argv[-2:] == ["--allowed-hosts", "mlflow"] and argv[argv.index("--port") + 1] == "5001"
    with redirect_stdout(io.StringIO()):
        assert cli_main(["mlflow-server", "--port", "0"]) == 2


def test_mlflow_server_runs_without_mlflows_job_runner_unless_asked(tmp_path: Path, monkeypatch) -> None:
    execs = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: execs.append((path, argv, env)))
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    monkeypatch.setenv("SOME_SETTING", "kept")
    with redirect_stderr(io.StringIO()):
        assert cli_main(["mlflow-server", "--store", str(tmp_path / "store"), "--port", "5123"]) == 0
    (path, argv, env), = execs
    assert argv == mlflow_server_command(tmp_path / "store", port=5123) and path == argv[0]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false" and env["SOME_SETTING"] == "kept"
    assert mlflow_server_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}) == {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}


# ============================================================================ end to end
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return out


def _stop(proc: subprocess.Popen, marker: str) -> None:
    """Stop a process this test started, then (one by one) what it started: its descendants and anything still
    running from our temp folder. Five seconds of grace, then SIGKILL: `ray start --block` stops its node's
    processes one by one with a grace period each (over 30 s here), and nothing of this test's cluster is kept."""
    procs = _processes()
    family, stack = [], [proc.pid]
    while stack:
        pid = stack.pop()
        children = [p for p, (ppid, _) in procs.items() if ppid == pid]
        family += children
        stack += children
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    leftovers = set(family) | {p for p, (_, cmd) in _processes().items() if marker in cmd and p != os.getpid()}
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_http(url: str, headers: dict[str, str], what: str, proc: subprocess.Popen, log: Path,
               timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{what} not up after {timeout_s} s:\n{log.read_text()[-3000:]}")


@dataclass
class Head:
    address: str
    token: str
    mlflow_uri: str
    work: Path
    project: Path
    teacher: Path
    ray_temp: Path

    def client_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "RAYDISTILL_"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAYDISTILL_HOME=str(self.work / "home"),
                   RAYDISTILL_TEST_SECRET="must-not-travel", PYTHONPATH=str(REPO))
        env.update(extra)
        return env

    def cli(self, *argv: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raydistill.cli", *argv], cwd=self.project,
                              env=self.client_env(**env), capture_output=True, text=True, timeout=timeout)


def _start_head(temp: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free localhost ports; returns the process and the dashboard URL."""
    ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "ray-client-server-port",
                                             "metrics-export-port", "runtime-env-agent-port",
                                             "node-manager-port", "object-manager-port")}
    proc = subprocess.Popen(
        [shutil.which("ray") or "ray", "start", "--head", "--block", "--num-cpus=6", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp}",
         *(f"--{k}={v}" for k, v in ports.items())],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{ports['dashboard-port']}"


@pytest.fixture(scope="module")
def head(request: pytest.FixtureRequest) -> Iterator[Head]:
    """A token-authenticated Ray head on free localhost ports, and an MLflow server, both started here."""
    # Short path: Ray's Unix sockets live under the temp dir (108-character limit).
    work = Path(tempfile.mkdtemp(prefix="rdjobs-", dir="/tmp"))
    token = secrets.token_hex(16)
    server_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "RAYDISTILL_"))}
    server_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
                      RAY_TRAIN_V2_ENABLED="1", PYTHONPATH=str(REPO))
    mlflow_log = work / "mlflow.log"
    mlflow_port = _free_port()
    mlflow_proc = subprocess.Popen(
        [sys.executable, "-m", "raydistill.cli", "mlflow-server", "--store", str(work / "mlflow"),
         "--port", str(mlflow_port)],
        env=server_env, stdout=mlflow_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    ray_proc: subprocess.Popen | None = None
    ray_temp = work / "ray"
    try:
        project = _project(work)
        # Planted beside the code: none of these may reach the cluster.
        for rel in ("data/images/1.jpg", ".env", "raydistill_runs/old/result.json", "mlflow.db", ".git/HEAD",
                    "models/teacher.pth"):
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            (project / rel).write_text("planted")
        sys.path.insert(0, str(Path(__file__).parent))
        from test_placement import build_tiny_teacher

        teacher = build_tiny_teacher(work / "teacher")
        for attempt in range(1, 4):
            ray_temp = work / f"ray{attempt}"
            ray_proc, address = _start_head(ray_temp, server_env, work / f"ray-start-{attempt}.log")
            try:
                _wait_http(f"{address}/api/version", {"Authorization": f"Bearer {token}"}, "ray start", ray_proc,
                           work / f"ray-start-{attempt}.log")
                break
            except RuntimeError as err:
                # On a busy machine a raylet can give up waiting for its dashboard agent (a fixed wait inside
                # Ray) and `ray start` exits; start again in a fresh temp folder. Anything else is an error.
                _stop(ray_proc, str(ray_temp))
                if "exited" not in str(err) or attempt == 3:
                    raise
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", {}, "mlflow server", mlflow_proc, mlflow_log)
        yield Head(address, token, f"http://127.0.0.1:{mlflow_port}", work, project, teacher, ray_temp)
    finally:
        _stop(mlflow_proc, str(work / "mlflow"))
        if ray_proc is not None:
            _stop(ray_proc, str(ray_temp))
        if request.session.testsfailed:
            print(f"\nkept {work} (Ray logs under ray*/session_latest/logs) for the failure above", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _quick_overrides(h: Head) -> list[str]:
    return [
        "teacher.kind=raydistill", f"teacher.checkpoint={h.teacher}", "teacher.device=cpu",
        "teacher.pool.batch_size=16", "teacher.infer_batch_size=16",
        "data.synth.n_images=40", "data.synth.image_size=32", "data.decode_size=32",
        "student.preset=test", "student.vocab_size=200",
        "train.steps=4", "train.batch_size=8", "train.checkpoint_every=2", "train.log_every=1",
        "train.shuffle_buffer=0", "distill.queue_size=32", "eval.batch_size=32",
        f"output_dir={h.work / 'runs'}", "ray.no_progress_timeout_s=180",
    ]


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_cluster_refuses_clients_without_the_token(head: Head) -> None:
    ok = head.cli("jobs", "list", "--address", head.address, "--json")
    assert ok.returncode == 0, ok.stderr
    assert isinstance(json.loads(ok.stdout.strip().splitlines()[-1]), list)
    missing = head.cli("jobs", "list", "--address", head.address, RAY_AUTH_MODE="disabled")
    assert missing.returncode == 2
    assert "token authentication" in missing.stderr and head.token not in missing.stderr
    wrong = head.cli("jobs", "list", "--address", head.address, RAY_AUTH_TOKEN="not-the-token")
    assert wrong.returncode == 2
    assert "refused" in wrong.stderr or "invalid" in wrong.stderr.lower()


@pytest.mark.slow
@pytest.mark.ray
def test_submit_follow_reaches_succeeded_with_metrics_in_mlflow(head: Head) -> None:
    from mlflow.tracking import MlflowClient

    result = head.cli("submit", "configs/quick.yaml", *_quick_overrides(head), "--address", head.address,
                      "--follow", "--env", "RAYDISTILL_HOME", "--mlflow-uri", head.mlflow_uri, "--json",
                      timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    sid = info["submission_id"]
    assert info["status"] == "SUCCEEDED"
    assert f"submitted {sid}" in result.stderr and f"{head.address}/#/jobs/{sid}" in result.stderr
    assert info["env_vars"] == ["MLFLOW_TRACKING_URI", "RAYDISTILL_HOME"]

    # The run's own --json summary, streamed in the job's logs.
    summary = next(d for d in _json_lines(result.stderr) if "run_id" in d)
    assert summary["steps"] == 4
    assert summary["mlflow_tracking_uri"] == head.mlflow_uri
    assert Path(summary["run_dir"]).parent == head.work / "runs" / "runs"
    assert (Path(summary["run_dir"]) / "result.json").is_file()
    assert any((head.work / "home" / "synth").iterdir())  # RAYDISTILL_HOME reached the job

    # The metrics are in the MLflow server this test started.
    run = MlflowClient(tracking_uri=head.mlflow_uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/rsum"] == pytest.approx(summary["metrics"]["student"]["rsum"])
    assert run.data.metrics["teacher_images_embedded"] == summary["teacher_images_embedded"] > 0
    assert run.data.params["train.steps"] == "4"

    # What travelled: exactly the two variables, and the code without the planted files.
    client = connect(head.address, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token})
    assert set(client.get_job_info(sid).runtime_env["env_vars"]) == {"MLFLOW_TRACKING_URI", "RAYDISTILL_HOME"}
    uploaded = list({p.parent.parent.resolve() for p in head.ray_temp.glob(
        "session_*/runtime_resources/working_dir_files/*/configs/quick.yaml")})  # session_latest is a link
    assert len(uploaded) == 1
    files = {p.relative_to(uploaded[0]).as_posix() for p in uploaded[0].rglob("*") if p.is_file()}
    assert {"raydistill/jobs.py", "raydistill/data/sources.py", "configs/quick.yaml", "pyproject.toml"} <= files
    assert not [f for f in files if f.split("/")[0] in ("data", "raydistill_runs", ".git", "models")
                or f in (".env", "mlflow.db")]

    listed = head.cli("jobs", "list", "--address", head.address, "--json")
    assert {"submission_id": sid, "status": "SUCCEEDED"}.items() <= next(
        j for j in json.loads(listed.stdout.strip().splitlines()[-1]) if j["submission_id"] == sid).items()
    status = head.cli("jobs", "status", sid, "--address", head.address)
    assert status.returncode == 0 and status.stdout.startswith(f"{sid}: SUCCEEDED")


@pytest.mark.slow
@pytest.mark.ray
def test_follow_exits_nonzero_when_the_job_fails(head: Head) -> None:
    result = head.cli("submit", "configs/quick.yaml", *_quick_overrides(head), "data.source=karpathy",
                      "data.path=missing/dataset_flickr30k.json", "--address", head.address, "--follow", "--json",
                      "--env", "RAYDISTILL_HOME", timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["status"] == "FAILED"
    assert "dataset_flickr30k.json" in result.stderr  # the job's own error, streamed
    logs = head.cli("jobs", "logs", info["submission_id"], "--address", head.address, "--follow")
    assert logs.returncode == 1 and "dataset_flickr30k.json" in logs.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_no_wait_then_stop(head: Head) -> None:
    result = head.cli("submit", "configs/quick.yaml", *_quick_overrides(head), "train.steps=100000",
                      "--address", head.address, "--no-wait", "--json", "--env", "RAYDISTILL_HOME")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["status"] in ("PENDING", "RUNNING")
    stop = head.cli("jobs", "stop", info["submission_id"], "--address", head.address, "--timeout", "120")
    assert stop.returncode == 0, stop.stderr
    status = head.cli("jobs", "status", info["submission_id"], "--address", head.address, "--json")
    assert json.loads(status.stdout.strip().splitlines()[-1])["status"] == "STOPPED"
