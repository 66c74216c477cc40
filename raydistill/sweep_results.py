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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raydistill.plots import pareto_front, plot_pareto

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
