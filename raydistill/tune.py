"""`raydistill tune` and `raydistill compare`: a Ray Tune search over students, and its table from MLflow.

``raydistill tune configs/quick.yaml --space tune_spaces/demo.yaml`` runs, top to bottom
(:func:`run_sweep`):

1. load the config and the search space (:mod:`raydistill.search_space`) and check every grid point;
2. fill the teacher-embedding cache ONCE (:func:`raydistill.pipeline.runner.embed`): the teacher never
   runs in a trial, every trial reads the cache (``cache.mode=cache``);
3. open the MLflow parent run of the sweep;
4. ``Tuner.fit()``: each trial is :func:`raydistill.tune_trial.distill_trial`, a function trainable that
   fits a ``TorchTrainer`` (through ``run_experiment``) whose validation reports reach Tune; the
   scheduler (ASHA by default, on ``val_rsum`` against the reported ``step``) stops the weak trials; each
   trial's run is an MLflow child run of the sweep;
5. end the child runs of stopped trials (KILLED, with the validation curve Tune received), write the
   results table, the Pareto plots and the best trial's config as a runnable YAML; log them to the parent.

MLflow under concurrent trials: every trial logs through :class:`raydistill.tracking.Tracker`, whose
sends are retried (SQLite's "database is locked" is one failure it retries) and fall back to a local
file rather than failing the trial; the driver itself writes only before and after ``Tuner.fit()``.

Ray Tune is imported only when a sweep runs, so the other ``raydistill`` commands start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from raydistill.config import Config, ConfigError, config_from_dict, dump_config, load_config
from raydistill.search_space import SearchSpace, apply_values, check_trial_config, flatten_values, load_space
from raydistill.sweep_results import (
    COUNT_KEYS,
    METRIC,
    SWEEP_KIND,
    SWEEP_KIND_TAG,
    TIME_ATTR,
    TRIAL_ID_TAG,
    atomic_write_text,
    best_row,
    format_table,
    latest_sweep,
    mark_pareto,
    rows_from_runs,
    sort_rows,
    write_results,
)

SCHEDULERS = ("asha", "fifo")
SCHEDULER_LOG = "scheduler_log.jsonl"
BEST_CONFIG = "best_config.yaml"
_TEACHER_COUNTS = ("teacher_images_embedded", "teacher_captions_embedded")


class SweepError(ValueError):
    """A sweep that cannot run as asked (or produced no usable trial); the message says why and what to do."""


def log(message: str) -> None:
    """Progress of the sweep (stderr, so ``--json`` keeps stdout for the result)."""
    print(f"[raydistill tune] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ planning
def prepare_sweep(config_path: str, overrides: list[str], space: SearchSpace) -> Config:
    """The sweep's base config: the file, then the space's ``fixed`` values, then the overrides.

    Raises:
        SweepError: an override sets a searched key, or the config has no validation RSUM to optimise.
    """
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if any(key == s or key.startswith(s + ".") or s.startswith(key + ".") for s in space.params):
            raise SweepError(f"override {item!r} sets a key the search space {space.origin} searches; drop one")
    cfg = load_config(config_path, space.fixed_overrides() + list(overrides))
    if not cfg.uses_teacher:
        raise SweepError("raydistill tune distils from the teacher cache: distill.objective must be dsmd")
    if not cfg.train.eval_every or not cfg.data.val_split:
        raise SweepError(
            f"raydistill tune optimises validation RSUM: set train.eval_every (e.g. train.eval_every=50) and "
            f"data.val_split (now {cfg.train.eval_every} and {cfg.data.val_split})"
        )
    return cfg


def asha_settings(planned_steps: int, eval_every: int) -> dict[str, int]:
    """ASHA's ``grace_period`` and ``max_t`` (in steps) for trials that validate every ``eval_every`` steps.

    Rungs then sit at ``eval_every * 2**k``, all strictly below the last step: a trial that reaches its
    last step is never stopped (it would lose its final evaluation for nothing).

    Raises:
        SweepError: fewer than two validation points per trial, so there is nothing to stop a trial on.
    """
    if eval_every >= planned_steps:
        raise SweepError(
            f"ASHA needs at least two validation points per trial: train.eval_every ({eval_every}) must be below "
            f"the planned steps ({planned_steps}); lower train.eval_every or use --scheduler fifo"
        )
    return {"grace_period": eval_every, "max_t": planned_steps - 1}


def trial_bundles(cfg: Config) -> list[dict[str, float]]:
    """The placement-group bundles of one trial (Train's workers reserve their own group on top).

    Tune puts every task a trial starts into the trial's group, so besides the trial's driver (bundle 0,
    1 CPU) the group holds one bundle for the driver's own Ray tasks: reading large eval splits from the cache
    and ``run_experiment``'s teacher probe, which loads the teacher once, where its actors would run, to read
    its dimension and fingerprint (hence the teacher pool's CPUs, GPUs and custom resources; a CPU teacher
    with no placement loads in the trial's driver instead: ``teacher.in_driver``).
    """
    pool = cfg.teacher.pool
    tasks: dict[str, float] = {"CPU": max(1.0, float(pool.num_cpus)), **pool.resources}
    if pool.num_gpus:
        tasks["GPU"] = float(pool.num_gpus)
    return [{"CPU": 1.0}, tasks]


def default_max_concurrent(cfg: Config, cpus: float, gpus: float) -> int:
    """How many trials fit at once on ``cpus`` / ``gpus``: each trial's bundles plus its Train workers."""
    bundles = trial_bundles(cfg)
    use_gpu = bool(gpus) and cfg.train.use_gpu != "no"
    per_trial_cpus = sum(b.get("CPU", 0) for b in bundles) + cfg.train.num_workers * cfg.train.cpus_per_worker
    per_trial_gpus = sum(b.get("GPU", 0) for b in bundles) + (cfg.train.num_workers if use_gpu else 0)
    fit = int(cpus // per_trial_cpus)
    if per_trial_gpus:
        fit = min(fit, int(gpus // per_trial_gpus))
    return max(1, fit)


def _trial_steps(cfg: Config) -> int:
    """Optimizer steps of every trial (the scheduler's horizon)."""
    from raydistill.pipeline import datasets as dsets
    from raydistill.pipeline.runner import planned_steps

    captions = 0
    if cfg.train.steps is None:
        # Counted from the records, as run_experiment counts them.
        captions = sum(len(r["captions"]) for r in dsets.read_records(cfg)[cfg.data.train_split])
    steps = planned_steps(cfg, captions)
    if cfg.train.eval_every > steps:
        raise SweepError(f"train.eval_every ({cfg.train.eval_every}) exceeds the planned steps ({steps}): "
                         "no trial would ever report a validation RSUM")
    return steps


# ------------------------------------------------------------------------------------------------ the sweep
def run_sweep(config_path: str, overrides: list[str], space_path: str, samples: int | None = None,
              scheduler: str = "asha", max_concurrent: int | None = None) -> dict[str, Any]:
    """Run a search and return its summary (the ``--json`` object of ``raydistill tune``).

    Args:
        config_path: The experiment YAML every trial starts from.
        overrides: ``key.sub=value`` overrides of that config.
        space_path: The search-space YAML (``tune_spaces/*.yaml``).
        samples: Tune's ``num_samples`` (default: the space's ``samples``); each grid point runs this often.
        scheduler: ``asha`` (stop weak trials early) or ``fifo`` (run every trial to the end).
        max_concurrent: Trials at once (default: as many as the Ray instance's CPUs/GPUs fit).

    Raises:
        SweepError, ConfigError: bad arguments or space, or no trial finished.
    """
    import ray

    from raydistill.pipeline.runner import embed, init_ray
    from raydistill.search_space import validate_space
    from raydistill.tracking import resolve_tracking_uri

    if scheduler not in SCHEDULERS:
        raise SweepError(f"--scheduler {scheduler!r}: allowed: {list(SCHEDULERS)}")
    for flag, value in (("--samples", samples), ("--max-concurrent", max_concurrent)):
        if value is not None and value < 1:
            raise SweepError(f"{flag} must be >= 1, got {value}")
    space = load_space(space_path)
    cfg = prepare_sweep(config_path, overrides, space)
    checked = validate_space(space, cfg, seed=cfg.train.seed)
    samples = samples or space.samples
    log(f"search space {space.origin}: {space.grid_size()} grid point(s) x {samples} sample(s) = "
        f"{space.grid_size() * samples} trial(s); {checked} trial config(s) checked")

    sweep, sweep_dir = _new_sweep_dir(cfg)
    atomic_write_text(sweep_dir / "config.yaml", dump_config(cfg))
    atomic_write_text(sweep_dir / "space.yaml", Path(space_path).read_text(encoding="utf-8"))

    init_ray(cfg)
    log("filling the teacher-embedding cache: the teacher's only pass of the sweep")
    cache = embed(cfg)
    steps = _trial_steps(cfg)
    resources = ray.cluster_resources()
    max_concurrent = max_concurrent or default_max_concurrent(cfg, resources.get("CPU", 1), resources.get("GPU", 0))
    settings = {"space": space.origin, "scheduler": scheduler, "samples": samples, "max_concurrent": max_concurrent,
                "planned_steps": steps, "metric": METRIC}

    tracking_uri = resolve_tracking_uri(cfg.tracking.uri, Path(cfg.output_dir))
    parent = _open_parent_run(cfg, space, sweep, sweep_dir, tracking_uri, settings)
    with parent:  # an exception or Ctrl-C ends the sweep's run FAILED / KILLED
        tuner = _make_tuner(cfg, space, sweep, sweep_dir, cache["cache_dir"], parent.run_id, settings)
        log(f"sweep {sweep}: {scheduler} scheduler, up to {max_concurrent} trial(s) at once, {steps} steps per trial")
        grid = tuner.fit()
        rows = [_trial_row(result) for result in grid]
        if parent.run_id:
            _close_trial_runs(rows, tracking_uri, cfg.tracking.experiment, parent.run_id, sweep_dir)
        rows = sort_rows(mark_pareto(rows))
        summary = _finish_sweep(cfg, rows, grid, cache, parent, sweep_dir, settings)
    summary.update({"parent_run_id": parent.run_id, "mlflow_tracking_uri": tracking_uri, "sweep": sweep,
                    "experiment": cfg.tracking.experiment})
    if summary["best"] is None:
        raise SweepError(f"no trial of sweep {sweep} finished (see {sweep_dir / 'results.json'}); "
                         f"statuses: {[r['status'] for r in rows]}")
    return summary


def _new_sweep_dir(cfg: Config) -> tuple[str, Path]:
    """A fresh ``<output_dir>/sweeps/<name>-sweep-<time>[.k]`` folder and its name."""
    base = f"{cfg.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    root = Path(cfg.output_dir) / "sweeps"
    root.mkdir(parents=True, exist_ok=True)
    for k in range(1000):
        name = base if k == 0 else f"{base}.{k}"
        try:
            (root / name).mkdir()
        except FileExistsError:
            continue
        return name, root / name
    raise SweepError(f"could not create a new sweep folder under {root}")


def _open_parent_run(cfg: Config, space: SearchSpace, sweep: str, sweep_dir: Path, tracking_uri: str,
                     settings: dict[str, Any]) -> Any:
    """The sweep's MLflow run: its settings, the space, the base config (every trial is a child of it)."""
    from raydistill.tracking import Tracker, flatten_config

    parent = Tracker(tracking_uri, cfg.tracking.experiment, run_name=sweep,
                     tags={SWEEP_KIND_TAG: SWEEP_KIND, "raydistill.space": space.origin},
                     local_dir=sweep_dir / "tracking", enabled=cfg.tracking.enabled)
    parent.log_params({**{f"sweep.{k}": v for k, v in settings.items()},
                       **{f"space.{k}": json.dumps(v) for k, v in space.spec().items()},
                       **flatten_config(cfg.model_dump(mode="json"), prefix="base")})
    parent.log_artifact(sweep_dir / "space.yaml")
    parent.log_artifact(sweep_dir / "config.yaml")
    return parent


def _make_tuner(cfg: Config, space: SearchSpace, sweep: str, sweep_dir: Path, cache_dir: str,
                parent_run_id: str | None, settings: dict[str, Any]) -> Any:
    """The ``Tuner``: the trainable with its fixed arguments and bundles, the space, the scheduler."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from raydistill.tune_trial import LoggedASHA, ProgressCallback, distill_trial

    if settings["scheduler"] == "asha":
        scheduler = LoggedASHA(sweep_dir / SCHEDULER_LOG, time_attr=TIME_ATTR, reduction_factor=2,
                               stop_last_trials=False,
                               **asha_settings(settings["planned_steps"], cfg.train.eval_every))
    else:
        scheduler = FIFOScheduler()
    trainable = tune.with_parameters(distill_trial, base=cfg.model_dump(mode="json"), cache_dir=cache_dir,
                                     parent_run_id=parent_run_id, sweep=sweep)
    return tune.Tuner(
        tune.with_resources(trainable, tune.PlacementGroupFactory(trial_bundles(cfg))),
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=settings["samples"], scheduler=scheduler,
            search_alg=BasicVariantGenerator(max_concurrent=settings["max_concurrent"], random_state=cfg.train.seed),
        ),
        run_config=tune.RunConfig(name=sweep, storage_path=str(Path(cfg.output_dir) / "tune"), verbose=0,
                                  callbacks=[ProgressCallback()]),
    )


def _finish_sweep(cfg: Config, rows: list[dict[str, Any]], grid: Any, cache: dict[str, Any], parent: Any,
                  sweep_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Write and log the results table, the Pareto plots and the best config; end the parent run."""
    files = write_results(rows, sweep_dir)
    for path in files.values():
        parent.log_artifact(path)
    if (sweep_dir / SCHEDULER_LOG).is_file():
        parent.log_artifact(sweep_dir / SCHEDULER_LOG)
    best = best_row(rows)
    best_path = None
    if best is not None:
        best_path = write_best_config(cfg, _values_of(grid, best["trial_id"]), sweep_dir / BEST_CONFIG, best)
        parent.log_artifact(best_path)
    counts = sweep_counts(cache, rows)
    parent.log_metrics({
        "trials_finished": sum(r["status"] == "finished" for r in rows),
        "trials_stopped": sum(r["status"] == "stopped" for r in rows),
        "trials_failed": sum(r["status"] == "error" for r in rows),
        **({"best/val_rsum": best["val_rsum"], "best/rsum": best["rsum"]} if best else {}),
        **counts,
    }, step=settings["planned_steps"])
    parent.finish("FINISHED" if best is not None else "FAILED")
    print(format_table(rows), file=sys.stderr)
    trial_keys = ("trial_id", "config", "rsum", "val_rsum", "status", "steps", "run_id", "student_params",
                  "images_per_s", "pareto_size", "pareto_speed")
    return {
        "sweep_dir": str(sweep_dir),
        **settings,
        "trials": [{k: r.get(k) for k in trial_keys} for r in rows],
        "best": {k: best[k] for k in ("trial_id", "config", "rsum", "val_rsum", "run_id")} if best else None,
        "best_config": str(best_path) if best_path else None,
        "results": {k: str(v) for k, v in files.items()},
        "cache_dir": cache["cache_dir"],
        **counts,
    }


# ------------------------------------------------------------------------------------------------ results
def _trial_row(result: Any) -> dict[str, Any]:
    """The sweep row of one Tune result; ``status``: finished, stopped (by the scheduler) or error."""
    metrics = dict(result.metrics or {})
    history = _val_history(result)
    if result.error is not None:
        status = "error"
    elif metrics.get("finished"):
        status = "finished"
    else:
        status = "stopped"
    done = status == "finished"
    return {
        "trial_id": metrics.get("trial_id") or _trial_id_from_path(result.path),
        "status": status,
        "run_id": metrics.get("run_id") if done else None,
        "config": flatten_values(result.config or {}),
        "val_rsum": history[-1][1] if history else None,
        "rsum": metrics.get("rsum") if done else None,
        "student_params": metrics.get("student_params") if done else None,
        "images_per_s": metrics.get("images_per_s") if done else None,
        "captions_per_s": metrics.get("captions_per_s") if done else None,
        "steps": history[-1][0] if history else None,
        "history": history,
        "counts": {k: metrics.get(k) for k in COUNT_KEYS} if done else None,
        "error": str(result.error)[:500] if result.error is not None else None,
    }


def _val_history(result: Any) -> list[tuple[int, float]]:
    """``(step, val_rsum)`` pairs the trial reported to Tune, one per step, in step order."""
    frame = result.metrics_dataframe
    if frame is None or METRIC not in frame or TIME_ATTR not in frame:
        return []
    by_step: dict[int, float] = {}
    for step, value in zip(frame[TIME_ATTR], frame[METRIC]):
        if step == step and value == value:  # NaN != NaN: skip rows without both
            by_step[int(step)] = float(value)
    return sorted(by_step.items())


def _trial_id_from_path(path: str | None) -> str | None:
    # Tune names a trial's folder <trainable>_<trial id>_<index>_<config>_<date>; trial ids are <5 hex>_<5 digits>.
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(path).name) if path else None
    return match.group(1) if match else None


def _values_of(grid: Any, trial_id: str) -> dict[str, Any]:
    for result in grid:
        if (result.metrics or {}).get("trial_id") == trial_id:
            return dict(result.config or {})
    raise SweepError(f"trial {trial_id} is not in the sweep's results")


def _close_trial_runs(rows: list[dict[str, Any]], tracking_uri: str, experiment: str, parent_run_id: str,
                      sweep_dir: Path) -> None:
    """Give each row its child run id; end the runs of stopped (KILLED) and failed (FAILED) trials.

    The scheduler stops a trial by killing it mid-run: its run is still RUNNING and may lack validation
    points its worker had not sent yet; the driver adds the ones Tune received.
    """
    from mlflow.tracking import MlflowClient

    from raydistill.tracking import Tracker, read_runs

    runs = {r["tags"].get(TRIAL_ID_TAG): r for r in read_runs(tracking_uri, experiment, parent_run_id)}
    client = MlflowClient(tracking_uri=tracking_uri)
    for row in rows:
        run = runs.get(row["trial_id"])
        if run is None:
            continue
        row["run_id"] = run["run_id"]
        if row["status"] == "finished" or run["status"] != "RUNNING":
            continue
        logged = {m.step for m in client.get_metric_history(run["run_id"], METRIC)}
        tracker = Tracker(tracking_uri, experiment, run_id=run["run_id"],
                          local_dir=sweep_dir / "tracking" / str(row["trial_id"]))
        for step, value in row["history"]:
            if step not in logged:
                tracker.log_metrics({METRIC: value}, step=step)
        tracker.set_tags({"raydistill.trial_status": row["status"]})
        tracker.finish("KILLED" if row["status"] == "stopped" else "FAILED")


def sweep_counts(cache: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, int]:
    """The pipeline's counts over the whole sweep: the cache pass plus each finished trial's own count.

    ``dataset_images`` / ``dataset_captions`` are the distinct images and captions of the sweep's splits as
    the cache pass counted them (a finished trial that counted otherwise is reported). A trial the scheduler
    stopped cannot report its counts (it is killed); ``trials_counted`` says how many trials were added.
    """
    counts = {k: int(cache[k]) for k in _TEACHER_COUNTS}
    counted = 0
    for row in rows:
        if not row.get("counts"):
            continue
        counted += 1
        for k in _TEACHER_COUNTS:
            counts[k] += int(row["counts"].get(k) or 0)
        for k in ("dataset_images", "dataset_captions"):
            if row["counts"].get(k) != cache[k]:
                log(f"warning: trial {row['trial_id']} counted {row['counts'].get(k)} {k}, the cache pass {cache[k]}")
    return {**counts, "dataset_images": int(cache["dataset_images"]),
            "dataset_captions": int(cache["dataset_captions"]), "trials_counted": counted}


def write_best_config(cfg: Config, values: dict[str, Any], path: Path, best: dict[str, Any]) -> Path:
    """Write the best trial's config (the sweep's config with the trial's sampled values) as a runnable YAML."""
    raw = apply_values(cfg.model_dump(mode="json"), values)
    raw["name"] = f"{cfg.name}-best"
    best_cfg = config_from_dict(raw, origin=str(path))
    check_trial_config(best_cfg, str(path))
    header = (
        f"# raydistill run {path}\n#\n"
        f"# The best trial ({best['trial_id']}) of a raydistill tune sweep: validation RSUM {best['val_rsum']:.2f}, "
        f"test RSUM {best['rsum']:.2f}.\n# Sampled: {json.dumps(flatten_values(values), default=str)}\n"
    )
    return atomic_write_text(path, header + dump_config(best_cfg))


# ------------------------------------------------------------------------------------------------ compare
def compare(tracking_uri: str, experiment: str, sweep: str | None = None, sort: str = "rsum") -> dict[str, Any]:
    """A sweep's table from MLflow: the given parent run (id or name), or the latest sweep of the experiment.

    Returns:
        ``{"parent_run_id", "sweep", "mlflow_tracking_uri", "experiment", "rows"}``, rows sorted best first
        by ``sort`` and Pareto-marked.

    Raises:
        SweepError: no such sweep.
    """
    from raydistill.tracking import read_runs

    runs = read_runs(tracking_uri, experiment)
    if sweep:
        matches = [r for r in runs if sweep in (r["run_id"], r["run_name"])]
        if not matches:
            raise SweepError(f"no run {sweep!r} (id or name) in experiment {experiment!r} at {tracking_uri}")
        parent = matches[-1]
    else:
        parent = latest_sweep(runs)
        if parent is None:
            raise SweepError(f"no raydistill tune sweep in experiment {experiment!r} at {tracking_uri}")
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parent["run_id"]]
    rows = sort_rows(mark_pareto(rows_from_runs(children)), key=sort)
    return {"parent_run_id": parent["run_id"], "sweep": parent["run_name"], "mlflow_tracking_uri": tracking_uri,
            "experiment": experiment, "rows": rows}


# ------------------------------------------------------------------------------------------------ CLI
def cmd_tune(args: argparse.Namespace) -> int:
    """``raydistill tune <config> [overrides...] --space <space> [--samples N] [--scheduler asha|fifo] ...``."""
    from raydistill.cli import _print_json, _shutdown_ray

    # With a tracking server, MLflow prints "View run ... at <url>" to stdout whenever a run ends; stdout
    # is for --json. Set before Ray starts so the trials' processes inherit it.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        summary = run_sweep(args.config, args.overrides, args.space, samples=args.samples,
                            scheduler=args.scheduler, max_concurrent=args.max_concurrent)
    finally:
        _shutdown_ray()
    log(f"best config: {summary['best_config']}")
    log(f"table: raydistill compare --tracking-uri {summary['mlflow_tracking_uri']} "
        f"--experiment {summary['experiment']} --sweep {summary['parent_run_id']}")
    if args.json:
        _print_json(summary)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``raydistill compare [config] [overrides...] [--tracking-uri U] [--experiment E] [--sweep RUN]``."""
    from raydistill.cli import _print_json
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
        _print_json(table)
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``tune`` and ``compare`` to the ``raydistill`` command."""
    p = subparsers.add_parser("tune", help="search students with Ray Tune (teacher cache filled once; MLflow sweep)")
    p.add_argument("config", help="experiment YAML every trial starts from (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.eval_every=20")
    p.add_argument("--space", required=True, help="search-space YAML (see tune_spaces/)")
    p.add_argument("--samples", type=int, default=None, help="Tune num_samples (default: the space's 'samples')")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="asha", help="asha (default) stops weak trials early")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what the CPUs fit)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=cmd_tune)

    p = subparsers.add_parser("compare", help="a sweep's trials from MLflow: sorted, Pareto sets marked")
    p.add_argument("config", nargs="?", help="the sweep's config (gives the tracking URI and experiment)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of that config")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, or $MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", help="MLflow experiment (default: the config's, or 'raydistill')")
    p.add_argument("--sweep", help="the sweep's parent run id or name (default: the latest sweep)")
    p.add_argument("--sort", default="rsum", choices=("rsum", "val_rsum", "student_params", "images_per_s"),
                   help="column to sort by, best first (default: rsum, the final test RSUM)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=cmd_compare)
