"""The `raydistill` command line: overrides anywhere, one message per error with the right exit status, the
traceback only for faults (or with --debug), and a JSON object on failure with --json."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from raydistill import cli, commands
from raydistill.data.records import DataError

REPO = Path(__file__).resolve().parents[1]


def test_the_module_entry_point_reports_a_bad_config_with_status_2(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    proc = subprocess.run([sys.executable, "-m", "raydistill.cli", "run", str(missing), "--json"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"raydistill: error: config file not found: {missing}"]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "error": f"config file not found: {missing}", "kind": "user"}


def test_overrides_are_accepted_anywhere_on_the_line() -> None:
    parser = cli.build_parser()
    args, debug = cli._split_overrides(parser, ["eval", "configs/quick.yaml", "--student", "runs/x/student",
                                                "train.lr=1e-3", "--teacher", "data.limit_images=5"])
    assert args.overrides == ["train.lr=1e-3", "data.limit_images=5"]
    assert (args.config, args.student, args.teacher, debug) == ("configs/quick.yaml", "runs/x/student", True, False)
    with pytest.raises(SystemExit):
        cli._split_overrides(parser, ["eval", "configs/quick.yaml", "--no-such-flag"])


def _failing(err: BaseException):
    def command(args):
        raise err
    return command


@pytest.mark.parametrize(
    "error, status, kind, message, traceback_shown",
    [
        (DataError("m.jsonl: row with image 'b.jpg': has both 'caption' and 'captions'; use one"), 2, "user",
         "m.jsonl: row with image 'b.jpg': has both 'caption' and 'captions'; use one", False),
        (OSError(errno.ENOSPC, "No space left on device", "/data/cache/parts/train/part-1.parquet"), 1, "failure",
         "/data/cache/parts/train/part-1.parquet: No space left on device; free some space", False),
        (ZeroDivisionError("a bug"), 1, "failure", "ZeroDivisionError: a bug", True),
    ],
)
def test_each_failure_is_one_message_with_its_status(monkeypatch, capsys, error, status, kind, message,
                                                     traceback_shown) -> None:
    from raydistill.pipeline.run_folder import CURRENT_RUN

    monkeypatch.setattr(commands, "cmd_embed", _failing(error))
    monkeypatch.setitem(CURRENT_RUN, "run_dir", None)
    assert cli.main(["embed", "configs/quick.yaml", "--json"]) == status
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith(f"raydistill: error: {message}")
    assert ("Traceback" in err) == traceback_shown
    result = json.loads(out.strip().splitlines()[-1])
    assert result["kind"] == kind and result["error"].startswith(message)
    # --debug shows the traceback of a user error too.
    assert cli.main(["embed", "configs/quick.yaml", "--debug"]) == status
    assert "Traceback" in capsys.readouterr().err


def test_a_user_error_raised_in_a_ray_task_is_reported_as_itself(monkeypatch, capsys) -> None:
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        @ray.remote(max_retries=0)
        def read() -> None:
            raise DataError("shards/a.tar: member k.txt: not valid UTF-8 at byte 3")

        def command(args):
            ray.get(read.remote())

        monkeypatch.setattr(commands, "cmd_embed", command)
        monkeypatch.setattr(commands, "shutdown_ray", lambda: None)
        assert cli.main(["embed", "configs/quick.yaml"]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == ["raydistill: error: shards/a.tar: member k.txt: not valid UTF-8 at byte 3"]
    finally:
        ray.shutdown()


def test_only_a_run_that_uses_the_demo_teacher_fits_it_first(monkeypatch) -> None:
    """`raydistill run configs/demo-teacher.yaml` (ground truth, no teacher) must not fit a demo teacher before
    fitting one; a DSMD run naming the demo teacher gets it first."""
    from raydistill import demo
    from raydistill.config import load_config
    from raydistill.demo_assets import config_path

    fitted = []
    monkeypatch.setattr(demo, "ensure_demo_teacher", lambda quick=False: fitted.append(quick))
    commands._ensure_demo_teacher(load_config(config_path("demo-teacher.yaml")))
    assert fitted == []
    commands._ensure_demo_teacher(load_config(config_path("demo.yaml")))
    assert fitted == [False]
