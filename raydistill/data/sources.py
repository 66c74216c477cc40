"""Caption files read whole: Karpathy's split JSON and the official COCO captions JSON.

A caption file is one JSON document (``dataset_flickr30k.json`` is 30 MB, ``captions_train2017.json`` 90 MB):
it is parsed once, in one Ray task (:func:`caption_file_dataset`), and handed to Ray Data as Arrow rows, so the
driver never holds the image list. ``read_karpathy`` and ``read_coco_captions`` also return the records as
a list, for tools and tests.

- `read_karpathy`: ``dataset_{flickr8k,flickr30k,coco}.json`` (Karpathy & Fei-Fei split files);
- `read_coco_captions`: the official ``captions_*.json``.

The rules every reader follows are in :mod:`raydistill.data.records`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from raydistill.data.records import (
    IMAGE_ROW_SCHEMA,
    DataError,
    ReadStats,
    RecordBuilder,
    clean_caption,
    expand_shards,
    field,
    id_text,
    join_path,
    load_json,
)

# --------------------------------------------------------------------------------------------------
# Karpathy split JSON


def _normalise_splits(splits: str | Iterable[str] | None) -> list[str] | None:
    if splits is None:
        return None
    names = [splits] if isinstance(splits, str) else list(splits)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"splits must be split names (strings), got {name!r}")
    # "restval" images are read as "train", so asking for restval means asking for train.
    return list(dict.fromkeys("train" if name == "restval" else name for name in names))


def read_karpathy(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    splits: str | Iterable[str] | None = None,
    *,
    stats: ReadStats | None = None,
) -> list[dict]:
    """Read a Karpathy split file (``dataset_flickr30k.json``, ``dataset_flickr8k.json``, ``dataset_coco.json``).

    Args:
        json_path: the JSON file: ``{"images": [{"filename", "split", "sentences": [{"raw", "sentid"}], ...}]}``.
        image_root: folder (or URI prefix) holding the images; a record's optional ``filepath`` (COCO:
            ``train2014`` / ``val2014``) is a sub-folder of it.
        splits: split name(s) to keep (None: all). ``"restval"`` images are read as ``"train"``.
        stats: filled with what was kept and dropped.

    Returns:
        Image records; ``image_id`` is ``str(cocoid)`` when present, else the filename stem; caption ids
        are the sentences' ``sentid`` as strings (``f"{image_id}#{k}"`` where a sentence has none).
    """
    source = os.fspath(json_path)
    wanted = _normalise_splits(splits)
    doc = load_json(json_path)
    images = field(doc, "images", list, f"{source}: top level")
    builder = RecordBuilder(source)
    for index, item in enumerate(images):
        where = f"{source}: images[{index}]"
        filename = field(item, "filename", str, where)
        if not filename:
            raise DataError(f"{where}: key 'filename' is empty")
        filepath = field(item, "filepath", str, where, required=False)
        split = field(item, "split", str, where)
        sentences = field(item, "sentences", list, where)
        cocoid = item.get("cocoid")
        image_id = id_text(cocoid, where, "cocoid") if cocoid is not None else PurePosixPath(filename).stem
        captions, caption_ids = [], []
        for k, sentence in enumerate(sentences):
            sentence_where = f"{where}.sentences[{k}]"
            captions.append(field(sentence, "raw", str, sentence_where))
            sentid = sentence.get("sentid")
            caption_ids.append(f"{image_id}#{k}" if sentid is None else id_text(sentid, sentence_where, "sentid"))
        builder.add(
            image_id,
            where,
            captions=captions,
            caption_ids=caption_ids,
            split="train" if split == "restval" else split,
            path=join_path(image_root, filepath or "", filename),
        )
    return builder.finish(wanted, stats)


# --------------------------------------------------------------------------------------------------
# official COCO captions JSON


def read_coco_captions(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str,
    *,
    stats: ReadStats | None = None,
) -> list[dict]:
    """Read an official COCO captions file (``captions_train2017.json``, ``captions_val2017.json``, ...).

    Args:
        json_path: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "id", "caption"}]}``.
        image_root: folder (or URI prefix) holding the ``file_name`` images.
        split: split name given to every image (one COCO file is one split).
        stats: filled with what was kept and dropped (images without captions are dropped).

    Returns:
        Image records in the file's image order; ``image_id`` is the COCO id as a string, caption ids are
        the annotation ids as strings, captions in annotation order.
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    source = os.fspath(json_path)
    doc = load_json(json_path)
    images = field(doc, "images", list, f"{source}: top level")
    annotations = field(doc, "annotations", list, f"{source}: top level")
    files: dict[str, tuple[str, str]] = {}
    for index, item in enumerate(images):
        where = f"{source}: images[{index}]"
        image_id = id_text(field(item, "id", (int, str), where), where, "id")
        file_name = field(item, "file_name", str, where)
        if image_id in files:
            raise DataError(f"{source}: duplicate image id {image_id!r} at images[{index}]")
        files[image_id] = (file_name, where)
    captions: dict[str, list[tuple[str, str]]] = {image_id: [] for image_id in files}
    for index, annotation in enumerate(annotations):
        where = f"{source}: annotations[{index}]"
        image_id = id_text(field(annotation, "image_id", (int, str), where), where, "image_id")
        caption_id = id_text(field(annotation, "id", (int, str), where), where, "id")
        caption = field(annotation, "caption", str, where)
        if image_id not in captions:
            raise DataError(f"{where}: image_id {image_id!r} is not in the file's images list")
        captions[image_id].append((caption_id, caption))
    builder = RecordBuilder(source)
    for image_id, (file_name, where) in files.items():
        pairs = captions[image_id]
        builder.add(
            image_id,
            where,
            captions=[text for _, text in pairs],
            caption_ids=[caption_id for caption_id, _ in pairs],
            split=split,
            path=join_path(image_root, file_name),
        )
    return builder.finish(None, stats)


