"""Placement on a heterogeneous cluster, and the dashboard metrics of a real run.

A local multi-node Ray cluster (``ray.cluster_utils.Cluster``) mirrors ``clusters/aws.yaml``: a head with no
CPUs for work, a ``teacher`` node and two ``student`` nodes, each with the node label ``raydistill/role`` and
its custom resource (``teacher_gpu`` / ``student_gpu``). A tiny distillation (``configs/quick.yaml`` shrunk,
with the placement keys of ``configs/cluster-flickr30k-beit3-base.yaml``; CPU instead of GPUs) runs on it with
two Train workers, so DDP runs between two raylets and the teacher's stream is split between the workers; the
Ray State API then shows where each actor lived: every teacher actor on the teacher node, one Train worker on
each student node. While it runs, every node's Prometheus endpoint is scraped for raydistill's metrics.

The cluster runs in a child process (this file's ``__main__``) with an explicit environment
(``RAY_AUTH_MODE=disabled``, its own ``--temp-dir``), so no Ray state leaks into or out of the test process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PLACEMENT_CONFIG = REPO / "configs" / "cluster-flickr30k-beit3-base.yaml"
ROLE = "raydistill/role"


# ------------------------------------------------------------------------------------------ child process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_teacher(out_dir: Path, embed_dim: int = 16) -> Path:
    """A randomly initialised ``test``-size dual encoder saved in raydistill's format (a ``raydistill`` teacher)."""
    from raydistill.models.student import build_student, save_dual_encoder
    from raydistill.models.tokenizers import build_wordpiece_tokenizer

    texts = ["a red circle left of a blue square", "the green triangle above the small yellow star",
             "abcdefghijklmnopqrstuvwxyz 0123456789"]
    tokenizer = build_wordpiece_tokenizer(texts, vocab_size=120)
    model = build_student("test", embed_dim=embed_dim, vocab_size=len(tokenizer))
    return save_dual_encoder(model, out_dir, tokenizer=tokenizer)


def tiny_overrides(teacher_dir: Path, work: Path) -> list[str]:
    """Shrink configs/quick.yaml to a few seconds of work on CPU."""
    return [
        "teacher.kind=raydistill", f"teacher.checkpoint={teacher_dir}", "teacher.device=cpu",
        "teacher.pool.batch_size=16", "teacher.infer_batch_size=16",
        "data.synth.n_images=40", "data.synth.image_size=32", "data.decode_size=32",
        "student.preset=test", "student.vocab_size=200",
        "train.steps=6", "train.batch_size=8", "train.num_workers=2", "train.checkpoint_every=3", "train.log_every=1",
        "train.shuffle_buffer=0", "distill.queue_size=32", "eval.batch_size=32",
        f"output_dir={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "ray.no_progress_timeout_s=180", "ray.shuffle_partitions=2",
    ]


def _placement_overrides() -> list[str]:
    """The placement keys of the shipped cluster config, on CPU (no GPUs on a test machine)."""
    from raydistill.config import load_config

    cfg = load_config(PLACEMENT_CONFIG)
    pool, train = cfg.teacher.pool, cfg.train
    return [
        f"teacher.pool.resources={json.dumps(pool.resources)}",
        f"teacher.pool.label_selector={json.dumps(pool.label_selector)}",
        f"train.resources_per_worker={json.dumps(train.resources_per_worker)}",
        f"train.label_selector={json.dumps(train.label_selector)}",
        "teacher.pool.num_gpus=0", "train.use_gpu='no'", "teacher.pool.num_cpus=1", "train.cpus_per_worker=1",
    ]


def _scrape(nodes: list[dict[str, Any]], seen: dict[str, set[str]]) -> None:
    """Add the raydistill metric names each node's Prometheus endpoint exports now."""
    for node in nodes:
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            continue
        names = set(re.findall(r"^(ray_raydistill_\w+)\{", text, flags=re.M))
        seen.setdefault(node["NodeID"], set()).update(names)


