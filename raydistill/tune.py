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

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydistill.pipeline.progress import log as progress_log
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
SWEEP_RECORD = "sweep.json"
"""The sweep folder's record of what a resume needs: the command, the settings, the cache, the parent run."""
AUTOSCALER_CONFIG = "ray_bootstrap_config.yaml"
"""The autoscaler's config in the head's home folder, as ``ray up`` writes it."""
_TEACHER_COUNTS = ("teacher_images_embedded", "teacher_captions_embedded")


class SweepError(ValueError):
    """A sweep that cannot run as asked (or produced no usable trial); the message says why and what to do."""


class SweepInterrupted(SweepError):
    """The sweep stopped before every trial ended (Ctrl-C, or a signal); the message says how to continue."""


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


def trial_bundles(cfg: Config) -> list[dict[str, float]]:
    """The placement-group bundles of one trial: its driver's CPU, and nothing for the teacher.

    Trials run in cache mode: the teacher's dimension comes from the cache's manifest and the teacher is
    loaded nowhere, so a trial reserves none of the teacher pool's CPUs, GPUs or custom resources (``cfg``
    does not change the bundle). What the trial starts besides its driver needs no room in this group:

    * Train's workers are placed in a group of their own (Train V2's controller creates it), and a worker
      does not put its child tasks in it (Train schedules workers without ``capture_child_tasks``);
    * Ray Data's tasks, the driver's evaluation reads and each worker's epoch datasets, carry Data's own
      scheduling strategy (``SPREAD``, or ``DEFAULT`` for large arguments), and Ray puts only tasks without
      one in the caller's group: they run on the cluster's free CPUs, which :func:`default_max_concurrent`
      leaves them;
    * the Train controller, its synchronisation actor and raydistill's counters actor reserve no CPU and fit
      in the driver's bundle.
    """
    return [{"CPU": 1.0}]


@dataclass(frozen=True)
class NodeType:
    """Nodes of one kind that trials can use.

    Attributes:
        name: The node type's name (or a node's id on a fixed instance).
        resources: What one such node offers (``CPU``, ``GPU``, custom resources).
        count: The most such nodes at once; None: no limit.
    """

    name: str
    resources: dict[str, float]
    count: int | None


@dataclass(frozen=True)
class Capacity:
    """What the cluster can scale to: its node types, caps on summed resources, and where that came from."""

    node_types: list[NodeType]
    source: str
    max_resources: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        types = ", ".join(f"{t.name} x{'unlimited' if t.count is None else t.count}" for t in self.node_types)
        return f"{self.source}: {types}"


def cluster_capacity(connected: bool) -> Capacity:
    """What the Ray cluster this process is connected to can scale to, not only what is up now.

    Sources, first found wins:

    1. the cluster config an autoscaler reports to the GCS (node types with their resources and
       ``max_count``), which Ray Train and Ray Data read for the same question;
    2. the autoscaler's own config on the head, ``~/ray_bootstrap_config.yaml`` (``ray up`` writes it),
       read with the autoscaler's reader, when this process runs on the head of a cluster it connected to;
    3. the nodes up now (a fixed instance, or a cluster that reports neither).

    Args:
        connected: Whether the sweep connected to a running cluster (False: it started a local instance,
            whose nodes are all there is).
    """
    if connected:
        for found in (_reported_cluster_config(), _autoscaler_config_file(Path.home() / AUTOSCALER_CONFIG)):
            if found is not None:
                return found
    return _nodes_up_now()



def _reported_cluster_config() -> Capacity | None:
    """The node types an autoscaler reported to the GCS, or None where none did (a private Ray API)."""
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as err:  # a private API: a Ray upgrade may move it; the next source still answers
        log(f"could not read the cluster config from the GCS ({err}); trying the next source")
        return None
    if config is None or not config.node_group_configs:
        return None
    types = [NodeType(g.name, dict(g.resources), None if g.max_count == -1 else int(g.max_count))
             for g in config.node_group_configs if g.max_count != 0]
    return Capacity(types, "the cluster config the autoscaler reported", dict(config.max_resources))


