"""`raydistill tune` and `raydistill compare`: a Ray Tune search over students, and its table from MLflow.

``raydistill tune configs/quick.yaml --space tune_spaces/demo.yaml`` runs, top to bottom
(:func:`run_sweep`):

1. load the config and the search space (:mod:`raydistill.sweep.space`) and check every grid point;
2. fill the teacher-embedding cache ONCE (:func:`raydistill.pipeline.runner.embed`): the teacher never
   runs in a trial, every trial reads the cache (``cache.mode=cache``);
3. open the MLflow parent run of the sweep;
4. ``Tuner.fit()``: each trial is :func:`raydistill.sweep.trial.distill_trial`, a function trainable that
   fits a ``TorchTrainer`` (through ``run_experiment``) whose validation reports reach Tune; the
   scheduler (ASHA by default, on ``val_rsum`` against the reported ``step``) stops the weak trials; each
   trial's run is an MLflow child run of the sweep;
5. end the child runs of stopped trials (KILLED, with the validation curve Tune received), write the
   results table, the Pareto plots and the best trial's config as a runnable YAML; log them to the parent.

A trial reserves only its driver's CPU (:func:`trial_bundles`); how many run at once by default is what
fits in what the cluster can scale to (:func:`cluster_capacity`, :func:`default_max_concurrent`).

``raydistill tune ... --resume SWEEP`` (:func:`resume_sweep`) continues an interrupted sweep from its folder's
record (``sweep.json``) with Tune's own experiment restore, into the same MLflow parent run.

MLflow under concurrent trials: every trial logs through :class:`raydistill.tracking.Tracker`, whose
sends are retried (SQLite's "database is locked" is one failure it retries) and fall back to a local
file rather than failing the trial; the driver itself writes only before and after ``Tuner.fit()``.

Ray Tune is imported only when a sweep runs, so the other ``raydistill`` commands start fast.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from raydistill.config import Config, config_from_dict, dump_config, load_config
from raydistill.pipeline.progress import log as progress_log
from raydistill.sweep.capacity import cluster_capacity, default_max_concurrent, trial_bundles
from raydistill.sweep.space import SearchSpace, load_space
from raydistill.sweep.results import (
    SweepError,
    SweepInterrupted,
    _close_trial_runs,
    _trial_row,
    _values_of,
    sweep_counts,
    write_best_config,
    METRIC,
    SWEEP_KIND,
    SWEEP_KIND_TAG,
    TIME_ATTR,
    atomic_write_text,
    best_row,
    format_table,
    mark_pareto,
    sort_rows,
    write_results,
)

SCHEDULERS = ("asha", "fifo")
SCHEDULER_LOG = "scheduler_log.jsonl"
BEST_CONFIG = "best_config.yaml"
SWEEP_RECORD = "sweep.json"
"""The sweep folder's record of what a resume needs: the command, the settings, the cache, the parent run."""
"""The autoscaler's config in the head's home folder, as ``ray up`` writes it."""


def log(message: str) -> None:
    """Progress of the sweep: :func:`raydistill.pipeline.progress.log` with a ``tune:`` prefix."""
    progress_log(f"tune: {message}")


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


