"""Parquet and JSONL manifests, read by Ray Data's own readers in tasks and checked where the rows are read.

A manifest is a table with one row per image (a ``captions`` list) or one row per caption (a ``caption``
string; the rows naming the same image are grouped). Columns:

- ``image``: a path (relative ones are under ``image_root``, by default the manifest's folder) or URI;
  or ``image_bytes``: the encoded image (binary in Parquet, base64 text in JSONL);
- ``captions`` (list of strings) or ``caption`` (string);
- optional ``image_id`` (default: the ``image`` path without its suffix, or a content hash of the bytes)
  and ``split`` (default ``"train"``). Other columns are ignored.

:func:`manifest_dataset` reads one file, a folder of files or a glob with ``ray.data.read_parquet`` /
``ray.data.read_json``; :func:`check_manifest_rows` checks and normalises each batch in the read tasks, and
:func:`merge_image_group` groups caption-level rows by image (Ray Data's ``groupby``) and refuses a
duplicate image id. Errors are :class:`~raydistill.data.records.DataError` naming the file and the row
(by its ``image`` or ``image_id`` value: a distributed read does not know line numbers; the pre-flight check
:func:`check_manifest_head` reads the first lines on the driver and names them by number).
"""

from __future__ import annotations

import base64
import binascii
import glob
import hashlib
import os
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa

from raydistill.data.records import (
    IMAGE_ROW_SCHEMA,
    DataError,
    clean_captions,
    decode_utf8,
    id_text,
    is_uri,
    join_path,
    parse_json,
    read_head,
    type_name,
)

#: Manifest file suffixes and the format each one means.
MANIFEST_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
#: Rows of a manifest after checking, before caption-level rows are grouped (``grouped`` marks those).
CHECKED_SCHEMA = pa.schema(list(IMAGE_ROW_SCHEMA) + [pa.field("grouped", pa.bool_()), pa.field("where", pa.string())])


def manifest_files(path: str) -> tuple[list[str], str]:
    """The manifest's files (one file, a folder's files, or a local glob) and their format.

    Raises:
        DataError: no file, an unknown suffix, or files of two formats.
    """
    if is_uri(path):
        files = [path]
    elif glob.has_magic(path):
        files = sorted(glob.glob(path))
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if PurePosixPath(f).suffix.lower() in MANIFEST_FORMATS)
    else:
        if not os.path.exists(path):
            raise DataError(f"{path}: manifest not found; check data.path")
        files = [path]
    if not files:
        raise DataError(f"{path}: no manifest files (allowed suffixes: {sorted(MANIFEST_FORMATS)}); check data.path")
    kinds = set()
    for name in files:
        suffix = PurePosixPath(name).suffix.lower()
        if suffix not in MANIFEST_FORMATS:
            raise DataError(f"{name}: unknown manifest suffix {suffix!r}; allowed: {sorted(MANIFEST_FORMATS)}")
        kinds.add(MANIFEST_FORMATS[suffix])
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes Parquet and JSONL manifests; use one format")
    return files, kinds.pop()


def default_image_root(path: str, image_root: str | None) -> str:
    """Where relative ``image`` paths resolve: ``image_root``, else the manifest's folder."""
    if image_root is not None:
        return image_root
    if is_uri(path):
        return path.rsplit("/", 1)[0]
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.dirname(base) if glob.has_magic(path) else base


def _missing(value: Any) -> bool:
    """A null cell: None, or the NaN that pandas puts in a column where a JSON line lacks the key."""
    return value is None or (isinstance(value, float) and value != value)


