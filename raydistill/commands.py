"""What each ``raydistill`` command does: one short function per command, wiring library pieces together.

The argument parser is :mod:`raydistill.cli`; the work is in the library (``pipeline``, ``sweep``, ``jobs``,
``demo``). Every command that takes ``--json`` prints exactly one JSON object as the last line of standard
output; progress and logs go to standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from raydistill.config import ConfigError, load_config
from raydistill.jobs import (
    TERMINAL_STATUSES,
    JobsError,
    _cluster_errors,
    _relative_output_warning,
    build_submission,
    connect,
    dashboard_url,
    exit_code,
    follow_logs,
    job_status,
    mlflow_server_command,
    mlflow_server_env,
    resolve_address,
    wait_for,
)
from raydistill.pipeline.progress import log, recall_header, recall_line

def print_json(obj: Any) -> None:
    """The command's one JSON object, as the last line of standard output."""
    sys.stdout.flush()
    print(json.dumps(obj, default=_json_default), flush=True)


def _json_default(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def shutdown_ray() -> None:
    """End this process's Ray connection (best effort: a command that failed may have left it half up)."""
    try:
        from raydistill.pipeline.ray_env import shutdown_ray as shutdown

        shutdown()
    except Exception:  # noqa: BLE001 - shutting down is best effort
        pass


def _load(args: argparse.Namespace):
    """The command's config; a demo teacher it names is fitted first if none is yet (first use only)."""
    from raydistill.config import load_config

    cfg = load_config(args.config, args.overrides)
    _ensure_demo_teacher(cfg)
    return cfg


def _ensure_demo_teacher(cfg) -> None:
    # A ground-truth run (the baseline, or fitting the demo teacher itself) never loads its teacher.
    if cfg.teacher.kind == "demo" and cfg.distill.objective != "ground_truth":
        from raydistill.demo import ensure_demo_teacher

        ensure_demo_teacher()


def cmd_run(args: argparse.Namespace) -> int:
    from raydistill.pipeline.run_folder import find_run_dir, load_run_config
    from raydistill.pipeline.runner import run_experiment

    if args.config and args.config.endswith((".yaml", ".yml")):
        cfg = _load(args)
    elif args.resume:
        # `raydistill run --resume RUN`: the run's own saved config says everything.
        cfg = load_run_config(find_run_dir(args.resume, None))
        _ensure_demo_teacher(cfg)
    else:
        raise SystemExit("raydistill run: give a config file (configs/*.yaml), or --resume RUN")
    summary = run_experiment(cfg, resume=args.resume)
    shutdown_ray()
    print(recall_header(), file=sys.stderr)
    print(recall_line("teacher", summary["metrics"]["teacher"]), file=sys.stderr)
    print(recall_line(f"student ({summary['student_params'] / 1e6:.2f} M)", summary["metrics"]["student"]), file=sys.stderr)
    print(f"student saved to {summary['student_dir']}", file=sys.stderr)
    print(f"compare runs: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}", file=sys.stderr)
    if args.json:
        print_json(summary)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from raydistill.pipeline.runner import embed

    summary = embed(_load(args))
    shutdown_ray()
    for split, s in summary["splits"].items():
        print(f"{split}: {s['images']} images, {s['captions']} captions cached", file=sys.stderr)
    print(f"cache: {summary['cache_dir']}", file=sys.stderr)
    if args.json:
        print_json(summary)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raydistill.pipeline.evaluate_cmd import evaluate_command

    summary = evaluate_command(_load(args), student=args.student, teacher=args.teacher, split=args.split)
    shutdown_ray()
    print(recall_header(), file=sys.stderr)
    for name, m in summary["metrics"].items():
        print(recall_line(name, m), file=sys.stderr)
    if args.json:
        print_json(summary)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from raydistill.data.synth import generate_scenes, shared_caption_fraction

    path = generate_scenes(args.out, n_images=args.n_images, image_size=args.image_size, seed=args.seed,
                           captions_per_image=(args.min_captions, args.max_captions))
    document = json.loads(path.read_text(encoding="utf-8"))
    # Captions that also caption another image cap every model's recall: say how many there are.
    shared = shared_caption_fraction(document) if any(i["split"] == "train" for i in document["images"]) else None
    print(f"wrote {path} (images in {path.parent / 'images'})"
          + (f"; {100 * shared:.1f} % of training captions also caption another image" if shared is not None else ""),
          file=sys.stderr)
    if args.json:
        print_json({"dataset": str(path), "images_dir": str(path.parent / "images"),
                    "shared_caption_fraction": shared})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raydistill.demo import run_demo

    summary = run_demo(quick=args.quick, output_dir=args.output_dir, seeds=args.seeds)
    shutdown_ray()
    if args.json:
        print_json(summary)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """``raydistill tune <config> [overrides...] --space <space> [--samples N] [--scheduler asha|fifo] ...``.

    With ``--resume SWEEP`` it continues that sweep instead (:func:`resume_sweep`). An interrupted sweep
    exits with status 130 and prints the command that continues it.
    """
    from raydistill.sweep.driver import SweepInterrupted, resume_sweep, run_sweep

    # With a tracking server, MLflow prints "View run ... at <url>" to stdout whenever a run ends; stdout
    # is for --json. Set before Ray starts so the trials' processes inherit it.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        if args.resume:
            summary = resume_sweep(args.config, args.overrides, args.space, args.resume, samples=args.samples,
                                   scheduler=args.scheduler, max_concurrent=args.max_concurrent)
        else:
            summary = run_sweep(args.config, args.overrides, args.space, samples=args.samples,
                                scheduler=args.scheduler or "asha", max_concurrent=args.max_concurrent)
    except SweepInterrupted as err:
        log(f"tune: {err}")
        return 130
    finally:
        shutdown_ray()
    log(f"tune: best config: {summary['best_config']}")
    log(f"tune: table: raydistill compare --tracking-uri {summary['mlflow_tracking_uri']} "
        f"--experiment {summary['experiment']} --sweep {summary['parent_run_id']}")
    if args.json:
        print_json(summary)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``raydistill compare [config] [overrides...] [--tracking-uri U] [--experiment E] [--sweep RUN]``."""
    from raydistill.sweep.results import compare, format_table
    from raydistill.tracking import resolve_tracking_uri

    if args.config:
        cfg = load_config(args.config, args.overrides)
        uri = resolve_tracking_uri(args.tracking_uri or cfg.tracking.uri, Path(cfg.output_dir))
        experiment = args.experiment or cfg.tracking.experiment
    else:
        if args.overrides:
            raise ConfigError("overrides need a config file: raydistill compare <config> key=value ...")
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ConfigError("raydistill compare needs a config, --tracking-uri or $MLFLOW_TRACKING_URI")
        uri = resolve_tracking_uri(uri, Path.cwd())
        experiment = args.experiment or "raydistill"
    table = compare(uri, experiment, sweep=args.sweep, sort=args.sort)
    print(f"sweep {table['sweep']} (run {table['parent_run_id']}), experiment {experiment}, {uri}")
    print(format_table(table["rows"]))
    if args.json:
        print_json(table)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """``raydistill submit``: upload the project and run one experiment (or a Tune search) as a Ray job."""
    address = resolve_address(args.address)
    working_dir = Path(args.working_dir or Path.cwd())
    submission = build_submission(args.config, args.overrides, working_dir, tune_space=args.tune, env=args.env,
                                  mlflow_uri=args.mlflow_uri, submission_id=args.submission_id)
    warning = _relative_output_warning(working_dir.resolve() / submission.metadata["raydistill_config"], args.overrides)
    if warning:
        print(f"[raydistill] warning: {warning}", file=sys.stderr)
    client = connect(address)
    with _cluster_errors(address, "submitting the job"):
        sid = client.submit_job(entrypoint=submission.entrypoint, runtime_env=submission.runtime_env,
                                submission_id=submission.submission_id, metadata=submission.metadata,
                                entrypoint_num_cpus=args.entrypoint_num_cpus)
    url = dashboard_url(address, sid)
    forwarded = sorted(submission.runtime_env.get("env_vars", {}))
    print(f"submitted {sid}\n  entrypoint: {submission.entrypoint}\n  dashboard:  {url}"
          + (f"\n  env:        {', '.join(forwarded)}" if forwarded else ""), file=sys.stderr, flush=True)
    try:
        with _cluster_errors(address, f"following job {sid}"):
            if args.follow:
                status = follow_logs(client, sid, lambda text: (sys.stderr.write(text), sys.stderr.flush()))
            elif args.no_wait:
                status = job_status(client, sid)
            else:
                status = wait_for(client, sid, lambda s: s != "PENDING", timeout_s=args.start_timeout)
    except KeyboardInterrupt:
        # Interrupting the client leaves the job running: say how to get back to it, or stop it.
        print(f"\njob {sid} keeps running: raydistill jobs logs {sid} --follow --address {address}\n"
              f"  to stop it: raydistill jobs stop {sid} --address {address}", file=sys.stderr)
        return 130
    print(f"job {sid}: {status}" + ("" if args.follow or status in TERMINAL_STATUSES else
                                     f" (follow with: raydistill jobs logs {sid} --follow --address {address})"),
          file=sys.stderr, flush=True)
    if args.json:
        print_json({"submission_id": sid, "status": status, "dashboard_url": url, "address": address,
                     "entrypoint": submission.entrypoint, "env_vars": forwarded})
    if args.follow or status in TERMINAL_STATUSES:
        return exit_code(status)
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """``raydistill jobs list``: the cluster's jobs, newest first."""
    address = resolve_address(args.address)
    client = connect(address)
    with _cluster_errors(address, "listing jobs"):
        jobs = client.list_jobs()
    rows = sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)
    if args.json:
        print_json([{"submission_id": j.submission_id, "status": str(j.status), "entrypoint": j.entrypoint,
                      "start_time": j.start_time, "end_time": j.end_time, "metadata": j.metadata or {}}
                     for j in rows])
        return 0
    print(f"{'submission id':<52} {'status':<10} {'started (UTC)':<20} entrypoint")
    for j in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(j.start_time / 1000)) if j.start_time else "-"
        entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
        print(f"{j.submission_id or j.job_id or '-':<52} {str(j.status):<10} {started:<20} {entry}")
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    """``raydistill jobs status ID``: prints the status and message; exits 0 (the query worked)."""
    address = resolve_address(args.address)
    client = connect(address)
    with _cluster_errors(address, f"reading job {args.submission_id}"):
        info = client.get_job_info(args.submission_id)
    status = str(info.status)
    if args.json:
        print_json({"submission_id": args.submission_id, "status": status, "message": info.message,
                     "entrypoint": info.entrypoint, "dashboard_url": dashboard_url(address, args.submission_id)})
    else:
        print(f"{args.submission_id}: {status}" + (f" ({info.message})" if info.message else ""))
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    """``raydistill jobs logs ID [--follow]``: the job's output; with --follow, exit code = outcome."""
    address = resolve_address(args.address)
    client = connect(address)
    with _cluster_errors(address, f"reading the logs of job {args.submission_id}"):
        if not args.follow:
            sys.stdout.write(client.get_job_logs(args.submission_id) or "")
            sys.stdout.flush()
            return 0
        status = follow_logs(client, args.submission_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    print(f"job {args.submission_id}: {status}", file=sys.stderr)
    return exit_code(status)


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    """``raydistill jobs stop ID``: ask the cluster to stop a job and wait until it has."""
    address = resolve_address(args.address)
    client = connect(address)
    with _cluster_errors(address, f"stopping job {args.submission_id}"):
        stopped = client.stop_job(args.submission_id)
        status = wait_for(client, args.submission_id, lambda s: s in TERMINAL_STATUSES, timeout_s=args.timeout)
    print(f"job {args.submission_id}: {status}" + ("" if stopped else " (it had already ended)"), file=sys.stderr)
    return 0 if status in TERMINAL_STATUSES else 1


def cmd_mlflow_server(args: argparse.Namespace) -> int:
    """``raydistill mlflow-server``: replace this process with an MLflow tracking server."""
    if not 0 < args.port < 65536:
        raise JobsError(f"--port {args.port}: must be between 1 and 65535")
    if args.workers < 1:
        raise JobsError(f"--workers {args.workers}: must be at least 1")
    store = Path(args.store).expanduser()
    argv = mlflow_server_command(store, args.artifacts, args.host, args.port, args.workers, args.allowed_hosts,
                                 args.backend_store_uri)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    store.mkdir(parents=True, exist_ok=True)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"[raydistill] MLflow tracking server on {args.host}:{args.port}; point runs at it with\n"
          f"  export MLFLOW_TRACKING_URI=http://{shown}:{args.port}    (or raydistill submit --mlflow-uri ...)",
          file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("[raydistill] warning: the server has no authentication; anyone who reaches this port can read and "
              "write runs. Keep it inside a private network (security group, firewall, SSH tunnel).",
              file=sys.stderr)
    sys.stderr.flush()
    # exec: the server gets this process's id, so `kill $(cat server.pid)` and signals reach it directly.
    os.execve(argv[0], argv, mlflow_server_env())
    return 0  # pragma: no cover - execv does not return
