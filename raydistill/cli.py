"""The ``raydistill`` command: thin entry points that wire library pieces together.

Every sub-command that takes ``--json`` prints exactly one JSON object as the last line of standard output;
progress and logs go to standard error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from raydistill import commands
from raydistill.jobs import DEFAULT_DASHBOARD_PORT
from raydistill.sweep.driver import SCHEDULERS

# Quiet, deterministic defaults before Ray or MLflow are imported anywhere.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydistill",
        description="Distil large image-text models into small dual encoders with DSMD on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, optional: bool = False) -> None:
        p.add_argument("config", nargs="?" if optional else None, help="experiment YAML (see configs/)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-3")
        p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")

    p = sub.add_parser("demo", help="the embedded end-to-end demo (no GPU, no network)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of the same path: 400 scenes, 10 steps per arm")
    p.add_argument("--seeds", type=int, default=None, help="seeds per student arm (default: 1; 2 for the spread)")
    p.add_argument("--output-dir", default="raydistill_runs/demo", help="where runs and the MLflow store go")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=commands.cmd_demo)

    p = sub.add_parser("run", help="train a student: teacher -> cache/stream -> Ray Train -> eval -> MLflow")
    with_config(p, optional=True)
    p.add_argument("--resume", metavar="RUN", help="continue a run (its name or folder) from its last checkpoint")
    p.set_defaults(func=commands.cmd_run)

    p = sub.add_parser("embed", help="fill (or resume) the teacher-embedding cache")
    with_config(p)
    p.set_defaults(func=commands.cmd_embed)

    p = sub.add_parser("eval", help="retrieval recall of a saved student and/or the teacher")
    with_config(p)
    p.add_argument("--student", help="a student folder saved by raydistill (run_dir/student)")
    p.add_argument("--teacher", action="store_true", help="also evaluate the config's teacher")
    p.add_argument("--split", help="split to evaluate (default data.test_split)")
    p.set_defaults(func=commands.cmd_eval)

    p = sub.add_parser("data", help="dataset utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="generate the synthetic captioned-scenes dataset (Karpathy format)")
    s.add_argument("--out", required=True, help="new folder to write into")
    s.add_argument("--n-images", type=int, default=1500)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--min-captions", type=int, default=3)
    s.add_argument("--max-captions", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=commands.cmd_data_synth)

    _add_sweep_commands(sub)
    _add_cluster_commands(sub)
    return parser


def _add_sweep_commands(subparsers: Any) -> None:
    """Add ``tune`` and ``compare`` to the ``raydistill`` command."""
    p = subparsers.add_parser("tune", help="search students with Ray Tune (teacher cache filled once; MLflow sweep)")
    p.add_argument("config", help="experiment YAML every trial starts from (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.eval_every=20")
    p.add_argument("--space", required=True, help="search-space YAML (see tune_spaces/)")
    p.add_argument("--samples", type=int, default=None, help="Tune num_samples (default: the space's 'samples')")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="asha (default) stops weak trials early; fifo runs every trial to the end")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="M",
                   help="trials at once. Default: as many as fit in what the cluster can scale to, not only what is "
                        "up now: the node types and max_workers its autoscaler reports to Ray (or, on the head of a "
                        "`ray up` cluster, its ~/ray_bootstrap_config.yaml), else the nodes up now (a fixed or local "
                        "instance). One trial counts 1 CPU for its driver, train.num_workers worker bundles "
                        "(train.cpus_per_worker CPUs, a GPU each on GPUs, train.resources_per_worker) that must each "
                        "fit one node, and data.decode_cpus per worker left free for its Ray Data tasks; "
                        "never more than the sweep's trials")
    p.add_argument("--resume", metavar="SWEEP",
                   help="continue an interrupted sweep (its name or folder, as printed when it started) with the "
                        "config and space it started with: finished trials keep their results, the others continue, "
                        "into the same MLflow parent run")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=commands.cmd_tune)

    p = subparsers.add_parser("compare", help="a sweep's trials from MLflow: sorted, Pareto sets marked")
    p.add_argument("config", nargs="?", help="the sweep's config (gives the tracking URI and experiment)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of that config")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, or $MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", help="MLflow experiment (default: the config's, or 'raydistill')")
    p.add_argument("--sweep", help="the sweep's parent run id or name (default: the latest sweep)")
    p.add_argument("--sort", default="rsum", choices=("rsum", "val_rsum", "student_params", "images_per_s"),
                   help="column to sort by, best first (default: rsum, the final test RSUM)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=commands.cmd_compare)


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=f"the Ray dashboard URL, e.g. http://<head>:{DEFAULT_DASHBOARD_PORT} "
                                      "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")


def _add_cluster_commands(sub: Any) -> None:
    """Add ``submit``, ``jobs {list,status,logs,stop}`` and ``mlflow-server`` to the ``raydistill`` parser."""
    p = sub.add_parser("submit", help="run an experiment (or a Tune search) on a Ray cluster through the Jobs API",
                       description="Upload the project (minus data, caches, run outputs, .git, credentials) and "
                                   "run `raydistill run CONFIG OVERRIDES --json` (or `raydistill tune ...`) on "
                                   "the cluster. Token auth: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN.")
    p.add_argument("config", help="experiment YAML inside the working directory (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-3")
    _add_address(p)
    p.add_argument("--tune", metavar="SPACE", help="run `raydistill tune` over this search space (tune_spaces/*.yaml)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="forward one environment variable to the job (repeatable); nothing else is forwarded")
    p.add_argument("--mlflow-uri", help="tracking URI for the job (default: $MLFLOW_TRACKING_URI if set, else "
                                        "what the cluster's head exports)")
    p.add_argument("--working-dir", help="folder uploaded as the job's working directory (default: the current one)")
    p.add_argument("--submission-id", help="id for the job (default: raydistill-<config>-<time>-<random>)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0,
                   help="CPUs reserved for the driver (default 0: it runs on the CPU:0 head)")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--follow", action="store_true", help="stream the logs; exit 0 only if the job SUCCEEDED")
    wait.add_argument("--no-wait", action="store_true", help="return right after submitting")
    p.add_argument("--start-timeout", type=float, default=600,
                   help="without --follow/--no-wait: seconds to wait for the job to leave PENDING")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=commands.cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster")
    jsub = p.add_subparsers(dest="jobs_command", required=True)
    j = jsub.add_parser("list", help="all jobs, newest first")
    _add_address(j)
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=commands.cmd_jobs_list)
    j = jsub.add_parser("status", help="a job's status and message")
    j.add_argument("submission_id")
    _add_address(j)
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=commands.cmd_jobs_status)
    j = jsub.add_parser("logs", help="a job's output")
    j.add_argument("submission_id")
    _add_address(j)
    j.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 only if it SUCCEEDED")
    j.set_defaults(func=commands.cmd_jobs_logs)
    j = jsub.add_parser("stop", help="stop a job and wait until it has stopped")
    j.add_argument("submission_id")
    _add_address(j)
    j.add_argument("--timeout", type=float, default=60, help="seconds to wait for the job to stop")
    j.set_defaults(func=commands.cmd_jobs_stop)

    p = sub.add_parser("mlflow-server", help="run an MLflow tracking server (SQLite store, proxied artifacts)",
                       description="Runs `mlflow server` with an absolute SQLite store and proxied artifacts. "
                                   "Bound to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--store", default="raydistill_runs/mlflow-server",
                   help="folder of mlflow.db (and of artifacts unless --artifacts)")
    p.add_argument("--artifacts", help="artifact destination: a folder or s3://bucket/prefix (default <store>/artifacts)")
    p.add_argument("--backend-store-uri", help="a database URI instead of <store>/mlflow.db (e.g. postgresql://...)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; 0.0.0.0 on a cluster head)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="server processes (SQLite: one writer at a time)")
    p.add_argument("--allowed-hosts", help="MLflow's Host-header allow-list, e.g. mlflow.internal,10.0.*")
    p.add_argument("--dry-run", action="store_true", help="print the mlflow command instead of running it")
    p.set_defaults(func=commands.cmd_mlflow_server)


def _split_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, bool]:
    """Parse ``argv`` with ``key.sub=value`` overrides accepted anywhere on the line (argparse alone takes
    positionals only before the first option), and ``--debug`` / ``--verbose`` anywhere."""
    debug = "--debug" in argv
    if "--verbose" in argv:
        os.environ["RAYDISTILL_VERBOSE"] = "1"  # read where Ray starts (pipeline.ray_env)
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        if not hasattr(args, "overrides"):
            parser.error(f"this command takes no key=value overrides: {' '.join(overrides)}")
        args.overrides = list(args.overrides or []) + overrides
    return args, debug or os.environ.get("RAYDISTILL_DEBUG", "") not in ("", "0")


def _report_failure(err: BaseException, args: argparse.Namespace, debug: bool) -> int:
    """One message for the user (status 2: their mistake, 1: a failure), the traceback only where it helps."""
    import errno
    import traceback

    from raydistill.errors import find_os_error, find_user_error
    from raydistill.pipeline.run_folder import CURRENT_RUN

    user = find_user_error(err)
    machine = find_os_error(err, (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES))
    if user is not None:
        kind, status, message = "user", 2, str(user)
    elif machine is not None:
        kind, status = "failure", 1
        message = f"{machine.filename or 'writing'}: {machine.strerror}" + (
            "; free some space (or point output_dir / cache.dir elsewhere) and resume the run"
            if machine.errno in (errno.ENOSPC, errno.EDQUOT) else "")
    else:
        kind, status, message = "failure", 1, f"{type(err).__name__}: {err}"
    if debug or (user is None and machine is None):
        # A fault of the program or the machine: the traceback is what its report needs.
        traceback.print_exception(err, file=sys.stderr)
    print(f"raydistill: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        commands.print_json({"error": message, "kind": kind, **{k: v for k, v in CURRENT_RUN.items() if v is not None}})
    return status


def main(argv: list[str] | None = None) -> int:
    """Run one ``raydistill`` command; returns its exit status (2: the user's mistake, 1: a failure)."""
    parser = build_parser()
    args, debug = _split_overrides(parser, sys.argv[1:] if argv is None else list(argv))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        commands.shutdown_ray()
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends in one message and a status
        commands.shutdown_ray()
        return _report_failure(err, args, debug)


def console_main() -> None:
    """The ``raydistill`` command (and ``python -m raydistill.cli``)."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
