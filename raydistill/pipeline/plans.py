"""The run's Ray Data plans, stage by stage, as the README's data-flow diagram draws them.

::

    source rows (data/source.py) ─► anti-join with the cache ─► decode ─► TeacherEmbedder pool ─► cache parts
                                                                                 │
    epoch 0 (stream):  source ─► shuffle ─► decode (teacher + student size) ─► teacher ─► caption rows ─► Train
    later epochs:      cache split ─► shuffle ─► decode (student size) ─► caption rows ─► Train
    no teacher:        source ─► shuffle ─► decode (student size) ─► caption rows ─► Train

:class:`DataPlan` holds what any process needs to build these plans (it is sent to the Train workers, which
build each epoch's dataset when the epoch starts). :func:`embed_splits` fills the cache for whole splits
(``raydistill embed``, evaluation splits, a partly cached training split); :func:`train_epoch_dataset` is one
epoch of caption rows; :func:`eval_dataset` one evaluation split's decoded images.

Shuffling (``train.shuffle``): ``global`` sorts the split's image rows by a hash of (seed, epoch, image id)
before decoding, an exchange of the light rows (ids, captions, embeddings; no pixels) between all blocks
once per epoch, the cost of a full shuffle; the order is a function of seed, epoch and ids only, whatever the
source's blocks, so a resumed run sees the same order. ``files`` keeps the source's or cache's order (no
exchange). Caption rows are then mixed within a window of ``train.shuffle_buffer`` rows in the worker.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raydistill.config import Config
from raydistill.pipeline.cache import BIN_PACKING_ENV, EmbeddingCache
from raydistill.pipeline.counters import Counters
from raydistill.pipeline.progress import counted, log, watch
from raydistill.pipeline.rows import decode_batch, explode_batch
from raydistill.pipeline.teacher_stage import TeacherEmbedder

#: Image rows per decoding call: a call costs more than decoding a few small images.
DECODE_BATCH = 64
#: Image rows per block entering the decode stage, at most: one task decodes a whole block, and a read's block
#: holds up to :data:`MAX_BLOCK_MB` of light rows (23,000 rows of a small-embedding cache), which would decode
#: on one CPU while the others wait.
DECODE_BLOCK_ROWS = 1024


@dataclass
class TeacherSide:
    """What a distillation run knows about its teacher without holding it: spec, dimension, cache."""

    spec: Any  # raydistill.models.teachers.TeacherSpec
    dim: int
    cache: EmbeddingCache
    key: dict[str, Any]
    fingerprint: str | None = None
    """The weights' fingerprint (None in cache mode, where the teacher is never loaded)."""


@dataclass
class DataPlan:
    """Everything a process needs to build the run's Ray Data plans (picklable; sent to the Train workers).

    ``expected`` holds, per split, the source's ``images``, ``captions`` and ``id_hash`` (see
    :func:`raydistill.pipeline.cache.id_hash`), which a teacher pass checks the cache against.
    ``train_from`` is where epoch 0's rows come from: ``stream`` (the teacher pool), ``cache`` or ``source``
    (no teacher).
    """

    cfg: Config
    teacher: TeacherSide | None
    tokenizer: Any
    max_len: int
    student_size: int
    counters: Counters
    train_from: str
    expected: dict[str, dict[str, int]] = field(default_factory=dict)


