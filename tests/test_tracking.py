"""Tracking against real MLflow stores (SQLite files, and an ``mlflow server`` the tests stop and start):
runs, params, metric history, artifacts, parent/child runs; what happens when the store is unreachable
(training goes on, one warning, records kept locally) and how the kept records reach the store later
(flush, finish, re-opening the run, replay_backlog) without being sent twice. Pareto front and plots."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import _validate_metric_name
from PIL import Image

from raydistill.jobs import mlflow_server_env
from raydistill.plots import (
    pareto_front,
    plot_balancer_weights,
    plot_pareto,
    plot_rsum_curves,
)
from raydistill.tracking import (
    LOCAL_METRICS_FILE,
    Tracker,
    TrackingConfigError,
    flatten_config,
    read_runs,
    replay_backlog,
    resolve_tracking_uri,
    sanitize_key,
)
from raydistill.tracking_backlog import HTTP_SETTINGS


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Trackers set MLflow's HTTP settings in os.environ; setenv-then-delenv makes monkeypatch remove them
    # again after the test, so other test modules see the environment they started with.
    for name in (*HTTP_SETTINGS, "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow database (creating one runs every migration: seconds, so only once)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def store(tmp_path: Path, template_db: Path) -> str:
    """A fresh SQLite tracking URI in this test's folder."""
    (tmp_path / "store").mkdir()
    shutil.copy(template_db, tmp_path / "store" / "mlflow.db")
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


@pytest.fixture()
def unmounted(tmp_path: Path, template_db: Path) -> tuple[str, Any]:
    """A SQLite URI whose database cannot be opened (a folder sits at its path, as on a storage that is not
    mounted), and a function that puts a real database there."""
    db = tmp_path / "shared" / "mlflow.db"
    db.mkdir(parents=True)

    def mount() -> None:
        db.rmdir()
        shutil.copy(template_db, db)

    return f"sqlite:///{db}", mount


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on localhost with a SQLite store, that a test stops (killed, as in a crash)
    and starts again on the same port and database."""

    def __init__(self, root: Path, template_db: Path) -> None:
        self.root = root
        shutil.copy(template_db, root / "mlflow.db")
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", self.url.rsplit(":", 1)[1], "--workers", "1"]
        env = mlflow_server_env()
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
        for _ in range(1200):
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                if self.proc.poll() is not None:
                    break
                threading.Event().wait(0.25)
        raise RuntimeError("mlflow server did not come up: " + (self.root / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)  # the server and its uvicorn child
            self.proc.wait(timeout=30)


@pytest.fixture()
def server(tmp_path: Path, template_db: Path):
    (tmp_path / "server").mkdir()
    srv = MlflowServer(tmp_path / "server", template_db)
    srv.start()
    yield srv
    srv.stop()


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _kept(local_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The records of a tracker's backlog, and the headers (naming the run) that lead each append."""
    lines = [json.loads(line) for line in (local_dir / LOCAL_METRICS_FILE).read_text().splitlines()]
    return [r for r in lines if r["kind"] != "run"], [r for r in lines if r["kind"] == "run"]


