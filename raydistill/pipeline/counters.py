"""Pipeline counters shared by every Ray task and actor of a run (a small named actor).

The product's numbers (images the teacher embedded, captions, bad images) are counted where the work
happens, not inferred: each stage adds to one named actor, and the driver reads the totals. Bad images are
counted once each, however many times a run decodes them (every epoch of a run without a cache): the actor
keeps a 64-bit hash per bad image (a few per cent of a dataset at most, by ``data.max_bad_fraction``) and
names the first :data:`MAX_BAD_FILES` with their reason. The counters are also exported to the Ray
dashboard's Prometheus endpoint as ``ray_raydistill_<name>``.
"""

from __future__ import annotations

import uuid
from typing import Any

import ray

from raydistill.pipeline.cache import id_hash
from raydistill.pipeline.progress import log

#: Bad image files a run names (its count covers all of them).
MAX_BAD_FILES = 10_000
#: Bad image files named on stderr as they are found (all of the first MAX_BAD_FILES go to the artifact).
LOGGED_BAD_FILES = 20
BAD_FILES_ARTIFACT = "bad_images.txt"
#: The totals exported to the Ray dashboard's Prometheus endpoint (as ``ray_raydistill_<name>_total``).
EXPORTED = ("teacher_images_embedded", "teacher_captions_embedded", "teacher_seconds", "images_decoded", "bad_images")


@ray.remote(num_cpus=0)
class _CountersActor:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.bad_files: list[tuple[str, str]] = []
        self.bad_seen: set[tuple[str, str]] = set()
        self.bad_by_split: dict[str, dict[str, int]] = {}
        self._metrics: dict[str, Any] = {}

    def add_many(self, values: dict[str, float], bad: list[tuple[str, str, str, str]] | None = None) -> dict[str, float]:
        values = dict(values)
        for image_id, split, name, reason in bad or []:
            if (split, image_id) in self.bad_seen:
                continue
            self.bad_seen.add((split, image_id))
            values["bad_images"] = values.get("bad_images", 0) + 1
            values[f"bad_images/{reason}"] = values.get(f"bad_images/{reason}", 0) + 1
            per_split = self.bad_by_split.setdefault(split, {"images": 0, "id_hash": 0})
            per_split["images"] += 1
            per_split["id_hash"] = (per_split["id_hash"] + id_hash([image_id])) % 2**64
            if len(self.bad_files) < MAX_BAD_FILES:
                self.bad_files.append((name, reason))
            if len(self.bad_seen) <= LOGGED_BAD_FILES:
                log(f"skipping bad image {name} ({reason})" + (
                    f"; further ones are only listed in the run's {BAD_FILES_ARTIFACT}"
                    if len(self.bad_seen) == LOGGED_BAD_FILES else ""))
        for key, value in values.items():
            if not value:
                self.totals.setdefault(key, 0)
                continue
            self.totals[key] = self.totals.get(key, 0) + value
            self._export(key, value)
        return dict(self.totals)

    def _export(self, key: str, value: float) -> None:
        if key not in EXPORTED:
            return  # per-split bookkeeping (id hashes, split counts) is not a dashboard metric
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

    def set_values(self, values: dict[str, float]) -> None:
        self.totals.update(values)

    def get_bad_files(self) -> list[tuple[str, str]]:
        return list(self.bad_files)

    def get_bad_in_split(self, split: str) -> dict[str, int]:
        return dict(self.bad_by_split.get(split, {"images": 0, "id_hash": 0}))


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

    def add_many(self, values: dict[str, float], bad: list[tuple[str, str, str, str]] | None = None
                 ) -> dict[str, float]:
        """Add to several counters, and count bad images ``(image_id, split, file name, reason)`` not seen
        before (``bad_images`` and ``bad_images/<reason>``); returns the new totals."""
        return ray.get(self._handle().add_many.remote(values, bad))

    def set_soon(self, values: dict[str, float]) -> None:
        """Set values (a training step's progress) without waiting for the actor: the caller goes on at once."""
        self._handle().set_values.remote(values)

    def bad_in_split(self, split: str) -> dict[str, int]:
        """The distinct bad images of ``split`` seen so far: ``images`` and their ``id_hash``."""
        return ray.get(self._handle().get_bad_in_split.remote(split))

    def bad_files(self) -> list[tuple[str, str]]:
        """The bad image files noted so far, with their reason (the first :data:`MAX_BAD_FILES`)."""
        return ray.get(self._handle().get_bad_files.remote())

    def get(self) -> dict[str, float]:
        """Current totals."""
        return ray.get(self._handle().get.remote())

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name = state["name"]
        self._actor = None
