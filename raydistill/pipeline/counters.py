"""Pipeline counters shared by every Ray task and actor of a run (a small named actor).

The product's numbers (images the teacher embedded, captions, bad images, cache hits) are counted where
the work happens, not inferred: each stage adds to one named actor, and the driver reads the totals.
The counters are also exported to the Ray dashboard's Prometheus endpoint as ``ray_raydistill_<name>``.
"""

from __future__ import annotations

import uuid
from typing import Any

import ray


@ray.remote(num_cpus=0)
class _CountersActor:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._metrics: dict[str, Any] = {}

    def add_many(self, values: dict[str, float]) -> dict[str, float]:
        for key, value in values.items():
            if not value:
                self.totals.setdefault(key, 0)
                continue
            self.totals[key] = self.totals.get(key, 0) + value
            self._export(key, value)
        return dict(self.totals)

    def _export(self, key: str, value: float) -> None:
        try:
            from ray.util.metrics import Counter

            name = "raydistill_" + key.replace("/", "_")
            if name not in self._metrics:
                self._metrics[name] = Counter(name, description=f"raydistill pipeline counter {key}")
            self._metrics[name].inc(value)
        except Exception:  # metrics export is best effort; the totals are the source of truth
            pass

    def get(self) -> dict[str, float]:
        return dict(self.totals)

    def reset(self) -> None:
        self.totals = {}


class Counters:
    """A picklable handle to a run's counters actor; pass it to Ray tasks and actors.

    Args:
        name: actor name; a new unique one when None.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"raydistill-counters-{uuid.uuid4().hex[:12]}"
        self._actor = None

    def start(self) -> Counters:
        """Create the actor (driver side). It lives as long as the driver's job."""
        self._actor = _CountersActor.options(name=self.name, get_if_exists=True).remote()
        return self

    def _handle(self):
        if self._actor is None:
            self._actor = ray.get_actor(self.name)
        return self._actor

    def add_many(self, values: dict[str, float]) -> dict[str, float]:
        """Add to several counters; returns the new totals."""
        return ray.get(self._handle().add_many.remote(values))

    def get(self) -> dict[str, float]:
        """Current totals."""
        return ray.get(self._handle().get.remote())

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name = state["name"]
        self._actor = None
