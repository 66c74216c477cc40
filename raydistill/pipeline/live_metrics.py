"""Training metrics for the Ray dashboard: gauges exported on each node's Prometheus endpoint.

Names appear as ``ray_raydistill_train_<metric>`` (e.g. ``ray_raydistill_train_loss_contrastive``,
``ray_raydistill_train_weight_cosine``, ``ray_raydistill_train_samples_per_s``), tagged with the run name.
The teacher side's counters (images and captions embedded, images decoded, bad images) are exported by
:mod:`raydistill.pipeline.counters`.
"""

from __future__ import annotations

import re
from typing import Any


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