def _start_cluster(work: Path, attempts: int = 3) -> tuple[Any, Any, list[Any], int]:
    """A head with no CPUs for work, a teacher node and two student nodes (labels and custom resources as in
    clusters/aws.yaml). Returns the cluster, the teacher node, the student nodes and the dashboard port.

    On a busy machine a node can fail to start (the raylet gives up waiting for its dashboard agent, or the
    dashboard misses its start-up deadline: fixed waits inside Ray); the attempt's processes are then stopped
    and the cluster is started again in a fresh temp folder, up to ``attempts`` times.
    """
    from ray.cluster_utils import Cluster

    for attempt in range(1, attempts + 1):
        temp = work / f"ray{attempt}"
        dashboard_port = _free_port()
        cluster = Cluster(initialize_head=False)
        try:
            cluster.add_node(num_cpus=0, labels={ROLE: "head"}, temp_dir=str(temp), include_dashboard=True,
                             dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                             _system_config={"metrics_report_interval_ms": 1000})
            teacher = cluster.add_node(num_cpus=3, resources={"teacher_gpu": 1}, labels={ROLE: "teacher"})
            students = [cluster.add_node(num_cpus=2, resources={"student_gpu": 1}, labels={ROLE: "student"})
                        for _ in range(2)]
            return cluster, teacher, students, dashboard_port
        except Exception as err:  # start-up only: nothing of the code under test has run yet
            if attempt == attempts:
                raise
            print(f"[test] cluster start {attempt} failed ({str(err).strip()[:200]}); starting again",
                  file=sys.stderr)
            try:
                cluster.shutdown()
            finally:
                _kill_leftovers(str(temp))
    raise AssertionError("unreachable")


