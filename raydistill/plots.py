"""Plots logged with each run: balancer weights, RSUM curves and the accuracy/cost Pareto front.

Figures are built on ``matplotlib.figure.Figure`` directly (rendered by the Agg canvas), never through
``pyplot``: no global figure registry, no GUI backend, safe in Ray workers and threads. Every file is
written atomically (a temporary name in the same folder, then ``os.replace``), so a reader never sees a
half-written image.

:func:`pareto_front` is a pure function; ``raydistill compare`` and :func:`plot_pareto` both use it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from raydistill.paths import write_atomically

# Formats matplotlib's Agg-based canvases can write; the suffix of the output path picks one.
_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg")


def save_figure(fig: Figure, out_path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write ``fig`` atomically to ``out_path``; the suffix gives the format.

    Args:
        fig: The figure to write (left open; the caller owns it).
        out_path: Destination file, e.g. ``plots/weights.png``. Parent folders are created.
        dpi: Resolution for raster formats.

    Returns:
        The destination path.

    Raises:
        ValueError: If the suffix is not one of png, svg, pdf, jpg, jpeg.
    """
    out = Path(out_path)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in _FORMATS:
        raise ValueError(f"figure path {str(out)!r}: suffix must be one of {list(_FORMATS)}, got {out.suffix!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"))
    return out


def _number(row: Mapping[str, Any], key: str, index: int) -> float | None:
    """``row[key]`` as a float; None when missing or NaN (e.g. a trial stopped before evaluation)."""
    value = row.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"row {index}: {key!r} must be a number, got {value!r}") from None
    return None if math.isnan(number) else number


def pareto_front(
    rows: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    x_lower_is_better: bool = True,
    y_higher_is_better: bool = True,
) -> list[Mapping[str, Any]]:
    """Rows not dominated by any other row on the two objectives ``x_key`` and ``y_key``.

    Row ``a`` dominates row ``b`` when ``a`` is at least as good on both objectives and strictly better on
    one. Identical points do not dominate each other, so duplicates on the front are all kept. Rows where
    either value is missing or NaN are left out (they have nothing to compare).

    Args:
        rows: Mappings holding the two values (numbers or numeric strings, as MLflow params are).
        x_key: Key of the first objective, e.g. ``latency_ms`` or ``student_params``.
        y_key: Key of the second objective, e.g. ``rsum``.
        x_lower_is_better: Whether smaller x is better (cost-like); False for gain-like x.
        y_higher_is_better: Whether larger y is better (accuracy-like); False for cost-like y.

    Returns:
        The front, sorted from the best x to the worst x (and so from the worst y to the best y).

    Raises:
        ValueError: If a present value is not a number.
    """
    x_sign = 1.0 if x_lower_is_better else -1.0
    y_sign = 1.0 if y_higher_is_better else -1.0
    # Work in "lower x is better, higher y is better" coordinates.
    points: list[tuple[float, float, int]] = []
    for index, row in enumerate(rows):
        x, y = _number(row, x_key, index), _number(row, y_key, index)
        if x is not None and y is not None:
            points.append((x_sign * x, y_sign * y, index))
    # Best x first; among equal x, best y first. A sweep then keeps each point whose y beats every y seen
    # so far (all of which have a better or equal x), plus exact duplicates of the last kept point.
    points.sort(key=lambda p: (p[0], -p[1], p[2]))
    front: list[Mapping[str, Any]] = []
    last: tuple[float, float] | None = None
    for x, y, index in points:
        if last is None or y > last[1] or (x, y) == last:
            front.append(rows[index])
            last = (x, y)
    return front


