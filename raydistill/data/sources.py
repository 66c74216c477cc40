"""Dataset readers: every supported source format in, one list of image-level records out.

A record is one image with all its captions::

    {"image_id": str, "path": str | None, "data": bytes | None,
     "captions": list[str], "caption_ids": list[str], "split": str}

Exactly one of ``path`` / ``data`` is set; ``caption_ids`` are unique across the dataset. Readers:

- `read_karpathy`: ``dataset_{flickr8k,flickr30k,coco}.json`` (Karpathy & Fei-Fei split files);
- `read_coco_captions`: the official ``captions_*.json``;
- `read_manifest`: a Parquet or JSONL table, image-level (``captions`` list) or caption-level
  (one ``caption`` per row, rows of one image grouped);
- `read_webdataset`: img2dataset-style tar shards (``KEY.jpg`` + ``KEY.txt`` / ``KEY.json``).

Rules shared by all readers:

- captions are cleaned by `clean_caption` (strip, collapse whitespace, so embedded newlines become
  spaces); captions that end up empty are dropped and counted, and an image left with no caption is
  dropped and counted (pass a `ReadStats` to get the counts; they are also logged);
- text must be UTF-8: other bytes are a `DataError` naming the file and the byte offset, because silently
  replacing characters would change captions the user never sees;
- a schema problem, a duplicate image id or caption id, an empty result, or a requested split with no
  images is a `DataError` naming the file and the key or record index.

`caption_rows` explodes records into caption-level rows; `dataset_fingerprint` identifies a dataset for
caches; `summarize` counts what a record list holds.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import PurePosixPath
from typing import Any

from raydistill.data.images import open_uri, uri_size

logger = logging.getLogger(__name__)

#: Image extensions recognised in WebDataset shards, in order of preference when a key has several.
WEBDATASET_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: Manifest file suffixes and the format each one means.
MANIFEST_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


class DataError(ValueError):
    """A dataset file that does not match its format; the message names the file and the key or index."""


@dataclasses.dataclass
class ReadStats:
    """What a reader kept and dropped; pass one to a reader and it is filled in."""

    images: int = 0
    """Images returned (after split selection)."""
    captions: int = 0
    """Captions returned."""
    dropped_captions: int = 0
    """Captions that were empty or whitespace-only."""
    dropped_images: int = 0
    """Images dropped because no caption was left (or, in shards, a caption had no image)."""


def clean_caption(text: str) -> str:
    """Strip a caption and collapse every run of whitespace (newlines included) to one space."""
    return " ".join(text.split())


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """Count images, captions and images per split in a record list."""
    splits: dict[str, int] = {}
    for record in records:
        splits[record["split"]] = splits.get(record["split"], 0) + 1
    return {
        "images": len(records),
        "captions": sum(len(record["captions"]) for record in records),
        "splits": dict(sorted(splits.items())),
    }


# --------------------------------------------------------------------------------------------------
# shared plumbing: reading files, typed field access, building records


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        with open_uri(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise DataError(f"{os.fspath(path)}: file not found") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{os.fspath(path)}: is a directory, expected a file") from exc


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: not valid UTF-8 at byte {exc.start} ({data[exc.start:exc.start + 4]!r}); "
            "re-encode the file as UTF-8"
        ) from exc


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise DataError(f"{where}: JSON nested too deeply to read") from exc


def _load_json(path: str | os.PathLike) -> Any:
    name = os.fspath(path)
    return _parse_json(_decode_utf8(_read_bytes(path), name), name)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _field(obj: Any, key: str, kinds: type | tuple[type, ...], where: str, *, required: bool = True) -> Any:
    """``obj[key]`` checked to be of ``kinds``; ``where`` is "file: images[3]" for the message."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing key {key!r} (keys present: {sorted(map(str, obj))})")
        return None
    value = obj[key]
    # bool is an int subclass; an id or count of `true` is a schema error, not 1.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        allowed = " or ".join(k.__name__ for k in _as_tuple(kinds))
        raise DataError(f"{where}: key {key!r} must be {allowed}, got {_type_name(value)} {value!r:.60}")
    return value


