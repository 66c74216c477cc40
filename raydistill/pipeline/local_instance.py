"""The processes of a local Ray instance that raydistill started, recorded so that none outlives its driver.

A local instance's processes (GCS, raylet, dashboard, their agents, workers) normally end with the driver that
started them; a driver killed outright can leave some behind (the dashboard and runtime-env agents, reparented
to init). :func:`record` writes the instance's processes (those whose command line names its session folder,
and their descendants: the agents retitle themselves ``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``), each
with its start time, and the driver's id, to ``$RAYDISTILL_HOME/local-instances/<session>.json``; :func:`forget`
removes the record at a clean shutdown; and :func:`end_orphans`, run by every ``raydistill`` command before it
starts Ray, ends the recorded processes of instances whose driver is gone. A process is ended only if the
process with that id started when the recorded one did, so an id the system has since given to another program
is left alone.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

# psutil is the copy Ray ships (ray/thirdparty_files), on the import path once `ray` is imported.
import ray  # noqa: F401
from raydistill.paths import raydistill_home, write_text_atomically


def _records() -> Path:
    return raydistill_home() / "local-instances"


def _session_processes(session_dir: str) -> list[int]:
    """Process ids whose command line names the instance's session folder."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(session_dir in part for part in (proc.info["cmdline"] or [])):
                found.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


#: The session folder of the local instance this process started and recorded (None: none).
STARTED: dict[str, str | None] = {"session_dir": None}


def record(session_dir: str | None = None) -> Path | None:
    """Write (or refresh: agents start after the raylet) the record of this driver's local instance."""
    session_dir = session_dir or STARTED["session_dir"]
    if session_dir is None:
        return None
    STARTED["session_dir"] = session_dir
    path = _records() / f"{Path(session_dir).name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    started = _with_descendants(set(_session_processes(session_dir)) - {os.getpid()})
    write_text_atomically(path, json.dumps({"driver": os.getpid(), "session_dir": session_dir,
                                            "pids": sorted(started), "started": {str(p): t for p, t in started.items()}}))
    return path


def _with_descendants(pids: set[int]) -> dict[int, float]:
    """``pids`` and all their descendants, each with its start time (``psutil.Process.create_time``)."""
    import psutil

    started: dict[int, float] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for member in [proc, *proc.children(recursive=True)]:
                started[member.pid] = member.create_time()
        except psutil.NoSuchProcess:
            continue
    return started


def forget() -> None:
    """Remove the record of the instance this process started (it is shutting down cleanly)."""
    if STARTED["session_dir"] is not None:
        (_records() / f"{Path(STARTED['session_dir']).name}.json").unlink(missing_ok=True)
        STARTED["session_dir"] = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_orphans(grace_s: float = 5.0) -> list[int]:
    """End the recorded processes of every local instance whose driver is gone; returns the ids ended."""
    import psutil

    ended: list[int] = []
    folder = _records()
    if not folder.is_dir():
        return ended
    for path in sorted(folder.glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if _alive(int(entry["driver"])):
            continue
        session, started = entry["session_dir"], entry.get("started", {})
        victims = []
        for pid in entry["pids"]:
            try:
                proc = psutil.Process(pid)
                if str(pid) in started:
                    same = abs(proc.create_time() - started[str(pid)]) < 0.01
                else:  # a record written before start times were: the command line must name the session
                    same = any(session in part for part in proc.cmdline())
                if same:
                    proc.send_signal(signal.SIGTERM)
                    victims.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        _, alive = psutil.wait_procs(victims, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        ended.extend(p.pid for p in victims)
        path.unlink(missing_ok=True)
    if ended:
        time.sleep(0.1)
    return ended