def configure_data_context(cfg: Config) -> None:
    """Ray Data settings of every plan built in this process (the driver, or a Train worker)."""
    import ray.data

    from raydistill.pipeline.backpressure import THRESHOLD_ENV, hold_queues

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = cfg.ray.no_progress_timeout_s
    # Blocks in order: a seeded epoch is the same sequence of rows in every run, so a resumed worker can skip
    # exactly the batches it trained on.
    ctx.execution_options.preserve_order = True
    # A user's error in a map function (a bad manifest row, too many bad images) reaches the driver as itself
    # inside Ray's RayTaskError, not as Ray Data's "UDF failed" wrapper that loses it.
    ctx.raise_original_map_exception = True
    # Ray Data's default of 200 partitions per shuffle is sized for big clusters; every partition is a task.
    ctx.default_hash_shuffle_parallelism = cfg.ray.shuffle_partitions
    limit = data_budget_mb(cfg)
    if limit:
        # The streaming executor back-pressures every operator to stay under this: the pipeline's peak
        # object-store use is set by configuration, not by the dataset's size.
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=limit * 2**20)
        # Whatever the budget, every operator may hold a block: blocks of Ray Data's 128 MiB held a large
        # dataset's pipeline at several times a 256 MiB budget.
        ctx.target_max_block_size = max_block_bytes(limit, ctx.target_max_block_size)
        # Ray Data packs a Parquet read's files into read tasks of up to 128 MiB of rows, and a task streams all
        # its blocks out whatever the budget: two tasks read a million-image cache's whole epoch ahead of
        # training. Read tasks of one block each leave the budget in charge (a manifest's, the cache's ids; an
        # epoch reads the cache a part per task). (Read where the plan is built, in this process; a value the
        # user set wins.)
        os.environ.setdefault(BIN_PACKING_ENV, str(ctx.target_max_block_size))
        # Each stage reads ahead by a number of its consumer's inputs, not until the budget is full (see
        # raydistill.pipeline.backpressure). (Ray's own threshold, if the user set it, wins.)
        if THRESHOLD_ENV not in os.environ:
            hold_queues(ctx)
        # A hash shuffle (a manifest's rows grouped by image, the cache's anti-join, the shards' duplicate-id
        # check) is exempt from the budget: it buffers up to 1 GiB of input before partitioning it, and keeps
        # every shard in the object store until its reducers run, which is the whole source at any size. Shards
        # go to each node's local disk instead, partitioned a block at a time. (A value the user set wins.)
        if "RAY_DATA_ENABLE_DISK_SHUFFLE" not in os.environ:
            ctx.use_disk_based_hash_shuffle = True
        ctx.shuffle_input_batch_bytes = min(ctx.shuffle_input_batch_bytes, ctx.target_max_block_size)


#: The largest block (MiB) of a budgeted pipeline. A Parquet read fills blocks up to the largest size, and each
#: operator may hold one block whatever the budget: with large blocks of light cache rows the reader would run
#: most of an epoch ahead of training, past the budget.
MAX_BLOCK_MB = 8


