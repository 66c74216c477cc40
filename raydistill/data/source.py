"""The configured data source as a Ray dataset of image rows, its identity, and its per-split counts.

Nothing here holds the dataset on the driver:

- :func:`check_source` runs before Ray starts: the files exist and their first rows have the right schema;
- :func:`source_identity` names the dataset for the embedding cache from its index files (the caption JSON,
  the manifest files, the shard names and sizes), not from its rows, so a cache-mode run reads no data;
- :func:`source_dataset` is the lazy Ray Data plan of the image rows of some splits (read, checked,
  grouped in tasks; ``data.limit_images`` applied per split);
- :func:`count_splits` is one pass over that plan that counts images and captions per split (and, for
  shards, finds a duplicate image id), keeping per batch counts only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from raydistill.config import Config
from raydistill.data.records import DataError, expand_shards, is_uri

#: Image rows per block for the stages after the reader (each block is a task in every stage).
ROWS_PER_BLOCK = 256


def _synth_json(cfg: Config) -> Path:
    from raydistill.data.synth import ensure_synth_dataset
    from raydistill.paths import raydistill_home

    s = cfg.data.synth
    return ensure_synth_dataset(raydistill_home() / "synth", n_images=s.n_images, image_size=s.image_size,
                                captions_per_image=(s.min_captions, s.max_captions), seed=s.seed)


def caption_files(cfg: Config) -> list[tuple[str, str, str, str | None]]:
    """``(kind, json_path, image_root, split)`` of a synth, Karpathy or COCO source."""
    data = cfg.data
    if data.source == "synth":
        path = _synth_json(cfg)
        return [("karpathy", str(path), str(path.parent / "images"), None)]
    if data.source == "karpathy":
        return [("karpathy", data.path, data.image_root or str(Path(data.path).parent), None)]
    if data.source == "coco":
        return [("coco", spec.captions, spec.images, split) for split, spec in data.coco_splits.items()]
    return []


def check_source(cfg: Config) -> None:
    """What is cheap to check before Ray starts: the source's files exist and their first rows read.

    Raises:
        DataError: naming the file and what is wrong.
    """
    data = cfg.data
    if data.source == "manifest":
        from raydistill.data.manifest import check_manifest_head

        check_manifest_head(data.path, data.image_root)
    elif data.source == "webdataset":
        from raydistill.data.webdataset import check_shards

        check_shards(data.path)
    elif data.source in ("karpathy", "coco"):
        for _, json_path, _, _ in caption_files(cfg):
            if not is_uri(json_path) and not os.path.isfile(json_path):
                raise DataError(f"{json_path}: caption file not found; check data.path / data.coco_splits")


def _file_identity(path: str) -> list[Any]:
    """A local file's name and content hash, or an object's name, size and modification time."""
    if is_uri(path):
        from pyarrow import fs as pafs

        filesystem, inner = pafs.FileSystem.from_uri(path)
        info = filesystem.get_file_info(inner)
        return [os.path.basename(inner), info.size, str(info.mtime)]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return [os.path.basename(path), digest.hexdigest()]


def source_identity(cfg: Config) -> str:
    """A sha256 naming the dataset: its index files' contents and the options that choose its rows.

    Caption files and manifests are hashed whole (a 1-million-row JSONL manifest hashes in about a second);
    WebDataset shards, which hold the images, by name and size. Image files referenced by path are named by
    those paths, not read: replacing an image file under the same name keeps the identity (and the cache).
    Moving the dataset to another folder keeps it too (file names, not full paths, are hashed).
    """
    data = cfg.data
    if data.source == "manifest":
        from raydistill.data.manifest import manifest_files

        files = [_file_identity(f) for f in manifest_files(data.path)[0]]
    elif data.source == "webdataset":
        files = []
        for shard in expand_shards(data.path):
            size = os.path.getsize(shard) if not is_uri(shard) else _file_identity(shard)[1]
            files.append([os.path.basename(shard), size])
    else:
        files = [[kind, split, *_file_identity(json_path)] for kind, json_path, _, split in caption_files(cfg)]
    identity = {"version": 2, "source": data.source, "files": files, "limit_images": data.limit_images}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def shuffle_partitions(cfg: Config, rows: int) -> int:
    """Hash partitions of an exchange of ``rows`` image rows: ``ray.shuffle_partitions``, or more so that none
    holds more than ``ray.shuffle_partition_rows`` of them.

    A partition leaves its reducer as one block (an image's rows must stay together), and the next stage holds
    that block in the object store while it works through it: with a fixed number of partitions the store
    would grow with the dataset.
    """
    per = cfg.ray.shuffle_partition_rows
    least = cfg.ray.shuffle_partitions
    return max(least, -(-rows // per)) if per else least


def _all_rows(cfg: Config) -> Any:
    data = cfg.data
    if data.source == "manifest":
        from raydistill.data.manifest import estimate_rows, manifest_dataset

        return manifest_dataset(data.path, data.image_root, shuffle_partitions(cfg, estimate_rows(data.path)))
    if data.source == "webdataset":
        from raydistill.data.webdataset import webdataset_dataset

        return webdataset_dataset(data.path)
    from raydistill.data.sources import caption_file_dataset

    return caption_file_dataset(caption_files(cfg))


def source_dataset(cfg: Config, splits: Sequence[str]) -> Any:
    """The image rows of ``splits`` as a lazy Ray dataset (``data.limit_images`` taken per split, in file order)."""
    from ray.data.expressions import col

    rows = _all_rows(cfg)
    wanted = list(dict.fromkeys(splits))
    if not cfg.data.limit_images:
        return rows.filter(expr=col("split").is_in(wanted))
    parts = [rows.filter(expr=col("split") == split).limit(cfg.data.limit_images) for split in wanted]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _count_batch(batch: Any) -> Any:
    """Per split in a batch: images, captions and the id hash (as text: it is a 64-bit unsigned sum)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from raydistill.pipeline.cache import id_hash

    rows = []
    splits = batch.column("split").to_pylist()
    n_captions = pc.list_value_length(batch.column("captions")).to_pylist()
    ids = batch.column("image_id").to_pylist()
    for split in dict.fromkeys(splits):
        idx = [k for k, s in enumerate(splits) if s == split]
        rows.append({"split": split, "images": len(idx), "captions": sum(n_captions[k] or 0 for k in idx),
                     "id_hash": str(id_hash(ids[k] for k in idx))})
    schema = pa.schema([("split", pa.string()), ("images", pa.int64()), ("captions", pa.int64()),
                        ("id_hash", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def count_splits(cfg: Config, splits: Sequence[str], required: Sequence[str] | None = None
                 ) -> dict[str, dict[str, int]]:
    """Images, captions and the id hash (see :func:`raydistill.pipeline.cache.id_hash`) of each split,
    counted in one pass over the source in Ray tasks.

    Args:
        cfg: the run's config.
        splits: the splits to count.
        required: the splits that must have images (default: all of ``splits``).

    Raises:
        DataError: a required split has no images with captions, or (shards) an image id appears twice.
    """
    ds = source_dataset(cfg, splits)
    totals = {split: {"images": 0, "captions": 0, "id_hash": 0} for split in splits}
    with reading(cfg):
        for row in ds.map_batches(_count_batch, batch_format="pyarrow", batch_size=None).iter_rows():
            split = totals[row["split"]]
            split["images"] += int(row["images"])
            split["captions"] += int(row["captions"])
            split["id_hash"] = (split["id_hash"] + int(row["id_hash"])) % 2**64
        if cfg.data.source == "webdataset":
            _refuse_duplicate_ids(ds, cfg.data.path, cfg.ray.shuffle_partitions)
    missing = [split for split in (required if required is not None else splits) if totals[split]["images"] == 0]
    if missing:
        with reading(cfg):
            names = _all_rows(cfg).select_columns(["split"]).map_batches(_unique_splits, batch_format="numpy")
            present = sorted({row["split"] for row in names.iter_rows()})
        raise DataError(
            f"{cfg.data.path or cfg.data.source}: split {missing[0]!r} has no images with captions (images whose "
            f"captions are all empty are dropped); splits present: {present} (set data.train_split / "
            "data.val_split / data.test_split to splits the data has)"
        )
    return totals


def _unique_splits(batch: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    return {"split": np.unique(batch["split"].astype(str))}


@contextlib.contextmanager
def reading(cfg: Config) -> Iterator[None]:
    """The first pass over a source: its errors reach the user as one :class:`DataError`.

    A DataError raised in a read task comes out of Ray's wrappers as itself. Any other error of the readers
    (a line pandas cannot parse, a truncated shard, a Parquet file with another schema) is the data's too:
    it becomes a DataError naming the source and the reader's own message. Errors of the machine (a full disk,
    a lost node) pass through unchanged.
    """
    from raydistill.errors import find_os_error, find_user_error

    try:
        yield
    except Exception as err:  # noqa: BLE001 - sorted below
        user = find_user_error(err)
        if user is not None:
            raise user from None
        if find_os_error(err, (errno.ENOSPC, errno.EIO, errno.ENOMEM)) is not None or _is_system_fault(err):
            raise
        message = str(getattr(err, "cause", None) or err).strip().splitlines()
        raise DataError(f"{cfg.data.path or cfg.data.source}: the {cfg.data.source} data cannot be read: "
                        f"{message[-1] if message else type(err).__name__}") from None


def _is_system_fault(err: BaseException) -> bool:
    """Ray's own failures (a worker or node lost, an object gone): not the data's fault."""
    import ray.exceptions

    faults = (ray.exceptions.ActorDiedError, ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError,
              ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)
    return isinstance(err, faults) or isinstance(getattr(err, "cause", None), faults)


def _refuse_duplicate_ids(ds: Any, source: str, partitions: int) -> None:
    """Shards are read independently: one hash shuffle of the ids finds a key that two shards share."""
    from ray.data.expressions import col

    counts = ds.select_columns(["image_id"]).groupby("image_id", num_partitions=partitions).count()
    duplicates = counts.filter(expr=col("count()") > 1).take(3)
    if duplicates:
        names = [row["image_id"] for row in duplicates]
        raise DataError(f"{source}: duplicate image id {names[0]!r} (in more than one shard; e.g. {names}); "
                        "sample keys must be unique across shards")
