"""The teacher stage: a Ray Data actor pool that embeds each image once and each caption once per pass.

:class:`TeacherEmbedder` is the callable class given to ``map_batches(compute=ActorPoolStrategy(...))``.
It loads the teacher in the actor (from storage, never captured in a closure), embeds the batch's images
(the ``image`` column, decoded at the teacher's size) and their captions, and writes them to the embedding
cache as one part per batch. Which images reach it is decided before: only those the cache lacks (an
anti-join on ``image_id``, :mod:`raydistill.pipeline.plans`), so the actor holds nothing of the cache.
The teacher-size pixels and the image bytes stop here; the rows go on with their embeddings.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from raydistill.pipeline.cache import EmbeddingCache
from raydistill.pipeline.counters import Counters


def _text_or_none(value: Any) -> str | None:
    return str(value) if isinstance(value, str) and value else None


def _bytes_or_none(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, (bytes, bytearray, np.bytes_)) and len(value) else None


def _maybe_inject_fault(parts_written: int) -> None:
    """Fault injection for recovery tests and drills: ``RAYDISTILL_KILL_TEACHER_AT=<n>:<marker file>``.

    Right after an actor has written (and counted) its n-th cache part of a pass, it dies abruptly, once
    (the marker file records it). The batch's result is lost, so Ray Data restarts the actor and retries
    the batch; the retry writes the same part again (a part is named by its image ids), so the cache holds
    each image once.
    """
    spec = os.environ.get("RAYDISTILL_KILL_TEACHER_AT")
    if not spec:
        return
    at, marker = spec.split(":", 1)
    if parts_written == int(at) and not os.path.exists(marker):
        Path(marker).write_text(f"teacher actor killed after writing part {parts_written}\n")
        os._exit(1)


class TeacherEmbedder:
    """Embed decoded image rows (``image`` uint8 [n, S, S, 3], ``captions``) with the frozen teacher, and
    write them to the cache.

    Args:
        teacher_spec: the :class:`~raydistill.models.teachers.TeacherSpec` (or its mapping) to load.
        dim: the teacher's embedding dimension.
        cache_uri: the embedding cache (None: no cache).
        write_through: write new embeddings to the cache.
        counters: the run's counters (the teacher's seconds; images are counted where the rows arrive).
        num_threads: torch CPU threads of this actor (its reserved CPUs; Ray starts actors with one thread).
    """

    def __init__(
        self,
        teacher_spec: Any,
        dim: int,
        cache_uri: str | None = None,
        write_through: bool = True,
        counters: Counters | None = None,
        num_threads: int | None = None,
    ) -> None:
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.spec = teacher_spec
        self.dim = dim
        self.cache = EmbeddingCache(cache_uri) if cache_uri else None
        self.write_through = write_through and self.cache is not None
        self.counters = counters
        self.teacher = None
        self.throughput = None
        self.parts_written = 0
        self._model()  # in the actor's start, from storage: a bad checkpoint fails before any batch

    def _model(self):
        if self.teacher is None:
            from raydistill.models.teachers import load_teacher

            self.teacher = load_teacher(self.spec)
            if self.teacher.dim != self.dim:
                raise ValueError(f"teacher {self.teacher.kind} gives dimension {self.teacher.dim}, expected {self.dim}")
        return self.teacher

    def _record_throughput(self, images: int, captions: int, seconds: float) -> None:
        """Teacher images/s and captions/s gauges for the dashboard (best effort: never fails a batch)."""
        try:
            if self.throughput is None:
                from raydistill.pipeline.dashboard import TeacherThroughput

                self.throughput = TeacherThroughput()
            self.throughput.record(images=images, captions=captions, seconds=seconds)
        except Exception:  # the dashboard is a view; the counters actor holds the record
            pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        call_start = time.perf_counter()
        n = len(batch["image_id"])
        model = self._model()
        t_img = np.asarray(model.embed_images(batch["image"]), np.float32).reshape(n, self.dim)
        captions = [str(c) for i in range(n) for c in batch["captions"][i]]
        flat = model.embed_texts(captions) if captions else np.zeros((0, self.dim), np.float32)
        t_txt = np.empty(n, dtype=object)
        offset = 0
        for i in range(n):
            k = len(batch["captions"][i])
            t_txt[i] = np.asarray(flat[offset : offset + k], np.float32)
            offset += k
        seconds = time.perf_counter() - call_start
        if self.write_through and n:
            rows = {key: list(batch[key]) for key in ("image_id", "split", "captions", "caption_ids")}
            rows["path"] = [_text_or_none(x) for x in batch["path"]] if "path" in batch else [None] * n
            rows["data"] = [_bytes_or_none(x) for x in batch["data"]] if "data" in batch else None
            rows["t_img"] = t_img
            rows["t_txt"] = list(t_txt)
            self.cache.write_part(rows, self.dim)
            self.parts_written += 1
        if self.counters is not None:
            self.counters.add_many({"teacher_seconds": seconds})
        self._record_throughput(n, len(captions), time.perf_counter() - call_start)
        _maybe_inject_fault(self.parts_written)
        out = {k: v for k, v in batch.items() if k not in ("data", "image")}
        out["t_img"] = t_img
        out["t_txt"] = t_txt
        return out
