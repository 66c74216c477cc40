"""`raydistill tune` and `raydistill compare`.

Fast tests check the pieces against hand-computed values and naive references: ASHA's settings and its
decisions (a naive ASHA written here), the Pareto marks (a naive front), the table, the counts, the
MLflow ending of stopped trials and the compare command on a real SQLite store.

One real sweep (module fixture) runs the CLI on a local Ray instance: the embedded synthetic scenes, a
tiny teacher saved here, two trials (two student sizes; a trial costs a minute or more of Ray start-up on
2 cores, so the four-trial demo space is left to `raydistill tune` users), both at once on one SQLite store;
the tests then check what it produced.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from raydistill.config import load_config
from raydistill.jobs import mlflow_server_env
from raydistill.sweep.space import load_space, parse_space
from raydistill.sweep.results import (
    TRIAL_CONFIG_TAG,
    TRIAL_ID_TAG,
    SweepError,
    _close_trial_runs,
    best_row,
    compare,
    format_table,
    mark_pareto,
    sort_rows,
    sweep_counts,
    write_results,
)
from raydistill.tracking import Tracker, read_runs
from raydistill.sweep.capacity import (
    Capacity,
    NodeType,
    capacity_from_autoscaler_config,
    cluster_capacity,
    default_max_concurrent,
    trial_bundles,
)
from raydistill.sweep.driver import asha_settings, find_sweep_dir, prepare_sweep, resume_sweep

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quick.yaml"
DEMO_SPACE = REPO / "tune_spaces" / "demo.yaml"
# The sweep's space: the demo space's student sizes, with the config's balancer (dsmd) in both trials.
TEST_SPACE = "description: two student sizes\nspace:\n  student.preset: {grid: [test, demo]}\n"
STEPS, EVAL_EVERY = 8, 2
# Subprocesses are killed after this long: a guard against a hung Ray, far above a normal run's minutes.
HANG = 3600


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# --------------------------------------------------------------------------------------------- references


def naive_asha(events: list[tuple[str, int, float]], grace: int, max_t: int, rf: int = 2) -> list[str]:
    """ASHA's decisions, written from the paper's rule: at the highest rung a result reaches, stop the trial
    if its score is below the (1 - 1/rf) quantile of the scores recorded there before it (rf = 2: the
    median); a trial is judged once per rung; rungs sit at grace * rf**k up to max_t."""
    rungs = [grace * rf**k for k in range(int(math.log(max_t / grace) / math.log(rf)) + 1)]
    recorded: dict[int, dict[str, float]] = {r: {} for r in rungs}
    decisions = []
    for trial, step, value in events:
        reached = [r for r in rungs if r <= step]
        if not reached or trial in recorded[max(reached)]:
            decisions.append("CONTINUE")
            continue
        rung = recorded[max(reached)]
        stop = bool(rung) and value < statistics.median(rung.values())
        rung[trial] = value
        decisions.append("STOP" if stop else "CONTINUE")
    return decisions


def naive_front(rows: list[dict[str, Any]], x: str, lower_x_better: bool) -> set[str]:
    """Trial ids no other row beats on both (x, rsum): O(n^2), rows without values left out."""
    pts = [(r["trial_id"], r[x] if lower_x_better else -r[x], r["rsum"]) for r in rows
           if r.get(x) is not None and r.get("rsum") is not None]
    return {t for t, a, b in pts
            if not any(a2 <= a and b2 >= b and (a2 < a or b2 > b) for _, a2, b2 in pts)}


# --------------------------------------------------------------------------------------------- scheduling


def test_asha_settings_keep_every_rung_below_the_last_step():
    from ray.tune.schedulers import AsyncHyperBandScheduler

    assert asha_settings(8, 2) == {"grace_period": 2, "max_t": 7}
    for steps, every in [(8, 2), (40, 10), (300, 50), (7, 3), (100, 1)]:
        sched = AsyncHyperBandScheduler(time_attr="step", reduction_factor=2, stop_last_trials=False,
                                        **asha_settings(steps, every))
        milestones = [m for m, _ in sched._brackets[0]._rungs]
        assert milestones and all(m < steps and m % every == 0 for m in milestones), (steps, every, milestones)
    with pytest.raises(SweepError, match=r"train.eval_every \(8\) must be below the planned steps \(8\)"):
        asha_settings(8, 8)


def test_logged_asha_takes_asha_decisions_and_writes_them_down(tmp_path):
    from raydistill.sweep.trial import LoggedASHA

    sched = LoggedASHA(tmp_path / "log.jsonl", time_attr="step", metric="val_rsum", mode="max",
                       reduction_factor=2, stop_last_trials=False, **asha_settings(8, 2))
    trials = {name: SimpleNamespace(trial_id=name) for name in "ABCD"}
    for trial in trials.values():
        sched.on_trial_add(None, trial)
    events = [("A", 2, 10.0), ("B", 2, 5.0), ("C", 2, 20.0), ("A", 4, 12.0), ("C", 4, 11.0), ("D", 2, 30.0),
              ("D", 4, 13.0), ("A", 6, 13.0), ("D", 8, 1.0), ("A", 8, 14.0)]
    got = [sched.on_trial_result(None, trials[t], {"step": s, "val_rsum": v}) for t, s, v in events]
    # By hand: B 5 < median{10}; C 11 < median{12} at rung 4; D's 1 at step 8 is past its last rung.
    expected = ["CONTINUE", "STOP", "CONTINUE", "CONTINUE", "STOP", "CONTINUE", "CONTINUE", "CONTINUE",
                "CONTINUE", "CONTINUE"]
    assert got == expected
    assert naive_asha(events, grace=2, max_t=7) == expected
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(x["trial_id"], x["step"], x["val_rsum"], x["decision"]) for x in lines] == [
        (t, s, v, d) for (t, s, v), d in zip(events, expected)]


def test_trial_bundles_hold_the_driver_and_nothing_for_the_teacher():
    # Trials run in cache mode: the teacher is loaded nowhere, so its pool's resources are not reserved.
    gpu_pool = load_config(QUICK, ["teacher.pool.num_cpus=4", "teacher.pool.num_gpus=1",
                                   "teacher.pool.resources={teacher_gpu: 1, teacher_node: 1}",
                                   "teacher.pool.label_selector={raydistill/role: teacher}"])
    bundles = trial_bundles(gpu_pool)
    assert not any("GPU" in b for b in bundles)
    assert all(set(b) == {"CPU"} for b in bundles)  # no custom resource either
    assert bundles == [{"CPU": 1.0}] == trial_bundles(load_config(QUICK))


def _one_node(cpus: float, gpus: float = 0, **custom: float) -> Capacity:
    return Capacity([NodeType("local", {"CPU": cpus, "GPU": gpus, **custom}, 1)], "a fixed instance")


def test_default_max_concurrent_counts_what_one_trial_needs():
    cfg = load_config(QUICK, ["train.eval_every=10", "data.decode_cpus=0.5"])
    # One trial: 1 CPU driver + 1 worker x (1 CPU + data.decode_cpus 0.5 for its Ray Data tasks) = 2.5 CPUs.
    assert default_max_concurrent(cfg, _one_node(8), trials=10) == 3  # 8 // 2.5
    assert default_max_concurrent(cfg, _one_node(8), trials=2) == 2  # never more than the sweep's trials
    assert default_max_concurrent(cfg, _one_node(2), trials=4) == 1  # never below one
    assert default_max_concurrent(load_config(QUICK, ["data.decode_cpus=1"]), _one_node(9), trials=9) == 3  # 9 // 3
    wide = load_config(QUICK, ["train.num_workers=2", "train.cpus_per_worker=2", "data.decode_cpus=0.5"])
    assert default_max_concurrent(wide, _one_node(16), trials=9) == 2  # 16 // (1 + 2 x (2 + 0.5))
    assert default_max_concurrent(wide, _one_node(64, gpus=3), trials=9) == 1  # 3 GPUs // 2 GPU workers
    assert default_max_concurrent(load_config(QUICK, ["train.use_gpu='no'", "data.decode_cpus=0.5"]), _one_node(10, gpus=1), trials=9) == 4
    # The teacher pool's GPU no longer counts: 4 GPUs hold 4 one-GPU trials.
    gpu_pool = load_config(QUICK, ["teacher.pool.num_gpus=1", "teacher.pool.resources={teacher_gpu: 1}",
                                     "data.decode_cpus=0.5"])
    assert default_max_concurrent(gpu_pool, _one_node(64, gpus=4, teacher_gpu=1), trials=9) == 4
    # Custom resources of the workers count: 3 student_gpu units hold one 2-worker trial.
    custom = load_config(QUICK, ["train.num_workers=2", "train.resources_per_worker={student_gpu: 1}", "data.decode_cpus=0.5"])
    assert default_max_concurrent(custom, _one_node(64, gpus=8, student_gpu=3), trials=9) == 1


def test_default_max_concurrent_places_each_worker_on_one_node():
    cfg = load_config(QUICK, ["train.num_workers=2", "train.cpus_per_worker=3", "data.decode_cpus=0.5"])
    # Four 4-CPU nodes: 16 CPUs would cover two trials of 1 + 2 x 3.5 = 8 CPUs, but each node holds one 3-CPU
    # worker: 4 worker slots, 2 trials; three 5-CPU nodes hold 3 workers: 1 trial (15 CPUs would fit one too).
    assert default_max_concurrent(cfg, Capacity([NodeType("n", {"CPU": 4}, 4)], "t"), trials=9) == 2
    assert default_max_concurrent(cfg, Capacity([NodeType("n", {"CPU": 5}, 3)], "t"), trials=9) == 1
    # Unlimited node types: as many trials as the sweep has, unless a cap on summed resources says less.
    unlimited = Capacity([NodeType("n", {"CPU": 8}, None)], "t")
    assert default_max_concurrent(cfg, unlimited, trials=7) == 7
    capped = Capacity([NodeType("n", {"CPU": 8}, None)], "t", max_resources={"CPU": 40})
    assert default_max_concurrent(cfg, capped, trials=7) == 5  # 40 // 8


def test_max_concurrent_on_the_aws_cluster_counts_the_student_nodes_it_can_start():
    import yaml

    capacity = capacity_from_autoscaler_config(yaml.safe_load((REPO / "clusters" / "aws.yaml").read_text()), "aws")
    assert {(t.name, t.count) for t in capacity.node_types} == {("head", 1), ("teacher", 2), ("student", 2)}
    student = next(t for t in capacity.node_types if t.name == "student")
    assert student.resources == {"CPU": 48, "GPU": 4, "student_gpu": 4}
    # Four 8-CPU GPU workers (student_gpu: 1 each) per trial; each 4-GPU student node holds 4 of them.
    cfg = load_config(REPO / "configs" / "cluster-flickr30k-beit3-base.yaml", ["cache.mode=cache"])
    assert default_max_concurrent(cfg, capacity, trials=8) == 2  # 2 student nodes x 4 slots // 4 workers
    # When the sweep starts the student nodes (min_workers 0) are not up: the nodes up now hold none of them.
    up_now = Capacity([t if t.name != "student" else NodeType("student", t.resources, 0)
                       for t in capacity.node_types], "up now")
    assert default_max_concurrent(cfg, up_now, trials=8) == 1
    # The cluster-wide max_workers bounds each type at its min_workers plus the nodes left to start.
    tight = yaml.safe_load((REPO / "clusters" / "aws.yaml").read_text())
    tight["max_workers"] = 3
    counts = {t.name: t.count for t in capacity_from_autoscaler_config(tight, "aws").node_types}
    assert counts == {"head": 1, "teacher": 2, "student": 1}


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray instance in this process (2 logical CPUs), for the placement and capacity checks."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_data_tasks_escape_the_trials_placement_group(local_ray):
    """What trial_bundles relies on: Tune schedules a trial's driver in the trial's group with
    capture_child_tasks=True, yet the Ray Data tasks the driver (or a Train worker) starts carry Data's own
    scheduling strategy and run outside the group, on the instance's free CPUs; only a task without a strategy
    is put in the group."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def group_of_task() -> str:
        return ray.get_runtime_context().get_placement_group_id() or ""

    @ray.remote(num_cpus=1)
    def trial_driver() -> tuple[list[str], str]:
        import numpy as np
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_no_progress_timeout_s = 60  # a starved pipeline fails here instead of hanging
        rows = ray.data.range(8, override_num_blocks=2).map_batches(
            lambda b: {"group": np.array([group_of_task()] * len(b["id"]))}, num_cpus=1)
        data_groups = sorted({str(r["group"]) for r in rows.take_all()})
        return data_groups, ray.get(ray.remote(num_cpus=0.5)(group_of_task).remote())

    group = placement_group(trial_bundles(load_config(QUICK)))
    ray.get(group.ready(), timeout=60)
    try:
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        data_groups, plain_group = ray.get(trial_driver.options(scheduling_strategy=strategy).remote(), timeout=120)
    finally:
        remove_placement_group(group)
    assert data_groups == [""]  # every Data task ran outside any placement group
    assert plain_group == group.id.hex()


