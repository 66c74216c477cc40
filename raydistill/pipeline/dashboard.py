"""The run's metrics on the Ray dashboard: training gauges, teacher throughput gauges, the list of all of them.

Ray exports ``ray.util.metrics`` gauges on each node's Prometheus endpoint as ``ray_<name>``; the dashboard's
Grafana panels (or any Prometheus) graph them. The pipeline's other metrics are exported where they are
counted (:data:`EXPORTED_METRICS` lists them all, with the module that owns each):

* :mod:`raydistill.pipeline.counters`: counters of images and captions the teacher embedded, images decoded,
  bad images (``rate()`` of these gives cluster-wide rates over any window);
* this module: :class:`LiveMetrics`, rank-0 training gauges (each loss term and balancer weight, samples/s,
  step time), and :class:`TeacherThroughput`, a teacher actor's own rate over the last ``window_s`` seconds, so a
  slow or idle actor shows up directly.

Usage inside a teacher actor (once per batch, after the model ran)::

    self.rates = TeacherThroughput()                                    # in __init__
    self.rates.record(images=n_embedded, captions=n_captions, seconds=batch_seconds)

Prometheus: ``sum(ray_raydistill_teacher_images_per_s)`` is the pool's throughput.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

#: Every metric raydistill exports, as it appears on a node's Prometheus endpoint (``<term>`` is a DSMD term:
#: feature, cosine, contrastive, hard_negative), with the module that exports it.
EXPORTED_METRICS: dict[str, str] = {
    "ray_raydistill_teacher_images_per_s": "raydistill.pipeline.dashboard",
    "ray_raydistill_teacher_captions_per_s": "raydistill.pipeline.dashboard",
    "ray_raydistill_teacher_images_embedded_total": "raydistill.pipeline.counters",
    "ray_raydistill_teacher_captions_embedded_total": "raydistill.pipeline.counters",
    "ray_raydistill_teacher_seconds_total": "raydistill.pipeline.counters",
    "ray_raydistill_images_decoded_total": "raydistill.pipeline.counters",
    "ray_raydistill_bad_images_total": "raydistill.pipeline.counters",
    "ray_raydistill_train_loss_<term>": "raydistill.pipeline.dashboard",
    "ray_raydistill_train_weight_<term>": "raydistill.pipeline.dashboard",
    "ray_raydistill_train_samples_per_s": "raydistill.pipeline.dashboard",
    "ray_raydistill_train_step_time_s": "raydistill.pipeline.dashboard",
}


def window_rate(events: deque[tuple[float, float]], now: float, window_s: float, started: float) -> float:
    """Events per second over the last ``window_s`` seconds (fewer if the work began more recently).

    Args:
        events: ``(time, count)`` pairs in time order; pairs older than the window are dropped in place.
        now: the current time (same clock as the events).
        window_s: the averaging window.
        started: when the work began; before a full window has passed the rate is over ``now - started``.

    Returns:
        The sum of the counts inside ``(now - window_s, now]`` divided by the covered span (0 for no span).
    """
    cutoff = now - window_s
    while events and events[0][0] <= cutoff:
        events.popleft()
    span = min(window_s, now - started)
    if span <= 0:
        return 0.0
    return sum(count for _, count in events) / span


class TeacherThroughput:
    """Gauges ``raydistill_teacher_images_per_s`` and ``raydistill_teacher_captions_per_s`` of one actor.

    The rates are wall-clock: time the actor waits for input (back-pressure, a slow decoder) lowers them,
    which is what the dashboard should show. The clock starts when the first recorded batch started, so
    model loading and queueing before the first batch are not counted.

    Args:
        window_s: the rates are averaged over this many seconds of wall-clock time.
        actor: tag value that tells actors apart (default: this Ray actor's id, shortened).
        clock: a monotonic clock in seconds (tests pass their own).
    """

    def __init__(self, window_s: float = 30.0, actor: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self.clock = clock
        self.started: float | None = None
        self.actor = actor or _actor_tag()
        self._images: deque[tuple[float, float]] = deque()
        self._captions: deque[tuple[float, float]] = deque()
        self._gauges: dict[str, Any] | None = None

    def record(self, images: int, captions: int, seconds: float = 0.0) -> dict[str, float]:
        """Add one batch's work, update the gauges and return the rates (``images_per_s``, ``captions_per_s``).

        Args:
            images: images the teacher embedded in this batch.
            captions: captions it embedded.
            seconds: how long the batch took; it ended now.
        """
        now = self.clock()
        if self.started is None:
            self.started = now - max(0.0, seconds)
        self._images.append((now, float(images)))
        self._captions.append((now, float(captions)))
        rates = {
            "images_per_s": window_rate(self._images, now, self.window_s, self.started),
            "captions_per_s": window_rate(self._captions, now, self.window_s, self.started),
        }
        self._export(rates)
        return rates

    def _export(self, rates: dict[str, float]) -> None:
        try:
            if self._gauges is None:
                from ray.util.metrics import Gauge

                self._gauges = {
                    key: Gauge(f"raydistill_teacher_{key}", description=f"teacher {key.replace('_per_s', '')} per "
                               f"second over the last {self.window_s:g} s, per actor", tag_keys=("actor",))
                    for key in rates
                }
            for key, value in rates.items():
                self._gauges[key].set(value, tags={"actor": self.actor})
        except Exception:  # the dashboard is a view: exporting never affects the teacher
            pass


def _actor_tag() -> str:
    """This Ray actor's id (12 characters), or ``driver`` outside an actor."""
    try:
        import ray

        actor_id = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except Exception:
        actor_id = None
    return actor_id[:12] if actor_id else "driver"


class LiveMetrics:
    """Set one Ray gauge per metric name; failures to export never affect training."""

    def __init__(self, run: str) -> None:
        self.run = run
        self._gauges: dict[str, Any] = {}

    def record(self, metrics: dict[str, float]) -> None:
        try:
            from ray.util.metrics import Gauge
        except ImportError:  # pragma: no cover - ray is a hard dependency
            return
        for key, value in metrics.items():
            name = "raydistill_train_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            try:
                if name not in self._gauges:
                    self._gauges[name] = Gauge(name, description=f"raydistill training {key}", tag_keys=("run",))
                self._gauges[name].set(float(value), tags={"run": self.run})
            except Exception:  # best effort: the dashboard is a view, MLflow is the record
                continue
