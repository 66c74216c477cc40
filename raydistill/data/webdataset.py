"""WebDataset tar shards (the img2dataset layout), read by ``ray.data.read_webdataset`` in tasks.

A sample is the members of a shard that share a key (``000123.jpg`` + ``000123.txt`` / ``000123.json``):
the image bytes (``jpg``, ``jpeg``, ``png`` or ``webp``, in that order of preference) and the caption
(``KEY.txt``, else the ``caption`` of ``KEY.json``). A sample without an image or without a caption, or whose
caption is empty, is dropped. ``image_id`` is the sample key, the caption id ``f"{key}#0"``. Image bytes
travel with the rows (and into the embedding cache); decoding is the decoder's job.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from raydistill.data.images import open_uri
from raydistill.data.records import (
    IMAGE_ROW_SCHEMA,
    DataError,
    clean_captions,
    decode_utf8,
    expand_shards,
    is_uri,
    parse_json,
)

#: Image extensions recognised in shards, in order of preference when a key has several.
WEBDATASET_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _bytes(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, (bytes, bytearray)) else None


def _caption(sample: dict[str, Any], shard: str, key: str) -> str | None:
    """The caption of one sample: ``KEY.txt``, else the ``caption`` of ``KEY.json``; None if neither."""
    txt = _bytes(sample.get("txt"))
    if txt is not None:
        return decode_utf8(txt, f"{shard}: member {key}.txt")
    meta = _bytes(sample.get("json"))
    if meta is not None:
        where = f"{shard}: member {key}.json"
        document = parse_json(decode_utf8(meta, where), where)
        if not isinstance(document, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(document).__name__}")
        caption = document.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise DataError(f"{where}: key 'caption' must be str, got {type(caption).__name__}")
        return caption
    return None


def sample_rows(batch: Any, split: str) -> pa.Table:
    """A Ray Data ``map_batches`` function: WebDataset samples (pandas batch) to image rows."""
    rows = []
    for sample in batch.to_dict("records"):
        sample = {str(k).lower(): v for k, v in sample.items()}
        key, shard = str(sample["__key__"]), str(sample.get("__url__", "?"))
        image_ext = next((ext for ext in WEBDATASET_IMAGE_EXTS if _bytes(sample.get(ext)) is not None), None)
        caption = _caption(sample, shard, key)
        if image_ext is None or caption is None:
            continue
        captions = clean_captions([caption], f"{shard}: {key}.{image_ext}")
        if not captions:
            continue
        rows.append({"image_id": key, "path": None, "data": _bytes(sample[image_ext]), "captions": captions,
                     "caption_ids": [f"{key}#0"], "split": split})
    return pa.Table.from_pylist(rows, schema=IMAGE_ROW_SCHEMA)


def webdataset_dataset(shards: str | list[str], split: str = "train") -> Any:
    """The image rows of the shards as a Ray dataset (read and parsed in tasks, shard by shard)."""
    import ray.data

    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    files = expand_shards(shards)
    # decoder=None: the members' raw bytes; the pipeline decodes images itself (robustly, counting bad ones).
    ds = ray.data.read_webdataset(files, decoder=None)
    return ds.map_batches(sample_rows, batch_format="pandas", fn_kwargs={"split": split})


def check_shards(shards: str | list[str]) -> list[str]:
    """Before Ray starts: every shard exists (local shards) and the first one is a tar archive.

    Returns:
        The expanded shard list.

    Raises:
        DataError: naming the shard.
    """
    import tarfile

    files = expand_shards(shards)
    for shard in files:
        if not is_uri(shard) and not os.path.isfile(shard):
            raise DataError(f"{shard}: shard not found; check data.path")
    try:
        with open_uri(files[0], "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            next(iter(tar), None)
    except FileNotFoundError:
        raise DataError(f"{files[0]}: shard not found; check data.path") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{files[0]}: not a readable tar shard: {exc}") from None
    return files