def test_cluster_capacity_prefers_what_the_cluster_can_scale_to(local_ray, tmp_path, monkeypatch):
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    monkeypatch.setenv("HOME", str(tmp_path))  # where ~/ray_bootstrap_config.yaml is looked for
    up_now = cluster_capacity(connected=False)
    assert up_now.source == "the nodes up now" and [t.resources["CPU"] for t in up_now.node_types] == [2]
    assert cluster_capacity(connected=True).source == "the nodes up now"  # nothing reported, no file

    # On the head of a `ray up` cluster: the autoscaler's config file (this process runs on the head).
    shutil.copy(REPO / "clusters" / "aws.yaml", tmp_path / "ray_bootstrap_config.yaml")
    from_file = cluster_capacity(connected=True)
    assert from_file.source == f"the autoscaler's config {tmp_path / 'ray_bootstrap_config.yaml'}"
    assert {(t.name, t.count) for t in from_file.node_types} == {("head", 1), ("teacher", 2), ("student", 2)}
    assert cluster_capacity(connected=False).source == "the nodes up now"  # a local instance: not its file

    # An autoscaler that reports its cluster config to the GCS (what Ray Train and Ray Data read) wins.
    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in (("head", {"CPU": 0}, 1), ("student", {"CPU": 48, "GPU": 4}, 3),
                                       ("spot", {"CPU": 16}, -1)):
        group = config.node_group_configs.add(name=name, max_count=max_count)
        group.resources.update(resources)
    config.max_resources["CPU"] = 200
    GcsClient(address=ray.get_runtime_context().gcs_address).report_cluster_config(config.SerializeToString())
    reported = cluster_capacity(connected=True)
    assert reported.source == "the cluster config the autoscaler reported"
    assert [(t.name, t.count, t.resources) for t in reported.node_types] == [
        ("head", 1, {"CPU": 0}), ("student", 3, {"CPU": 48, "GPU": 4}), ("spot", None, {"CPU": 16})]
    assert reported.max_resources == {"CPU": 200}


