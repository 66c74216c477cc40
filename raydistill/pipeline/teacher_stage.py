"""The teacher stage: a Ray Data actor pool that embeds each image once and each caption once per pass.

:class:`TeacherEmbedder` is the callable class given to ``map_batches(compute=ActorPoolStrategy(...))``.
It loads the teacher in the actor (from storage, never captured in a closure), and consults the embedding
cache first: images already embedded are cache hits and skip the model entirely (the model is loaded only
at the first miss), so epoch 2 onwards of a write-through stream, and every later run, never run the teacher
again. New embeddings are written to the cache as one part file per batch.
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
    the batch; the new actor reads the cache first, so the retry is a cache hit and nothing is embedded twice.
    """
    spec = os.environ.get("RAYDISTILL_KILL_TEACHER_AT")
    if not spec:
        return
    at, marker = spec.split(":", 1)
    if parts_written == int(at) and not os.path.exists(marker):
        Path(marker).write_text(f"teacher actor killed after writing part {parts_written}\n")
        os._exit(1)


class TeacherEmbedder:
    """Embed decoded image rows (``image`` uint8 [n, S, S, 3], ``captions``) with the frozen teacher.

    Args:
        teacher_spec: the dict given to :func:`raydistill.models.teachers.load_teacher`.
        dim: the teacher's embedding dimension.
        cache_uri: the embedding cache (None: no cache).
        write_through: write new embeddings to the cache.
        counters: the run's counters (images/captions embedded, cache hits/misses).
        num_threads: torch CPU threads of this actor (its reserved CPUs; Ray starts actors with one thread).
        fault_injection: honour ``RAYDISTILL_KILL_TEACHER_AT`` (actors only: never in the driver).
    """

    def __init__(
        self,
        teacher_spec: dict[str, Any],
        dim: int,
        cache_uri: str | None = None,
        write_through: bool = True,
        counters: Counters | None = None,
        num_threads: int | None = None,
        fault_injection: bool = True,
    ) -> None:
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.spec = dict(teacher_spec)
        self.dim = dim
        self.cache = EmbeddingCache(cache_uri) if cache_uri else None
        self.write_through = write_through and self.cache is not None
        self.counters = counters
        self.teacher = None
        self.throughput = None
        self.known = self.cache.load_embeddings() if self.cache is not None else {}
        self.parts_written = 0
        self.fault_injection = fault_injection

    def _model(self):
        if self.teacher is None:
            from raydistill.models.teachers import load_teacher

            self.teacher = load_teacher(self.spec)
            if self.teacher.dim != self.dim:
                raise ValueError(f"teacher {self.spec.get('checkpoint')} gives dimension {self.teacher.dim}, expected {self.dim}")
        return self.teacher

    def _record_throughput(self, images: int, captions: int, seconds: float) -> None:
        """Teacher images/s and captions/s gauges for the dashboard (best effort: never fails a batch)."""
        try:
            if self.throughput is None:
                from raydistill.dashboard_metrics import TeacherThroughput

                self.throughput = TeacherThroughput()
            self.throughput.record(images=images, captions=captions, seconds=seconds)
        except Exception:  # the dashboard is a view; the counters actor holds the record
            pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        call_start = time.perf_counter()
        n = len(batch["image_id"])
        t_img = np.zeros((n, self.dim), np.float32)
        t_txt = np.empty(n, dtype=object)
        miss = []
        for i, image_id in enumerate(batch["image_id"]):
            hit = self.known.get(str(image_id))
            if hit is not None and len(hit[1]) == len(batch["captions"][i]):
                t_img[i], t_txt[i] = hit
            else:
                miss.append(i)
        n_captions = 0
        seconds = 0.0
        if miss:
            start = time.perf_counter()
            model = self._model()
            idx = np.asarray(miss)
            t_img[idx] = model.embed_images(batch["image"][idx])
            captions = [str(c) for i in miss for c in batch["captions"][i]]
            n_captions = len(captions)
            flat = model.embed_texts(captions) if captions else np.zeros((0, self.dim), np.float32)
            offset = 0
            for i in miss:
                k = len(batch["captions"][i])
                t_txt[i] = np.asarray(flat[offset : offset + k], np.float32)
                offset += k
            seconds = time.perf_counter() - start
            if self.write_through:
                rows = {key: [batch[key][i] for i in miss] for key in ("image_id", "split", "captions", "caption_ids")}
                rows["path"] = [_text_or_none(batch["path"][i]) for i in miss] if "path" in batch else [None] * len(miss)
                rows["data"] = [_bytes_or_none(batch["data"][i]) for i in miss] if "data" in batch else None
                rows["t_img"] = t_img[idx]
                rows["t_txt"] = [t_txt[i] for i in miss]
                self.cache.write_part(rows, self.dim)
                self.parts_written += 1
        if self.counters is not None:
            self.counters.add_many(
                {
                    "teacher_images_embedded": len(miss),
                    "teacher_captions_embedded": n_captions,
                    "teacher_seconds": seconds,
                    "cache_hits": n - len(miss),
                    "cache_misses": len(miss),
                }
            )
        self._record_throughput(len(miss), n_captions, time.perf_counter() - call_start)
        if self.fault_injection:
            _maybe_inject_fault(self.parts_written)
        out = {k: v for k, v in batch.items() if k != "data"}
        out["t_img"] = t_img
        out["t_txt"] = t_txt
        return out
