"""Tracking against a real MLflow SQLite store: runs, params, metric history, artifacts, parent/child
runs, the local fallback when the store is unreachable and the flush when it comes back; Pareto front
and plots."""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import _validate_metric_name
from PIL import Image

from raydistill.plots import pareto_front, plot_balancer_weights, plot_pareto, plot_rsum_curves
from raydistill.tracking import (
    LOCAL_METRICS_FILE,
    RetryPolicy,
    Tracker,
    TrackingConfigError,
    TrackingUnavailableWarning,
    flatten_config,
    read_runs,
    resolve_tracking_uri,
    sanitize_key,
)

FAST = RetryPolicy(attempts=2, backoff_s=0.0, recheck_after_s=0.0, max_recheck_s=0.0)


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    # Synchronous logging, and no multi-minute HTTP retries inside each of our attempts.
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)


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


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _local_records(tracker: Tracker) -> list[dict[str, Any]]:
    return [json.loads(line) for line in tracker.local_path.read_text().splitlines()]


class CountingClient:
    """Delegates to a real MlflowClient, counting calls and failing the first ``fail`` calls to methods in
    ``failing`` the way a busy SQLite store does."""

    def __init__(self, uri: str, fail: int = 0, failing: tuple[str, ...] = ("log_batch",)) -> None:
        self.real = MlflowClient(tracking_uri=uri)
        self.fail = fail
        self.failing = failing
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.real, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, kwargs))
            if name in self.failing and self.fail > 0:
                self.fail -= 1
                raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=15)
            return method(*args, **kwargs)

        return call


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


# ---- a run in a real store ------------------------------------------------------------------------------