def test_find_sweep_dir_takes_a_folder_or_a_name(tmp_path):
    folder = tmp_path / "out" / "sweeps" / "quick-sweep-20250101-000000"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text("{}")
    assert find_sweep_dir(str(folder), "elsewhere") == folder.resolve()
    assert find_sweep_dir(folder.name, str(tmp_path / "out")) == folder.resolve()
    with pytest.raises(SweepError, match="no sweep folder holding sweep.json"):
        find_sweep_dir("quick-sweep-nope", str(tmp_path / "out"))
    for flag, kwargs in (("--samples", {"samples": 2}), ("--scheduler", {"scheduler": "fifo"}),
                         ("--max-concurrent", {"max_concurrent": 1})):
        with pytest.raises(SweepError, match=f"{flag}: a resumed sweep keeps the settings it started with"):
            resume_sweep(str(QUICK), [], str(DEMO_SPACE), str(folder), **kwargs)


def test_a_restarted_trial_continues_the_run_its_earlier_attempt_left(tmp_path):
    from raydistill.sweep.trial import earlier_attempt

    cfg = load_config(QUICK, [f"output_dir={tmp_path}", "name=quick-ab12c_00001"])
    assert earlier_attempt(cfg) is None
    runs = tmp_path / "runs"
    for name, has_config in (("quick-ab12c_00001-20250101-000000", True), ("quick-ab12c_00001-20250101-000100", True),
                             ("quick-ab12c_00001-20250101-000200", False),  # a folder without a run in it
                             ("quick-ab12c_00002-20250101-000300", True), ("quick-ab12c_000010-20250101-000400", True)):
        (runs / name).mkdir(parents=True)
        if has_config:
            (runs / name / "config.yaml").write_text("name: x\n")
    assert earlier_attempt(cfg) == runs / "quick-ab12c_00001-20250101-000100"


