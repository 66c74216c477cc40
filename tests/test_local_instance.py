"""A local Ray instance's processes never outlive their driver: recorded, and ended by the next command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydistill.pipeline import local_instance


def _sleeper(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *args])


def test_the_orphans_of_a_dead_driver_are_ended_and_nothing_else(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYDISTILL_HOME", str(tmp_path / "home"))
    session = str(tmp_path / "session_2026-01-01_00-00-00_1")
    agent = _sleeper(f"--session-dir={session}")  # an agent of the dead driver's instance
    bystander = _sleeper("--session-dir=/elsewhere")  # a process that later got a recorded pid
    dead_driver = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_driver.wait()
    try:
        records = tmp_path / "home" / "local-instances"
        records.mkdir(parents=True)
        (records / "session_2026-01-01_00-00-00_1.json").write_text(json.dumps(
            {"driver": dead_driver.pid, "session_dir": session, "pids": [agent.pid, bystander.pid]}))
        assert local_instance.end_orphans(grace_s=5) == [agent.pid]
        assert agent.wait(timeout=10) is not None
        assert bystander.poll() is None  # still running: its command line names another session
        assert not list(records.iterdir())
        # A record whose driver still runs (this process) is left as it is.
        (records / "live.json").write_text(json.dumps({"driver": os.getpid(), "session_dir": session,
                                                       "pids": [bystander.pid]}))
        assert local_instance.end_orphans() == [] and (records / "live.json").exists()
    finally:
        for proc in (agent, bystander):
            proc.kill()
            proc.wait()


def test_record_names_the_session_processes_and_forget_removes_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYDISTILL_HOME", str(tmp_path / "home"))
    session = str(tmp_path / "session_x")
    agent = _sleeper(f"--temp-dir={session}")
    try:
        path = local_instance.record(session)
        entry = json.loads(path.read_text())
        assert agent.pid in entry["pids"] and entry["session_dir"] == session
        local_instance.forget()
        assert not path.exists()
    finally:
        agent.kill()
        agent.wait()


def test_descendants_are_recorded_with_start_times_and_ended_with_the_session(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    monkeypatch.setenv("RAYDISTILL_HOME", str(tmp_path / "home"))
    session = str(tmp_path / "session_2026-01-01_00-00-00_2")
    # A process of the instance (its command line names the session) whose child does not name it, as Ray's
    # agents retitle themselves `ray::DashboardAgent`.
    spawn = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", spawn, f"--session-dir={session}"])
    bystander = _sleeper()
    dead_driver = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_driver.wait()
    try:
        for _ in range(100):
            children = psutil.Process(parent.pid).children()
            if children:
                break
            time.sleep(0.1)
        child = children[0]
        path = local_instance.record(session)
        entry = json.loads(path.read_text())
        assert {parent.pid, child.pid} <= set(entry["pids"])
        assert entry["started"][str(child.pid)] == child.create_time()
        # The driver is gone; the bystander holds a recorded id but started at another time (an id reused).
        entry.update(driver=dead_driver.pid, pids=[*entry["pids"], bystander.pid])
        entry["started"][str(bystander.pid)] = psutil.Process(bystander.pid).create_time() - 60
        path.write_text(json.dumps(entry))
        assert sorted(local_instance.end_orphans(grace_s=5)) == sorted([parent.pid, child.pid])
        gone, alive = psutil.wait_procs([child], timeout=10)
        assert gone and not alive and parent.wait(timeout=10) is not None
        assert bystander.poll() is None and not path.exists()
    finally:
        for proc in (parent, bystander):
            proc.kill()
            proc.wait()


def test_the_module_works_in_a_process_that_has_not_imported_ray(tmp_path: Path) -> None:
    # psutil comes with Ray: the module must not depend on an earlier `import ray` somewhere else.
    # (The session folder comes by the environment: a command line naming it would be a process of it.)
    code = ("import os; from raydistill.pipeline import local_instance; "
            "print(local_instance.end_orphans(), local_instance._session_processes(os.environ['SESSION']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAYDISTILL_HOME": str(tmp_path),
                              "SESSION": str(tmp_path / "session_none")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[] []"
