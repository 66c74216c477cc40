"""The driver killed: `raydistill run --resume` continues the run from its last checkpoint to the planned step,
and ends in the state of a run never interrupted.

The real command runs in a subprocess with its own local Ray instance, shuffling on (a seeded global order and
a window shuffle). The Train worker is told to stall at step 4 (``RAYDISTILL_STALL_WORKER_AT``), after the
step-3 checkpoint is on disk, in the middle of the first epoch's stream through the teacher; the test then
kills the driver and every process it started with SIGKILL, as a machine dying would, and resumes the run by
its folder: the partly filled cache is completed, and the epoch goes on from the cache in the same order.
(`raydistill embed` resuming a partial cache is tested in tests/test_reliability.py, on a cache whose teacher
actor is killed mid-pass.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from e2e_helpers import REPO, assert_same_state, make_tiny_teacher, tiny_overrides, uninterrupted_reference
from raydistill.pipeline.run_folder import load_run_config
from raydistill.pipeline.trainer import STATE_FILE, latest_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STEPS = 6  # checkpoints every 3 steps (tiny_overrides); the worker stalls at step 4


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process, from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        out[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _started_at(pid: int) -> float | None:
    """The start time of the process ``pid`` (psutil's ``create_time``), or None when there is none."""
    import ray  # noqa: F401 - psutil is the copy Ray ships, on the import path once ray is imported
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def test_a_killed_driver_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    teacher = make_tiny_teacher(tmp_path / "teacher")
    out = tmp_path / "out"
    marker = tmp_path / "stalled"
    overrides = tiny_overrides(teacher, out, steps=STEPS) + ["ray.num_cpus=6", "ray.dashboard=false"]
    env = dict(os.environ, RAYDISTILL_STALL_WORKER_AT=f"4:{marker}")
    command = [sys.executable, "-m", "raydistill.cli", "run"]
    log = tmp_path / "first.log"

    with open(log, "w") as sink:
        proc = subprocess.Popen([*command, str(REPO / "configs" / "quick.yaml"), *overrides, "--json"], cwd=tmp_path,
                                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    records: list[Path] = []
    try:
        _wait_for(marker.exists, proc, log, "stall at step 4", timeout=480)
        runs = list((out / "runs").iterdir())
        assert len(runs) == 1
        run_dir = runs[0]
        checkpoints = out / "ray_train" / run_dir.name
        _wait_for(lambda: latest_checkpoint(checkpoints) is not None, proc, log, "checkpoint on disk", timeout=120)
        records = list((Path(os.environ["RAYDISTILL_HOME"]) / "local-instances").glob("*.json"))
        assert len(records) == 1  # the instance this driver started, recorded
        entry = json.loads(records[0].read_text())
        session = entry["session_dir"]
        # Ray's agents retitle themselves (no session folder on their command line); they are recorded too.
        assert any("ray::DashboardAgent" in " ".join(_cmdline(int(pid))) for pid in entry["started"])
    finally:
        # The driver alone, as `kill -9 <pid>` would: whatever of its instance survives it is left to the next
        # command to end (it was started in its own session, so nothing else here is touched).
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert marker.read_text() == "stalled at step 4\n"
    assert torch.load(latest_checkpoint(checkpoints) / STATE_FILE, weights_only=True)["step"] == 3
    assert not (run_dir / "result.json").exists()

    resumed = subprocess.run([*command, "--resume", str(run_dir), "--json"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    # Nothing of the killed driver's instance is left: the resume ended what had outlived it.
    left = [pid for pid in _processes() if session in " ".join(_cmdline(pid))]
    assert left == []
    assert [pid for pid, started in entry["started"].items() if _started_at(int(pid)) == started] == []
    assert not records[0].exists()
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["run_dir"] == str(run_dir)
    assert summary["steps"] == summary["planned_steps"] == STEPS
    assert summary["resumed_from_step"] == 3
    state = torch.load(Path(summary["checkpoint"]) / STATE_FILE, weights_only=True)
    assert state["step"] == STEPS and state["balancer"]["_extra_state"]["step"] == STEPS
    assert json.loads((run_dir / "result.json").read_text())["steps"] == STEPS
    # The driver shows the training's progress to the last step (the workers' own output goes to Ray's logs).
    assert f"[raydistill] training: {STEPS}/{STEPS} (100%)" in resumed.stderr

    # The student, optimizer, schedule, balancer and queues of the uninterrupted run of the same seed.
    reference, outputs = uninterrupted_reference(load_run_config(run_dir), run_dir, Path(summary["cache_dir"]), STEPS)
    assert_same_state(state, reference.state_dict())

    # One MLflow run, continued: every step's loss logged exactly once across the two drivers.
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    logged = sorted(client.get_metric_history(summary["run_id"], "loss/contrastive"), key=lambda m: m.step)
    assert [m.step for m in logged] == list(range(1, STEPS + 1))
    assert [m.value for m in logged] == pytest.approx([outputs[k]["loss/contrastive"] for k in range(1, STEPS + 1)])
    experiment = client.get_experiment(run.info.experiment_id)
    assert len(client.search_runs([experiment.experiment_id])) == 1
