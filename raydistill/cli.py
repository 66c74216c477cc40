"""The ``raydistill`` command: thin entry points that wire library pieces together.

Every sub-command that takes ``--json`` prints exactly one JSON object as the last line of standard output;
progress and logs go to standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

# Quiet, deterministic defaults before Ray or MLflow are imported anywhere.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _print_json(obj: Any) -> None:
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


def _shutdown_ray() -> None:
    try:
        from raydistill.pipeline.ray_env import shutdown_ray

        shutdown_ray()
    except Exception:  # noqa: BLE001 - shutting down is best effort
        pass


def _load(args: argparse.Namespace):
    """The command's config; a demo teacher it names is fitted first if none is yet (first use only)."""
    from raydistill.config import load_config

    cfg = load_config(args.config, args.overrides)
    _ensure_demo_teacher(cfg)
    return cfg


def _ensure_demo_teacher(cfg) -> None:
    if cfg.teacher.kind == "demo":
        from raydistill.demo import ensure_demo_teacher

        ensure_demo_teacher()


def _recall_line(name: str, m: dict[str, float] | None, extra: str = "") -> str:
    if not m:
        return f"{name:<26} {'-':>6}"
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    return f"{name:<26} " + " ".join(f"{m[k]:6.1f}" for k in keys) + extra


RECALL_HEADER = f"{'model':<26} " + " ".join(f"{k:>6}" for k in ("I2T@1", "I2T@5", "I2T@10", "T2I@1", "T2I@5", "T2I@10", "RSUM"))


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
    _shutdown_ray()
    print(RECALL_HEADER, file=sys.stderr)
    print(_recall_line("teacher", summary["metrics"]["teacher"]), file=sys.stderr)
    print(_recall_line(f"student ({summary['student_params'] / 1e6:.2f} M)", summary["metrics"]["student"]), file=sys.stderr)
    print(f"student saved to {summary['student_dir']}", file=sys.stderr)
    print(f"compare runs: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}", file=sys.stderr)
    if args.json:
        _print_json(summary)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from raydistill.pipeline.runner import embed

    summary = embed(_load(args))
    _shutdown_ray()
    for split, s in summary["splits"].items():
        print(f"{split}: {s['images']} images, {s['captions']} captions cached", file=sys.stderr)
    print(f"cache: {summary['cache_dir']}", file=sys.stderr)
    if args.json:
        _print_json(summary)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raydistill.pipeline.evaluate_cmd import evaluate_command

    summary = evaluate_command(_load(args), student=args.student, teacher=args.teacher, split=args.split)
    _shutdown_ray()
    print(RECALL_HEADER, file=sys.stderr)
    for name, m in summary["metrics"].items():
        print(_recall_line(name, m), file=sys.stderr)
    if args.json:
        _print_json(summary)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from raydistill.data.synth import generate_scenes

    path = generate_scenes(args.out, n_images=args.n_images, image_size=args.image_size, seed=args.seed,
                           captions_per_image=(args.min_captions, args.max_captions))
    print(f"wrote {path} (images in {path.parent / 'images'})", file=sys.stderr)
    if args.json:
        _print_json({"dataset": str(path), "images_dir": str(path.parent / "images")})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raydistill.demo import run_demo

    summary = run_demo(quick=args.quick, output_dir=args.output_dir, seeds=args.seeds)
    _shutdown_ray()
    if args.json:
        _print_json(summary)
    return 0


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
                   help="a smoke run of the same path: 400 scenes, 10 steps per arm (under 2 minutes on 2 cores)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per student arm (default: 1; 2 for the spread)")
    p.add_argument("--output-dir", default="raydistill_runs/demo", help="where runs and the MLflow store go")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="train a student: teacher -> cache/stream -> Ray Train -> eval -> MLflow")
    with_config(p, optional=True)
    p.add_argument("--resume", metavar="RUN", help="continue a run (its name or folder) from its last checkpoint")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("embed", help="fill (or resume) the teacher-embedding cache")
    with_config(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("eval", help="retrieval recall of a saved student and/or the teacher")
    with_config(p)
    p.add_argument("--student", help="a student folder saved by raydistill (run_dir/student)")
    p.add_argument("--teacher", action="store_true", help="also evaluate the config's teacher")
    p.add_argument("--split", help="split to evaluate (default data.test_split)")
    p.set_defaults(func=cmd_eval)

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
    s.set_defaults(func=cmd_data_synth)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: Any) -> None:
    """Commands whose modules register themselves (tune, compare, submit, jobs, mlflow-server)."""
    for module in ("raydistill.tune", "raydistill.jobs"):
        try:
            mod = __import__(module, fromlist=["register_cli"])
        except ImportError:
            continue
        register = getattr(mod, "register_cli", None)
        if register is not None:
            register(sub)


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
        _print_json({"error": message, "kind": kind, **{k: v for k, v in CURRENT_RUN.items() if v is not None}})
    return status


def main(argv: list[str] | None = None) -> int:
    """Run one ``raydistill`` command; returns its exit status (2: the user's mistake, 1: a failure)."""
    parser = build_parser()
    args, debug = _split_overrides(parser, sys.argv[1:] if argv is None else list(argv))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _shutdown_ray()
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends in one message and a status
        _shutdown_ray()
        return _report_failure(err, args, debug)


def console_main() -> None:
    """The ``raydistill`` command (and ``python -m raydistill.cli``)."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
