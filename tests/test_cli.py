"""The `raydistill` entry point's exit: main's status, every thread and exit handler, flushed output."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# main() is replaced by one that leaves work for the exit sequence: a non-daemon thread still writing, an atexit
# handler, and output still in stdout's buffer (a pipe is block-buffered).
SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    from pathlib import Path
    import raydistill.cli as cli

    out = Path(sys.argv[1])

    def late_writer():
        time.sleep(0.5)
        (out / "thread.txt").write_text("joined")

    def fake_main():
        threading.Thread(target=late_writer).start()
        atexit.register(lambda: (out / "atexit.txt").write_text((out / "thread.txt").read_text() + " then atexit"))
        sys.stdout.write("x" * 100_000 + " last words")
        return int(sys.argv[2])

    cli.main = fake_main
    cli.console_main()
    (out / "after.txt").write_text("console_main returned")
""")


@pytest.mark.parametrize("status", [0, 3])
def test_console_main_exits_with_mains_status_after_threads_handlers_and_output(tmp_path: Path, status: int) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(status)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert proc.stdout == "x" * 100_000 + " last words"
    # The thread was joined before the exit handlers ran, as at a normal interpreter exit.
    assert (tmp_path / "atexit.txt").read_text() == "joined then atexit"
    assert not (tmp_path / "after.txt").exists()  # the process ended inside console_main


def test_the_module_entry_point_reports_a_bad_config_with_status_2(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    proc = subprocess.run([sys.executable, "-m", "raydistill.cli", "run", str(missing)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("raydistill: error:")
    assert str(missing) in proc.stderr