def _autoscaler_config_file(path: Path) -> Capacity | None:
    """Node types and ``max_workers`` from the autoscaler's config file, when this process runs on the head."""
    import ray
    import yaml

    if not path.is_file():
        return None
    head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    if head != [ray.get_runtime_context().get_node_id()]:
        return None  # the file is the head's own: elsewhere it describes some other cluster
    try:
        return capacity_from_autoscaler_config(yaml.safe_load(path.read_text(encoding="utf-8")),
                                               f"the autoscaler's config {path}")
    except Exception as err:  # an unreadable file: fall back to the nodes up now, and say so
        log(f"could not read the autoscaler's config {path} ({err}); counting the nodes up now")
        return None


def capacity_from_autoscaler_config(raw: dict[str, Any], source: str) -> Capacity | None:
    """The node types of a cluster-launcher config (``clusters/aws.yaml``), as the autoscaler reads it.

    Each type counts up to its ``max_workers`` (the head's type one more, for the head); where the cluster-wide
    ``max_workers`` is below their sum, it bounds each type at its ``min_workers`` plus the nodes left to start.
    Ray's own reader fills in the launcher's defaults and validates the file; nothing is asked of the cloud.

    Returns:
        The capacity, or None for a config without ``available_node_types``.
    """
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    config = AutoscalingConfig(raw, skip_content_hash=True)
    configs = config.get_node_type_configs() or {}
    head_type = config.get_head_node_type()
    spare = config.get_max_num_worker_nodes()
    if spare is not None:
        spare -= sum(c.min_worker_nodes for name, c in configs.items() if name != head_type)
    types = []
    for name, c in configs.items():
        count = c.max_worker_nodes
        if spare is not None and name != head_type:
            count = min(count, c.min_worker_nodes + max(0, spare))
        if count:
            types.append(NodeType(name, dict(c.resources), count))
    return Capacity(types, source) if types else None


def _nodes_up_now() -> Capacity:
    """The alive nodes' resources (``node:*`` and other per-node markers left out)."""
    import ray

    types = [NodeType(n["NodeID"][:8], {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}, 1)
             for n in ray.nodes() if n["Alive"]]
    return Capacity(types, "the nodes up now")


def trial_demand(cfg: Config, gpus: bool) -> tuple[dict[str, float], dict[str, float]]:
    """One Train worker's bundle, and everything one trial needs at once (summed over its bundles).

    A trial needs its driver's bundle (:func:`trial_bundles`), ``train.num_workers`` worker bundles
    (``train.cpus_per_worker`` CPUs, one GPU each when the workers train on GPUs, ``train.resources_per_worker``)
    and, outside any reservation, ``data.decode_cpus`` per worker: one Ray Data task per worker at a time,
    so that its epochs' datasets are never starved.

    Args:
        gpus: Whether the cluster has GPUs (``train.use_gpu: auto`` then trains on them).
    """
    t = cfg.train
    worker = {"CPU": float(t.cpus_per_worker), **{k: float(v) for k, v in t.resources_per_worker.items()}}
    if t.use_gpu == "yes" or (t.use_gpu == "auto" and gpus):
        worker["GPU"] = 1.0
    total: dict[str, float] = {}
    for bundle in trial_bundles(cfg) + [worker] * t.num_workers + [{"CPU": cfg.data.decode_cpus}] * t.num_workers:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return worker, total


