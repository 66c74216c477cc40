"""Build the run's data: image records on the driver, then the Ray Data pipelines that feed training.

stream:  records -> decode (CPU tasks) -> TeacherEmbedder (actor pool; cache hits skip the model) -> explode
cache:   cache parts (read_parquet) -> decode -> explode          (the teacher is never instantiated)
ground_truth objective: records -> decode -> explode              (no teacher at all)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray

from raydistill.config import Config
from raydistill.demo_assets import raydistill_home
from raydistill.data.sources import DataError, read_coco_captions, read_karpathy, read_manifest, read_webdataset
from raydistill.pipeline.cache import EmbeddingCache, rows_from_cache_batch
from raydistill.pipeline.counters import Counters
from raydistill.pipeline.progress import log
from raydistill.pipeline.rows import decode_batch, explode_batch
from raydistill.pipeline.teacher_stage import TeacherEmbedder


def read_records(cfg: Config) -> dict[str, list[dict[str, Any]]]:
    """Read the configured source on the driver; image records grouped by split (``limit_images`` applied)."""
    data = cfg.data
    if data.source == "synth":
        from raydistill.data.synth import ensure_synth_dataset

        s = data.synth
        log(f"synthetic captioned scenes: {s.n_images} images at {s.image_size} px (seed {s.seed})")
        json_path = ensure_synth_dataset(
            raydistill_home() / "synth",
            n_images=s.n_images,
            image_size=s.image_size,
            captions_per_image=(s.min_captions, s.max_captions),
            seed=s.seed,
        )
        records = read_karpathy(json_path, json_path.parent / "images")
    elif data.source == "karpathy":
        records = read_karpathy(data.path, data.image_root or str(Path(data.path).parent))
    elif data.source == "coco":
        records = []
        for split, spec in data.coco_splits.items():
            records.extend(read_coco_captions(spec.captions, spec.images, split))
    elif data.source == "manifest":
        records = read_manifest(data.path, data.image_root)
    else:
        records = read_webdataset(data.path)
    by_split: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_split.setdefault(record["split"], []).append(record)
    if data.limit_images:
        by_split = {k: v[: data.limit_images] for k, v in by_split.items()}
    needed = [cfg.data.train_split, cfg.data.test_split] + ([cfg.data.val_split] if cfg.train.eval_every and cfg.data.val_split else [])
    for split in needed:
        if not by_split.get(split):
            raise DataError(
                f"{data.path or data.source}: split {split!r} has no images; splits present: {sorted(by_split)} "
                "(set data.train_split / data.test_split / data.val_split)"
            )
    return by_split


def slim(record: dict[str, Any]) -> dict[str, Any]:
    """The fields of a record the pipelines carry (the source's extra fields stay on the driver)."""
    return {k: record.get(k) for k in ("image_id", "path", "data", "captions", "caption_ids", "split")}


def records_dataset(records: list[dict[str, Any]]) -> ray.data.Dataset:
    """Image records as a Ray dataset, in blocks of at least 128 records (at most 200 blocks).

    Every block is a task per stage, and a task costs far more than decoding a few small images: 75 blocks of
    16 demo images took 48-74 s to decode and tokenise on 2 cores, 8 blocks of 150 took 1.9 s.
    """
    blocks = max(1, min(len(records) // 128, 200))
    return ray.data.from_items([slim(r) for r in records], override_num_blocks=blocks)


def column_batch(rows: list[dict[str, Any]] | dict[str, list[Any]]) -> dict[str, np.ndarray]:
    """Rows (or columns) as the numpy batch Ray Data hands a ``map_batches`` function: one object array per key."""
    columns = rows if isinstance(rows, dict) else {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {})}
    batch = {}
    for key, values in columns.items():
        array = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):  # element by element: nested lists must stay objects
            array[i] = value
        batch[key] = array
    return batch


def decode_locally(batch: dict[str, np.ndarray], cfg: Config, counters: Counters | None,
                   chunk: int = 256) -> list[dict[str, Any]]:
    """Decode image-level rows in this process with the policy of :func:`decoded` (bad images skipped and
    counted, or fatal), returned as rows. For splits too small to be worth Ray Data's task start-up."""
    d = cfg.data
    rows: list[dict[str, Any]] = []
    n = len(batch["image_id"]) if batch else 0
    for start in range(0, n, chunk):
        part = decode_batch({k: v[start:start + chunk] for k, v in batch.items()}, d.decode_size, d.on_bad_image,
                            d.max_bad_fraction, d.max_pixels, counters)
        rows.extend({k: v[i] for k, v in part.items()} for i in range(len(part["image_id"])))
    return rows


def decoded(ds: ray.data.Dataset, cfg: Config, counters: Counters | None) -> ray.data.Dataset:
    """Decode and resize images in Ray Data CPU tasks (bad images skipped and counted, or fatal)."""
    d = cfg.data
    return ds.map_batches(
        decode_batch,
        batch_format="numpy",
        batch_size=32,
        num_cpus=0.5,
        fn_kwargs={
            "size": d.decode_size,
            "on_bad_image": d.on_bad_image,
            "max_bad_fraction": d.max_bad_fraction,
            "max_pixels": d.max_pixels,
            "counters": counters,
        },
    )


def with_teacher(
    ds: ray.data.Dataset,
    cfg: Config,
    teacher_spec: dict[str, Any],
    dim: int,
    cache: EmbeddingCache | None,
    counters: Counters | None,
) -> ray.data.Dataset:
    """Add ``t_img`` / ``t_txt`` with the teacher actor pool (placement and resources from ``teacher.pool``)."""
    pool = cfg.teacher.pool
    return ds.map_batches(
        TeacherEmbedder,
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        batch_size=pool.batch_size,
        batch_format="numpy",
        num_gpus=pool.num_gpus or None,
        num_cpus=pool.num_cpus,
        resources=pool.resources or None,
        label_selector=pool.label_selector or None,
        fn_constructor_kwargs={
            "teacher_spec": teacher_spec,
            "dim": dim,
            "cache_uri": cache.uri if cache is not None else None,
            "write_through": cache is not None and cfg.cache.write_through,
            "counters": counters,
            "num_threads": max(1, int(pool.num_cpus)),
        },
    )


def from_cache(cache: EmbeddingCache, split: str, image_ids: set[str] | None = None) -> ray.data.Dataset:
    """A split's image rows with embeddings, read from the cache's Parquet parts."""
    ds = ray.data.read_parquet(cache.part_paths_for_reading())
    if image_ids is not None:
        ids = frozenset(image_ids)
        ds = ds.filter(lambda row: row["split"] == split and row["image_id"] in ids)
    else:
        ds = ds.filter(lambda row: row["split"] == split)
    return ds.map_batches(rows_from_cache_batch, batch_format="numpy", batch_size=64)


def training_rows(ds: ray.data.Dataset, tokenizer: Any, max_len: int, with_teacher: bool) -> ray.data.Dataset:
    """Explode image rows into caption-level training rows (tokenised; no string columns)."""
    return ds.map_batches(
        explode_batch,
        batch_format="numpy",
        batch_size=32,
        num_cpus=0.5,
        fn_kwargs={"tokenizer": tokenizer, "max_len": max_len, "with_teacher": with_teacher},
    )
