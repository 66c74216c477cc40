"""The image-level row every source becomes, and the checks every reader shares.

A row is one image with all its captions (``IMAGE_ROW_SCHEMA``)::

    {"image_id": str, "path": str | None, "data": bytes | None,
     "captions": list[str], "caption_ids": list[str], "split": str}

Exactly one of ``path`` / ``data`` is set; ``caption_ids`` are unique across the dataset. Rules shared by all
readers:

- captions are cleaned by :func:`clean_caption` (strip, collapse whitespace, so embedded newlines become
  spaces); captions that end up empty are dropped and counted, and an image left with no caption is
  dropped and counted;
- text must be UTF-8: other bytes are a :class:`DataError` naming the file and the byte offset, because
  silently replacing characters would change captions the user never sees;
- a schema problem, a duplicate image id or caption id, an empty result, or a requested split with no
  images is a :class:`DataError` naming the file and the key or record.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from raydistill.data.images import open_uri
from raydistill.errors import UserError
from raydistill.paths import is_uri

logger = logging.getLogger(__name__)

#: The columns of an image-level row, as every source hands them to the pipeline.
IMAGE_ROW_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("path", pa.string()),
    pa.field("data", pa.binary()),
    pa.field("captions", pa.list_(pa.string())),
    pa.field("caption_ids", pa.list_(pa.string())),
    pa.field("split", pa.string()),
])


class DataError(UserError, ValueError):
    """A dataset file that does not match its format; the message names the file and the key or record."""


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


# --------------------------------------------------------------------------------------------------
# text, JSON and files


def read_bytes(path: str | os.PathLike) -> bytes:
    """A whole (small) file's bytes, local or object store.

    Raises:
        DataError: the file does not exist or is a folder.
    """
    try:
        with open_uri(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{os.fspath(path)}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{os.fspath(path)}: is a directory, expected a file") from None


def read_head(path: str | os.PathLike, limit: int) -> bytes:
    """The first ``limit`` bytes of a file, cut back to the last complete line when the file is longer.

    Raises:
        DataError: the file does not exist or is a folder.
    """
    try:
        with open_uri(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise DataError(f"{os.fspath(path)}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{os.fspath(path)}: is a directory, expected a file") from None
    if len(data) > limit:
        data = data[: data.rfind(b"\n", 0, limit) + 1]
    return data


def decode_utf8(data: bytes, where: str, partial: bool = False) -> str:
    """``data`` as UTF-8 text (``partial``: a character cut at the very end is dropped).

    Raises:
        DataError: naming ``where`` and the byte offset of the first invalid byte.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if partial and exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
            return data[: exc.start].decode("utf-8")
        raise DataError(
            f"{where}: not valid UTF-8 at byte {exc.start} ({data[exc.start:exc.start + 4]!r}); "
            "re-encode the file as UTF-8"
        ) from None


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` with a :class:`DataError` naming ``where``, the line and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None


def load_json(path: str | os.PathLike) -> Any:
    """A whole JSON file (UTF-8), with errors that name it."""
    name = os.fspath(path)
    return parse_json(decode_utf8(read_bytes(path), name), name)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def field(obj: Any, key: str, kinds: type | tuple[type, ...], where: str, *, required: bool = True) -> Any:
    """``obj[key]`` checked to be of ``kinds``; ``where`` is "file: images[3]" for the message."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(obj)}")
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing key {key!r} (keys present: {sorted(map(str, obj))})")
        return None
    value = obj[key]
    # bool is an int subclass; an id or count of `true` is a schema error, not 1.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        allowed = " or ".join(k.__name__ for k in _as_tuple(kinds))
        raise DataError(f"{where}: key {key!r} must be {allowed}, got {type_name(value)} {value!r:.60}")
    return value


def id_text(value: Any, where: str, key: str) -> str:
    """An id given as a non-empty string or an integer, as text."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise DataError(
            f"{where}: {key} must be a non-empty string or an integer, got {type_name(value)} {value!r:.60}"
        )
    return str(value)


def check_encodable(text: str, where: str) -> None:
    """Reject lone surrogates: JSON may spell them ("\\ud800"), but they are not text and break UTF-8 later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{where}: invalid Unicode (lone surrogate {text[exc.start]!r} at character {exc.start})"
        ) from None


def join_path(root: str | os.PathLike, *parts: str) -> str:
    """Join path parts under a local folder or an object-store URI prefix."""
    root_text = os.fspath(root)
    if is_uri(root_text):
        return "/".join([root_text.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return os.path.join(root_text, *[p for p in parts if p])


def clean_caption(text: str) -> str:
    """Strip a caption and collapse every run of whitespace (newlines included) to one space."""
    return " ".join(text.split())


def clean_captions(captions: Iterable[str], where: str) -> list[str]:
    """Every caption cleaned; those left empty are dropped."""
    kept = []
    for k, text in enumerate(captions):
        check_encodable(text, f"{where}: caption {k}")
        cleaned = clean_caption(text)
        if cleaned:
            kept.append(cleaned)
    return kept


# --------------------------------------------------------------------------------------------------
# building records


class RecordBuilder:
    """Collects the records of a source read in one process (a JSON file), cleaning captions and rejecting
    duplicate image and caption ids."""

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
        check_encodable(image_id, f"{where}: image id")
        if image_id in self._image_ids:
            raise DataError(f"duplicate image id {image_id!r} at {where} (first seen at {self._image_ids[image_id]})")
        self._image_ids[image_id] = where
        raw = list(captions)
        ids = [None] * len(raw) if caption_ids is None else [str(c) for c in caption_ids]
        kept, kept_ids = [], []
        for k, (text, caption_id) in enumerate(zip(raw, ids)):
            check_encodable(text, f"{where}: caption {k}")
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
        self.records.append({"image_id": image_id, "path": path, "data": data, "captions": kept,
                             "caption_ids": kept_ids, "split": split})

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


# --------------------------------------------------------------------------------------------------
# shard patterns

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
            if is_uri(item):
                raise DataError(f"shard pattern {item!r}: glob patterns work only on local paths; "
                                "list object-store shards with a brace pattern like {000..009}")
            matches = sorted(glob.glob(item))
            if not matches:
                raise DataError(f"shard pattern {item!r} matches no files")
            found.extend(matches)
    if not found:
        raise DataError(f"no shards given: {shards!r}")
    return list(dict.fromkeys(found))