class _Records(logging.Handler):
    """Every record the tracker's logger emits during a test."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_TRACKER_RECORDS = _Records()


@pytest.fixture(autouse=True)
def _listen_on_the_trackers_logger() -> Iterator[None]:
    """A handler of our own on the tracker's logger, from the test's setup to its teardown. (pytest's caplog
    listens on the root logger with one handler per test phase: libraries used by earlier tests in the same
    process may reconfigure the root logger, and a fixture only sees the setup phase's handler.)"""
    logger = logging.getLogger("raydistill.tracking")
    _TRACKER_RECORDS.records.clear()
    logger.addHandler(_TRACKER_RECORDS)
    yield
    logger.removeHandler(_TRACKER_RECORDS)


def _outage_warnings() -> list[str]:
    return [r.getMessage() for r in _TRACKER_RECORDS.records if r.levelno == logging.WARNING]


def _train(tracker: Tracker, steps: range) -> float:
    """A stand-in training loop: does its own arithmetic, logs each step, returns its result."""
    total = 0.0
    for step in steps:
        loss = 1.0 / (step + 1)
        total += loss
        tracker.log_metrics({"loss/total": loss, "weight/contrastive": 0.5 * step}, step=step)
    return total


def _losses(steps: range) -> list[tuple[int, float]]:
    return [(step, 1.0 / (step + 1)) for step in steps]


# ---- resolve_tracking_uri -------------------------------------------------------------------------------


def test_resolve_tracking_uri_precedence_and_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "runs"
    # Default: absolute path under the workdir, even when the workdir is given relative.
    assert resolve_tracking_uri(None, Path("runs")) == f"sqlite:///{work}/mlflow.db"
    assert f"sqlite:///{work}/mlflow.db".startswith("sqlite:////")
    # Environment beats the default; a relative SQLite path there is relative to the current folder.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env/m.db")
    assert resolve_tracking_uri(None, work) == f"sqlite:///{tmp_path}/env/m.db"
    assert resolve_tracking_uri("", work) == f"sqlite:///{tmp_path}/env/m.db"
    # The config value beats both; relative to the workdir; the query string survives.
    assert resolve_tracking_uri("sqlite:///db/t.db?timeout=30", work) == f"sqlite:///{work}/db/t.db?timeout=30"
    assert resolve_tracking_uri("sqlite:////abs/x.db", work) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://head:5000", work) == "http://head:5000"
    assert resolve_tracking_uri("postgresql://u@db/mlflow", work) == "postgresql://u@db/mlflow"


def test_resolve_tracking_uri_refuses_file_store_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for uri in ("./mlruns", "mlruns", "file:///data/mlruns", "/data/mlruns"):
        with pytest.raises(TrackingConfigError, match="MLFLOW_ALLOW_FILE_STORE") as info:
            resolve_tracking_uri(uri, tmp_path)
        assert repr(uri) in str(info.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    with pytest.raises(TrackingConfigError, match=r"\$MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(None, tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert resolve_tracking_uri("./mlruns", tmp_path) == (tmp_path / "mlruns").resolve().as_uri()
    assert resolve_tracking_uri("file:///data/mlruns", tmp_path) == "file:///data/mlruns"


# ---- params and keys ------------------------------------------------------------------------------------


def test_flatten_config_joins_keys_and_encodes_values() -> None:
    config = {
        "model": {"size": "small", "dims": [256, 128], "student": {"lr": 1e-4, "frozen": False}},
        "seed": 3,
        "resume": None,
        "empty": {},
        "path": Path("/data/x"),
    }
    assert flatten_config(config) == {
        "model.size": "small",
        "model.dims": "[256, 128]",
        "model.student.lr": "0.0001",
        "model.student.frozen": "false",
        "seed": "3",
        "resume": "null",
        "empty": "{}",
        "path": "/data/x",
    }
    assert flatten_config({"a": 1}, prefix="cfg") == {"cfg.a": "1"}


def test_sanitize_key_examples() -> None:
    assert sanitize_key("loss/contrastive") == "loss/contrastive"
    assert sanitize_key("weight[img→txt]") == "weight_img_txt_"  # "→" is not a word character
    assert sanitize_key("/a//b/./c/") == "a/b/c"
    assert sanitize_key("../up") == "__/up"
    assert sanitize_key("..0") == "__0"  # MLflow refuses a name starting with "..", whatever follows
    assert sanitize_key("./...a/b") == "___a/b"
    assert sanitize_key("") == "_"
    assert len(sanitize_key("k" * 400)) == 250


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
@example("..0")  # once found by CI: MLflow refuses every name that starts with ".."
def test_sanitize_key_output_is_accepted_by_mlflow(key: str) -> None:
    name = sanitize_key(key)
    _validate_metric_name(name)  # MLflow's own check: raises on an invalid name
    assert 1 <= len(name) <= 250


# ---- a run in a reachable store -------------------------------------------------------------------------


def test_run_holds_params_metric_history_tags_and_artifacts(store: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "student.safetensors"
    checkpoint.write_bytes(b"\x00" * 64)
    export = tmp_path / "export"
    (export / "tokenizer").mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (export / "tokenizer" / "vocab.txt").write_text("[PAD]\n")
    with Tracker(store, "dsmd", run_name="small", tags={"kind": "student"}, local_dir=tmp_path / "run") as tracker:
        tracker.log_params({"student": {"size": "tiny", "lr": 0.001}, "note": "x" * 7000})
        for step in (0, 5, 10):
            tracker.log_metrics({"loss/total": 10.0 / (step + 1), "weight/relation": step * 0.5}, step=step)
        tracker.set_tags({"phase": "distil"})
        tracker.log_artifact(checkpoint, artifact_path="model")
        tracker.log_artifact(export, artifact_path="export")  # a folder goes up whole
        run_id = tracker.run_id
    assert run_id is not None
    assert list((tmp_path / "run").glob("*")) == []  # the store took everything: nothing kept

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "small"
    assert run.data.params == {"student.size": "tiny", "student.lr": "0.001", "note": "x" * 6000}
    assert run.data.tags["kind"] == "student" and run.data.tags["phase"] == "distil"
    assert _history(client, run_id, "loss/total") == [(0, 10.0), (5, 10.0 / 6), (10, 10.0 / 11)]
    assert _history(client, run_id, "weight/relation") == [(0, 0.0), (5, 2.5), (10, 5.0)]
    # Artifacts: beside the database, not under the current directory's ./mlruns.
    assert run.info.artifact_uri.startswith((tmp_path / "store" / "mlartifacts").as_uri())
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/student.safetensors"]
    assert [f.path for f in client.list_artifacts(run_id, "export/tokenizer")] == ["export/tokenizer/vocab.txt"]


def test_metrics_go_through_mlflow_async_logging_in_batches(store: str, tmp_path: Path) -> None:
    tracker = Tracker(store, "dsmd", local_dir=tmp_path / "run", flush_every=4)
    reader = MlflowClient(tracking_uri=store)
    for step in range(3):
        tracker.log_metrics({"a": step, "b": 2 * step}, step=step)
    assert _history(reader, tracker.run_id, "a") == []  # three calls buffered: nothing handed to MLflow yet
    tracker.log_metrics({"a": 3, "b": 6}, step=3)
    # The fourth call handed the batch to MLflow's async logging queue, whose thread writes it.
    assert "MLflowAsyncLoggingLoop" in {t.name for t in threading.enumerate()}
    assert tracker.flush()
    assert _history(reader, tracker.run_id, "b") == [(s, 2.0 * s) for s in range(4)]
    # read_runs waits for what this process handed to MLflow, so a run's latest values are there at once.
    for step in range(4, 12):
        tracker.log_metrics({"a": step}, step=step)
    assert read_runs(store, "dsmd")[0]["metrics"]["a"] == 11.0
    tracker.finish()
    assert _history(reader, tracker.run_id, "a") == [(s, float(s)) for s in range(12)]


def test_parent_and_child_runs_and_read_runs(store: str, tmp_path: Path) -> None:
    with Tracker(store, "sweep", run_name="tune", local_dir=tmp_path / "p") as parent:
        children = []
        for i, rsum in enumerate((120.0, 150.0)):
            with Tracker(
                store, "sweep", run_name=f"trial{i}", parent_run_id=parent.run_id, local_dir=tmp_path / f"c{i}"
            ) as child:
                child.log_params({"balancer": "dsmd", "trial": i})
                child.log_metrics({"rsum": rsum - 10}, step=1)
                child.log_metrics({"rsum": rsum}, step=2)
            children.append(child.run_id)
    client = MlflowClient(tracking_uri=store)
    for run_id in children:
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert "mlflow.parentRunId" not in client.get_run(parent.run_id).data.tags

    trials = read_runs(store, "sweep", parent_run_id=parent.run_id)
    assert [r["run_id"] for r in trials] == children
    assert [r["metrics"] for r in trials] == [{"rsum": 120.0}, {"rsum": 150.0}]  # latest value
    assert [r["params"] for r in trials] == [{"balancer": "dsmd", "trial": "0"}, {"balancer": "dsmd", "trial": "1"}]
    assert {r["status"] for r in trials} == {"FINISHED"}
    assert {r["run_id"] for r in read_runs(store, "sweep")} == {parent.run_id, *children}
    with pytest.raises(TrackingConfigError, match="'nope' not found.*'sweep'"):
        read_runs(store, "nope")


def test_leaving_the_block_marks_failed_on_an_exception_and_killed_on_ctrl_c(store: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(store, "dsmd", local_dir=tmp_path / "a") as failed:
            failed.log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with Tracker(store, "dsmd", local_dir=tmp_path / "b") as killed:
            killed.log_metrics({"loss": 2.0}, step=0)
            raise KeyboardInterrupt
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert _history(client, killed.run_id, "loss") == [(0, 2.0)]  # metrics sent before the status
    killed.finish("FINISHED")  # a second finish does nothing
    assert client.get_run(killed.run_id).info.status == "KILLED"


def test_resume_logs_into_the_same_run(store: str, tmp_path: Path) -> None:
    first = Tracker(store, "dsmd", local_dir=tmp_path / "run")
    first.log_metrics({"loss": 3.0}, step=0)
    first.finish("FAILED")
    with Tracker(store, "dsmd", run_id=first.run_id, local_dir=tmp_path / "run") as resumed:
        assert MlflowClient(tracking_uri=store).get_run(first.run_id).info.status == "RUNNING"
        resumed.log_metrics({"loss": 2.0}, step=1)
    client = MlflowClient(tracking_uri=store)
    assert _history(client, first.run_id, "loss") == [(0, 3.0), (1, 2.0)]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("dsmd").experiment_id])) == 1


def test_param_change_refused_by_the_store_is_dropped_and_the_rest_sent(
    store: str, tmp_path: Path
) -> None:
    tracker = Tracker(store, "dsmd", local_dir=tmp_path / "run")
    tracker.log_params({"lr": 0.1})
    tracker.log_params({"lr": 0.2, "epochs": 3})  # MLflow refuses to change a param
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.finish()
    run = MlflowClient(tracking_uri=store).get_run(tracker.run_id)
    assert run.data.params == {"lr": "0.1", "epochs": "3"}
    assert run.data.metrics == {"loss": 1.0} and run.info.status == "FINISHED"
    [warning] = _outage_warnings()
    assert "refused a params record" in warning and "Changing param values is not allowed" in warning
    assert not (tmp_path / "run" / LOCAL_METRICS_FILE).exists()  # a refusal is not an outage: nothing kept


def test_bad_values_raise(store: str, tmp_path: Path) -> None:
    tracker = Tracker(store, "dsmd", local_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="'loss/total' must be a number, got 'high'"):
        tracker.log_metrics({"loss/total": "high"}, step=0)
    with pytest.raises(ValueError, match="step must be an integer, got 1.5"):
        tracker.log_metrics({"loss": 1.0}, step=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be an integer, got True"):
        tracker.log_metrics({"loss": 1.0}, step=True)
    with pytest.raises(ValueError, match="artifact path '/no/such/file' does not exist"):
        tracker.log_artifact("/no/such/file")
    with pytest.raises(ValueError, match="status must be one of"):
        tracker.finish("DONE")
    with pytest.raises(ValueError, match="flush_every must be >= 1"):
        Tracker(store, "dsmd", local_dir=tmp_path / "run", flush_every=0)


def test_disabled_tracker_touches_nothing(tmp_path: Path) -> None:
    with Tracker("http://127.0.0.1:1", "dsmd", local_dir=tmp_path / "run", enabled=False) as t:
        t.log_params({"a": 1})
        t.log_metrics({"loss": 1.0}, step=0)
        t.set_tags({"a": "b"})
        assert t.flush()
    assert t.run_id is None and not (tmp_path / "run").exists()
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_mlflow_http_retries_give_up_in_seconds_unless_the_job_says_otherwise(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")  # set for the job: kept
    Tracker(store, "dsmd", local_dir=tmp_path / "run").finish()
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2  # MLflow's default: 7, about 4 minutes of retries
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 33


def test_transient_sqlite_lock_is_waited_out_by_mlflow(
    store: str, tmp_path: Path
) -> None:
    tracker = Tracker(store, "dsmd", local_dir=tmp_path / "run")
    lock = sqlite3.connect(store[len("sqlite:///"):], isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")  # another process writing
    release = threading.Timer(1.0, lock.execute, ["ROLLBACK"])
    release.start()
    tracker.set_tags({"phase": "locked"})  # MLflow's SQLite store waits for the lock (busy_timeout)
    tracker.log_metrics({"loss": 0.5}, step=7)
    tracker.finish()
    release.join()
    lock.close()
    run = MlflowClient(tracking_uri=store).get_run(tracker.run_id)
    assert run.data.tags["phase"] == "locked" and run.data.metrics == {"loss": 0.5}
    assert _outage_warnings() == [] and not (tmp_path / "run" / LOCAL_METRICS_FILE).exists()


# ---- store unreachable, and the records it missed -------------------------------------------------------


def test_unreachable_sqlite_store_keeps_training_and_records_then_flush_sends_them(
    unmounted: tuple[str, Any], tmp_path: Path
) -> None:
    uri, mount = unmounted
    artifact = tmp_path / "table.json"
    artifact.write_text("{}")
    run_dir = tmp_path / "run"
    tracker = Tracker(uri, "dsmd", run_name="late", tags={"kind": "student"}, local_dir=run_dir)
    tracker.log_params({"lr": 0.01})
    result = _train(tracker, range(3))
    tracker.set_tags({"phase": "distil"})
    tracker.log_artifact(artifact, artifact_path="eval")
    assert not tracker.flush()  # still unreachable: nothing sent, nothing raised
    assert result == pytest.approx(1 + 1 / 2 + 1 / 3)  # training ran to the end
    assert tracker.run_id is None
    [warning] = _outage_warnings()  # one warning for the whole outage
    assert uri in warning and str(run_dir / LOCAL_METRICS_FILE) in warning and "\n" not in warning

    kept, headers = _kept(run_dir)
    assert {json.dumps(h, sort_keys=True) for h in headers} == {json.dumps(
        {"kind": "run", "tracking_uri": uri, "experiment": "dsmd", "run_name": "late", "run_id": None,
         "tags": {"kind": "student"}}, sort_keys=True)}
    assert [r["kind"] for r in kept] == ["params", *["metric"] * 6, "tags", "artifact"]
    metrics = [r for r in kept if r["kind"] == "metric"]
    assert [(r["key"], r["step"], r["value"]) for r in metrics] == [
        (key, step, value) for step in range(3) for key, value in (("loss/total", 1 / (step + 1)),
                                                                   ("weight/contrastive", 0.5 * step))]

    mount()  # the storage is back
    _train(tracker, range(3, 4))
    assert tracker.flush()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "late" and run.info.status == "RUNNING"
    assert run.data.params == {"lr": "0.01"}
    assert run.data.tags["kind"] == "student" and run.data.tags["phase"] == "distil"
    assert _history(client, tracker.run_id, "loss/total") == _losses(range(4))
    # Kept metrics reach the store with the step and time they were logged at.
    sent = {(m.step, m.timestamp) for m in client.get_metric_history(tracker.run_id, "loss/total")}
    assert {(r["step"], r["timestamp"]) for r in metrics if r["key"] == "loss/total"} <= sent
    assert [f.path for f in client.list_artifacts(tracker.run_id, "eval")] == ["eval/table.json"]
    assert not (run_dir / LOCAL_METRICS_FILE).exists() and not (run_dir / "metrics.sent").exists()
    tracker.finish()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert len(_outage_warnings()) == 1


def test_status_of_a_run_ended_during_an_outage_is_applied_by_replay_backlog_once(
    unmounted: tuple[str, Any], tmp_path: Path
) -> None:
    uri, mount = unmounted
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with Tracker(uri, "dsmd", run_name="interrupted", local_dir=run_dir) as tracker:
            _train(tracker, range(2))
            raise KeyboardInterrupt  # Ctrl-C while the store is down
    kept, _ = _kept(run_dir)
    assert [r["kind"] for r in kept] == ["metric", "metric", "metric", "metric", "status"]
    assert kept[-1]["status"] == "KILLED"
    assert replay_backlog(run_dir) == 0  # still down: nothing sent, nothing raised, all still kept
    assert _kept(run_dir)[0] == kept

    mount()
    assert replay_backlog(run_dir) == 5  # the header names the store and creates the run
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("dsmd").experiment_id])
    assert run.info.run_name == "interrupted"
    assert run.info.status == "KILLED" and run.info.end_time == kept[-1]["end_time"]
    assert _history(client, run.info.run_id, "loss/total") == _losses(range(2))
    assert replay_backlog(run_dir) == 0 and replay_backlog(run_dir, uri) == 0  # nothing left to send twice
    assert not (run_dir / LOCAL_METRICS_FILE).exists()


def test_a_folder_holding_two_runs_records_replays_each_to_its_own_run(
    unmounted: tuple[str, Any], tmp_path: Path
) -> None:
    # A run resumed before its first attempt ever reached the store gets a new run in the same folder.
    uri, mount = unmounted
    first = Tracker(uri, "dsmd", run_name="first", local_dir=tmp_path / "run")
    first.log_metrics({"loss": 3.0}, step=0)
    first.finish("FAILED")
    second = Tracker(uri, "dsmd", run_name="second", local_dir=tmp_path / "run")
    second.log_metrics({"loss": 2.0}, step=1)
    mount()
    second.finish()  # replays both: the first run's records, then its own
    client = MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("dsmd").experiment_id])}
    assert {name: r.info.status for name, r in runs.items()} == {"first": "FAILED", "second": "FINISHED"}
    assert _history(client, runs["first"].info.run_id, "loss") == [(0, 3.0)]
    assert _history(client, runs["second"].info.run_id, "loss") == [(1, 2.0)]
    assert second.run_id == runs["second"].info.run_id and first.run_id is None


