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
from raydistill.search_space import load_space, parse_space
from raydistill.sweep_results import (
    TRIAL_CONFIG_TAG,
    TRIAL_ID_TAG,
    best_row,
    format_table,
    mark_pareto,
    sort_rows,
    write_results,
)
from raydistill.tracking import Tracker, read_runs
from raydistill.tune import (
    SweepError,
    _close_trial_runs,
    asha_settings,
    compare,
    default_max_concurrent,
    prepare_sweep,
    sweep_counts,
    trial_bundles,
)

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
    from raydistill.tune_trial import LoggedASHA

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


def test_trial_bundles_reserve_the_driver_and_its_own_tasks():
    assert trial_bundles(load_config(QUICK)) == [{"CPU": 1.0}, {"CPU": 1.0}]
    gpu_pool = load_config(QUICK, ["teacher.pool.num_cpus=4", "teacher.pool.num_gpus=1",
                                   "teacher.pool.resources={teacher_node: 1}"])
    assert trial_bundles(gpu_pool) == [{"CPU": 1.0}, {"CPU": 4.0, "GPU": 1.0, "teacher_node": 1.0}]


def test_default_max_concurrent_counts_what_one_trial_reserves():
    cfg = load_config(QUICK, ["train.eval_every=10"])
    assert default_max_concurrent(cfg, cpus=8, gpus=0) == 2  # 8 // (1 driver + 1 tasks + 1 worker)
    assert default_max_concurrent(cfg, cpus=2, gpus=0) == 1  # never below one
    wide = load_config(QUICK, ["train.num_workers=2", "train.cpus_per_worker=2"])
    assert default_max_concurrent(wide, cpus=16, gpus=0) == 2  # 16 // (2 + 2 x 2)
    assert default_max_concurrent(wide, cpus=64, gpus=3) == 1  # 3 GPUs // 2 GPU workers
    assert default_max_concurrent(load_config(QUICK, ["train.use_gpu='no'"]), cpus=9, gpus=1) == 3
    gpu_pool = load_config(QUICK, ["teacher.pool.num_gpus=1"])
    assert default_max_concurrent(gpu_pool, cpus=64, gpus=4) == 2  # 4 // (1 probe + 1 worker)


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
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"),
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


def _overrides(root: Path) -> list[str]:
    return [f"teacher.kind=raydistill", f"teacher.checkpoint={root / 'teacher'}", "data.synth.n_images=200",
            f"train.steps={STEPS}", "train.batch_size=32", f"train.eval_every={EVAL_EVERY}", "train.log_every=2",
            f"train.checkpoint_every={STEPS}", "distill.queue_size=64", "student.vocab_size=200",
            f"output_dir={root / 'out'}", "ray.num_cpus=8", "tracking.experiment=sweep-test"]


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


def test_best_config_validates_and_runs(sweep):
    summary = sweep["summary"]
    path = Path(summary["best_config"])
    assert path.read_text().startswith(f"# raydistill run {path}")
    cfg = load_config(path)
    assert cfg.student.preset == summary["best"]["config"]["student.preset"]
    assert cfg.balancer.kind == "dsmd"
    assert cfg.train.steps == STEPS and cfg.teacher.checkpoint == str(sweep["root"] / "teacher")
    proc = subprocess.run([sys.executable, "-m", "raydistill.cli", "run", str(path), "--json"], cwd=sweep["root"],
                          env=_env(sweep["root"]), capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-6000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["steps"] == STEPS and 0 <= run["metrics"]["student"]["rsum"] <= 600
    # The sweep's cache is complete: the best config's run finds every image there.
    assert run["teacher_images_embedded"] == 0