def test_prepare_sweep_applies_fixed_then_overrides_and_refuses_searched_keys():
    space = load_space(DEMO_SPACE)
    assert prepare_sweep(str(QUICK), [], space).train.eval_every == 10
    assert prepare_sweep(str(QUICK), ["train.eval_every=5"], space).train.eval_every == 5
    with pytest.raises(SweepError, match="'student.preset=tiny' sets a key the search space"):
        prepare_sweep(str(QUICK), ["student.preset=tiny"], space)
    with pytest.raises(SweepError, match="'balancer.params.k=3' sets a key"):
        prepare_sweep(str(QUICK), ["balancer.params.k=3"], space)
    no_eval = parse_space({"space": {"train.lr": {"uniform": [1e-4, 1e-3]}}}, "s.yaml")
    with pytest.raises(SweepError, match="set train.eval_every"):
        prepare_sweep(str(QUICK), [], no_eval)
    with pytest.raises(SweepError, match="distill.objective must be dsmd"):
        prepare_sweep(str(QUICK), ["train.eval_every=5", "distill.objective=ground_truth",
                                   "student.embed_dim=32"], no_eval)


# --------------------------------------------------------------------------------------------- results


ROWS = [
    {"trial_id": "a", "status": "finished", "config": {"student.preset": "test"}, "val_rsum": 50.0,
     "rsum": 40.0, "student_params": 100, "images_per_s": 900.0},
    {"trial_id": "b", "status": "finished", "config": {"student.preset": "demo"}, "val_rsum": 80.0,
     "rsum": 90.0, "student_params": 700, "images_per_s": 300.0},
    {"trial_id": "c", "status": "finished", "config": {"student.preset": "demo"}, "val_rsum": 80.0,
     "rsum": 60.0, "student_params": 700, "images_per_s": 350.0},
    {"trial_id": "d", "status": "finished", "config": {"student.preset": "test"}, "val_rsum": 30.0,
     "rsum": 35.0, "student_params": 100, "images_per_s": 950.0},
    {"trial_id": "e", "status": "stopped", "config": {"student.preset": "test"}, "val_rsum": 99.0,
     "rsum": None, "student_params": None, "images_per_s": None},
]


def test_pareto_marks_match_a_naive_front():
    marked = {r["trial_id"]: r for r in mark_pareto(ROWS)}
    size = {t for t, r in marked.items() if r["pareto_size"]}
    speed = {t for t, r in marked.items() if r["pareto_speed"]}
    assert size == naive_front(ROWS, "student_params", lower_x_better=True) == {"a", "b"}
    assert speed == naive_front(ROWS, "images_per_s", lower_x_better=False) == {"a", "b", "c", "d"}


def test_sorting_and_the_best_trial():
    assert [r["trial_id"] for r in sort_rows(ROWS)] == ["b", "c", "a", "d", "e"]
    assert [r["trial_id"] for r in sort_rows(ROWS, "val_rsum")] == ["e", "b", "c", "a", "d"]
    assert [r["trial_id"] for r in sort_rows(ROWS, "student_params")][:2] == ["a", "d"]
    with pytest.raises(ValueError, match="cannot sort a sweep table by 'speed'"):
        sort_rows(ROWS, "speed")
    # Stopped trials never win (no final evaluation); b and c tie on val RSUM 80: the smaller... same size,
    # so the first of them.
    assert best_row(ROWS)["trial_id"] == "b"
    assert best_row([r for r in ROWS if r["status"] == "stopped"]) is None