def test_replay_cut_short_resumes_where_it_stopped(unmounted: tuple[str, Any], tmp_path: Path) -> None:
    uri, mount = unmounted
    artifact = tmp_path / "table.json"
    artifact.write_text("{}")
    run_dir = tmp_path / "run"
    with Tracker(uri, "dsmd", local_dir=run_dir) as tracker:
        tracker.log_params({"lr": 0.01})
        _train(tracker, range(3))
        tracker.log_artifact(artifact)
        tracker.set_tags({"phase": "done"})
    assert [r["kind"] for r in _kept(run_dir)[0]] == ["params", *["metric"] * 6, "artifact", "tags", "status"]

    mount()
    blocker = Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
    blocker.write_text("not a folder")  # the artifact upload fails: the replay stops there
    assert replay_backlog(run_dir, uri) == 7  # params and metrics
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("dsmd").experiment_id])
    assert run.data.params == {"lr": "0.01"} and run.info.status == "RUNNING" and "phase" not in run.data.tags

    blocker.unlink()
    assert replay_backlog(run_dir, uri) == 3  # artifact, tags, status: what was sent before is not sent again
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "done"
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["table.json"]
    assert _history(client, run.info.run_id, "loss/total") == _losses(range(3))


def test_server_down_mid_run_then_reopening_the_run_replays_what_it_missed(
    server: MlflowServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    artifact = tmp_path / "table.json"
    artifact.write_text("{}")
    run_dir = tmp_path / "run"
    tracker = Tracker(server.url, "dsmd", run_name="served", local_dir=run_dir)
    tracker.log_params({"lr": 0.01})
    _train(tracker, range(3))
    assert tracker.flush()

    server.stop()
    capfd.readouterr()
    # Log the way an application does (a root handler on stderr), so that urllib3's retry lines would show.
    root = logging.StreamHandler(sys.stderr)
    root.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    logging.getLogger().addHandler(root)
    try:
        result = _train(tracker, range(3, 6))  # handed to MLflow's async logging, which fails in the background
        tracker.set_tags({"phase": "late"})
        tracker.log_artifact(artifact, artifact_path="eval")
        tracker.finish("FAILED")  # the store is down: the final status is kept too
    finally:
        logging.getLogger().removeHandler(root)
    assert result == pytest.approx(1 / 4 + 1 / 5 + 1 / 6)
    [warning] = _outage_warnings()
    assert server.url in warning and "\n" not in warning
    # One line on stderr for the outage: no MLflow error lines, urllib3 retry lines or tracebacks.
    assert capfd.readouterr().err.splitlines() == [f"WARNING:raydistill.tracking:{warning}"]
    kept, headers = _kept(run_dir)
    assert {h["run_id"] for h in headers} == {tracker.run_id}
    assert sorted(r["step"] for r in kept if r["kind"] == "metric") == [3, 3, 4, 4, 5, 5]
    assert [r["kind"] for r in kept if r["kind"] != "metric"] == ["tags", "artifact", "status"]

    server.start()  # same port, same database
    resumed = Tracker(server.url, "dsmd", run_id=tracker.run_id, local_dir=run_dir)
    client = MlflowClient(tracking_uri=server.url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING"  # FAILED was applied from the backlog, then the run re-opened
    assert run.data.tags["phase"] == "late" and run.data.params == {"lr": "0.01"}
    assert [f.path for f in client.list_artifacts(tracker.run_id, "eval")] == ["eval/table.json"]
    assert not (run_dir / LOCAL_METRICS_FILE).exists()
    _train(resumed, range(6, 7))
    resumed.finish()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert _history(client, tracker.run_id, "loss/total") == _losses(range(7))  # each step once


# ---- Pareto front and plots -----------------------------------------------------------------------------


def _naive_front(rows: list[dict[str, float]], lower_x: bool) -> list[int]:
    sign = 1 if lower_x else -1

    def dominates(a: dict[str, float], b: dict[str, float]) -> bool:
        ax, bx = sign * a["x"], sign * b["x"]
        return ax <= bx and a["y"] >= b["y"] and (ax < bx or a["y"] > b["y"])

    return sorted(i for i, r in enumerate(rows) if not any(dominates(o, r) for o in rows))


def test_pareto_front_hand_computed() -> None:
    rows = [
        {"name": "a", "latency": 1.0, "rsum": 200.0},
        {"name": "b", "latency": 2.0, "rsum": 250.0},
        {"name": "c", "latency": 2.0, "rsum": 240.0},  # same latency as b, worse: dominated
        {"name": "d", "latency": 3.0, "rsum": 250.0},  # same rsum as b, slower: dominated
        {"name": "e", "latency": 4.0, "rsum": 300.0},
        {"name": "f", "latency": 0.5, "rsum": 100.0},
        {"name": "g", "latency": 5.0, "rsum": 290.0},  # dominated by e
        {"name": "h", "latency": None, "rsum": 999.0},  # no measurement: left out
        {"name": "i", "latency": 4.0, "rsum": 300.0},  # duplicate of e: both kept
    ]
    front = pareto_front(rows, "latency", "rsum")
    assert [r["name"] for r in front] == ["f", "a", "b", "e", "i"]
    # With higher x better (e.g. throughput), the best-x point comes first.
    assert [r["name"] for r in pareto_front(rows, "latency", "rsum", x_lower_is_better=False)] == ["g", "e", "i"]
    assert pareto_front([{"x": "1e-3", "y": "2"}], "x", "y") == [{"x": "1e-3", "y": "2"}]
    with pytest.raises(ValueError, match="row 0: 'x' must be a number, got 'fast'"):
        pareto_front([{"x": "fast", "y": 1.0}], "x", "y")


@pytest.mark.parametrize("lower_x", [True, False])
def test_pareto_front_matches_naive_reference(lower_x: bool) -> None:
    rng = random.Random(1)
    for _ in range(50):
        # Small integer grids make ties and duplicates common.
        rows = [{"x": float(rng.randint(0, 6)), "y": float(rng.randint(0, 6))} for _ in range(rng.randint(1, 15))]
        front = pareto_front(rows, "x", "y", x_lower_is_better=lower_x)
        assert sorted(next(i for i, r in enumerate(rows) if r is f) for f in front) == _naive_front(rows, lower_x)


def _assert_png(path: Path, directory: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100
    assert [p.name for p in directory.iterdir()] == [path.name]  # no temporary files left behind


def test_plots_write_png_files(tmp_path: Path) -> None:
    history = [
        {"step": s, "contrastive": 1.0, "relation": 0.5 * (s + 1), "feature": 10.0 ** -(s % 3)} for s in range(10)
    ]
    out = plot_balancer_weights(history, tmp_path / "w" / "weights.png")
    _assert_png(out, tmp_path / "w")
    curves = {"student": [(0, 50.0), (10, 120.0)], "baseline": [(10, 90.0), (0, 40.0)]}
    out = plot_rsum_curves(curves, tmp_path / "r" / "rsum.png")
    _assert_png(out, tmp_path / "r")
    rows = [{"latency": 1.0 + i, "rsum": 100.0 + 30 * math.sqrt(i), "run_name": f"t{i}"} for i in range(6)]
    out = plot_pareto(rows, tmp_path / "p" / "pareto.png", "latency", "rsum", label_key="run_name")
    _assert_png(out, tmp_path / "p")


def test_plots_reject_empty_or_malformed_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_balancer_weights([], tmp_path / "w.png")
    with pytest.raises(ValueError, match="row 1 has no 'step'"):
        plot_balancer_weights([{"step": 0, "a": 1.0}, {"a": 2.0}], tmp_path / "w.png")
    with pytest.raises(ValueError, match="'student' has no"):
        plot_rsum_curves({"student": []}, tmp_path / "r.png")
    with pytest.raises(ValueError, match="suffix must be one of"):
        plot_rsum_curves({"s": [(0, 1.0)]}, tmp_path / "r.bmp")
    with pytest.raises(ValueError, match="both 'x' and 'y'"):
        plot_pareto([{"x": 1.0}], tmp_path / "p.png", "x", "y")
    assert list(tmp_path.iterdir()) == []  # nothing written on bad input
