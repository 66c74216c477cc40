"""A sweep's results: one row per trial, the Pareto sets, the terminal table and the files logged with the sweep.

Both ``raydistill tune`` (from the trials' final reports) and ``raydistill compare`` (from the MLflow child
runs) build the same rows, so the table reads the same either way::

    {"trial_id": "3f2a1_00000", "status": "finished", "run_id": "...", "config": {"student.preset": "demo"},
     "val_rsum": 131.2, "rsum": 128.0, "student_params": 652_000, "images_per_s": 912.0, ...}

``rsum`` is the final test RSUM (None for a trial the scheduler stopped early); ``val_rsum`` is the last
validation RSUM, the metric the sweep optimises.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raydistill.config import Config, config_from_dict, dump_config
from raydistill.errors import UserError
from raydistill.pipeline.progress import log as progress_log
from raydistill.plots import pareto_front, plot_pareto
from raydistill.sweep.space import apply_values, check_trial_config, flatten_values


class SweepError(UserError, ValueError):
    """A sweep that cannot run as asked (or produced no usable trial); the message says why and what to do."""


class SweepInterrupted(SweepError):
    """The sweep stopped before every trial ended (Ctrl-C, or a signal); the message says how to continue."""


_TEACHER_COUNTS = ("teacher_images_embedded", "teacher_captions_embedded")


def log(message: str) -> None:
    progress_log(f"tune: {message}")

from raydistill.paths import write_text_atomically

METRIC = "val_rsum"
"""The metric every trial reports to Tune and the sweep maximises: validation RSUM."""
TIME_ATTR = "step"
"""The scheduler's time axis: the optimizer step of each report."""
COUNT_KEYS = ("teacher_images_embedded", "teacher_captions_embedded", "dataset_images", "dataset_captions")
"""The pipeline's counts a finished trial reports."""

# MLflow run tags of a sweep (the parent run) and of its trials (the child runs).
SWEEP_KIND_TAG = "raydistill.kind"
SWEEP_KIND = "sweep"
TRIAL_ID_TAG = "raydistill.trial_id"
TRIAL_CONFIG_TAG = "raydistill.trial_config"

# MLflow run status -> trial status (the sweep marks stopped trials KILLED and failed ones FAILED).
_STATUS_OF_RUN = {"FINISHED": "finished", "KILLED": "stopped", "FAILED": "error", "RUNNING": "running",
                  "SCHEDULED": "running"}