# --------------------------------------------------------------------------------------------------
# as a Ray dataset


def records_table(records: list[dict]) -> pa.Table:
    """Image records as Arrow rows of :data:`~raydistill.data.records.IMAGE_ROW_SCHEMA`."""
    return pa.Table.from_pylist(records, schema=IMAGE_ROW_SCHEMA)


def _parse_caption_files(files: list[tuple[str, str, str, str | None]], blocks: int) -> tuple:
    """Parse caption files of ``(kind, json_path, image_root, split)`` (runs in a Ray task).

    Returns ``blocks`` slices of the rows (Arrow tables), then the counts of dropped captions and images.
    """
    stats = ReadStats()
    tables = []
    for kind, json_path, image_root, split in files:
        if kind == "karpathy":
            records = read_karpathy(json_path, image_root, stats=stats)
        else:
            records = read_coco_captions(json_path, image_root, split or "", stats=stats)
        tables.append(records_table(records))
        del records
    table = pa.concat_tables(tables)
    ids = table.column("image_id")
    if len(tables) > 1 and len(pc.unique(ids)) != len(ids):
        duplicate = next(v["values"] for v in pc.value_counts(ids).to_pylist() if v["counts"] > 1)
        raise DataError(f"image id {duplicate!r} appears in more than one of {[f[1] for f in files]}; "
                        "image ids must be unique across the dataset's caption files")
    step = -(-len(table) // blocks)
    slices = [table.slice(k * step, step) for k in range(blocks)]
    return (*slices, {"dropped_captions": stats.dropped_captions, "dropped_images": stats.dropped_images})


#: Caption JSON per block of rows, and the most blocks: each block is a task in every stage that follows, and
#: Ray Data starts one more task (a worker process, on a small machine) per block to read its schema.
CAPTION_BYTES_PER_BLOCK = 1 << 20
MAX_CAPTION_BLOCKS = 8


def caption_blocks(files: list[tuple[str, str, str, str | None]]) -> int:
    """How many blocks the rows of ``files`` are cut into: one per :data:`CAPTION_BYTES_PER_BLOCK` of JSON, at
    least one and at most :data:`MAX_CAPTION_BLOCKS` (a file whose size cannot be read counts as large)."""
    from raydistill.paths import is_uri

    large = MAX_CAPTION_BLOCKS * CAPTION_BYTES_PER_BLOCK
    total = 0
    for _, json_path, _, _ in files:
        try:
            total += large if is_uri(json_path) else os.path.getsize(json_path)
        except OSError:
            total += large
    return max(1, min(MAX_CAPTION_BLOCKS, -(-total // CAPTION_BYTES_PER_BLOCK)))


def caption_file_dataset(files: list[tuple[str, str, str, str | None]], blocks: int | None = None) -> Any:
    """The image rows of caption files as a Ray dataset, parsed in one Ray task (the driver holds references).

    Args:
        files: ``(kind, json_path, image_root, split)`` with kind ``karpathy`` or ``coco`` (split: COCO's).
        blocks: how many blocks to cut the rows into (each block is a task in the stages that follow); default
            :func:`caption_blocks`.
    """
    import ray
    import ray.data

    blocks = blocks or caption_blocks(files)
    # On the cluster, outside the placement group of a Tune trial that may build this plan.
    parse = ray.remote(num_cpus=1, max_retries=0, scheduling_strategy="DEFAULT")(_parse_caption_files)
    refs = parse.options(num_returns=blocks + 1).remote(files, blocks)
    return ray.data.from_arrow_refs(refs[:blocks])


__all__ = [
    "DataError",
    "ReadStats",
    "caption_blocks",
    "caption_file_dataset",
    "clean_caption",
    "expand_shards",
    "read_coco_captions",
    "read_karpathy",
    "records_table",
]