def plot_balancer_weights(history: Sequence[Mapping[str, float]], out_path: str | os.PathLike[str]) -> Path:
    """Line plot of each loss term's balancer weight over training steps, on a log scale.

    Args:
        history: One mapping per logged step: ``{"step": 10, "contrastive": 1.0, "relation": 0.3, ...}``.
            Every key except ``step`` is a line; a key missing at some steps leaves a gap there.
        out_path: Image file to write (png, svg, pdf, jpg).

    Returns:
        The written path.

    Raises:
        ValueError: If the history is empty, a row has no ``step``, or there are no weight keys.
    """
    if not history:
        raise ValueError("balancer weight history is empty: nothing to plot")
    names: list[str] = []
    for index, row in enumerate(history):
        if "step" not in row:
            raise ValueError(f"balancer weight history row {index} has no 'step' key: {dict(row)!r}")
        names.extend(k for k in row if k != "step" and k not in names)
    if not names:
        raise ValueError("balancer weight history has only 'step' keys: no weights to plot")
    steps = [float(row["step"]) for row in history]

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name in names:
        # NaN breaks the line where a term was not logged; non-positive weights cannot sit on a log axis.
        values = [float(row.get(name, math.nan)) for row in history]
        ax.plot(steps, [v if v > 0 else math.nan for v in values], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weight (log scale)")
    ax.set_title("Balancer weights")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, out_path)


def plot_rsum_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]], out_path: str | os.PathLike[str],
    title: str = "Retrieval RSUM",
) -> Path:
    """RSUM (sum of the six retrieval recalls) against training step, one line per run or model.

    Args:
        curves: ``{"student": [(step, rsum), ...], "baseline": [...]}``.
        out_path: Image file to write.
        title: The plot's title.

    Returns:
        The written path.

    Raises:
        ValueError: If there are no curves or a curve has no points.
    """
    if not curves:
        raise ValueError("no RSUM curves to plot")
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name, points in curves.items():
        if not points:
            raise ValueError(f"RSUM curve {name!r} has no (step, rsum) points")
        ordered = sorted((float(s), float(r)) for s, r in points)
        ax.plot([s for s, _ in ordered], [r for _, r in ordered], marker="o", markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("RSUM")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, out_path)


def plot_pareto(
    rows: Sequence[Mapping[str, Any]],
    out_path: str | os.PathLike[str],
    x_key: str,
    y_key: str,
    x_lower_is_better: bool = True,
    label_key: str | None = None,
) -> Path:
    """Scatter of every row on (x, y) with the Pareto front (higher y is better) marked and joined.

    Args:
        rows: Mappings with numeric ``x_key`` and ``y_key`` values (rows lacking either are skipped).
        out_path: Image file to write.
        x_key: Key for the horizontal axis (e.g. ``latency_ms``).
        y_key: Key for the vertical axis (e.g. ``rsum``).
        x_lower_is_better: Whether smaller x is better.
        label_key: Optional key whose value annotates each front point (e.g. ``run_name``).

    Returns:
        The written path.

    Raises:
        ValueError: If no row has both values.
    """
    points = [
        (x, y)
        for i, row in enumerate(rows)
        if (x := _number(row, x_key, i)) is not None and (y := _number(row, y_key, i)) is not None
    ]
    if not points:
        raise ValueError(f"no row has numeric values for both {x_key!r} and {y_key!r}: nothing to plot")
    front = pareto_front(rows, x_key, y_key, x_lower_is_better=x_lower_is_better)
    front_xy = sorted((float(r[x_key]), float(r[y_key])) for r in front)

    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:gray", alpha=0.6, label="runs")
    ax.plot(
        [p[0] for p in front_xy],
        [p[1] for p in front_xy],
        color="tab:red",
        marker="o",
        drawstyle="steps-post" if x_lower_is_better else "steps-pre",
        label="Pareto front",
    )
    if label_key is not None:
        for row in front:
            ax.annotate(str(row.get(label_key, "")), (float(row[x_key]), float(row[y_key])), fontsize="x-small")
    ax.set_xlabel(x_key + (" (lower is better)" if x_lower_is_better else " (higher is better)"))
    ax.set_ylabel(y_key + " (higher is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, out_path)