METRIC_COLUMNS = ("val_rsum", "rsum", "student_params", "images_per_s", "captions_per_s", "steps")
SIZE_FRONT = "pareto_size"
SPEED_FRONT = "pareto_speed"


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def mark_pareto(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``rows`` with ``pareto_size`` and ``pareto_speed`` set.

    ``pareto_size``: on the front of test RSUM (higher is better) against ``student_params`` (lower is
    better); ``pareto_speed``: against ``images_per_s`` (higher is better). Rows without a test RSUM (trials
    stopped early) are on neither front.
    """
    out = [dict(r, _index=i) for i, r in enumerate(rows)]
    size = {r["_index"] for r in pareto_front(out, "student_params", "rsum", x_lower_is_better=True)}
    speed = {r["_index"] for r in pareto_front(out, "images_per_s", "rsum", x_lower_is_better=False)}
    for r in out:
        index = r.pop("_index")
        r[SIZE_FRONT] = index in size
        r[SPEED_FRONT] = index in speed
    return out


def sort_rows(rows: Sequence[dict[str, Any]], key: str = "rsum") -> list[dict[str, Any]]:
    """Rows sorted best first by ``key`` (higher is better, except ``student_params``); missing values last.

    Ties are broken by validation RSUM, then by trial id, so the order is stable.
    """
    if key not in METRIC_COLUMNS:
        raise ValueError(f"cannot sort a sweep table by {key!r}; allowed: {list(METRIC_COLUMNS)}")
    sign = 1.0 if key == "student_params" else -1.0

    def order(row: Mapping[str, Any]) -> tuple:
        value, val = _number(row.get(key)), _number(row.get("val_rsum"))
        return (value is None, sign * (value or 0.0), val is None, -(val or 0.0), str(row.get("trial_id")))

    return sorted(rows, key=order)


def best_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The finished trial with the highest final validation RSUM (ties: fewer parameters), or None."""
    finished = [r for r in rows if r.get("status") == "finished" and _number(r.get("val_rsum")) is not None]
    if not finished:
        return None
    return max(finished, key=lambda r: (float(r["val_rsum"]), -(_number(r.get("student_params")) or 0.0)))


def config_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sampled keys over all rows, in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row.get("config", {}) if k not in keys)
    return keys


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as an aligned text table; ``*`` marks the size Pareto set, ``+`` the throughput one."""
    keys = config_keys(rows)
    header = ["P", "trial", "status", *keys, "val_RSUM", "RSUM", "params_M", "img/s"]
    lines = []
    for r in rows:
        mark = ("*" if r.get(SIZE_FRONT) else "") + ("+" if r.get(SPEED_FRONT) else "")
        params = _number(r.get("student_params"))
        lines.append([
            mark or "-", str(r.get("trial_id")), str(r.get("status")),
            *[_cell(r.get("config", {}).get(k)) for k in keys],
            _cell(_round(r.get("val_rsum"), 1)), _cell(_round(r.get("rsum"), 1)),
            _cell(None if params is None else params / 1e6), _cell(_round(r.get("images_per_s"), 0)),
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    text = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    text.append("P: * on the RSUM/parameters Pareto front, + on the RSUM/throughput front, - on neither; "
                "RSUM is the final test RSUM (- for trials stopped early)")
    return "\n".join(text)


def _round(value: Any, digits: int) -> float | None:
    number = _number(value)
    return None if number is None else round(number, digits)


# --------------------------------------------------------------------------------------------- files


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, text)
    return path


def write_results(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv`` and the two Pareto plots (when any trial finished).

    Returns:
        ``{"json": ..., "csv": ..., "pareto_size": ..., "pareto_speed": ...}`` for the files written.
    """
    keys = config_keys(rows)
    written = {"json": atomic_write_text(out_dir / "results.json", json.dumps(list(rows), indent=2, default=str) + "\n")}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial_id", "status", "run_id", *keys, *METRIC_COLUMNS, SIZE_FRONT, SPEED_FRONT])
    for r in rows:
        writer.writerow([r.get("trial_id"), r.get("status"), r.get("run_id"),
                         *[_cell(r.get("config", {}).get(k)) for k in keys],
                         *["" if r.get(c) is None else r.get(c) for c in METRIC_COLUMNS],
                         bool(r.get(SIZE_FRONT)), bool(r.get(SPEED_FRONT))])
    written["csv"] = atomic_write_text(out_dir / "results.csv", buffer.getvalue())
    plotted = [dict(r, label=_label(r, keys)) for r in rows if _number(r.get("rsum")) is not None]
    if plotted:
        written["pareto_size"] = plot_pareto(plotted, out_dir / "pareto_params.png", "student_params", "rsum",
                                             x_lower_is_better=True, label_key="label")
        if all(_number(r.get("images_per_s")) is not None for r in plotted):
            written["pareto_speed"] = plot_pareto(plotted, out_dir / "pareto_throughput.png", "images_per_s", "rsum",
                                                  x_lower_is_better=False, label_key="label")
    return written


def _label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    """The trial's sampled values, skipping keys it has no value for (another option's parameters)."""
    values = [row.get("config", {}).get(k) for k in keys]
    return ", ".join(_cell(v) for v in values if v not in (None, {}, [])) or str(row.get("trial_id"))


# --------------------------------------------------------------------------------------------- from MLflow


def rows_from_runs(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Sweep rows from the child runs of a sweep (``raydistill.tracking.read_runs`` dicts)."""
    rows = []
    for run in runs:
        tags, metrics = run.get("tags", {}), run.get("metrics", {})
        try:
            config = json.loads(tags.get(TRIAL_CONFIG_TAG, "{}"))
        except json.JSONDecodeError:
            config = {}
        params = metrics.get("student_params")
        rows.append({
            "trial_id": tags.get(TRIAL_ID_TAG, run.get("run_name")),
            "status": _STATUS_OF_RUN.get(str(run.get("status")), str(run.get("status")).lower()),
            "run_id": run.get("run_id"),
            "config": config,
            "val_rsum": metrics.get("val_rsum"),
            "rsum": metrics.get("test/rsum"),
            "student_params": None if params is None else int(params),
            "images_per_s": metrics.get("test/images_per_s"),
            "captions_per_s": metrics.get("test/captions_per_s"),
            "steps": None,
        })
    return rows


def latest_sweep(runs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The most recently started sweep (parent) run among ``runs``, or None."""
    sweeps = [r for r in runs if r.get("tags", {}).get(SWEEP_KIND_TAG) == SWEEP_KIND]
    return max(sweeps, key=lambda r: (r.get("start_time") or 0, r["run_id"])) if sweeps else None


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