def test_table_and_result_files(tmp_path):
    rows = sort_rows(mark_pareto(ROWS))
    table = format_table(rows).splitlines()
    assert table[0].split()[:4] == ["P", "trial", "status", "student.preset"]
    by_trial = {line.split()[1]: line.split() for line in table[1:6]}
    assert by_trial["b"][0] == "*+" and by_trial["c"][0] == "+" and by_trial["e"][:3] == ["-", "e", "stopped"]
    assert by_trial["b"][-3:] == ["90", "0.0007", "300"]
    files = write_results(rows, tmp_path)
    with open(files["csv"], newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert [line["trial_id"] for line in lines] == ["b", "c", "a", "d", "e"]
    assert lines[0]["student.preset"] == "demo" and float(lines[0]["rsum"]) == 90.0
    assert lines[4]["rsum"] == "" and lines[0]["pareto_size"] == "True" and lines[1]["pareto_size"] == "False"
    assert json.loads(files["json"].read_text())[0]["trial_id"] == "b"
    for key in ("pareto_size", "pareto_speed"):
        with Image.open(files[key]) as image:
            assert image.size[0] > 100 and image.size[1] > 100


def test_sweep_counts_add_the_trials_to_the_cache_pass():
    cache = {"teacher_images_embedded": 200, "teacher_captions_embedded": 823, "dataset_images": 200,
             "dataset_captions": 823}
    rows = [{"trial_id": "a", "counts": {"teacher_images_embedded": 0, "teacher_captions_embedded": 0,
                                         "dataset_images": 200, "dataset_captions": 823}},
            {"trial_id": "b", "counts": {"teacher_images_embedded": 3, "teacher_captions_embedded": 11,
                                         "dataset_images": 200, "dataset_captions": 823}},
            {"trial_id": "c", "counts": None}]
    assert sweep_counts(cache, rows) == {"teacher_images_embedded": 203, "teacher_captions_embedded": 834,
                                         "dataset_images": 200, "dataset_captions": 823, "trials_counted": 2}


# --------------------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow database (migrations take seconds: once per module)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, template_db: Path):
    """A real ``mlflow server`` on localhost (SQLite backend), for the tracking-server case."""
    import socket
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("server")
    shutil.copy(template_db, root / "mlflow.db")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"), env=mlflow_server_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((root / "server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not come up: " + (root / "server.log").read_text()[-3000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path, template_db: Path) -> tuple[str, str]:
    """(tracking URI, experiment): a fresh SQLite file, or a fresh experiment on the tracking server."""
    if request.param == "sqlite":
        shutil.copy(template_db, tmp_path / "mlflow.db")
        return f"sqlite:///{tmp_path / 'mlflow.db'}", "sweeps"
    return request.getfixturevalue("mlflow_server"), f"sweeps-{tmp_path.name}"


def _child(store: tuple[str, str], parent: str, trial: str, config: dict, tmp: Path) -> Tracker:
    uri, experiment = store
    return Tracker(uri, experiment, run_name=f"run-{trial}", parent_run_id=parent, local_dir=tmp / trial,
                   tags={TRIAL_ID_TAG: trial, TRIAL_CONFIG_TAG: json.dumps(config)})


def _sweep_run(store: tuple[str, str], name: str, tmp: Path) -> Tracker:
    return Tracker(*store, run_name=name, tags={"raydistill.kind": "sweep"}, local_dir=tmp)


def test_stopped_trials_runs_are_killed_with_the_curve_tune_received(store, tmp_path):
    uri, experiment = store
    parent = _sweep_run(store, "sweep", tmp_path)
    stopped = _child(store, parent.run_id, "t1", {"student.preset": "test"}, tmp_path)
    stopped.log_metrics({"val_rsum": 10.0}, step=2)  # the worker sent step 2 before the trial was killed
    done = _child(store, parent.run_id, "t2", {"student.preset": "demo"}, tmp_path)
    done.log_metrics({"val_rsum": 30.0}, step=2)
    done.finish()
    rows = [{"trial_id": "t1", "status": "stopped", "history": [(2, 10.0), (4, 12.5)], "run_id": None},
            {"trial_id": "t2", "status": "finished", "history": [(2, 30.0)], "run_id": None}]
    _close_trial_runs(rows, uri, experiment, parent.run_id, tmp_path)

    client = MlflowClient(tracking_uri=uri)
    assert [r["run_id"] for r in rows] == [stopped.run_id, done.run_id]
    killed = client.get_run(stopped.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["raydistill.trial_status"] == "stopped"
    assert sorted((m.step, m.value) for m in client.get_metric_history(stopped.run_id, "val_rsum")) == [
        (2, 10.0), (4, 12.5)]
    assert client.get_run(done.run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(done.run_id, "val_rsum")] == [(2, 30.0)]


def test_a_run_a_restarted_trial_could_not_continue_ends_killed_as_superseded(store, tmp_path):
    uri, experiment = store
    parent = _sweep_run(store, "sweep", tmp_path)
    lost = _child(store, parent.run_id, "t1", {"student.preset": "test"}, tmp_path / "first")  # cut short
    final = _child(store, parent.run_id, "t1", {"student.preset": "test"}, tmp_path / "second")
    final.log_metrics({"val_rsum": 30.0}, step=2)
    final.finish()
    rows = [{"trial_id": "t1", "status": "finished", "history": [(2, 30.0)], "run_id": final.run_id}]
    _close_trial_runs(rows, uri, experiment, parent.run_id, tmp_path)

    client = MlflowClient(tracking_uri=uri)
    assert rows[0]["run_id"] == final.run_id
    superseded = client.get_run(lost.run_id)
    assert superseded.info.status == "KILLED" and superseded.data.tags["raydistill.trial_status"] == "superseded"
    assert client.get_run(final.run_id).info.status == "FINISHED"


def test_compare_reads_the_latest_sweep_from_mlflow(store, tmp_path, capsys):
    from raydistill.cli import main

    uri, experiment = store
    old = _sweep_run(store, "old-sweep", tmp_path)
    old.finish()
    parent = _sweep_run(store, "new-sweep", tmp_path)
    for row in ROWS:
        child = _child(store, parent.run_id, row["trial_id"], row["config"], tmp_path)
        metrics = {"val_rsum": row["val_rsum"]}
        if row["rsum"] is not None:
            metrics.update({"test/rsum": row["rsum"], "student_params": row["student_params"],
                            "test/images_per_s": row["images_per_s"]})
        child.log_metrics(metrics, step=8)
        child.finish("FINISHED" if row["status"] == "finished" else "KILLED")
    parent.finish()

    table = compare(uri, experiment)
    assert table["parent_run_id"] == parent.run_id and table["sweep"] == "new-sweep"
    assert [(r["trial_id"], r["status"]) for r in table["rows"]] == [
        ("b", "finished"), ("c", "finished"), ("a", "finished"), ("d", "finished"), ("e", "stopped")]
    assert {r["trial_id"] for r in table["rows"] if r["pareto_size"]} == naive_front(ROWS, "student_params", True)
    assert compare(uri, experiment, sweep="old-sweep")["rows"] == []
    with pytest.raises(SweepError, match="no run 'nope'"):
        compare(uri, experiment, sweep="nope")

    assert main(["compare", "--tracking-uri", uri, "--experiment", experiment, "--sort", "val_rsum", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("sweep "))  # after MLflow's own prints
    assert out[start].startswith("sweep new-sweep")
    assert [line.split()[1] for line in out[start + 2:start + 7]] == ["e", "b", "c", "a", "d"]
    assert json.loads(out[-1])["rows"][0]["trial_id"] == "e"


# --------------------------------------------------------------------------------------------- a real sweep


def _make_teacher(path: Path) -> None:
    """A tiny dual encoder (preset ``test``, 32-d) saved with its tokenizer: the sweep's teacher."""
    from raydistill.models.student import build_student, save_dual_encoder
    from raydistill.models.tokenizers import build_wordpiece_tokenizer

    words = "a the red green blue yellow purple circle square disc box star small large left right above below of"
    tokenizer = build_wordpiece_tokenizer([words] * 4, vocab_size=60)
    save_dual_encoder(build_student("test", embed_dim=32, vocab_size=len(tokenizer)), path, tokenizer=tokenizer)


def _overrides(root: Path, steps: int = STEPS, eval_every: int = EVAL_EVERY,
               experiment: str = "sweep-test") -> list[str]:
    return ["teacher.kind=raydistill", f"teacher.checkpoint={root / 'teacher'}", "data.synth.n_images=200",
            f"train.steps={steps}", "train.batch_size=32", f"train.eval_every={eval_every}", "train.log_every=2",
            f"train.checkpoint_every={steps}", "distill.queue_size=64", "student.vocab_size=200",
            f"output_dir={root / 'out'}", "ray.num_cpus=8", "ray.shuffle_partitions=2",
            f"tracking.experiment={experiment}"]


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ, RAYDISTILL_HOME=str(root / "home"), MLFLOW_ENABLE_ASYNC_LOGGING="false",
               PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sweep")
    _make_teacher(root / "teacher")
    (root / "space.yaml").write_text(TEST_SPACE)
    proc = subprocess.run(
        [sys.executable, "-m", "raydistill.cli", "tune", str(QUICK), *_overrides(root), "--space", "space.yaml",
         "--max-concurrent", "2", "--json"],
        cwd=root, env=_env(root), capture_output=True, text=True, timeout=HANG,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"root": root, "summary": summary, "stderr": proc.stderr}


def test_sweep_runs_the_grid_and_the_scheduler_decides_each_trial(sweep):
    summary = sweep["summary"]
    trials = summary["trials"]
    assert sorted(t["config"]["student.preset"] for t in trials) == ["demo", "test"]
    log_path = Path(summary["sweep_dir"]) / "scheduler_log.jsonl"
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    # Every decision is the one ASHA's rule gives on the results in the order the scheduler saw them.
    assert [e["decision"] for e in events] == naive_asha(
        [(e["trial_id"], e["step"], e["val_rsum"]) for e in events], grace=EVAL_EVERY, max_t=STEPS - 1)
    told_to_stop = {e["trial_id"] for e in events if e["decision"] == "STOP"}
    for t in trials:
        steps = [e["step"] for e in events if e["trial_id"] == t["trial_id"]]
        assert steps == sorted(steps) and steps[0] == EVAL_EVERY and all(s % EVAL_EVERY == 0 for s in steps)
        if t["trial_id"] in told_to_stop:
            assert t["status"] == "stopped" and t["rsum"] is None and t["steps"] < STEPS
        else:
            assert t["status"] == "finished" and t["steps"] == STEPS and 0 <= t["rsum"] <= 600
            assert t["student_params"] > 0 and t["images_per_s"] > 0
    best = summary["best"]
    finished = [t for t in trials if t["status"] == "finished"]
    assert best["val_rsum"] == max(t["val_rsum"] for t in finished)
    assert best["config"] in [t["config"] for t in finished]


def test_the_teacher_embedded_each_image_and_caption_once_for_the_whole_sweep(sweep):
    from raydistill.data.synth import ensure_synth_dataset

    summary = sweep["summary"]
    os.environ["RAYDISTILL_HOME"] = str(sweep["root"] / "home")
    try:
        dataset = ensure_synth_dataset(sweep["root"] / "home" / "synth", n_images=200, image_size=48, seed=0,
                                       captions_per_image=(3, 5))
    finally:
        os.environ.pop("RAYDISTILL_HOME")
    images = json.loads(dataset.read_text())["images"]
    assert len(images) == 200
    n_captions = sum(len(i["sentences"]) for i in images)
    assert summary["dataset_images"] == 200 and summary["dataset_captions"] == n_captions
    assert summary["teacher_images_embedded"] == 200
    assert summary["teacher_captions_embedded"] == n_captions
    assert summary["trials_counted"] == sum(t["status"] == "finished" for t in summary["trials"])


def test_mlflow_holds_the_sweep_and_one_child_run_per_trial(sweep):
    summary = sweep["summary"]
    uri = summary["mlflow_tracking_uri"]
    assert uri == f"sqlite:///{sweep['root'] / 'out' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["raydistill.kind"] == "sweep"
    assert parent.data.params["sweep.scheduler"] == "asha" and parent.data.params["base.train.steps"] == str(STEPS)
    assert parent.data.metrics["best/val_rsum"] == summary["best"]["val_rsum"]
    children = {r["tags"][TRIAL_ID_TAG]: r for r in read_runs(uri, "sweep-test", summary["parent_run_id"])}
    assert set(children) == {t["trial_id"] for t in summary["trials"]}
    for t in summary["trials"]:
        run = children[t["trial_id"]]
        assert run["run_id"] == t["run_id"]
        assert json.loads(run["tags"][TRIAL_CONFIG_TAG]) == t["config"]
        assert run["params"]["student.preset"] == t["config"]["student.preset"]
        assert run["params"]["balancer.kind"] == "dsmd"  # the config's, in every trial
        assert run["params"]["cache.mode"] == "cache"
        history = sorted((m.step, m.value) for m in client.get_metric_history(t["run_id"], "val_rsum"))
        assert [s for s, _ in history] == list(range(EVAL_EVERY, t["steps"] + 1, EVAL_EVERY))
        assert history[-1][1] == pytest.approx(t["val_rsum"])
        if t["status"] == "finished":
            assert run["status"] == "FINISHED"
            assert run["metrics"]["test/rsum"] == pytest.approx(t["rsum"])
            assert run["metrics"]["student_params"] == t["student_params"]
            assert run["metrics"]["test/images_per_s"] > 0 and run["metrics"]["test/captions_per_s"] > 0
            assert run["metrics"]["teacher_images_embedded"] == 0
        else:
            assert run["status"] == "KILLED"


def test_concurrent_trials_did_not_lose_tracking_to_a_locked_database(sweep):
    assert "database is locked" not in sweep["stderr"]
    # A tracker that could not write keeps its records in tracking/metrics.jsonl: there must be none.
    assert not list((sweep["root"] / "out").rglob("metrics.jsonl"))


def test_sweep_artifacts_and_pareto_marks(sweep):
    summary = sweep["summary"]
    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    logged = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"results.csv", "results.json", "pareto_params.png", "pareto_throughput.png", "best_config.yaml",
            "scheduler_log.jsonl", "space.yaml", "config.yaml"} <= logged
    with Image.open(summary["results"]["pareto_size"]) as image:
        assert image.format == "PNG"
    trials = summary["trials"]
    assert {t["trial_id"] for t in trials if t["pareto_size"]} == naive_front(trials, "student_params", True)
    assert {t["trial_id"] for t in trials if t["pareto_speed"]} == naive_front(trials, "images_per_s", False)
    rsums = [t["rsum"] for t in trials if t["rsum"] is not None]
    assert rsums == sorted(rsums, reverse=True)


def test_compare_prints_the_sweep_from_mlflow(sweep, capsys):
    from raydistill.cli import main

    summary = sweep["summary"]
    code = main(["compare", "--tracking-uri", summary["mlflow_tracking_uri"], "--experiment", "sweep-test", "--json"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    table = json.loads(out[-1])
    assert table["parent_run_id"] == summary["parent_run_id"]
    got = [(r["trial_id"], r["status"], r["rsum"], r["pareto_size"]) for r in table["rows"]]
    assert got == [(t["trial_id"], t["status"], t["rsum"], t["pareto_size"]) for t in summary["trials"]]


def test_best_config_validates_and_finds_the_sweeps_complete_cache(sweep, monkeypatch):
    from raydistill.config import config_from_dict
    from raydistill.data.source import source_identity
    from raydistill.pipeline.teacher_side import open_teacher_side

    summary = sweep["summary"]
    path = Path(summary["best_config"])
    assert path.read_text().startswith(f"# raydistill run {path}")
    monkeypatch.chdir(sweep["root"])  # where the sweep ran: its output_dir
    monkeypatch.setenv("RAYDISTILL_HOME", str(sweep["root"] / "home"))
    cfg = load_config(path)
    assert cfg.student.preset == summary["best"]["config"]["student.preset"]
    assert cfg.balancer.kind == "dsmd"
    assert cfg.train.steps == STEPS and cfg.teacher.checkpoint == str(sweep["root"] / "teacher")
    # A run of it finds every image in the sweep's cache: in cache mode the run's own check (which refuses a
    # missing, stale or incomplete cache without loading the teacher) passes. A cache-mode run from such a cache
    # runs end to end in tests/test_e2e_run.py.
    raw = cfg.model_dump(mode="json")
    raw["cache"]["mode"] = "cache"
    side = open_teacher_side(config_from_dict(raw, origin=str(path)), source_identity(cfg))
    assert side.cache.uri == summary["cache_dir"]
    assert set(side.cache.complete_splits()) >= {cfg.data.train_split, cfg.data.test_split}


# --------------------------------------------------------------------------------------------- an interrupted sweep

# Two trials of the `test` student, one at a time, run to the end (fifo), validated once at their last step: the
# fewest trials and the least work per trial that still leave one trial finished and one to resume.
RESUME_SPACE = "description: two learning rates\nspace:\n  train.lr: {grid: [1.0e-3, 2.0e-3]}\n"


def _wait_for_line(log_path: Path, pattern: str, proc: subprocess.Popen) -> re.Match:
    """The first match of ``pattern`` in the growing log of ``proc``; fails if the process ends first."""
    import time

    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        found = re.search(pattern, log_path.read_text(), re.MULTILINE)
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the sweep exited ({proc.returncode}) before {pattern!r}:\n{log_path.read_text()[-6000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {pattern!r} after {HANG} s")


def test_an_interrupted_sweep_resumes_into_its_parent_run_without_rerunning_finished_trials(sweep):
    """Ctrl-C (SIGINT to the sweep's pid) once a trial has ended, then ``--resume``: every trial ends with a
    result, the trial that had finished keeps its one run (not trained again), the parent run is the same and
    ends FINISHED. Shares the module sweep's folder, so its data, teacher and filled cache are reused."""
    import signal

    root = sweep["root"]
    (root / "resume-space.yaml").write_text(RESUME_SPACE)
    command = [sys.executable, "-m", "raydistill.cli", "tune", str(QUICK),
               *_overrides(root, steps=4, eval_every=4, experiment="resume-test"), "student.preset=test",
               "train.shuffle=files", "--space", "resume-space.yaml"]  # files: no shuffle exchange per epoch
    log_path = root / "interrupted.log"
    with open(log_path, "w") as stderr:
        proc = subprocess.Popen([*command, "--scheduler", "fifo", "--max-concurrent", "1"], cwd=root, env=_env(root),
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            ended = _wait_for_line(log_path, r"trial (\S+) ended$", proc).group(1)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=HANG) == 130, log_path.read_text()[-6000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    name = re.search(r"--resume (\S+)$", log_path.read_text(), re.MULTILINE).group(1)
    record = json.loads((root / "out" / "sweeps" / name / "sweep.json").read_text())
    uri, parent_id = record["tracking_uri"], record["parent_run_id"]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(parent_id).info.status == "KILLED"
    finished = {r["tags"][TRIAL_ID_TAG]: r for r in read_runs(uri, "resume-test", parent_id)}[ended]
    assert finished["status"] == "FINISHED"
    run_dirs = sorted((root / "out" / "runs").glob(f"quick-{ended}-*"))
    assert len(run_dirs) == 1
    result_before = (run_dirs[0] / "result.json").read_text()

    proc = subprocess.run([*command, "--resume", name, "--json"], cwd=root, env=_env(root), capture_output=True,
                          text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "restoring Tune's experiment" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["sweep"] == name and summary["parent_run_id"] == parent_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 2
    trials = summary["trials"]
    assert sorted(t["config"]["train.lr"] for t in trials) == [1e-3, 2e-3]
    assert all(t["status"] == "finished" and 0 <= t["rsum"] <= 600 and t["steps"] == 4 for t in trials)
    # The finished trial was not trained again: the same run, folder and result; nothing new logged to it.
    assert next(t for t in trials if t["trial_id"] == ended)["run_id"] == finished["run_id"]
    assert sorted((root / "out" / "runs").glob(f"quick-{ended}-*")) == run_dirs
    assert (run_dirs[0] / "result.json").read_text() == result_before
    assert client.get_run(finished["run_id"]).info.end_time == finished["end_time"]
    # One finished child run per trial, the one the summary names; none left running.
    children = read_runs(uri, "resume-test", parent_id)
    assert not [r for r in children if r["status"] == "RUNNING"]
    for t in trials:
        assert [r["run_id"] for r in children if r["tags"][TRIAL_ID_TAG] == t["trial_id"]
                and r["status"] == "FINISHED"] == [t["run_id"]]