def run_cluster_check(work: Path) -> dict[str, Any]:
    """Start the four-node cluster, run the tiny distillation, return where things ran and what was exported."""
    import ray
    from ray.util.state import list_actors

    from raydistill.config import load_config
    from raydistill.pipeline.dashboard import TeacherThroughput
    from raydistill.pipeline.runner import run_experiment

    # The config first: a bad override fails before any process starts.
    cfg = load_config(REPO / "configs" / "quick.yaml",
                      tiny_overrides(build_tiny_teacher(work / "teacher"), work) + _placement_overrides())
    cluster, teacher_node, student_nodes, dashboard_port = _start_cluster(work)
    try:
        ray.init(address=cluster.address)
        ray.data.DataContext.get_current().execution_no_progress_timeout_s = 180
        ray.data.DataContext.get_current().enable_progress_bars = False
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["summary"] = run_experiment(cfg)
            except BaseException as err:  # reported to the test, which fails with it
                outcome["error"] = f"{type(err).__name__}: {err}"

        # The teacher-throughput gauges, from an actor on the teacher node (holding no resources, so the
        # teacher pool still gets the node's one teacher_gpu unit).
        @ray.remote(num_cpus=0, label_selector={ROLE: "teacher"})
        class Throughput:
            def record(self) -> dict[str, float]:
                self.rates = TeacherThroughput(window_s=60)
                return self.rates.record(images=64, captions=320, seconds=2.0)

        throughput = Throughput.remote()
        rates = ray.get(throughput.record.remote())

        seen: dict[str, set[str]] = {}
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        while thread.is_alive():
            _scrape(ray.nodes(), seen)
            time.sleep(1.0)
        # Metrics reach the endpoints within a report interval or two after the last update.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _scrape(ray.nodes(), seen)
            names = set().union(*seen.values())
            if {"ray_raydistill_train_step_time_s", "ray_raydistill_teacher_images_per_s"} <= names:
                break
            time.sleep(1.0)

        actors = list_actors(address=f"http://127.0.0.1:{dashboard_port}", detail=True, limit=10000,
                             raise_on_missing_output=False)
        nodes = {n["NodeID"]: n.get("Labels", {}).get(ROLE) for n in ray.nodes()}
        return {
            "error": outcome.get("error"),
            "summary": outcome.get("summary"),
            "rates": rates,
            "teacher_node": teacher_node.node_id,
            "student_nodes": [node.node_id for node in student_nodes],
            "node_roles": nodes,
            "actors": [{"class_name": a.class_name, "node_id": a.node_id, "state": a.state,
                        "repr_name": getattr(a, "repr_name", "")} for a in actors],
            "metrics_by_node": {k: sorted(v) for k, v in seen.items()},
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


# ------------------------------------------------------------------------------------------ rate arithmetic
def test_window_rate_by_hand() -> None:
    from collections import deque

    from raydistill.pipeline.dashboard import window_rate

    events = deque([(1.0, 10.0), (5.0, 20.0), (12.0, 30.0)])
    # Window (2, 12]: 20 + 30 over the full 10 s window.
    assert window_rate(events, now=12.0, window_s=10.0, started=0.0) == 5.0
    assert list(events) == [(5.0, 20.0), (12.0, 30.0)]  # the expired event is dropped
    # Work began 4 s ago: the same 50 over 4 s.
    assert window_rate(deque([(5.0, 20.0), (12.0, 30.0)]), now=12.0, window_s=10.0, started=8.0) == 12.5
    assert window_rate(deque(), now=3.0, window_s=10.0, started=3.0) == 0.0


def test_teacher_throughput_with_a_fake_clock() -> None:
    from raydistill.pipeline.dashboard import TeacherThroughput

    times = iter([102.0, 110.0, 140.0])  # the moments each batch ended
    rates = TeacherThroughput(window_s=30.0, actor="a1", clock=lambda: next(times))
    # First batch: 64 images, 320 captions in the 2 s it took (so the clock starts at 100).
    assert rates.record(images=64, captions=320, seconds=2.0) == {"images_per_s": 32.0, "captions_per_s": 160.0}
    # 8 s later, 16 more images: (64 + 16) / (110 - 100) s.
    assert rates.record(images=16, captions=80, seconds=1.0) == {"images_per_s": 8.0, "captions_per_s": 40.0}
    # 30 s of nothing: both batches left the window.
    assert rates.record(images=0, captions=0) == {"images_per_s": 0.0, "captions_per_s": 0.0}
    with pytest.raises(ValueError, match="window_s"):
        TeacherThroughput(window_s=0)


# ------------------------------------------------------------------------------------------ the test
def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _kill_leftovers(marker: str) -> None:
    """SIGKILL, one by one, the processes this test started that are still alive (their cmdline names our temp dir)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
@pytest.mark.ray
def test_teacher_actors_on_teacher_node_workers_on_student_node_and_metrics_exported() -> None:
    # A short temp path: Ray's Unix sockets live under it (108-character limit).
    work = Path(tempfile.mkdtemp(prefix="rdplace-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="disabled", RAYDISTILL_HOME=str(work / "home"), RAY_TRAIN_V2_ENABLED="1",
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    result_file = work / "result.json"
    proc = subprocess.Popen([sys.executable, __file__, str(work), str(result_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output = b""
    finally:
        _kill_leftovers(str(work))
    log = output.decode(errors="replace")[-6000:]
    assert proc.returncode == 0 and result_file.is_file(), f"{log}\n(kept {work})"
    result = json.loads(result_file.read_text())
    shutil.rmtree(work, ignore_errors=True)
    assert result["error"] is None, result["error"] + "\n" + log
    summary = result["summary"]

    # The run really distilled: the teacher embedded every image it saw once, the student trained.
    assert summary["steps"] == 6
    assert summary["teacher_images_embedded"] == summary["dataset_images"] > 0
    assert summary["teacher_captions_embedded"] == summary["dataset_captions"] > 0
    assert 0 <= summary["metrics"]["student"]["rsum"] <= 600

    # Where the actors ran.
    roles = result["node_roles"]
    students = set(result["student_nodes"])
    assert roles[result["teacher_node"]] == "teacher" and {roles[n] for n in students} == {"student"}
    teacher_actors = [a for a in result["actors"] if "TeacherEmbedder" in (a["class_name"] + a["repr_name"])]
    train_workers = [a for a in result["actors"] if a["class_name"] == "RayTrainWorker"]
    assert teacher_actors, [a["class_name"] for a in result["actors"]]
    assert train_workers, [a["class_name"] for a in result["actors"]]
    assert {a["node_id"] for a in teacher_actors} == {result["teacher_node"]}
    # One worker per student node (each holds one student_gpu unit): DDP between two raylets.
    assert sorted(a["node_id"] for a in train_workers) == sorted(students)

    # The dashboard metrics, on the Prometheus endpoints.
    everywhere = set().union(*map(set, result["metrics_by_node"].values()))
    expected = {
        "ray_raydistill_teacher_images_embedded_total", "ray_raydistill_teacher_captions_embedded_total",
        "ray_raydistill_images_decoded_total",
        "ray_raydistill_train_samples_per_s", "ray_raydistill_train_step_time_s",
        *(f"ray_raydistill_train_loss_{term}" for term in ("feature", "cosine", "contrastive", "hard_negative")),
        *(f"ray_raydistill_train_weight_{term}" for term in ("feature", "cosine", "contrastive", "hard_negative")),
    }
    assert expected <= everywhere, sorted(expected - everywhere)
    # Training gauges come from the rank-0 worker, so from a student node's endpoint.
    assert any("ray_raydistill_train_step_time_s" in result["metrics_by_node"].get(n, []) for n in students)
    # 64 images and 320 captions in a batch of 2 s, the first recorded: 32 images/s, 160 captions/s.
    assert result["rates"] == {"images_per_s": 32.0, "captions_per_s": 160.0}
    teacher_metrics = set(result["metrics_by_node"][result["teacher_node"]])
    assert {"ray_raydistill_teacher_images_per_s", "ray_raydistill_teacher_captions_per_s"} <= teacher_metrics


if __name__ == "__main__":
    _work, _out = Path(sys.argv[1]), Path(sys.argv[2])
    _result = run_cluster_check(_work)
    _tmp = _out.with_suffix(".tmp")
    _tmp.write_text(json.dumps(_result, default=str))
    os.replace(_tmp, _out)
