"""What runs inside Ray Tune for ``raydistill tune``: the trial trainable, its Train callback, the scheduler.

* :func:`distill_trial` is the function trainable (the Train V2 pattern): it builds the trial's config and
  calls :func:`~raydistill.pipeline.runner.run_experiment`, which fits a ``TorchTrainer`` whose
  ``RunConfig`` carries :class:`ValidationReportCallback`; a last ``ray.tune.report`` adds the final
  test recall, size and throughput. A trial Tune starts again (a resumed sweep) continues its earlier run.
* :class:`LoggedASHA` is ASHA that writes down each decision it takes, so a reader can see why a trial
  stopped.
* :class:`ProgressCallback` prints one line per trial event to stderr.

This module imports Ray Tune at import time; :mod:`raydistill.sweep.driver` imports it only when a sweep runs.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from raydistill.pipeline.progress import log as progress_log
from raydistill.config import Config, config_from_dict
from raydistill.sweep.space import apply_values, check_trial_config, flatten_values
from raydistill.sweep.results import COUNT_KEYS, METRIC, TIME_ATTR, TRIAL_CONFIG_TAG, TRIAL_ID_TAG


def log(message: str) -> None:
    """Progress of the sweep: :func:`raydistill.pipeline.progress.log` with a ``tune:`` prefix."""
    progress_log(f"tune: {message}")


class ValidationReportCallback(TuneReportCallback):
    """Forwards to Tune only the Train reports that carry ``val_rsum``.

    The worker loop also reports loss windows and checkpoints without a validation score; Tune rejects a
    result that lacks the sweep's metric, and ASHA has nothing to compare in it.
    """

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trial_config(base: dict[str, Any], values: dict[str, Any], cache_dir: str, name: str) -> Config:
    """A trial's config: the sweep's resolved base config, the sampled values, and the filled cache.

    Args:
        base: ``Config.model_dump(mode="json")`` of the sweep's config (absolute paths).
        values: The trial's sampled values (dotted keys, as in the search space).
        cache_dir: The cache the sweep filled before the trials.
        name: The trial's run name.

    Raises:
        ConfigError: the values make an invalid config (the space was checked, so this is a bug or a race).
    """
    raw = apply_values(base, values)
    raw = apply_values(raw, {"name": name, "cache.mode": "cache", "cache.dir": cache_dir})
    origin = f"trial {name} ({flatten_values(values)})"
    cfg = config_from_dict(raw, origin=origin)
    check_trial_config(cfg, origin)
    return cfg


def distill_trial(config: dict[str, Any], *, base: dict[str, Any], cache_dir: str, parent_run_id: str | None,
                  sweep: str) -> None:
    """The Tune trainable: one student trained from the cache, logged as a child run of the sweep.

    Validation RSUM reaches Tune through :class:`ValidationReportCallback` while the ``TorchTrainer`` runs;
    when the run finishes, one last report adds the final test recall, size, throughput and counts.

    Tune starts a trial again when a resumed sweep restores it (it was cut short, or failed); that attempt
    continues the run an earlier one left (:func:`earlier_attempt`): from its last Train checkpoint, in the
    same MLflow child run, or, when that run had finished and only its report to Tune was lost, it reports
    the run's saved result without training again.
    """
    import ray.data

    from raydistill.pipeline.run_folder import RUN_RESULT
    from raydistill.pipeline.runner import run_experiment

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, config, cache_dir, name=f"{base['name']}-{trial_id}")
    # init_ray sets these in a driver; inside a trial Ray is already up and init_ray returns at once.
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.execution_no_progress_timeout_s = cfg.ray.no_progress_timeout_s
    tags = {TRIAL_ID_TAG: trial_id, TRIAL_CONFIG_TAG: json.dumps(flatten_values(config), default=str),
            "raydistill.sweep": sweep}
    earlier = earlier_attempt(cfg)
    if earlier is not None and (earlier / RUN_RESULT).is_file():
        log(f"trial {trial_id}: its run {earlier.name} had finished; reporting its saved result")
        summary = json.loads((earlier / RUN_RESULT).read_text(encoding="utf-8"))
    else:
        if earlier is not None:
            log(f"trial {trial_id}: continuing its run {earlier.name} from its last checkpoint")
        summary = run_experiment(cfg, resume=str(earlier) if earlier else None, tags=tags,
                                 parent_run_id=parent_run_id, train_callbacks=[ValidationReportCallback()])
    tune.report(final_report(summary))


def earlier_attempt(cfg: Config) -> Path | None:
    """The run folder an earlier attempt of this trial left under ``<output_dir>/runs``, or None.

    A trial's runs are named ``<trial's name>-<time>`` and a trial's name holds its Tune trial id, unique
    across sweeps; the newest such folder is the one to continue. A trial driver restarted on another node
    does not see a folder on the first node's disk (``output_dir`` is node-local) and starts a new run.
    """
    from raydistill.pipeline.run_folder import RUN_CONFIG

    runs = Path(cfg.output_dir) / "runs"
    folders = sorted(path.parent for path in runs.glob(f"{glob.escape(cfg.name)}-*/{RUN_CONFIG}"))
    return folders[-1] if folders else None


def final_report(summary: dict[str, Any]) -> dict[str, Any]:
    """A finished run's last report to Tune: final validation and test RSUM, size, throughput, counts."""
    student = summary["metrics"]["student"]
    history = [h for h in summary.get("history", []) if METRIC in h]
    return {
        METRIC: history[-1][METRIC] if history else math.nan,
        TIME_ATTR: summary["steps"],
        "rsum": student["rsum"],
        "student_params": summary["student_params"],
        "images_per_s": student["images_per_s"],
        "captions_per_s": student["captions_per_s"],
        "run_id": summary["run_id"],
        "run_dir": summary["run_dir"],
        "finished": 1,
        **{k: summary.get(k) for k in COUNT_KEYS},
    }


class LoggedASHA(AsyncHyperBandScheduler):
    """ASHA that appends each decision it takes on a validation result to a JSON-lines file.

    One line per result that carries the metric: ``{"trial_id", "step", "val_rsum", "decision"}`` with
    ``decision`` ``CONTINUE`` or ``STOP``, in the order the scheduler saw the results.

    Args:
        log_path: The JSON-lines file (appended to).
        **kwargs: ``AsyncHyperBandScheduler`` arguments.
    """

    def __init__(self, log_path: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_path = str(log_path)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if METRIC in result and TIME_ATTR in result:
            line = {"trial_id": trial.trial_id, TIME_ATTR: int(result[TIME_ATTR]), METRIC: float(result[METRIC]),
                    "decision": "STOP" if decision == TrialScheduler.STOP else "CONTINUE"}
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")
        return decision


class ProgressCallback(tune.Callback):
    """One stderr line per trial event (Tune's own reporter is off: stdout is kept for ``--json``)."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log(f"trial {trial.trial_id} started: {flatten_values(trial.config)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("finished"):
            log(f"trial {trial.trial_id} finished: val RSUM {result[METRIC]:.1f}, test RSUM {result['rsum']:.1f}")
        else:
            log(f"trial {trial.trial_id} step {result.get(TIME_ATTR)}: val RSUM {result.get(METRIC, math.nan):.1f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log(f"trial {trial.trial_id} ended")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log(f"trial {trial.trial_id} failed (see {trial.path})")