def _trial_steps(cfg: Config, cache_dir: str) -> int:
    """Optimizer steps of every trial (the scheduler's horizon)."""
    from raydistill.pipeline.cache import EmbeddingCache
    from raydistill.pipeline.run_folder import planned_steps

    captions = 0
    if cfg.train.steps is None:
        # Counted by the cache the sweep filled, as run_experiment counts them in cache mode.
        captions = EmbeddingCache(cache_dir).complete_splits()[cfg.data.train_split]["captions"]
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
        max_concurrent: Trials at once (default: as many as fit in what the cluster can scale to, see
            :func:`cluster_capacity` and :func:`default_max_concurrent`).

    Raises:
        SweepError, ConfigError: bad arguments or space, or no trial finished.
        SweepInterrupted: the sweep was stopped before every trial ended (:func:`resume_sweep` continues it).
    """
    from raydistill.sweep.space import validate_space
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
    record: dict[str, Any] = {
        "sweep": sweep,
        "command": {"config": config_path, "overrides": list(overrides), "space": space_path},
        "asked": {"samples": samples, "scheduler": scheduler, "max_concurrent": max_concurrent},
        "tune_path": str(Path(cfg.output_dir) / "tune" / sweep),
    }
    atomic_write_text(sweep_dir / SWEEP_RECORD, json.dumps(record, indent=2))
    log(f"sweep {sweep} in {sweep_dir}; if it is interrupted, continue it with: {_resume_command(record)}")

    connected = _start_ray(cfg)
    cache = _fill_cache(cfg)
    settings = _sweep_settings(cfg, space, record, cache["cache_dir"], connected)
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri, Path(cfg.output_dir))
    parent = _open_parent_run(cfg, space, sweep, sweep_dir, tracking_uri, settings)
    record.update({"settings": settings, "cache": cache, "tracking_uri": tracking_uri, "parent_run_id": parent.run_id})
    atomic_write_text(sweep_dir / SWEEP_RECORD, json.dumps(record, indent=2))
    with parent:  # an exception or Ctrl-C ends the sweep's run FAILED / KILLED
        tuner = _make_tuner(cfg, space, sweep_dir, record)
        return _run_trials(cfg, tuner, record, sweep_dir, parent)


def resume_sweep(config_path: str, overrides: list[str], space_path: str, resume: str, samples: int | None = None,
                 scheduler: str | None = None, max_concurrent: int | None = None) -> dict[str, Any]:
    """Continue an interrupted sweep and return its summary, as :func:`run_sweep` would have.

    The sweep goes on with the config and space it started with (saved in its folder; the command's config
    and overrides locate the folder, and a difference from the saved config is reported): a cache it had
    filled is reused, its MLflow parent run is re-opened (and ends FINISHED), and Tune restores its
    experiment (``Tuner.restore(..., resume_errored=True)``): finished trials keep their results and are
    not run again, trials cut short or failed continue their own run folder and MLflow child run
    (:func:`raydistill.sweep.trial.distill_trial`), trials not started yet start.

    Args:
        config_path, overrides, space_path: As given to :func:`run_sweep` (they locate the sweep).
        resume: The sweep's name (under ``<output_dir>/sweeps``) or its folder.
        samples, scheduler, max_concurrent: Must be None: a resumed sweep keeps the settings it started with.

    Raises:
        SweepError: no such sweep, a setting given again, or no trial finished.
        SweepInterrupted: interrupted again.
    """
    import yaml

    from raydistill.tracking import Tracker, resolve_tracking_uri

    for flag, value in (("--samples", samples), ("--scheduler", scheduler), ("--max-concurrent", max_concurrent)):
        if value is not None:
            raise SweepError(f"{flag}: a resumed sweep keeps the settings it started with; drop {flag}")
    asked = prepare_sweep(config_path, overrides, load_space(space_path))
    sweep_dir = find_sweep_dir(resume, asked.output_dir)
    record = json.loads((sweep_dir / SWEEP_RECORD).read_text(encoding="utf-8"))
    saved = sweep_dir / "config.yaml"
    cfg = config_from_dict(yaml.safe_load(saved.read_text(encoding="utf-8")), origin=str(saved))
    _report_changes(asked, cfg, Path(space_path), sweep_dir / "space.yaml")
    space = load_space(sweep_dir / "space.yaml")
    log(f"resuming sweep {record['sweep']} ({sweep_dir}) with the config and space it started with")

    connected = _start_ray(cfg)
    cache = record.get("cache")
    if cache is None or not _cache_complete(cfg, cache["cache_dir"]):
        cache = _fill_cache(cfg)
    settings = record.get("settings") or _sweep_settings(cfg, space, record, cache["cache_dir"], connected)
    tracking_uri = record.get("tracking_uri") or resolve_tracking_uri(cfg.tracking.uri, Path(cfg.output_dir))
    if record.get("parent_run_id"):
        parent = Tracker(tracking_uri, cfg.tracking.experiment, run_id=record["parent_run_id"],
                         local_dir=sweep_dir / "tracking", enabled=cfg.tracking.enabled)
    else:
        parent = _open_parent_run(cfg, space, record["sweep"], sweep_dir, tracking_uri, settings)
    record.update({"settings": settings, "cache": cache, "tracking_uri": tracking_uri, "parent_run_id": parent.run_id})
    atomic_write_text(sweep_dir / SWEEP_RECORD, json.dumps(record, indent=2))
    with parent:
        tuner = _restore_tuner(cfg, record) or _make_tuner(cfg, space, sweep_dir, record)
        return _run_trials(cfg, tuner, record, sweep_dir, parent)


def find_sweep_dir(sweep: str, output_dir: str) -> Path:
    """A sweep folder given by path, or by name under ``<output_dir>/sweeps``.

    Raises:
        SweepError: neither holds a sweep record (``sweep.json``).
    """
    tried = [Path(sweep), Path(output_dir) / "sweeps" / sweep]
    for path in tried:
        if (path / SWEEP_RECORD).is_file():
            return path.resolve()
    raise SweepError(f"--resume {sweep}: no sweep folder holding {SWEEP_RECORD} (tried {', '.join(map(str, tried))}); "
                     "give the name or folder `raydistill tune` printed when the sweep started")


def _start_ray(cfg: Config) -> bool:
    """Connect to the configured cluster or start a local instance; True when it connected to a cluster."""
    from raydistill.pipeline.ray_env import init_ray

    init_ray(cfg)
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def _fill_cache(cfg: Config) -> dict[str, Any]:
    """Fill (or complete) the teacher-embedding cache: the teacher's only pass of the sweep."""
    from raydistill.pipeline.runner import embed

    log("filling the teacher-embedding cache: the teacher's only pass of the sweep")
    return embed(cfg)