def _check_encodable(text: str, where: str) -> None:
    """Reject lone surrogates: JSON may spell them ("\\ud800"), but they are not text and break UTF-8 later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{where}: invalid Unicode (lone surrogate {text[exc.start]!r} at character {exc.start})"
        ) from exc


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _join(root: str | os.PathLike, *parts: str) -> str:
    """Join path parts under a local folder or an object-store URI prefix."""
    root_text = os.fspath(root)
    if "://" in root_text:
        return "/".join([root_text.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return os.path.join(root_text, *[p for p in parts if p])


class _RecordBuilder:
    """Collects records for one source, cleaning captions and rejecting duplicate ids."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.records: list[dict] = []
        self.dropped_captions = 0
        self.dropped_images = 0
        self._image_ids: dict[str, str] = {}
        self._caption_ids: set[str] = set()

    def add(
        self,
        image_id: str,
        where: str,
        *,
        captions: Iterable[str],
        caption_ids: Iterable[str] | None,
        split: str,
        path: str | None = None,
        data: bytes | None = None,
    ) -> None:
        """Add one image; ``caption_ids`` None means ``f"{image_id}#{k}"`` over the kept captions."""
        if not image_id:
            raise DataError(f"empty image id at {where}")
        _check_encodable(image_id, f"{where}: image id")
        if image_id in self._image_ids:
            raise DataError(f"duplicate image id {image_id!r} at {where} (first seen at {self._image_ids[image_id]})")
        self._image_ids[image_id] = where
        raw = list(captions)
        ids = [None] * len(raw) if caption_ids is None else [str(c) for c in caption_ids]
        kept, kept_ids = [], []
        for k, (text, caption_id) in enumerate(zip(raw, ids)):
            _check_encodable(text, f"{where}: caption {k}")
            cleaned = clean_caption(text)
            if not cleaned:
                self.dropped_captions += 1
                continue
            kept.append(cleaned)
            kept_ids.append(caption_id if caption_id is not None else f"{image_id}#{len(kept) - 1}")
        if not kept:
            self.dropped_images += 1
            return
        for caption_id in kept_ids:
            if caption_id in self._caption_ids:
                raise DataError(f"duplicate caption id {caption_id!r} at {where}")
            self._caption_ids.add(caption_id)
        self.records.append(
            {
                "image_id": image_id,
                "path": path,
                "data": data,
                "captions": kept,
                "caption_ids": kept_ids,
                "split": split,
            }
        )

    def finish(self, splits: Sequence[str] | None, stats: ReadStats | None) -> list[dict]:
        """Select ``splits`` (None keeps all), check something is left, fill ``stats``, log counts."""
        records = self.records
        if not records:
            raise DataError(
                f"{self.source}: no images with captions "
                f"({self.dropped_images} images dropped, {self.dropped_captions} empty captions)"
            )
        if splits is not None:
            present = sorted({r["split"] for r in records})
            for split in splits:
                if split not in present:
                    raise DataError(f"{self.source}: split {split!r} has no images; splits present: {present}")
            records = [r for r in records if r["split"] in splits]
        n_captions = sum(len(r["captions"]) for r in records)
        logger.info(
            "%s: %d images, %d captions (dropped %d empty captions, %d images)",
            self.source, len(records), n_captions, self.dropped_captions, self.dropped_images,
        )
        if stats is not None:
            stats.images += len(records)
            stats.captions += n_captions
            stats.dropped_captions += self.dropped_captions
            stats.dropped_images += self.dropped_images
        return records


def _caption_list(values: Any, where: str) -> list[str]:
    if not isinstance(values, list):
        raise DataError(f"{where}: captions must be a list of strings, got {_type_name(values)}")
    for k, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(f"{where}: caption {k} must be a string, got {_type_name(value)} {value!r:.60}")
    return values