def _as_list(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _image_of(row: dict[str, Any], where: str, base: str) -> tuple[str | None, bytes | None, str]:
    """(path, data, default image id) of one manifest row."""
    image, image_bytes = row.get("image"), row.get("image_bytes")
    if _missing(image) == _missing(image_bytes):
        raise DataError(f"{where}: needs exactly one of 'image' (a path) and 'image_bytes', got "
                        f"{'both' if not _missing(image) else 'neither'}")
    if not _missing(image):
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: 'image' must be a non-empty path string, got {type_name(image)} {image!r:.60}")
        absolute = is_uri(image) or os.path.isabs(image)
        # The default id keeps the folder part so train/x.jpg and val/x.jpg stay different images.
        normalised = PurePosixPath(image)
        suffix = normalised.suffix
        default_id = str(normalised)[: -len(suffix)] if suffix else str(normalised)
        return (image if absolute else join_path(base, image)), None, default_id
    if isinstance(image_bytes, str):
        # JSON has no bytes type: JSONL manifests carry image_bytes as base64 text.
        try:
            image_bytes = base64.b64decode(image_bytes, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DataError(f"{where}: 'image_bytes' text is not valid base64: {exc}") from None
    if not isinstance(image_bytes, (bytes, bytearray)):
        raise DataError(f"{where}: 'image_bytes' must be bytes (or base64 text in JSONL), got {type_name(image_bytes)}")
    data = bytes(image_bytes)
    return None, data, hashlib.sha256(data).hexdigest()[:16]


def _row_name(row: dict[str, Any], file: str) -> str:
    """How an error names a row: its file, and its image path or id (a distributed read has no line numbers)."""
    for key in ("image", "image_id"):
        value = row.get(key)
        if isinstance(value, str) and value:
            return f"{file}: row with {key} {value!r}"
    return f"{file}: a row"


def check_row(row: dict[str, Any], where: str, base: str) -> dict[str, Any]:
    """Check one manifest row and return it normalised (``captions`` still raw; ``grouped`` for caption rows).

    Raises:
        DataError: naming ``where`` and the column.
    """
    image_path, data, default_id = _image_of(row, where, base)
    raw_id = row.get("image_id")
    image_id = default_id if _missing(raw_id) else id_text(raw_id, where, "image_id")
    split = row.get("split")
    split = "train" if _missing(split) else split
    if not isinstance(split, str) or not split:
        raise DataError(f"{where}: 'split' must be a non-empty string, got {type_name(split)} {split!r:.60}")
    captions_value, caption_value = _as_list(row.get("captions")), row.get("caption")
    if not _missing(captions_value) and not _missing(caption_value):
        raise DataError(f"{where}: has both 'caption' and 'captions'; use one")
    if not _missing(captions_value):
        if not isinstance(captions_value, list):
            raise DataError(f"{where}: captions must be a list of strings, got {type_name(captions_value)}")
        captions, grouped = captions_value, False
    else:
        if not _missing(caption_value) and not isinstance(caption_value, str):
            raise DataError(f"{where}: 'caption' must be a string, got {type_name(caption_value)} {caption_value!r:.60}")
        # A null caption is an empty caption: dropped and counted like one.
        captions, grouped = [caption_value if not _missing(caption_value) else ""], True
    for k, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise DataError(f"{where}: caption {k} must be a string, got {type_name(caption)} {caption!r:.60}")
    return {"image_id": image_id, "path": image_path, "data": data, "captions": list(captions),
            "caption_ids": [], "split": split, "grouped": grouped, "where": where}


def check_manifest_rows(batch: Any, base: str, source: str) -> pa.Table:
    """A Ray Data ``map_batches`` function: check and normalise a pandas batch of raw manifest rows.

    Image-level rows get their captions cleaned and their caption ids (``f"{image_id}#{k}"``) here;
    caption-level rows are cleaned after :func:`merge_image_group` has grouped them.
    """
    files = batch["path"].tolist() if "path" in batch else [source] * len(batch)
    columns = set(batch.columns) - {"path"}
    if not columns & {"image", "image_bytes"} or not columns & {"caption", "captions"}:
        raise DataError(f"{files[0] if files else source}: a manifest needs an 'image' or 'image_bytes' column and a "
                        f"'caption' or 'captions' column; columns found: {sorted(columns)}")
    out = []
    for row, file in zip(batch.drop(columns=["path"], errors="ignore").to_dict("records"), files):
        checked = check_row(row, _row_name(row, file), base)
        if not checked["grouped"]:
            checked = _finish_image(checked)
            if checked is None:
                continue
        out.append(checked)
    return pa.Table.from_pylist(out, schema=CHECKED_SCHEMA)


def _finish_image(row: dict[str, Any]) -> dict[str, Any] | None:
    """Clean the captions and name them; None when no caption is left (the image is dropped)."""
    captions = clean_captions(row["captions"], row["where"])
    if not captions:
        return None
    return {**row, "captions": captions, "caption_ids": [f"{row['image_id']}#{k}" for k in range(len(captions))]}


def merge_image_group(group: dict[str, np.ndarray]) -> pa.Table:
    """A Ray Data ``map_groups`` function over the rows of one image id: one image row, or a DataError.

    Several rows for one image are allowed only when every one is caption-level (``caption`` column) with the
    same image and split; their captions are joined in row order.
    """
    n = len(group["image_id"])
    first = {key: group[key][0] for key in group}
    if n > 1:
        if not all(group["grouped"]):
            raise DataError(f"duplicate image id {first['image_id']!r}: {first['where']} and "
                            f"{group['where'][1]}; only caption-per-row manifests may repeat an image")
        for k in range(1, n):
            same_image = group["path"][k] == first["path"] and group["data"][k] == first["data"]
            if not same_image or group["split"][k] != first["split"]:
                raise DataError(f"{group['where'][k]}: image id {first['image_id']!r} was first seen at "
                                f"{first['where']} with a different image or split")
    if first["grouped"]:
        row = {**first, "captions": [c for captions in group["captions"] for c in _as_list(captions)]}
        row = _finish_image(row)
    else:
        row = {**first, "captions": _as_list(first["captions"]), "caption_ids": _as_list(first["caption_ids"])}
    rows = [] if row is None else [{field.name: row[field.name] for field in IMAGE_ROW_SCHEMA}]
    return pa.Table.from_pylist(rows, schema=IMAGE_ROW_SCHEMA)


def estimate_rows(path: str) -> int:
    """About how many rows the manifest has, read without its rows: the Parquet footers' counts, or for JSONL the
    files' sizes over the mean line length in the first file's first 64 KiB.

    Raises:
        DataError: a Parquet file without a readable footer (named).
    """
    import pyarrow.parquet as pq

    from raydistill.data.images import open_uri

    files, kind = manifest_files(path)
    if kind == "parquet":
        total = 0
        for name in files:
            try:
                with open_uri(name, "rb") as f:
                    total += pq.ParquetFile(f).metadata.num_rows
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{name}: not a readable Parquet file: {exc}") from None
        return total
    head = read_head(files[0], 1 << 16)
    lines = max(1, head.count(b"\n"))
    return int(sum(_file_size(name) for name in files) * lines / max(1, len(head)))


def _file_size(name: str) -> int:
    if is_uri(name):
        from pyarrow import fs as pafs

        filesystem, inner = pafs.FileSystem.from_uri(name)
        return int(filesystem.get_file_info(inner).size or 0)
    return os.path.getsize(name)


def manifest_dataset(path: str, image_root: str | None, partitions: int = 16) -> Any:
    """The manifest's image rows as a Ray dataset (read, checked and grouped in tasks; nothing on the driver).

    ``partitions``: of the exchange that groups the rows by image id (see
    :func:`raydistill.data.source.shuffle_partitions`)."""
    import ray.data

    files, kind = manifest_files(path)
    base = default_image_root(path, image_root)
    # manifest_files chose the files by their suffixes (.pq, .ndjson included): the readers take them as given.
    if kind == "parquet":
        ds = ray.data.read_parquet(files, include_paths=True, file_extensions=None)
    else:
        ds = ray.data.read_json(files, lines=True, include_paths=True, file_extensions=None)
    checked = ds.map_batches(check_manifest_rows, batch_format="pandas", fn_kwargs={"base": base, "source": path})
    # One image's rows may sit anywhere in the files: group them by id (a hash shuffle of the light rows),
    # which also finds a duplicate image id wherever it is.
    return checked.groupby("image_id", num_partitions=partitions).map_groups(merge_image_group, batch_format="numpy")


def check_manifest_head(path: str, image_root: str | None, lines: int = 20) -> None:
    """Check the first rows of the first manifest file on the driver, before Ray starts (cheap, fails early).

    Raises:
        DataError: a missing file, an unreadable format, or a bad row among the first ``lines`` (named by
            line number).
    """
    files, kind = manifest_files(path)
    base = default_image_root(path, image_root)
    first = files[0]
    if kind == "parquet":
        import pyarrow.parquet as pq

        from raydistill.data.images import open_uri

        try:
            with open_uri(first, "rb") as f:
                parquet = pq.ParquetFile(pa.BufferReader(f.read())) if is_uri(first) else pq.ParquetFile(first)
                rows = next(parquet.iter_batches(batch_size=lines), pa.table({})).to_pylist()
                columns = set(parquet.schema_arrow.names)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{first}: not a readable Parquet file: {exc}") from None
        named = [(f"{first}: row {k}", row) for k, row in enumerate(rows)]
    else:
        text = decode_utf8(read_head(first, 1 << 16), first, partial=True)
        named, columns = [], set()
        for line_no, line in enumerate(text.splitlines()[:lines], start=1):
            if not line.strip():
                continue
            row = parse_json(line, f"{first}: line {line_no}")
            if not isinstance(row, dict):
                raise DataError(f"{first}: line {line_no}: expected a JSON object, got {type_name(row)}")
            named.append((f"{first}: line {line_no}", row))
            columns.update(row)
    if not columns & {"image", "image_bytes"} or not columns & {"caption", "captions"}:
        raise DataError(f"{first}: a manifest needs an 'image' or 'image_bytes' column and a 'caption' or "
                        f"'captions' column; columns found: {sorted(columns)}")
    for where, row in named:
        check_row(row, where, base)