def max_block_bytes(budget_mb: int, current: int | None) -> int:
    """Ray Data's largest block for a pipeline budget of ``budget_mb`` MiB: a quarter of it and at most
    :data:`MAX_BLOCK_MB`, never more than ``current`` (Ray's own setting; None: its default of 128 MiB)."""
    from ray.data.context import DEFAULT_TARGET_MAX_BLOCK_SIZE

    return min(current or DEFAULT_TARGET_MAX_BLOCK_SIZE, budget_mb * 2**20 // 4, MAX_BLOCK_MB * 2**20)


#: ``ray.data_object_store_mb: auto``: this many training batches of rows, within these bounds (MiB).
AUTO_BUDGET_BATCHES = 16
AUTO_BUDGET_MB = (256, 2048)
#: Per training row besides its pixels: token ids and mask, the teacher's embeddings, ids (a generous bound).
ROW_OVERHEAD_BYTES = 16 * 1024


def data_budget_mb(cfg: Config) -> int | None:
    """The object-store budget (MiB) of each of the run's Ray Data pipelines: ``ray.data_object_store_mb``, or
    for ``auto`` :data:`AUTO_BUDGET_BATCHES` training batches of rows clamped to :data:`AUTO_BUDGET_MB`.

    A pipeline reads ahead of its consumer until it holds its budget, so the budget is how much reading and
    decoding runs ahead of training. Sized in batches, that is the same at any dataset size; sized in bytes
    for large images, it would read most of a small-image dataset ahead, on CPUs the trainer needs. A row's
    size is its pixels (the teacher's decode size too while streaming) plus :data:`ROW_OVERHEAD_BYTES`.
    """
    limit = cfg.ray.data_object_store_mb
    if limit != "auto":
        return limit
    pixels = 3 * student_decode_size(cfg) ** 2
    if cfg.cache.mode == "stream":
        pixels += 3 * cfg.data.decode_size**2
    batches = AUTO_BUDGET_BATCHES * cfg.train.batch_size * (pixels + ROW_OVERHEAD_BYTES) / 2**20
    low, high = AUTO_BUDGET_MB
    return int(min(high, max(low, batches)))


def student_decode_size(cfg: Config) -> int:
    """The side the student's images are decoded to: its preset's resize size (it crops from there)."""
    from raydistill.models.architecture import get_preset

    preset = get_preset(cfg.student.preset)
    return int(preset.resize_size or preset.image_size)


# ------------------------------------------------------------------------------------------------ stages
def _order_key(batch: dict[str, np.ndarray], seed: int, epoch: int) -> dict[str, np.ndarray]:
    prefix = f"{seed}:{epoch}:".encode()
    batch["order"] = np.asarray(
        [int.from_bytes(hashlib.blake2b(prefix + str(i).encode(), digest_size=8).digest(), "little") >> 1
         for i in batch["image_id"]], dtype=np.int64)
    return batch


def shuffled(ds: Any, cfg: Config, epoch: int) -> Any:
    """The image rows in this epoch's order (``train.shuffle``; see the module docstring)."""
    if cfg.train.shuffle != "global":
        return ds
    from raydistill.pipeline.backpressure import release_queues

    keyed = ds.map_batches(_order_key, batch_format="numpy", fn_kwargs={"seed": cfg.train.seed, "epoch": epoch})
    # The keys are uniform over [0, 2**63): evenly spaced boundaries split them evenly, with no sampling pass.
    parts = cfg.ray.shuffle_partitions
    boundaries = [k * (2**63 // parts) for k in range(1, parts)]
    rows = keyed.sort("order", boundaries=boundaries).drop_columns(["order"])
    release_queues(rows.context)  # this epoch's pipeline only: a dataset's context is its own copy
    return rows


def decoded(ds: Any, cfg: Config, sizes: dict[str, int], counters: Counters | None, count_bad: bool,
            regroup: bool = True) -> Any:
    """Decode and resize images in Ray Data CPU tasks, once, to each size in ``sizes``.

    ``regroup``: cut ``ds``'s blocks into blocks of at most :data:`DECODE_BLOCK_ROWS` rows first (a source's or a
    shuffle's blocks); False for a cache's parts read a part per task, already blocks of a teacher batch.
    """
    d = cfg.data
    if regroup:
        ds = ds.repartition(target_num_rows_per_block=DECODE_BLOCK_ROWS)
    return ds.map_batches(
        decode_batch,
        batch_format="numpy",
        batch_size=DECODE_BATCH,
        num_cpus=cfg.data.decode_cpus,
        fn_kwargs={"sizes": sizes, "on_bad_image": d.on_bad_image, "max_bad_fraction": d.max_bad_fraction,
                   "max_pixels": d.max_pixels, "counters": counters, "count_bad": count_bad},
    )


def with_teacher(ds: Any, cfg: Config, teacher: TeacherSide, counters: Counters | None, write_through: bool) -> Any:
    """Add ``t_img`` / ``t_txt`` with the teacher actor pool (placement and resources from ``teacher.pool``)."""
    import ray.data

    pool = cfg.teacher.pool
    embedded = ds.map_batches(
        TeacherEmbedder,
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        batch_size=pool.batch_size,
        batch_format="numpy",
        num_gpus=pool.num_gpus or None,
        num_cpus=pool.num_cpus,
        resources=pool.resources or None,
        label_selector=pool.label_selector or None,
        fn_constructor_kwargs={
            "teacher_spec": teacher.spec,
            "dim": teacher.dim,
            "cache_uri": teacher.cache.uri,
            "write_through": write_through,
            "counters": counters,
            "num_threads": max(1, int(pool.num_cpus)),
        },
    )
    # Counted where the embeddings arrive, not in the actor: a batch that Ray retries after its actor died
    # is embedded twice but delivered once, and the count is of the images the pass embedded.
    return embedded.map_batches(_count_embedded, batch_format="numpy", batch_size=None, num_cpus=cfg.data.decode_cpus,
                                fn_kwargs={"counters": counters})


def _count_embedded(batch: dict[str, np.ndarray], counters: Counters | None) -> dict[str, np.ndarray]:
    """Count the batch's images and captions, in total and per split (with the split's id hash, which lets a
    pass into an empty cache finalise it without reading it back)."""
    from raydistill.pipeline.cache import id_hash

    if counters is not None:
        values = {"teacher_images_embedded": len(batch["image_id"]),
                  "teacher_captions_embedded": int(sum(len(c) for c in batch["captions"]))}
        splits = np.asarray([str(s) for s in batch["split"]], dtype=object)
        for split in dict.fromkeys(splits):
            idx = np.flatnonzero(splits == split)
            values[f"embedded/{split}/images"] = len(idx)
            values[f"embedded/{split}/captions"] = int(sum(len(batch["captions"][i]) for i in idx))
            values[f"embedded/{split}/id_hash"] = id_hash(batch["image_id"][i] for i in idx)
        counters.add_many(values)
    return batch


def caption_rows(ds: Any, plan: DataPlan) -> Any:
    """Explode decoded image rows into caption-level training rows (tokenised; no string columns)."""
    return ds.map_batches(
        explode_batch,
        batch_format="numpy",
        batch_size=DECODE_BATCH,
        num_cpus=plan.cfg.data.decode_cpus,
        fn_kwargs={"tokenizer": plan.tokenizer, "max_len": plan.max_len, "with_teacher": plan.teacher is not None},
    )


def _batch_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"rows": np.asarray([len(batch["image_id"])], np.int64)}


# ------------------------------------------------------------------------------------------------ passes
def embed_splits(plan: DataPlan, splits: list[str]) -> dict[str, dict[str, int]]:
    """Fill the cache for whole ``splits`` in one teacher pass and finalise each: only the images the cache
    lacks reach the teacher.

    The splits' source rows are read once and anti-joined with the cached (split, image id) pairs (Ray Data's
    hash join) when there are some; they then go through one decode stage and one actor pool, and the
    embeddings are written as parts; what comes back to this process is one count per batch. Splits already
    complete are skipped.

    Returns:
        Per split, the cache's ``images`` and ``captions`` (and ``duplicates_removed``).
    """
    from raydistill.data.source import shuffle_partitions, source_dataset

    cfg, teacher = plan.cfg, plan.teacher
    assert teacher is not None, "embed_splits needs a teacher"
    cache = teacher.cache
    done = cache.complete_splits()
    stats = {split: done[split] for split in splits if split in done}
    todo = [s for s in dict.fromkeys(splits) if s not in done]
    if not todo:
        return stats
    # One read of the source for all the pass's splits: a read per split would read and group the whole
    # manifest once for each (at 1M images the test split's own read held more of the store than the teacher).
    rows = source_dataset(cfg, todo)
    cached = {split: ids for split in todo if (ids := cache.ids_dataset(split)) is not None}
    resumed = set(cached)
    total = sum(plan.expected[s]["images"] for s in todo)
    if cached:
        first, *rest = cached.values()
        rows = rows.join(first.union(*rest) if rest else first, join_type="left_anti",
                         num_partitions=shuffle_partitions(cfg, total), on=("split", "image_id"))
    log(f"teacher pass over {', '.join(repr(s) for s in todo)}: {total} images"
        + (f" (resuming {sorted(resumed)}: only what the cache lacks)" if resumed else ""))
    embedded = with_teacher(decoded(rows, cfg, {"image": cfg.data.decode_size}, plan.counters, count_bad=True),
                            cfg, teacher, plan.counters, write_through=True)
    since = int(plan.counters.get().get("teacher_images_embedded", 0))
    with watch("teacher pass", None if resumed else total, counted(plan.counters, "teacher_images_embedded", since=since)):
        for _ in embedded.map_batches(_batch_rows, batch_size=None).iter_batches(batch_size=None):
            pass  # the rows are in the cache; what comes back is one count per batch
    for split in todo:
        stats[split] = finalize_split(plan, split, first_pass=split not in resumed)
    return stats


def finalize_split(plan: DataPlan, split: str, first_pass: bool) -> dict[str, int]:
    """Mark ``split`` complete in the cache once it holds every image of the source that decoded.

    ``first_pass``: the split had no cached rows before this pass, so what the pass delivered is what the cache
    holds (a part is named by its images: a retried batch rewrites its own part), and when that matches the
    source the cache is not read back.
    """
    bad = plan.counters.bad_in_split(split)
    expected = plan.expected[split]
    totals = plan.counters.get()
    delivered = {key: int(totals.get(f"embedded/{split}/{key}", 0)) for key in ("images", "captions", "id_hash")}
    result = plan.teacher.cache.finalize(split, expected["images"] - bad["images"],
                                         (expected["id_hash"] - bad["id_hash"]) % 2**64,
                                         delivered=delivered if first_pass else None)
    log(f"cache {plan.teacher.cache.uri}: split {split!r} complete: {result['images']} images, "
        f"{result['captions']} captions"
        + (f", {result['duplicates_removed']} duplicate rows removed" if result["duplicates_removed"] else ""))
    return result


def train_epoch_dataset(plan: DataPlan, epoch: int) -> Any:
    """Epoch ``epoch``'s caption rows: streamed through the teacher, read from the cache, or (no teacher)
    decoded from the source; in this epoch's order."""
    from raydistill.data.source import source_dataset

    cfg, split = plan.cfg, plan.cfg.data.train_split
    pixels = {"pixels": plan.student_size}
    from_cache = plan.train_from == "cache" or (plan.train_from == "stream" and epoch > 0 and cfg.cache.write_through)
    if from_cache:
        sort = cfg.train.shuffle == "global"  # the sort regroups the rows: fewer, larger read tasks
        image_rows = decoded(shuffled(plan.teacher.cache.split_dataset(split, part_per_task=not sort), cfg, epoch),
                             cfg, pixels, plan.counters, count_bad=False, regroup=sort)
    elif plan.train_from == "stream":
        sizes = {"image": cfg.data.decode_size, **pixels}
        image_rows = decoded(shuffled(source_dataset(cfg, [split]), cfg, epoch), cfg, sizes, plan.counters,
                             count_bad=epoch == 0)
        image_rows = with_teacher(image_rows, cfg, plan.teacher, plan.counters,
                                  write_through=cfg.cache.write_through)
    else:
        image_rows = decoded(shuffled(source_dataset(cfg, [split]), cfg, epoch), cfg, pixels, plan.counters,
                             count_bad=epoch == 0)
    return caption_rows(image_rows, plan)


def eval_rows(plan: DataPlan, split: str) -> Any:
    """One evaluation split's image rows before decoding: from the cache when distilling (with the teacher's
    embeddings; :func:`embed_splits` filled it), else from the source."""
    from raydistill.data.source import source_dataset

    if plan.teacher is not None:
        return plan.teacher.cache.split_dataset(split)
    return source_dataset(plan.cfg, [split])


def eval_dataset(plan: DataPlan, split: str, rows: Any = None) -> Any:
    """One evaluation split's image rows decoded at the student's size; ``rows``: its :func:`eval_rows` (e.g.
    materialised once for repeated evaluations), else they are read."""
    rows = eval_rows(plan, split) if rows is None else rows
    return decoded(rows, plan.cfg, {"pixels": plan.student_size}, plan.counters, count_bad=plan.teacher is None)