def _id_text(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise DataError(
            f"{where}: {key} must be a non-empty string or an integer, got {_type_name(value)} {value!r:.60}"
        )
    return str(value)


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
    doc = _load_json(json_path)
    images = _field(doc, "images", list, f"{source}: top level")
    builder = _RecordBuilder(source)
    for index, item in enumerate(images):
        where = f"{source}: images[{index}]"
        filename = _field(item, "filename", str, where)
        if not filename:
            raise DataError(f"{where}: key 'filename' is empty")
        filepath = _field(item, "filepath", str, where, required=False)
        split = _field(item, "split", str, where)
        sentences = _field(item, "sentences", list, where)
        cocoid = item.get("cocoid")
        image_id = _id_text(cocoid, where, "cocoid") if cocoid is not None else PurePosixPath(filename).stem
        captions, caption_ids = [], []
        for k, sentence in enumerate(sentences):
            sentence_where = f"{where}.sentences[{k}]"
            captions.append(_field(sentence, "raw", str, sentence_where))
            sentid = sentence.get("sentid")
            caption_ids.append(f"{image_id}#{k}" if sentid is None else _id_text(sentid, sentence_where, "sentid"))
        builder.add(
            image_id,
            where,
            captions=captions,
            caption_ids=caption_ids,
            split="train" if split == "restval" else split,
            path=_join(image_root, filepath or "", filename),
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
    doc = _load_json(json_path)
    images = _field(doc, "images", list, f"{source}: top level")
    annotations = _field(doc, "annotations", list, f"{source}: top level")
    files: dict[str, tuple[str, str]] = {}
    for index, item in enumerate(images):
        where = f"{source}: images[{index}]"
        image_id = _id_text(_field(item, "id", (int, str), where), where, "id")
        file_name = _field(item, "file_name", str, where)
        if image_id in files:
            raise DataError(f"{source}: duplicate image id {image_id!r} at images[{index}]")
        files[image_id] = (file_name, where)
    captions: dict[str, list[tuple[str, str]]] = {image_id: [] for image_id in files}
    for index, annotation in enumerate(annotations):
        where = f"{source}: annotations[{index}]"
        image_id = _id_text(_field(annotation, "image_id", (int, str), where), where, "image_id")
        caption_id = _id_text(_field(annotation, "id", (int, str), where), where, "id")
        caption = _field(annotation, "caption", str, where)
        if image_id not in captions:
            raise DataError(f"{where}: image_id {image_id!r} is not in the file's images list")
        captions[image_id].append((caption_id, caption))
    builder = _RecordBuilder(source)
    for image_id, (file_name, where) in files.items():
        pairs = captions[image_id]
        builder.add(
            image_id,
            where,
            captions=[text for _, text in pairs],
            caption_ids=[caption_id for caption_id, _ in pairs],
            split=split,
            path=_join(image_root, file_name),
        )
    return builder.finish(None, stats)


# --------------------------------------------------------------------------------------------------
# Parquet / JSONL manifests


def _manifest_rows(path: str | os.PathLike) -> tuple[list[dict], set[str]]:
    """The manifest's rows as dicts, and its column names."""
    name = os.fspath(path)
    suffix = PurePosixPath(name).suffix.lower()
    kind = MANIFEST_FORMATS.get(suffix)
    if kind is None:
        raise DataError(f"{name}: unknown manifest suffix {suffix!r}; allowed: {sorted(MANIFEST_FORMATS)}")
    data = _read_bytes(path)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{name}: not a readable Parquet file: {exc}") from exc
        return table.to_pylist(), set(table.column_names)
    rows, columns = [], set()
    for line_no, line in enumerate(_decode_utf8(data, name).splitlines(), start=1):
        if not line.strip():
            continue
        row = _parse_json(line, f"{name}: line {line_no}")
        if not isinstance(row, dict):
            raise DataError(f"{name}: line {line_no}: expected a JSON object, got {_type_name(row)}")
        rows.append(row)
        columns.update(row)
    return rows, columns


def _manifest_image(row: dict, where: str, base: str) -> tuple[str | None, bytes | None, str]:
    """(path, data, default image id) of one manifest row."""
    image, image_bytes = row.get("image"), row.get("image_bytes")
    if (image is None) == (image_bytes is None):
        raise DataError(f"{where}: needs exactly one of 'image' (a path) and 'image_bytes', got "
                        f"{'both' if image is not None else 'neither'}")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: 'image' must be a non-empty path string, got {_type_name(image)} {image!r:.60}")
        absolute = "://" in image or os.path.isabs(image)
        # The default id keeps the folder part so train/x.jpg and val/x.jpg stay different images.
        normalised = PurePosixPath(image)
        suffix = normalised.suffix
        default_id = str(normalised)[: -len(suffix)] if suffix else str(normalised)
        return (image if absolute else _join(base, image)), None, default_id
    if isinstance(image_bytes, str):
        # JSON has no bytes type: JSONL manifests carry image_bytes as base64 text.
        try:
            image_bytes = base64.b64decode(image_bytes, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DataError(f"{where}: 'image_bytes' text is not valid base64: {exc}") from exc
    if not isinstance(image_bytes, (bytes, bytearray)):
        raise DataError(
            f"{where}: 'image_bytes' must be bytes (or base64 text in JSONL), got {_type_name(image_bytes)}"
        )
    data = bytes(image_bytes)
    return None, data, hashlib.sha256(data).hexdigest()[:16]


def read_manifest(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    stats: ReadStats | None = None,
) -> list[dict]:
    """Read a Parquet (``.parquet``/``.pq``) or JSONL (``.jsonl``/``.ndjson``/``.json``) manifest.

    Columns: ``image`` (a path; relative ones are under ``image_root``, default the manifest's folder) or
    ``image_bytes`` (binary in Parquet, base64 text in JSONL); ``captions`` (list of strings, one row per
    image) or ``caption`` (one string per row; rows naming the same image are grouped, in row order);
    optional ``image_id`` (default: the ``image`` path without its suffix, or a content hash of the
    bytes) and ``split`` (default ``"train"``). Other columns are ignored.

    Args:
        path: the manifest file or URI.
        image_root: folder or URI prefix for relative ``image`` paths.
        stats: filled with what was kept and dropped (null or empty captions are dropped).

    Returns:
        Image records in first-appearance order; caption ids are ``f"{image_id}#{k}"``.
    """
    source = os.fspath(path)
    rows, columns = _manifest_rows(path)
    if not columns & {"image", "image_bytes"} or not columns & {"caption", "captions"}:
        raise DataError(
            f"{source}: a manifest needs an 'image' or 'image_bytes' column and a 'caption' or 'captions' "
            f"column; columns found: {sorted(columns)}"
        )
    if image_root is not None:
        base = os.fspath(image_root)
    elif "://" in source:
        base = source.rsplit("/", 1)[0]
    else:
        base = os.path.dirname(os.path.abspath(source))
    # image_id -> [path, data, split, captions, grouped-by-caption-rows?, where]
    images: dict[str, list] = {}
    for index, row in enumerate(rows):
        where = f"{source}: row {index}"
        image_path, data, default_id = _manifest_image(row, where, base)
        raw_id = row.get("image_id")
        image_id = default_id if raw_id is None else _id_text(raw_id, where, "image_id")
        split = row.get("split")
        split = "train" if split is None else split
        if not isinstance(split, str) or not split:
            raise DataError(f"{where}: 'split' must be a non-empty string, got {_type_name(split)} {split!r:.60}")
        if row.get("captions") is not None and row.get("caption") is not None:
            raise DataError(f"{where}: has both 'caption' and 'captions'; use one")
        if row.get("captions") is not None:
            captions, grouped = _caption_list(row["captions"], where), False
        else:
            caption = row.get("caption")
            if caption is not None and not isinstance(caption, str):
                raise DataError(f"{where}: 'caption' must be a string, got {_type_name(caption)} {caption!r:.60}")
            # A null caption is an empty caption: dropped and counted like one.
            captions, grouped = [caption if caption is not None else ""], True
        entry = images.get(image_id)
        if entry is None:
            images[image_id] = [image_path, data, split, list(captions), grouped, where]
            continue
        if not (grouped and entry[4]):
            raise DataError(f"{source}: duplicate image id {image_id!r} at row {index} (first at {entry[5]}); "
                            "only caption-per-row manifests may repeat an image")
        if (entry[0], entry[1], entry[2]) != (image_path, data, split):
            raise DataError(f"{where}: image id {image_id!r} was first seen at {entry[5]} with a different "
                            "image or split")
        entry[3].extend(captions)
    builder = _RecordBuilder(source)
    for image_id, (image_path, data, split, captions, _, where) in images.items():
        builder.add(image_id, where, captions=captions, caption_ids=None, split=split, path=image_path, data=data)
    return builder.finish(None, stats)


# --------------------------------------------------------------------------------------------------
# WebDataset shards (img2dataset layout)

_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero padding kept) and ``{a,b}`` lists, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        first, last = range_match.groups()
        if int(first) > int(last):
            raise DataError(f"shard pattern {pattern!r}: range {{{body}}} counts down; write it low..high")
        width = len(first) if first.startswith("0") else 0
        options = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise DataError(f"shard pattern {pattern!r}: cannot expand {{{body}}}; use {{000..009}} or {{a,b}}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return list(itertools.chain.from_iterable(_expand_braces(head + option + tail) for option in options))


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard list from paths/URIs, brace patterns (``data-{000..009}.tar``) and local globs (``*.tar``)."""
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    found: list[str] = []
    for pattern in patterns:
        for item in _expand_braces(os.fspath(pattern)):
            if not glob.has_magic(item):
                found.append(item)
                continue
            if "://" in item:
                raise DataError(f"shard pattern {item!r}: glob patterns work only on local paths; "
                                "list object-store shards with a brace pattern like {000..009}")
            matches = sorted(glob.glob(item))
            if not matches:
                raise DataError(f"shard pattern {item!r} matches no files")
            found.extend(matches)
    if not found:
        raise DataError(f"no shards given: {shards!r}")
    return list(dict.fromkeys(found))


def _split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset naming: key = path up to the first dot of the file name, extension = the rest."""
    folder, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None  # hidden files (e.g. macOS ._ forks) and extension-less members are not sample parts
    stem, ext = base.split(".", 1)
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def _shard_samples(shard: str) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} for every regular file in one tar shard."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with open_uri(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            # Streaming mode ("r|"): object-store streams are not seekable, and shards are read once.
            for member in tar:
                parts = _split_member_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                extracted = tar.extractfile(member)
                samples.setdefault(parts[0], {})[parts[1]] = extracted.read() if extracted else b""
    except FileNotFoundError as exc:
        raise DataError(f"{shard}: shard not found") from exc
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{shard}: not a readable tar shard: {exc}") from exc
    return samples


def _sample_caption(key: str, parts: dict[str, bytes], shard: str) -> str | None:
    """The caption of one sample: ``KEY.txt``, else the ``caption`` of ``KEY.json``; None if neither."""
    if "txt" in parts:
        return _decode_utf8(parts["txt"], f"{shard}: member {key}.txt")
    if "json" in parts:
        where = f"{shard}: member {key}.json"
        meta = _parse_json(_decode_utf8(parts["json"], where), where)
        caption = _field(meta, "caption", str, where, required=False)
        return caption
    return None


def read_webdataset(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    split: str = "train",
    *,
    stats: ReadStats | None = None,
) -> list[dict]:
    """Read img2dataset-style WebDataset tar shards into records carrying the image bytes.

    Args:
        shards: a shard path/URI, a brace pattern (``s3://b/data-{00000..00009}.tar``), a local glob, or a
            list of these.
        split: split name given to every image.
        stats: filled with what was kept and dropped (samples without an image or without a caption).

    Returns:
        Records with ``data`` (the ``KEY.jpg``/``.jpeg``/``.png``/``.webp`` bytes), one caption each,
        ``image_id`` = the sample key, caption id ``f"{key}#0"``; shard order, then member order.
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    shard_list = expand_shards(shards)
    described = ", ".join(shard_list) if len(shard_list) <= 3 else f"{shard_list[0]} (+{len(shard_list) - 1} shards)"
    builder = _RecordBuilder(described)
    for shard in shard_list:
        for key, parts in _shard_samples(shard).items():
            image_ext = next((ext for ext in WEBDATASET_IMAGE_EXTS if ext in parts), None)
            caption = _sample_caption(key, parts, shard)
            if image_ext is None or caption is None:
                builder.dropped_images += 1
                continue
            builder.add(key, f"{shard}: {key}.{image_ext}", captions=[caption], caption_ids=None,
                        split=split, data=parts[image_ext])
    return builder.finish(None, stats)


# --------------------------------------------------------------------------------------------------
# dispatch and record utilities

READERS: dict[str, Callable[..., list[dict]]] = {
    "karpathy": read_karpathy,
    "coco": read_coco_captions,
    "manifest": read_manifest,
    "webdataset": read_webdataset,
}


def read_source(kind: str, **kwargs: Any) -> list[dict]:
    """Read a dataset with the reader named ``kind`` (one of `READERS`), passing ``kwargs`` through."""
    reader = READERS.get(kind)
    if reader is None:
        raise ValueError(f"unknown data source kind {kind!r}; allowed: {sorted(READERS)}")
    return reader(**kwargs)


def caption_rows(records: Iterable[dict]) -> list[dict]:
    """Explode image records into caption-level rows ``{"caption_id", "image_id", "caption"}``."""
    rows = []
    for record in records:
        if len(record["captions"]) != len(record["caption_ids"]):
            raise DataError(
                f"record {record['image_id']!r}: {len(record['captions'])} captions but "
                f"{len(record['caption_ids'])} caption ids"
            )
        for caption_id, caption in zip(record["caption_ids"], record["captions"]):
            rows.append({"caption_id": caption_id, "image_id": record["image_id"], "caption": caption})
    return rows


def _image_identity(record: dict) -> list:
    """What pins an image's content cheaply: file name and size, or a hash of inline bytes."""
    if record.get("data") is not None:
        return ["data", hashlib.sha256(record["data"]).hexdigest()]
    path = record["path"]
    try:
        size = uri_size(path)
    except (OSError, ValueError):
        size = None  # a missing image is the decoder's to report; the fingerprint still records it
    # The file name, not the full path: moving a dataset to another mount must not invalidate caches.
    return ["path", PurePosixPath(path.replace("\\", "/")).name, size]


def dataset_fingerprint(records: Iterable[dict]) -> str:
    """A stable sha256 over ids, splits, captions and image identity (file name + size, or bytes hash).

    Record order does not matter (records are sorted by ``image_id``); any caption, id, split or image
    size change gives a different fingerprint.
    """
    digest = hashlib.sha256(b"raydistill-dataset-v1\n")
    for record in sorted(records, key=lambda r: r["image_id"]):
        entry = [
            record["image_id"],
            record["split"],
            list(record["caption_ids"]),
            list(record["captions"]),
            _image_identity(record),
        ]
        digest.update(json.dumps(entry, separators=(",", ":")).encode("ascii"))
        digest.update(b"\n")
    return digest.hexdigest()


__all__ = [
    "DataError",
    "ReadStats",
    "READERS",
    "caption_rows",
    "clean_caption",
    "dataset_fingerprint",
    "expand_shards",
    "read_coco_captions",
    "read_karpathy",
    "read_manifest",
    "read_source",
    "read_webdataset",
    "summarize",
]