def _cache_complete(cfg: Config, cache_dir: str) -> bool:
    """Whether the cache a sweep filled still holds every split its trials read."""
    from raydistill.pipeline.cache import EmbeddingCache

    needed = {s for s in (cfg.data.train_split, cfg.data.test_split, cfg.data.val_split) if s}
    try:
        return needed <= set(EmbeddingCache(cache_dir).complete_splits())
    except Exception as err:  # unreadable or gone: fill it again, which resumes whatever is left
        log(f"the sweep's cache {cache_dir} is not usable ({err}): filling it again")
        return False


def _sweep_settings(cfg: Config, space: SearchSpace, record: dict[str, Any], cache_dir: str,
                    connected: bool) -> dict[str, Any]:
    """The sweep's settings (logged to MLflow, part of ``--json``), with the trials it runs at once."""
    asked = record["asked"]
    steps = _trial_steps(cfg, cache_dir)
    max_concurrent = asked["max_concurrent"]
    if max_concurrent:
        log(f"up to {max_concurrent} trial(s) at once (--max-concurrent)")
    else:
        capacity = cluster_capacity(connected)
        max_concurrent = default_max_concurrent(cfg, capacity, trials=space.grid_size() * asked["samples"])
        log(f"up to {max_concurrent} trial(s) at once: what fits in {capacity.describe()}")
    return {"space": record["command"]["space"], "scheduler": asked["scheduler"], "samples": asked["samples"],
            "max_concurrent": max_concurrent, "planned_steps": steps, "metric": METRIC}


def _report_changes(asked: Config, saved: Config, space_path: Path, saved_space: Path) -> None:
    """Say where the command's config or space differ from those the sweep started with (which win)."""
    from raydistill.tracking import flatten_config

    now, then = flatten_config(asked.model_dump(mode="json")), flatten_config(saved.model_dump(mode="json"))
    changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    if changed:
        log(f"warning: the command's config differs from the sweep's at {', '.join(changed)}; "
            "the sweep continues with its own")
    if space_path.read_bytes() != saved_space.read_bytes():
        log(f"warning: {space_path} differs from the space the sweep started with; the sweep continues with its own")


def _resume_command(record: dict[str, Any]) -> str:
    command = record["command"]
    return shlex.join(["raydistill", "tune", command["config"], *command["overrides"], "--space", command["space"],
                       "--resume", record["sweep"]])