def test_run_holds_params_metric_history_and_artifacts(store: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "student.safetensors"
    checkpoint.write_bytes(b"\x00" * 64)
    export = tmp_path / "export"
    (export / "tokenizer").mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (export / "tokenizer" / "vocab.txt").write_text("[PAD]\n")
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    with Tracker(store, "dsmd", run_name="small", tags={"kind": "student"}, local_dir=tmp_path / "run") as tracker:
        tracker.log_params({"student": {"size": "tiny", "lr": 0.001}, "note": "x" * 7000})
        for step in (0, 5, 10):
            tracker.log_metrics({"loss/total": 10.0 / (step + 1), "weight/relation": step * 0.5}, step=step)
        tracker.set_tags({"phase": "distil"})
        tracker.log_artifact(checkpoint, artifact_path="model")
        tracker.log_artifact(export, artifact_path="export")  # a folder goes up whole
        tracker.log_dict({"r@1": 0.5, "rsum": 300.0}, "eval/retrieval.json")
        tracker.log_figure(fig, "plots/curve.png")
        run_id = tracker.run_id
    assert run_id is not None and tracker.pending == 0
    assert not tracker.local_path.exists()  # the store took everything: no fallback file

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
    table = json.loads(Path(client.download_artifacts(run_id, "eval/retrieval.json", str(tmp_path))).read_text())
    assert table == {"r@1": 0.5, "rsum": 300.0}
    png = [f for f in client.list_artifacts(run_id, "plots")]
    assert [f.path for f in png] == ["plots/curve.png"] and png[0].file_size > 0


def test_metrics_are_batched_into_few_store_writes(store: str, tmp_path: Path) -> None:
    client = CountingClient(store)
    tracker = Tracker(store, "dsmd", local_dir=tmp_path / "run", client=client, flush_every=4)
    for step in range(8):
        tracker.log_metrics({"a": step, "b": 2 * step, "c": 3 * step}, step=step)
        if step == 2:  # three calls buffered: nothing sent yet
            assert [name for name, _ in client.calls if name == "log_batch"] == []
    tracker.finish()
    batches = [kwargs["metrics"] for name, kwargs in client.calls if name == "log_batch"]
    assert [len(b) for b in batches] == [12, 12]
    assert _history(client.real, tracker.run_id, "c") == [(s, 3.0 * s) for s in range(8)]


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


def test_exception_in_block_marks_run_failed(store: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(store, "dsmd", local_dir=tmp_path / "run") as tracker:
            tracker.log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("boom")
    assert MlflowClient(tracking_uri=store).get_run(tracker.run_id).info.status == "FAILED"


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


def test_experiment_created_by_another_process_meanwhile_is_used(store: str, tmp_path: Path) -> None:
    class RacingClient(CountingClient):
        """The first lookup misses; another process creates the experiment before our create."""

        def get_experiment_by_name(self, name: str) -> Any:
            if not any(call == "lookup" for call, _ in self.calls):
                self.calls.append(("lookup", {}))
                MlflowClient(tracking_uri=store).create_experiment(name)
                return None
            return self.real.get_experiment_by_name(name)

    tracker = Tracker(store, "shared", local_dir=tmp_path / "run", client=RacingClient(store), retry=FAST)
    assert not tracker.offline
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("shared")
    assert client.get_run(tracker.run_id).info.experiment_id == experiment.experiment_id


def test_param_change_rejected_by_store_is_kept_locally_and_others_still_sent(store: str, tmp_path: Path) -> None:
    tracker = Tracker(store, "dsmd", local_dir=tmp_path / "run", retry=FAST)
    tracker.log_params({"lr": 0.1})
    tracker.log_params({"lr": 0.2, "epochs": 3})  # MLflow refuses to change a param
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.finish()
    assert not tracker.offline and tracker.pending == 0
    run = MlflowClient(tracking_uri=store).get_run(tracker.run_id)
    assert run.data.params == {"lr": "0.1", "epochs": "3"}
    assert run.data.metrics == {"loss": 1.0}
    records = _local_records(tracker)
    assert [r["kind"] for r in records] == ["run", "params"]
    assert records[1]["params"] == {"lr": "0.2"} and "Changing param values is not allowed" in records[1]["error"]


def test_bad_metric_value_names_the_key(store: str, tmp_path: Path) -> None:
    tracker = Tracker(store, "dsmd", local_dir=tmp_path / "run", retry=FAST)
    with pytest.raises(ValueError, match="'loss/total' must be a number, got 'high'"):
        tracker.log_metrics({"loss/total": "high"}, step=0)
    with pytest.raises(ValueError, match="step must be an integer, got 1.5"):
        tracker.log_metrics({"loss": 1.0}, step=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be an integer, got True"):
        tracker.log_metrics({"loss": 1.0}, step=True)
    with pytest.raises(ValueError, match="artifact path '/no/such/file' does not exist"):
        tracker.log_artifact("/no/such/file")
    with pytest.raises(ValueError, match="relative file name"):
        tracker.log_dict({}, "../outside.json")
    with pytest.raises(ValueError, match="must end with one of"):
        tracker.log_dict({}, "table.csv")
    with pytest.raises(ValueError, match="status must be one of"):
        tracker.finish("DONE")


def test_disabled_tracker_touches_nothing(tmp_path: Path) -> None:
    with Tracker("http://127.0.0.1:1", "dsmd", local_dir=tmp_path / "run", enabled=False, client=object()) as t:
        t.log_params({"a": 1})
        t.log_metrics({"loss": 1.0}, step=0)
        t.log_dict({"a": 1}, "x.json")
    assert t.run_id is None and not (tmp_path / "run").exists()


# ---- store unavailable ----------------------------------------------------------------------------------


def _train(tracker: Tracker, steps: int) -> float:
    """A stand-in training loop: does its own arithmetic, logs each step, returns its result."""
    total = 0.0
    for step in range(steps):
        loss = 1.0 / (step + 1)
        total += loss
        tracker.log_metrics({"loss/total": loss, "weight/contrastive": 0.5 * step}, step=step)
    return total


def test_unreachable_server_keeps_training_and_keeps_metrics_locally(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    artifact = tmp_path / "table.json"
    artifact.write_text("{}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(uri, "dsmd", run_name="offline", local_dir=tmp_path / "run", retry=FAST)
        tracker.log_params({"lr": 0.01})
        result = _train(tracker, steps=4)
        tracker.log_artifact(artifact, artifact_path="eval")
        tracker.finish()
    assert result == pytest.approx(1 + 1 / 2 + 1 / 3 + 1 / 4)  # training ran to the end
    ours = [w for w in caught if issubclass(w.category, TrackingUnavailableWarning)]
    assert len(ours) == 1
    assert str(tracker.local_path) in str(ours[0].message) and uri in str(ours[0].message)
    assert tracker.run_id is None and tracker.offline

    records = _local_records(tracker)
    assert tracker.local_path == tmp_path / "run" / LOCAL_METRICS_FILE
    assert records[0] == {
        "kind": "run", "tracking_uri": uri, "experiment": "dsmd", "run_name": "offline", "run_id": None, "tags": {}
    }
    metric_records = [r for r in records if r["kind"] == "metric"]
    stamps = [r.pop("timestamp") for r in metric_records]
    assert stamps == sorted(stamps) and all(isinstance(s, int) for s in stamps)
    expected_metrics = [
        {"kind": "metric", "key": key, "value": value, "step": step}
        for step in range(4)
        for key, value in (("loss/total", 1.0 / (step + 1)), ("weight/contrastive", 0.5 * step))
    ]
    assert metric_records == expected_metrics
    assert [r["kind"] for r in records] == ["run", "params", *["metric"] * 8, "artifact", "status"]
    assert records[1] == {"kind": "params", "params": {"lr": "0.01"}}
    assert records[-2] == {"kind": "artifact", "path": str(artifact.resolve()), "artifact_path": "eval"}
    assert records[-1]["status"] == "FINISHED"


def test_backlog_is_flushed_when_the_store_comes_back(
    tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Something that is not a database sits at the store's path (as with a broken mount): SQLite
    # fails to open it with a real OperationalError on every try. MLflow retries opening an engine
    # 10 times (~100 s of sleeps) inside each of our tries; once is enough here.
    monkeypatch.setattr("mlflow.store.db.utils.MAX_RETRY_COUNT", 1)
    db = tmp_path / "shared" / "mlflow.db"
    db.mkdir(parents=True)
    uri = f"sqlite:///{db}"
    with pytest.warns(TrackingUnavailableWarning, match="kept locally"):
        tracker = Tracker(uri, "dsmd", run_name="late", local_dir=tmp_path / "run", retry=FAST)
        tracker.log_params({"lr": 0.01})
        _train(tracker, steps=3)
    assert tracker.offline and tracker.run_id is None and tracker.pending == 1 + 6
    assert [r["kind"] for r in _local_records(tracker)] == ["run", "params", *["metric"] * 6]

    db.rmdir()  # the storage is back
    shutil.copy(template_db, db)
    tracker.log_metrics({"loss/total": 0.2, "weight/contrastive": 1.5}, step=3)
    assert not tracker.offline and tracker.pending == 0 and tracker.run_id is not None
    tracker.finish()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "late"
    assert run.data.params == {"lr": "0.01"}
    assert _history(client, tracker.run_id, "loss/total") == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.2)]
    assert _history(client, tracker.run_id, "weight/contrastive") == [(0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5)]
    # The local file still holds exactly what was at risk; nothing was appended after recovery.
    assert [r["kind"] for r in _local_records(tracker)] == ["run", "params", *["metric"] * 6]


def test_transient_lock_within_retries_is_invisible(store: str, tmp_path: Path) -> None:
    client = CountingClient(store, fail=2)  # two "database is locked" answers, then the real store
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingUnavailableWarning)
        policy = RetryPolicy(attempts=3, backoff_s=0.0)
        tracker = Tracker(store, "dsmd", local_dir=tmp_path / "run", client=client, retry=policy)
        tracker.log_metrics({"loss": 0.5}, step=7)
        tracker.finish()
    assert not tracker.local_path.exists()
    assert [name for name, _ in client.calls].count("log_batch") == 3
    assert _history(client.real, tracker.run_id, "loss") == [(7, 0.5)]


def test_offline_tracker_waits_before_trying_the_store_again(store: str, tmp_path: Path) -> None:
    client = CountingClient(store, fail=10**6)  # locked until we say otherwise
    policy = RetryPolicy(attempts=2, backoff_s=0.0, recheck_after_s=3600.0)
    tracker = Tracker(store, "dsmd", local_dir=tmp_path / "run", client=client, retry=policy)
    with pytest.warns(TrackingUnavailableWarning):
        tracker.log_metrics({"loss": 1.0}, step=0)
    tries = len(client.calls)
    tracker.log_metrics({"loss": 0.5}, step=1)
    tracker.log_metrics({"loss": 0.25}, step=2)
    assert len(client.calls) == tries  # within the interval: straight to the local file, no store calls
    assert [(r["step"], r["value"]) for r in _local_records(tracker)[1:]] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    client.fail = 0
    assert tracker.flush()  # an explicit flush tries at once
    assert _history(client.real, tracker.run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 0.25)]


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