def default_max_concurrent(cfg: Config, capacity: Capacity, trials: int) -> int:
    """How many trials fit at once in what the cluster can scale to; at least 1, at most ``trials``.

    ``n`` trials fit when the node types hold ``n x train.num_workers`` whole worker bundles (a bundle sits
    on one node) and their summed resources (capped by ``capacity.max_resources``) cover ``n`` times what
    one trial needs (:func:`trial_demand`). A node type without a count limit fits any number.
    """
    gpus = any(t.resources.get("GPU", 0) > 0 for t in capacity.node_types)
    worker, per_trial = trial_demand(cfg, gpus)
    slots = sum(_times(t.count, _fits(t.resources, worker)) for t in capacity.node_types)
    fit = min(trials, slots // cfg.train.num_workers)
    for key, need in per_trial.items():
        total = sum(_times(t.count, t.resources.get(key, 0.0)) for t in capacity.node_types)
        total = min(total, capacity.max_resources.get(key, math.inf))
        fit = min(fit, total / need + 1e-9)
    return max(1, math.floor(fit))


def _fits(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many ``bundle`` one node with ``resources`` holds."""
    return min(math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0)


def _times(count: int | None, amount: float) -> float:
    """``count`` nodes' worth of ``amount`` (no count limit: unlimited, unless there is none of it)."""
    if not amount:
        return 0.0
    return math.inf if count is None else count * amount


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
    (:func:`raydistill.tune_trial.distill_trial`), trials not started yet start.

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

    from raydistill.tune_trial import distill_trial

    trainable = tune.with_parameters(distill_trial, base=cfg.model_dump(mode="json"),
                                     cache_dir=record["cache"]["cache_dir"], parent_run_id=record["parent_run_id"],
                                     sweep=record["sweep"])
    return tune.with_resources(trainable, tune.PlacementGroupFactory(trial_bundles(cfg)))


def _make_tuner(cfg: Config, space: SearchSpace, sweep_dir: Path, record: dict[str, Any]) -> Any:
    """The ``Tuner``: the trainable, the space, the scheduler, the experiment's folder."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from raydistill.tune_trial import LoggedASHA, ProgressCallback

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

    The scheduler stops a trial by killing it mid-run: its run is still RUNNING (or FAILED) and may lack
    validation points its worker had not sent yet; the driver adds the ones Tune received. A trial of a resumed sweep
    that could not continue its earlier run (restarted on another node, or cut short before its run folder
    recorded the run) left that run RUNNING: it ends KILLED, tagged ``superseded``.
    """
    from mlflow.tracking import MlflowClient

    from raydistill.tracking import read_runs

    runs_of: dict[str | None, list[dict[str, Any]]] = {}
    for run in read_runs(tracking_uri, experiment, parent_run_id):  # oldest first
        runs_of.setdefault(run["tags"].get(TRIAL_ID_TAG), []).append(run)
    client = MlflowClient(tracking_uri=tracking_uri)
    for row in rows:
        runs = runs_of.get(row["trial_id"])
        if not runs:
            continue
        run = next((r for r in runs if r["run_id"] == row.get("run_id")), runs[-1])
        row["run_id"] = run["run_id"]
        for other in runs:
            if other is not run and other["status"] == "RUNNING":
                _end_trial_run(tracking_uri, experiment, other["run_id"], sweep_dir, "superseded", "KILLED")
        if row["status"] == "finished" or (row["status"] == "error" and run["status"] != "RUNNING"):
            continue
        # A stopped trial's run may also have ended FAILED: the kill reached its tracker as an exception.
        logged = {m.step for m in client.get_metric_history(run["run_id"], METRIC)}
        tracker = _end_trial_run(tracking_uri, experiment, run["run_id"], sweep_dir, row["status"], None)
        for step, value in row["history"]:
            if step not in logged:
                tracker.log_metrics({METRIC: value}, step=step)
        tracker.finish("KILLED" if row["status"] == "stopped" else "FAILED")


def _end_trial_run(tracking_uri: str, experiment: str, run_id: str, sweep_dir: Path, trial_status: str,
                   end: str | None) -> Any:
    """A tracker on a trial's child run, tagged with the trial's status; ended ``end`` when given."""
    from raydistill.tracking import Tracker

    tracker = Tracker(tracking_uri, experiment, run_id=run_id, local_dir=sweep_dir / "tracking" / run_id)
    tracker.set_tags({"raydistill.trial_status": trial_status})
    if end:
        tracker.finish(end)
    return tracker


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
    """``raydistill tune <config> [overrides...] --space <space> [--samples N] [--scheduler asha|fifo] ...``.

    With ``--resume SWEEP`` it continues that sweep instead (:func:`resume_sweep`). An interrupted sweep
    exits with status 130 and prints the command that continues it.
    """
    from raydistill.cli import _print_json, _shutdown_ray

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
        log(str(err))
        return 130
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