def _run_trials(cfg: Config, tuner: Any, record: dict[str, Any], sweep_dir: Path, parent: Any) -> dict[str, Any]:
    """``Tuner.fit()``, then the results: rows, child runs ended, files written, the parent run ended."""
    sweep, settings = record["sweep"], record["settings"]
    log(f"sweep {sweep}: {settings['scheduler']} scheduler, up to {settings['max_concurrent']} trial(s) at once, "
        f"{settings['planned_steps']} steps per trial")
    grid = tuner.fit()
    unfinished = _unfinished_trials(record["tune_path"])
    if unfinished:
        # Tune stops on Ctrl-C (or SIGUSR1) and saves its experiment: the trials' runs stay as they are.
        parent.finish("KILLED")
        raise SweepInterrupted(f"sweep {sweep} was interrupted before trial(s) {', '.join(unfinished)} ended; "
                               f"continue it with: {_resume_command(record)}")
    rows = [_trial_row(result) for result in grid]
    if parent.run_id:
        _close_trial_runs(rows, record["tracking_uri"], cfg.tracking.experiment, parent.run_id, sweep_dir)
    rows = sort_rows(mark_pareto(rows))
    summary = _finish_sweep(cfg, rows, grid, record["cache"], parent, sweep_dir, settings)
    summary.update({"parent_run_id": parent.run_id, "mlflow_tracking_uri": record["tracking_uri"], "sweep": sweep,
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


def _unfinished_trials(tune_path: str) -> list[str]:
    """The trials Tune's saved experiment holds as neither finished nor failed: an interrupted ``fit()``.

    Read from the experiment's saved state, which is what ``Tuner.restore`` continues: after an interruption
    Tune saves the state, then stops the live trials, which the returned results then show as ended.
    """
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    return [t.trial_id for t in ExperimentAnalysis(tune_path).trials if t.status not in (Trial.TERMINATED, Trial.ERROR)]


def _trainable(cfg: Config, record: dict[str, Any]) -> Any:
    """The trial function with its fixed arguments and its placement-group bundles."""
    from ray import tune

    from raydistill.sweep.trial import distill_trial

    trainable = tune.with_parameters(distill_trial, base=cfg.model_dump(mode="json"),
                                     cache_dir=record["cache"]["cache_dir"], parent_run_id=record["parent_run_id"],
                                     sweep=record["sweep"])
    return tune.with_resources(trainable, tune.PlacementGroupFactory(trial_bundles(cfg)))


def _make_tuner(cfg: Config, space: SearchSpace, sweep_dir: Path, record: dict[str, Any]) -> Any:
    """The ``Tuner``: the trainable, the space, the scheduler, the experiment's folder."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from raydistill.sweep.trial import LoggedASHA, ProgressCallback

    settings = record["settings"]
    if settings["scheduler"] == "asha":
        scheduler = LoggedASHA(sweep_dir / SCHEDULER_LOG, time_attr=TIME_ATTR, reduction_factor=2,
                               stop_last_trials=False,
                               **asha_settings(settings["planned_steps"], cfg.train.eval_every))
    else:
        scheduler = FIFOScheduler()
    tune_path = Path(record["tune_path"])
    return tune.Tuner(
        _trainable(cfg, record),
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=settings["samples"], scheduler=scheduler,
            search_alg=BasicVariantGenerator(max_concurrent=settings["max_concurrent"], random_state=cfg.train.seed),
        ),
        run_config=tune.RunConfig(name=tune_path.name, storage_path=str(tune_path.parent), verbose=0,
                                  callbacks=[ProgressCallback()]),
    )


def _restore_tuner(cfg: Config, record: dict[str, Any]) -> Any:
    """Tune's own restore of the sweep's experiment, or None where Tune never saved one (it had not started).

    The scheduler, search algorithm (with the trials it has yet to create) and callbacks come back from the
    experiment folder; ASHA's rungs start empty, so trials that continue are judged against each other only.
    """
    from ray import tune

    path = record["tune_path"]
    if not tune.Tuner.can_restore(path):
        log(f"no Tune experiment at {path} yet: the sweep's trials start now")
        return None
    log(f"restoring Tune's experiment {path}: finished trials keep their results, the others continue")
    return tune.Tuner.restore(path, trainable=_trainable(cfg, record), resume_errored=True)


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


# ------------------------------------------------------------------------------------------------ CLI
